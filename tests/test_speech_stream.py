"""Streamed speech: Code2Wav decoded chunk by chunk equals the whole decode; the Talker's frames reach the decoder
as they are generated, so the first audio comes long before the last; `infer --wav` writes that waveform."""

from __future__ import annotations

import numpy as np
import pytest
import soundfile as sf
import torch
from typer.testing import CliRunner

from omnitune.infer import Inferencer
from omnitune.model.speech_stream import StreamingCode2Wav, context_frames
from omnitune.model.tiny import build_tiny_model
from speech_helpers import captured_frames, code2wav_24k, loud, talker_never_stops
from test_infer_fixtures import lora_run_dir  # noqa: F401  (fixture)


SEED = 7  # the tiny Talker samples its frames; this seed speaks for more than one 12-frame piece


def _codes(c2w, frames=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, c2w.config.codebook_size, (c2w.config.num_quantizers, frames), generator=g)


def _stream(c2w, codes, **kw) -> list[np.ndarray]:
    dec = StreamingCode2Wav(c2w, **kw)
    pieces = [p for t in range(codes.shape[-1]) for p in dec.push(codes[:, t])]
    return pieces + [p for p in [dec.flush()] if p is not None]


@pytest.fixture(scope="module", params=["tiny", "24k"])
def c2w(request):
    return loud(build_tiny_model().code2wav) if request.param == "tiny" else code2wav_24k()


@pytest.mark.parametrize("chunk", [1, 4, 12])
def test_chunks_concatenate_to_the_whole_decode(c2w, chunk):
    codes = _codes(c2w)
    with torch.no_grad():
        whole = c2w(codes[None])[0, 0].numpy()
    pieces = _stream(c2w, codes, chunk=chunk)
    assert len(pieces) == -(-codes.shape[-1] // chunk)
    stream = np.concatenate(pieces)
    assert stream.shape == whole.shape
    assert np.abs(stream - whole).max() <= 1e-5 * np.abs(whole).max()


def test_without_the_transformers_left_context_chunks_are_not_exact():
    """The transformer's reach (layers x (window - 1) frames) is needed: with less, each chunk starts wrong."""
    c2w = code2wav_24k()
    attention, conv = context_frames(c2w)
    assert (attention, conv) == (2 * 7, 10)
    codes = _codes(c2w)
    with torch.no_grad():
        whole = c2w(codes[None])[0, 0].numpy()
    short = np.concatenate(_stream(c2w, codes, chunk=5, left_context=0))
    assert short.shape == whole.shape  # no sample is lost or repeated at a boundary, only their values differ
    assert np.abs(short - whole).max() > 1e-2 * np.abs(whole).max()


def test_the_release_needs_568_frames_of_transformer_context():
    from transformers.models.qwen3_omni_moe.configuration_qwen3_omni_moe import Qwen3OmniMoeCode2WavConfig
    from transformers.models.qwen3_omni_moe.modeling_qwen3_omni_moe import Qwen3OmniMoeCode2Wav

    cfg = Qwen3OmniMoeCode2WavConfig(hidden_size=64, num_attention_heads=4, num_key_value_heads=4,
                                     intermediate_size=64, decoder_dim=64)  # the release's depth, windows, rates
    attention, conv = context_frames(Qwen3OmniMoeCode2Wav(cfg))
    assert attention == 8 * 71 and 8 <= conv <= 16


@pytest.fixture(scope="module")
def speaking(lora_run_dir):
    inf = Inferencer(lora_run_dir, speech=True)
    loud(inf.model.code2wav)
    return inf


def test_inferencer_streams_speech_as_the_talker_speaks_and_equals_the_whole_decode(speaking):
    arrivals: list[tuple[int, np.ndarray]] = []  # (frames made so far, piece)
    with captured_frames(speaking.model) as codes, talker_never_stops(speaking.model):
        gen = speaking.generate("Say something.", speaker="chelsie", max_new_tokens=6, max_speech_tokens=41,
                                speech_chunk=8, on_audio=lambda p: arrivals.append((len(codes), p)))
    assert len(codes) == 40 and [n for n, _ in arrivals] == [8, 16, 24, 32, 40]  # each piece as its frames exist
    streamed = np.concatenate([p for _, p in arrivals])
    np.testing.assert_array_equal(streamed, gen.audio)
    with torch.no_grad():
        whole = speaking.model.code2wav(torch.stack(codes, -1)[None])[0, 0].numpy()
    assert gen.audio.shape == whole.shape
    assert np.abs(gen.audio - whole).max() <= 1e-5 * np.abs(whole).max()


def test_infer_cli_writes_the_streamed_waveform(speaking, lora_run_dir, tmp_path, monkeypatch):
    """`infer --wav` grows the file piece by piece; it holds the samples the same generation returns in memory."""
    from omnitune import cli

    monkeypatch.setattr("omnitune.infer.Inferencer", lambda *a, **k: speaking)  # the loaded (loud) model again
    out = tmp_path / "reply.wav"
    torch.manual_seed(SEED)
    res = CliRunner().invoke(cli.app, ["infer", str(lora_run_dir), "--text", "Hi", "--speaker", "ethan",
                                       "--wav", str(out), "--max-new-tokens", "4"])
    assert res.exit_code == 0, res.output
    assert "first audio after" in res.output
    torch.manual_seed(SEED)
    gen = speaking.generate([{"role": "user", "content": [{"type": "text", "text": "Hi"}]}], speaker="ethan",
                            max_new_tokens=4)
    wav, rate = sf.read(str(out), dtype="float32")
    assert rate == 24000 and wav.shape == gen.audio.shape and wav.size > 12 * 8
    assert np.abs(wav - gen.audio).max() <= 1.5 / 32767  # 16-bit rounding


@pytest.mark.slow  # ~40 s: 320 Talker steps on 2 cores
def test_speech_past_300_frames_loses_no_samples(speaking):
    """transformers' own decode (chunked_decode, 300-frame chunks) drops the look-ahead samples at every chunk
    boundary; the waveform generate() now returns is the whole decode, at any length."""
    with captured_frames(speaking.model) as codes, talker_never_stops(speaking.model):
        gen = speaking.generate("Talk.", speaker="aiden", max_new_tokens=2, max_speech_tokens=321)
    frames = torch.stack(codes, -1)[None]
    with torch.no_grad():
        whole = speaking.model.code2wav(frames)[0, 0].numpy()
        theirs = speaking.model.code2wav.chunked_decode(frames, chunk_size=300, left_context_size=25)
    assert frames.shape[-1] == 320 and theirs.shape[-1] < whole.size  # their boundary at frame 300 lost samples
    assert gen.audio.shape == whole.shape
    assert np.abs(gen.audio - whole).max() <= 1e-5 * np.abs(whole).max()
