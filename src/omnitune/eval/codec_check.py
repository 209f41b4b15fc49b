"""`omnitune codec-check AUDIO...`: which speech codec matches a checkpoint, before any voice training.

No official audio -> codes encoder was released with Qwen3-Omni (model/codec.py), so target codes come from an
encoder whose codes the checkpoint's Talker and Code2Wav may or may not speak. For each audio file and codec:
encode (24 kHz) -> the checkpoint's Code2Wav decodes the codes back -> objective scores of the round trip (log-mel
L1 distance, SI-SDR in dB; only meaningful with real weights, NaN where Code2Wav does not make 24 kHz audio), and
the checkpoint's Talker's teacher-forced codec CE on the codes (codebook 0 per frame), conditioned on the file's
transcript (`--text`; without one a neutral sentence, which keeps the CE comparable between codecs but not an
absolute score). The encoder the checkpoint was trained with gives a much lower CE and a cleaner round trip.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from omnitune.data.collate import OmniCollator, to_device
from omnitune.data.media import load_audio
from omnitune.data.render import render
from omnitune.data.schema import validate_record
from omnitune.model import parts
from omnitune.model.codec import FRAME_SAMPLES, SAMPLE_RATE, load_codec
from omnitune.model.source import load_generation_processor, load_model, resolve_source
from omnitune.recipe import TalkerConfig
from omnitune.tokens import pad_id
from omnitune.train.objectives import TalkerCodec

NEUTRAL_TEXT = "Hello, this is a short test of my voice."


def log_mel(wav: np.ndarray, rate: int = SAMPLE_RATE, n_fft: int = 1024, hop: int = 256,
            mels: int = 80) -> torch.Tensor:
    """[frames, mels] natural-log mel spectrogram (Slaney mel scale), the usual basis of a vocoder's mel loss."""
    from transformers.audio_utils import mel_filter_bank

    x = torch.as_tensor(wav, dtype=torch.float32)
    spec = torch.stft(x, n_fft, hop, window=torch.hann_window(n_fft), return_complex=True).abs().T
    bank = torch.as_tensor(mel_filter_bank(n_fft // 2 + 1, mels, 0.0, rate / 2, rate, norm="slaney",
                                           mel_scale="slaney"), dtype=torch.float32)
    return torch.log(spec @ bank + 1e-5)


def mel_distance(reference: np.ndarray, estimate: np.ndarray) -> float:
    """Mean absolute difference of the two log-mel spectrograms over their common frames (0 = identical)."""
    a, b = log_mel(reference), log_mel(estimate)
    n = min(len(a), len(b))
    return float((a[:n] - b[:n]).abs().mean())


def si_sdr(reference: np.ndarray, estimate: np.ndarray) -> float:
    """Scale-invariant signal-to-distortion ratio in dB over the common length (higher is better)."""
    n = min(len(reference), len(estimate))
    ref = reference[:n].astype(np.float64) - reference[:n].mean()
    est = estimate[:n].astype(np.float64) - estimate[:n].mean()
    target = (est @ ref) / max(ref @ ref, 1e-12) * ref
    return float(10 * np.log10(max(target @ target, 1e-12) / max((est - target) @ (est - target), 1e-12)))


@torch.no_grad()
def codec_check(source: str, audio: list[Path], codecs: list[str], codec_path: str | None = None,
                texts: list[str] | None = None, speaker: str = "ethan") -> list[dict]:
    """One row per (codec, file): frames, mel distance, SI-SDR and the Talker's codec CE (module docstring)."""
    src = resolve_source(source)
    model = load_model(src, speech=True, device_map={"": 0} if torch.cuda.is_available() else None)
    processor = load_generation_processor(src)
    thinker = parts.thinker_of(model)
    device = next(thinker.parameters()).device
    table = dict(model.config.talker_config.speaker_id)
    objective = TalkerCodec(table, speaker.lower())
    collate = OmniCollator(pad_id(processor.tokenizer))
    rows = []
    for name in codecs:
        section = TalkerConfig(**{**src.talker.model_dump(), "codec": name,
                                  "codec_path": codec_path if codec_path else src.talker.codec_path})
        codec = load_codec(model.config.talker_config, section)
        for i, path in enumerate(audio):
            wav = load_audio(path, rate=SAMPLE_RATE)
            codes = codec.encode(wav)
            decoded = model.code2wav.chunked_decode(codes.T[None].to(device), chunk_size=300, left_context_size=25)
            decoded = decoded.reshape(-1).float().cpu().numpy()
            text = texts[i] if texts and i < len(texts) else NEUTRAL_TEXT
            record = validate_record({"conversations": [{"role": "user", "content": "Please say something."},
                                                        {"role": "assistant", "content": text}]}, "<codec-check>", 0)
            sample = {**render(processor, record, src.data), "speech_codes": codes}
            batch = to_device(collate([sample]), device, thinker.dtype)
            ce0, _ = objective.sums(model, batch)
            # a Code2Wav that does not upsample a frame to 1920 samples (the tiny model's) makes no 24 kHz speech
            real_rate = abs(len(decoded) - len(codes) * FRAME_SAMPLES) <= FRAME_SAMPLES
            rows.append({"codec": name, "file": str(path), "frames": len(codes),
                         "mel_distance": mel_distance(wav, decoded) if real_rate else float("nan"),
                         "si_sdr_db": si_sdr(wav, decoded) if real_rate else float("nan"),
                         "codec_ce": float(ce0) / (len(codes) + 1), "transcript": text != NEUTRAL_TEXT})
    return rows
