"""Target speech for the Talker: a record's reply audio decoded at 24 kHz and encoded into codec codes once, in
`prepare`, with the rest of the data cache (data/cache.py keys the cache by the codec's fingerprint, so another
codec prepares the data again). The codec is loaded only when a record has speech and the cache is not valid."""
from __future__ import annotations

from typing import Any

import torch

from omnitune.data.media import MediaError, load_audio
from omnitune.data.schema import Record, RecordError
from omnitune.model.codec import FRAME_SAMPLES, SAMPLE_RATE, SpeechCodec, codec_fingerprint, load_codec
from omnitune.recipe import Recipe


def talker_config(recipe: Recipe):
    """The Talker config of the recipe's checkpoint (config.json only, no weights)."""
    from transformers import AutoConfig

    from omnitune.model.load import resolve_model_path

    return AutoConfig.from_pretrained(resolve_model_path(recipe.model.path)).talker_config


class SpeechTargets:
    """Adds `speech_codes` [frames, codebooks] (int16) and `speaker` to the rendered sample of a record with
    target speech."""

    def __init__(self, recipe: Recipe):
        self.section = recipe.talker
        self.config = talker_config(recipe)
        # the Talker's sequence holds one position per frame: speech longer than data.max_length frames never fits
        self.max_seconds = recipe.data.max_length * FRAME_SAMPLES / SAMPLE_RATE
        self._codec: SpeechCodec | None = None

    @property
    def fingerprint(self) -> str:
        return codec_fingerprint(self.config, self.section)

    def __call__(self, record: Record, sample: dict[str, Any]) -> dict[str, Any]:
        if record.speech is None:
            return sample
        try:
            wav = load_audio(record.speech, self.max_seconds, rate=SAMPLE_RATE)
        except MediaError as e:
            raise RecordError(record.file, record.line, f"target speech: {e}") from None
        if self._codec is None:
            self._codec = load_codec(self.config, self.section)
        codes = self._codec.encode(wav)
        if codes.shape[0] == 0:
            raise RecordError(record.file, record.line, f"target speech {record.speech} is shorter than one codec "
                                                        f"frame ({FRAME_SAMPLES / SAMPLE_RATE * 1000:.0f} ms)")
        out = {**sample, "speech_codes": codes.to(torch.int16)}
        if record.speaker:
            out["speaker"] = record.speaker
        return out
