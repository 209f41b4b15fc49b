"""`omnitune serve` on the tiny model, spoken to by the real `openai` client over HTTP: text, streamed text,
speech (whole and streamed), multi-LoRA, every class of bad request, API keys, concurrent requests."""

from __future__ import annotations

import base64
import io
import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import openai
import pytest
import soundfile as sf
import uvicorn

from omnitune.serve import ServeError, ServeOptions, build_app, parse_adapters
from omnitune.serve.app import create_app
from speech_helpers import loud, talker_never_stops
from test_infer_fixtures import lora_run, media_dir

SPEECH_FRAMES = 30  # --max-speech-tokens: the Talker (which never stops by itself here) speaks 29 frames


class Server:
    """A uvicorn server on a free port of 127.0.0.1, in a thread of the test process."""

    def __init__(self, app):
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert time.monotonic() < deadline and self.thread.is_alive(), "the server did not start"
            time.sleep(0.02)
        self.port = self.server.servers[0].sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"

    def client(self, api_key: str = "none", **kw) -> openai.OpenAI:
        return openai.OpenAI(api_key=api_key, base_url=f"{self.url}/v1", max_retries=0, timeout=120, **kw)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)


@pytest.fixture(scope="module")
def served():
    """The LoRA run served as 'lora-run', a second run's adapter as 'other', local media allowed from one folder."""
    opts = ServeOptions(str(lora_run()), adapters=(f"other={lora_run('other-run', seed=1)}",),
                        allowed_media_dirs=(media_dir(),), max_new_tokens=64, max_speech_tokens=SPEECH_FRAMES,
                        max_prompt_tokens=300, max_request_mb=1, max_queue=8)
    app, engine, models = build_app(opts)
    loud(engine.inferencer.model.code2wav)  # the config's init is near-silent: make waveforms worth comparing
    server = Server(app)
    with talker_never_stops(engine.inferencer.model):
        yield server, engine, models
    server.stop()
    engine.close()


@pytest.fixture(scope="module")
def client(served):
    return served[0].client()


def ask(client, text="Hello there", model="lora-run", **kw):
    return client.chat.completions.create(model=model, messages=[{"role": "user", "content": text}],
                                          max_tokens=kw.pop("max_tokens", 8), **kw)


def data_uri(path, mime) -> str:
    return f"data:{mime};base64," + base64.b64encode(path.read_bytes()).decode()


def test_models_are_the_source_and_each_adapter(served, client):
    assert served[2] == ["lora-run", "other"]
    assert [m.id for m in client.models.list()] == ["lora-run", "other"]


def test_text_reply(client):
    r = ask(client, max_tokens=6)
    msg = r.choices[0].message
    assert msg.role == "assistant" and msg.content and msg.audio is None
    assert r.usage.completion_tokens == 6 and r.usage.prompt_tokens > 5 and r.choices[0].finish_reason == "length"


def test_streamed_text_adds_up_to_the_whole_reply(client):
    whole = ask(client).choices[0].message.content
    chunks = list(ask(client, stream=True, stream_options={"include_usage": True}))
    pieces = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert len(pieces) > 1 and "".join(pieces) == whole
    assert chunks[-1].usage.completion_tokens == 8


def test_speech_reply_is_a_24khz_wav(client):
    r = ask(client, modalities=["text", "audio"], audio={"voice": "Chelsie", "format": "wav"}, seed=0)
    msg = r.choices[0].message
    wav, rate = sf.read(io.BytesIO(base64.b64decode(msg.audio.data)), dtype="float32")
    info = sf.info(io.BytesIO(base64.b64decode(msg.audio.data)))
    assert rate == 24000 and info.channels == 1 and info.subtype == "PCM_16"
    assert wav.size > 20 * 8 and np.isfinite(wav).all() and np.abs(wav).max() > 1e-3
    assert msg.audio.transcript == msg.content and msg.content


def test_streamed_speech_comes_in_pieces_that_add_up_to_the_whole_reply(client):
    kw = dict(modalities=["text", "audio"], seed=0)
    whole = ask(client, audio={"voice": "ethan", "format": "pcm16"}, **kw).choices[0].message
    chunks = list(ask(client, audio={"voice": "ethan", "format": "pcm16"}, stream=True, **kw))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    audio = [base64.b64decode(c.choices[0].delta.audio.data) for c in chunks
             if c.choices and c.choices[0].delta.audio]
    assert len(audio) == -(-(SPEECH_FRAMES - 1) // 12)  # one piece per 12 Talker frames, as they are made
    assert text == whole.content and b"".join(audio) == base64.b64decode(whole.audio.data)


def test_the_model_field_picks_the_adapter(client):
    ours, other, again = (ask(client, model=m, max_tokens=10).choices[0].message.content
                          for m in ("lora-run", "other", "lora-run"))
    assert ours != other and ours == again


def test_image_audio_and_video_in_one_request(client):
    media = media_dir()
    content = [{"type": "image_url", "image_url": {"url": data_uri(media / "i.png", "image/png")}},
               {"type": "input_audio", "input_audio": {"data": base64.b64encode((media / "a.wav").read_bytes())
                                                       .decode(), "format": "wav"}},
               {"type": "video_url", "video_url": {"url": f"file://{media / 'v.mp4'}"}},
               {"type": "text", "text": "What is going on?"}]
    r = client.chat.completions.create(model="other", max_tokens=4, messages=[
        {"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello."}, {"role": "user", "content": content}])
    assert r.choices[0].message.content and r.usage.prompt_tokens > 40
    swapped = [{"type": "image_url", "image_url": {"url": str(media / "i.png")}},  # a plain absolute path
               {"type": "audio_url", "audio_url": {"url": f"file://{media / 'a.wav'}"}},
               {"type": "video_url", "video_url": {"url": data_uri(media / "v.mp4", "video/mp4")}}]
    r2 = client.chat.completions.create(model="other", max_tokens=4, messages=[{"role": "user", "content": swapped}])
    assert r2.choices[0].message.content and r2.usage.prompt_tokens > 40


def _garbage_image():
    url = "data:image/png;base64," + base64.b64encode(b"no png").decode()
    return [{"type": "image_url", "image_url": {"url": url}}]


BAD = {  # what is wrong -> (request changes, status, words the message must contain)
    "unknown voice": (dict(modalities=["text", "audio"], audio={"voice": "alloy", "format": "wav"}), 400,
                      "unknown speaker 'alloy'"),
    "undecodable image": (dict(content=_garbage_image()), 400,
                           "cannot decode image messages[0].content[0] (inline data): cannot identify image file"),
    "bad base64": (dict(content=[{"type": "input_audio", "input_audio": {"data": "%%%", "format": "wav"}}]), 400,
                   "not valid base64"),
    "prompt too long": (dict(content="word " * 400), 400, "over the limit of 300"),
    "max_tokens too large": (dict(max_tokens=100), 400, "over this server's limit of 64"),
    "wrong type": (dict(temperature="hot"), 400, "temperature"),
    "wrong content type": (dict(content=[{"type": "hologram"}]), 400, "unsupported content part type"),
    "file outside the allowed folders": (dict(content=[{"type": "image_url", "image_url": {"url": "file:///etc/passwd"}}]),
                                         403, "outside the allowed folders"),
    "path escaping the allowed folder": (dict(content=[{"type": "image_url", "image_url": {
        "url": str(media_dir() / ".." / ".." / "etc" / "hostname")}}]), 403, "outside the allowed folders"),
    "remote url": (dict(content=[{"type": "image_url", "image_url": {"url": "https://example.com/a.png"}}]), 400,
                   "remote URLs are not fetched"),
    "unknown model": (dict(model="gpt-4o"), 404, "not served here"),
    "streamed speech as wav": (dict(modalities=["text", "audio"], audio={"voice": "ethan", "format": "wav"},
                                    stream=True), 400, "pcm16"),
    "tool role": (dict(messages=[{"role": "tool", "content": "x", "tool_call_id": "1"}]), 400, "role 'tool'"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_requests_get_a_4xx_that_says_what_is_wrong(client, case):
    changes, status, words = BAD[case]
    kw = dict(model="lora-run", max_tokens=4, messages=[{"role": "user", "content": changes.pop("content", "Hi")}])
    kw.update({k: v for k, v in changes.items()})
    with pytest.raises(openai.APIStatusError) as err:
        result = client.chat.completions.create(**kw)
        if kw.get("stream"):
            list(result)
    assert err.value.status_code == status
    assert words in err.value.message and err.value.body["message"]


def test_a_body_over_the_size_limit_is_refused_unread(served):
    import httpx2 as httpx

    body = json.dumps({"model": "lora-run", "messages": [{"role": "user", "content": "x" * (2 << 20)}]})
    r = httpx.post(f"{served[0].url}/v1/chat/completions", content=body, timeout=60)
    assert r.status_code == 413 and "over this server's limit" in r.json()["error"]["message"]
    r = httpx.post(f"{served[0].url}/v1/chat/completions", content=b"{not json", timeout=60)
    assert r.status_code == 400 and "not valid JSON" in r.json()["error"]["message"]


def test_concurrent_requests_all_answer(client):
    want = ask(client, text="One", max_tokens=6).choices[0].message.content
    with ThreadPoolExecutor(4) as pool:
        streamed = pool.submit(lambda: "".join(c.choices[0].delta.content or "" for c in
                                               ask(client, text="One", max_tokens=6, stream=True) if c.choices))
        plain = [pool.submit(ask, client, "One", m, max_tokens=6) for m in ("lora-run", "other", "lora-run")]
        got = [f.result().choices[0].message.content for f in plain]
    assert streamed.result() == want and got[0] == got[2] == want and got[1]


def test_a_client_that_leaves_mid_stream_does_not_stop_the_server(client):
    stream = ask(client, max_tokens=60, stream=True)
    next(iter(stream))
    stream.close()
    assert ask(client, max_tokens=3).choices[0].message.content


def test_a_failure_inside_generation_is_a_500_and_the_server_goes_on(served, client):
    def fault(*_):
        raise RuntimeError("simulated device fault")

    hook = served[1].inferencer.thinker.register_forward_pre_hook(fault)
    try:
        with pytest.raises(openai.InternalServerError, match="RuntimeError: simulated device fault"):
            ask(client, max_tokens=2)
    finally:
        hook.remove()
    assert ask(client, max_tokens=2).choices[0].message.content


def test_api_key_is_required_when_set(served):
    _, engine, models = served
    secured = Server(create_app(engine, {m: None for m in models[:1]}, api_key="s3cret"))
    try:
        with pytest.raises(openai.AuthenticationError, match="API key"):
            secured.client("wrong").models.list()
        assert [m.id for m in secured.client("s3cret").models.list()] == ["lora-run"]
    finally:
        secured.stop()


def test_adapter_options_are_checked_before_loading(tmp_path):
    assert parse_adapters(["a=runs/a", "b.2=runs/b"]) == {"a": "runs/a", "b.2": "runs/b"}
    for bad, words in ((["noequals"], "NAME=RUN_DIR"), (["a=x", "a=y"], "given twice"), (["a b=x"], "a name is")):
        with pytest.raises(ServeError, match=words):
            parse_adapters(bad)
    with pytest.raises(ServeError, match="already the name"):
        build_app(ServeOptions(str(lora_run()), adapters=("lora-run=x",)))


@pytest.mark.slow  # a fresh process imports torch and loads the model: ~30 s on 2 cores
def test_the_serve_command_answers_over_http():
    import os
    import socket
    import subprocess
    import sys

    import httpx2 as httpx

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "omnitune", "serve", str(lora_run()), "--port", str(port),
                             "--no-speech", "--api-key", "k3y", "--name", "mine"], env=dict(os.environ),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 240
        while True:
            assert proc.poll() is None, proc.stdout.read()[-3000:]
            assert time.monotonic() < deadline, "omnitune serve did not come up"
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.5)
        client = openai.OpenAI(api_key="k3y", base_url=f"http://127.0.0.1:{port}/v1", max_retries=0, timeout=120)
        assert [m.id for m in client.models.list()] == ["mine"]
        assert ask(client, model="mine", max_tokens=3).choices[0].message.content
        with pytest.raises(openai.BadRequestError, match="speaks no audio"):
            ask(client, model="mine", modalities=["text", "audio"], audio={"voice": "ethan", "format": "wav"})
    finally:
        proc.terminate()
        out = proc.communicate(timeout=60)[0]
    assert f"serving mine on http://127.0.0.1:{port}/v1 (text only; API key required)" in " ".join(out.split())


def test_text_only_inferencer_switches_adapters_and_refuses_what_cannot_be_one():
    from omnitune.infer import InferError, Inferencer
    from omnitune.model.source import SourceError
    from test_infer_fixtures import full_run

    inf = Inferencer(lora_run(), speech=False, adapters={"other": lora_run("other-run", seed=1)})
    merged = Inferencer(lora_run(), speech=False).generate("Hello there", max_new_tokens=8).text
    assert inf.adapters == ["other"]
    assert inf.generate("Hello there", max_new_tokens=8).text == merged  # the run's own LoRA, unmerged
    assert inf.generate("Hello there", max_new_tokens=8, adapter="other").text != merged
    with pytest.raises(InferError, match="unknown adapter 'nope'; loaded: other"):
        inf.generate("Hello there", adapter="nope")
    with pytest.raises(SourceError, match="full fine-tune"):
        Inferencer(lora_run(), speech=False, adapters={"full": full_run()})
