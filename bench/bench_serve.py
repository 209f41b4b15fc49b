"""What `omnitune serve` delivers on a GPU: the real server (FastAPI app, request queue, Inferencer, streamed
Code2Wav) on 127.0.0.1, spoken to by the real `openai` client, over a Qwen3-Omni at the real widths with random
weights built on the device (Thinker, Talker and Code2Wav; bench/common.py's Thinker config, the release's Talker
and Code2Wav configs; depths adjustable).

The only difference from `omnitune serve RUN` is where the weights come from: the model is built on the GPU and
handed to `Inferencer(model=...)`; the tiny checkpoint lends its processor (the real tokenizer). Random weights
would end speech at random, so the Talker's end-of-speech logit is held at -inf: every spoken reply lasts exactly
`--speech-frames` frames (12.5 a second). The Thinker's text rarely ends early (random logits over 152k tokens).

Measured (each a median over `--repeats` requests, after one warm-up request of each kind):
- text, streamed: time to first token (TTFT) for a `--prompt-words` prompt, then decode tokens/s;
- speech, streamed (pcm16): time to first audio piece (from the request, and from the last text piece: the Talker
  starts when the Thinker ends), and the speech real-time factor: Talker + Code2Wav seconds / audio seconds;
- text, N concurrent non-streamed requests (`--concurrency 1,8`): total completion tokens / wall time, latencies.
Prints a table, writes $OUT/bench_serve.json.

Usage: `bash bench/fetch_wheels.sh` here (the server's and client's wheels are among them), carry .wheels, then on
the GPU machine: source bench/gpu_env.sh && python3 bench/bench_serve.py [--thinker-layers 48 --talker-layers 20]
(defaults: the release's depths; ~70 GB of weights; a few minutes).
BENCH_DEVICE=cpu BENCH_TINY=1 dry-runs the same code on a CPU at tiny widths (tests/test_bench.py).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from common import build_on_device, thinker_config

DEVICE = os.environ.get("BENCH_DEVICE", "cuda")
TINY = bool(os.environ.get("BENCH_TINY"))
SPEECH_RATE = 24000
# The release's Talker (QWEN3_OMNI_NOTES.md: 20 layers, hidden 1024, 128 experts top-6 + shared expert) and code
# predictor (5 layers, 15 residual codebooks of 2048); BENCH_TINY shrinks the widths.
TALKER = dict(hidden_size=1024, intermediate_size=2048, num_attention_heads=16, num_key_value_heads=2, head_dim=128,
              num_experts=128, num_experts_per_tok=6, moe_intermediate_size=384,
              shared_expert_intermediate_size=768)
PREDICTOR = dict(hidden_size=1024, intermediate_size=3072, num_hidden_layers=5, num_attention_heads=16,
                 num_key_value_heads=8, head_dim=128)
CODE2WAV: dict = {}  # the transformers defaults are the release's Code2Wav
if TINY:
    TALKER.update(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                  num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, shared_expert_intermediate_size=64)
    PREDICTOR.update(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
                     num_key_value_heads=2, head_dim=16)
    CODE2WAV.update(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=4,
                    num_hidden_layers=2, decoder_dim=96)


def full_config(thinker_layers: int, talker_layers: int):
    """Qwen3OmniMoeConfig at the real widths (or tiny), the release's token and codec ids."""
    from transformers import Qwen3OmniMoeConfig

    thinker = thinker_config(thinker_layers).to_dict()
    hidden = thinker["text_config"]["hidden_size"]
    talker = dict(
        text_config=dict(vocab_size=3072, num_hidden_layers=talker_layers, norm_topk_prob=True,
                         max_position_embeddings=65536, rms_norm_eps=1e-6, **TALKER,
                         rope_parameters=dict(rope_type="default", rope_theta=1e6, interleaved=True,
                                              mrope_section=[24, 20, 20] if not TINY else [4, 2, 2])),
        code_predictor_config=dict(vocab_size=2048, num_code_groups=16, rms_norm_eps=1e-6, **PREDICTOR,
                                   rope_parameters=dict(rope_type="default", rope_theta=1e6)),
        num_code_groups=16, thinker_hidden_size=hidden, accept_hidden_layer=min(24, thinker_layers),
        codec_pad_id=2148, codec_bos_id=2149, codec_eos_token_id=2150, codec_nothink_id=2155,
        codec_think_bos_id=2156, codec_think_eos_id=2157, speaker_id={"chelsie": 2301, "ethan": 2302, "aiden": 2303},
        audio_token_id=151675, image_token_id=151655, video_token_id=151656, vision_start_token_id=151652,
        audio_start_token_id=151669, position_id_per_seconds=13, spatial_merge_size=2)
    return Qwen3OmniMoeConfig(
        thinker_config=thinker, talker_config=talker, code2wav_config=dict(CODE2WAV), enable_audio_output=True,
        im_start_token_id=151644, im_end_token_id=151645, tts_pad_token_id=151671, tts_bos_token_id=151672,
        tts_eos_token_id=151673, system_token_id=8948, user_token_id=872, assistant_token_id=77091)


def build_model(thinker_layers: int, talker_layers: int):
    from transformers import Qwen3OmniMoeForConditionalGeneration

    dtype = torch.bfloat16 if DEVICE == "cuda" else torch.float32
    model = build_on_device(Qwen3OmniMoeForConditionalGeneration, full_config(thinker_layers, talker_layers), DEVICE,
                            dtype)
    eos = model.config.talker_config.codec_eos_token_id

    def no_end(module, args, out):  # random weights end speech at random: hold every reply to --speech-frames
        out[..., eos] = float("-inf")
        return out

    model.talker.codec_head.register_forward_hook(no_end)
    return model.eval()


class Server:
    """The app on a free port of 127.0.0.1, served by uvicorn in a thread of this process."""

    def __init__(self, app):
        import uvicorn

        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        while not self.server.started:
            if not self.thread.is_alive():
                raise RuntimeError("the server did not start")
            time.sleep(0.05)
        self.url = f"http://127.0.0.1:{self.server.servers[0].sockets[0].getsockname()[1]}/v1"

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=60)


def prompt(words: int) -> list[dict]:
    text = " ".join(["word"] * words)
    return [{"role": "user", "content": f"Summarise: {text}"}]


def streamed_text(client, words: int, tokens: int) -> dict:
    start = time.perf_counter()
    stamps = []
    stream = client.chat.completions.create(model="bench", messages=prompt(words), max_tokens=tokens, stream=True,
                                            stream_options={"include_usage": True})
    used = None
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            stamps.append(time.perf_counter() - start)
        if chunk.usage:
            used = chunk.usage
    n = used.completion_tokens if used else len(stamps)
    decode = (n - 1) / (stamps[-1] - stamps[0]) if len(stamps) > 1 and stamps[-1] > stamps[0] else float("nan")
    return dict(ttft_s=stamps[0], total_s=stamps[-1], tokens=n, prompt_tokens=used.prompt_tokens if used else None,
                decode_tok_s=decode)


def streamed_speech(client, words: int, tokens: int) -> dict:
    import base64

    start = time.perf_counter()
    text_at, audio_at, samples = [], [], 0
    stream = client.chat.completions.create(model="bench", messages=prompt(words), max_tokens=tokens, stream=True,
                                            modalities=["text", "audio"], audio={"voice": "ethan", "format": "pcm16"})
    for chunk in stream:
        if not chunk.choices:
            continue
        delta = chunk.choices[0].delta
        if delta.content:
            text_at.append(time.perf_counter() - start)
        if delta.audio:
            audio_at.append(time.perf_counter() - start)
            samples += len(base64.b64decode(delta.audio.data)) // 2
    seconds = samples / SPEECH_RATE
    return dict(first_text_s=text_at[0], text_done_s=text_at[-1], first_audio_s=audio_at[0],
                first_audio_after_text_s=audio_at[0] - text_at[-1], last_audio_s=audio_at[-1], audio_s=seconds,
                pieces=len(audio_at), rtf=(audio_at[-1] - text_at[-1]) / seconds)


def concurrent_text(client, n: int, words: int, tokens: int) -> dict:
    def one(_):
        t = time.perf_counter()
        r = client.chat.completions.create(model="bench", messages=prompt(words), max_tokens=tokens)
        return time.perf_counter() - t, r.usage.completion_tokens

    start = time.perf_counter()
    with ThreadPoolExecutor(n) as pool:
        results = list(pool.map(one, range(n)))
    wall = time.perf_counter() - start
    latencies = [lat for lat, _ in results]
    total = sum(tok for _, tok in results)
    return dict(requests=n, wall_s=wall, tokens=total, tok_s=total / wall, mean_latency_s=statistics.mean(latencies),
                max_latency_s=max(latencies))


def median_of(rows: list[dict]) -> dict:
    return {k: statistics.median(r[k] for r in rows) if isinstance(rows[0][k], (int, float)) else rows[0][k]
            for k in rows[0] if rows[0][k] is not None}


def table(res: dict) -> str:
    t, s = res["text"], res["speech"]
    lines = ["| measure | value |", "|---|---|",
             f"| text: time to first token ({t['prompt_tokens']} prompt tokens) | {t['ttft_s'] * 1e3:.0f} ms |",
             f"| text: decode, 1 request streamed | {t['decode_tok_s']:.1f} tok/s |",
             f"| speech: time to first audio piece (from the request) | {s['first_audio_s'] * 1e3:.0f} ms |",
             f"| speech: time to first audio piece (after the last text piece) | "
             f"{s['first_audio_after_text_s'] * 1e3:.0f} ms |",
             f"| speech: real-time factor (Talker + Code2Wav s / audio s; {s['audio_s']:.1f} s of audio) | "
             f"{s['rtf']:.2f} |"]
    for c in res["concurrency"]:
        lines.append(f"| text: {c['requests']} concurrent requests x {c['tokens'] // c['requests']} tokens | "
                     f"{c['tok_s']:.1f} tok/s total, mean latency {c['mean_latency_s']:.1f} s |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--thinker-layers", type=int, default=2 if TINY else 48)
    ap.add_argument("--talker-layers", type=int, default=2 if TINY else 20)
    ap.add_argument("--prompt-words", type=int, default=16 if TINY else 500)
    ap.add_argument("--text-tokens", type=int, default=8 if TINY else 128)
    ap.add_argument("--speech-text-tokens", type=int, default=6 if TINY else 32)
    ap.add_argument("--speech-frames", type=int, default=30 if TINY else 125, help="12.5 frames per second of audio")
    ap.add_argument("--concurrency", default="1,8")
    ap.add_argument("--repeats", type=int, default=1 if TINY else 3)
    args = ap.parse_args()

    import openai

    from omnitune.infer import Inferencer
    from omnitune.serve.app import Limits, create_app
    from omnitune.serve.engine import Engine

    t0 = time.perf_counter()
    model = build_model(args.thinker_layers, args.talker_layers)
    inf = Inferencer("tiny", model=model, speech=True, device=DEVICE)  # the tiny checkpoint lends its processor
    build_s = time.perf_counter() - t0
    engine = Engine(inf, max_queue=64)
    limits = Limits(max_new_tokens=max(args.text_tokens, args.speech_text_tokens),
                    max_speech_tokens=args.speech_frames + 1)  # the last frame sampled gets no residual codes
    server = Server(create_app(engine, {"bench": None}, limits))
    client = openai.OpenAI(api_key="none", base_url=server.url, max_retries=0, timeout=3600)
    try:
        streamed_text(client, args.prompt_words, 4)  # warm-up: first CUDA kernels, allocator, tokenizer
        streamed_speech(client, 8, 2)
        res = dict(
            device=torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu", build_s=build_s,
            config=dict(thinker_layers=args.thinker_layers, talker_layers=args.talker_layers, tiny=TINY,
                        prompt_words=args.prompt_words, text_tokens=args.text_tokens,
                        speech_text_tokens=args.speech_text_tokens, speech_frames=args.speech_frames),
            text=median_of([streamed_text(client, args.prompt_words, args.text_tokens) for _ in range(args.repeats)]),
            speech=median_of([streamed_speech(client, args.prompt_words, args.speech_text_tokens)
                              for _ in range(args.repeats)]),
            concurrency=[concurrent_text(client, int(n), args.prompt_words, args.text_tokens)
                         for n in args.concurrency.split(",")])
        if DEVICE == "cuda":
            res["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
    finally:
        server.stop()
        engine.close()
    print(table(res))
    out = Path(os.environ.get("OUT", "."))
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench_serve.json").write_text(json.dumps(res, indent=2))
    print(f"wrote {out / 'bench_serve.json'}", file=sys.stderr)


if __name__ == "__main__":
    main()
