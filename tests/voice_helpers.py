"""Voice-training data for tests: conversations whose last assistant turn carries its speech as a wav file."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import soundfile as sf

ANSWERS = ["The weather is sunny today.", "I like green apples.", "Seven plus two is nine.",
           "The train leaves at noon.", "Cats sleep a lot.", "Rivers run to the sea."]


def write_voice_data(folder: Path, n: int = 4, seconds: float = 0.6, speaker: str | None = None,
                     rate: int = 16000, seed: int = 0, name: str = "voice.jsonl") -> Path:
    """n records, each a text question and an answer with a `seconds`-long speech file (tones with noise) at
    `rate` Hz (resampled to 24 kHz by prepare)."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    lines = []
    for i in range(n):
        t = np.arange(int(seconds * rate)) / rate
        wav = 0.3 * np.sin(2 * np.pi * (180 + 40 * i) * t) + 0.02 * rng.standard_normal(t.size)
        sf.write(folder / f"reply{i}.wav", wav.astype(np.float32), rate)
        record = {"conversations": [
            {"role": "user", "content": f"Tell me fact number {i}."},
            {"role": "assistant", "content": [{"type": "text", "text": ANSWERS[i % len(ANSWERS)]},
                                              {"type": "audio", "audio": f"reply{i}.wav"}]}]}
        if speaker:
            record["speaker"] = speaker
        lines.append(json.dumps(record))
    path = folder / name
    path.write_text("\n".join(lines) + "\n")
    return path


class FrameIndexCodec:
    """A made-up codec plugged in as talker.codec=voice_helpers:FrameIndexCodec: frame j's codes are all j."""

    sample_rate = 24000

    def __init__(self, talker_config, section):
        self.num_codebooks = talker_config.num_code_groups
        self.codebook_size = talker_config.code_predictor_config.vocab_size

    def encode(self, wav):
        import torch

        frames = -(-len(wav) // 1920)
        return (torch.arange(frames) % self.codebook_size)[:, None].expand(-1, self.num_codebooks).clone()
