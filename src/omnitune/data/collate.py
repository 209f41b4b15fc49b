"""Batches for `Qwen3OmniMoeThinkerForConditionalGeneration.forward(**batch)`, plus per-sample loss weights.

Token tensors are right-padded (labels -100 on padding); audio features of all clips in the batch are padded to
the longest clip with `feature_attention_mask` marking real frames; image and video patches are concatenated in
sample order with their grids, which is how the model consumes them.

Sample weight rule: a sample's weight is the mean of the recipe's loss weights of the non-text input modalities
it contains (audio, vision; a video counts as vision, and as audio too when its track is used); a text-only
sample gets the text weight. E.g. with text 1.0 / audio 0.8 / vision 0.9, an audio+image sample weighs 0.85.
The trainer pops `sample_weight` before calling the model and scales each sample's token loss by it.

Packing (`packing=True`, recipe `data.packing`): the samples' unpadded tokens go into ONE row [1, N] (labels as in
data/packing.py: the first label of each later sample is -100), with `seq_lengths` [B] and per-sample media
counts `image_counts` / `video_counts` / `audio_counts` [B] so the trainer can compute each sample's M-RoPE
positions on its own slice; media are concatenated exactly as in a padded batch; `sample_weight` is then per
token, [1, N]. There is no attention_mask: the model masks attention per sample from the positions.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Mapping

import torch

from omnitune.data.packing import pack_samples
from omnitune.model.encoded_inputs import ENCODED_KEYS
from omnitune.tokens import IGNORE_INDEX


def sample_weight(modalities, weights: Mapping[str, float]) -> float:
    """The loss weight of a sample with these modalities (see the module docstring)."""
    inputs = [m for m in ("audio", "vision") if m in modalities]
    if not inputs:
        return float(weights["text"])
    return sum(float(weights[m]) for m in inputs) / len(inputs)


# Python values a training batch carries beside its tensors (`host_counts`), popped before the model sees the batch.
HOST_KEYS = ("trained_tokens", "right_padded")


class OmniCollator:
    """Pad (or, with `packing`, pack) and concatenate rendered samples into one model batch."""

    def __init__(self, pad_token_id: int, loss_weights: Mapping[str, float] | Any = None, packing: bool = False,
                 host_counts: bool = False, layout: Callable[[dict], dict] | None = None):
        """`loss_weights` None: no `sample_weight` (scoring and generation weigh every sample alike).
        `host_counts`: also `trained_tokens` (int) and, for padded batches, `right_padded` (True): what the trainer
        would otherwise read back from the GPU every step (train/graphed_step.py). `layout`: adds what a media
        batch's graphed step would read back (M-RoPE positions, media token positions: train/host_layout.py)."""
        self.pad_token_id = pad_token_id
        if hasattr(loss_weights, "model_dump"):
            loss_weights = loss_weights.model_dump()
        self.weights = None if loss_weights is None else dict(loss_weights)
        self.packing = packing
        self.host_counts = host_counts
        self.layout = layout

    def __call__(self, samples: list[dict[str, Any]]) -> dict[str, Any]:
        batch = self._packed_tokens(samples) if self.packing else self._padded_tokens(samples)
        if self.host_counts:
            batch["trained_tokens"] = int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
            if not self.packing:
                batch["right_padded"] = True  # `_padded_tokens` pads at the end of each row
        batch.update(media_batch(samples))
        if any("speech_codes" in s for s in samples):
            batch.update(speech_batch(samples))
        batch["use_audio_in_video"] = any(bool(s.get("use_audio_in_video")) for s in samples)
        if self.layout is not None:
            batch.update(self.layout(batch))
        if self.weights is None:
            return batch
        weights = torch.tensor([sample_weight(s["modalities"], self.weights) for s in samples], dtype=torch.float32)
        # Packed: one weight per token (its sample's), so train/loss.py weights a packed row per sample.
        batch["sample_weight"] = weights.repeat_interleave(batch["seq_lengths"])[None] if self.packing else weights
        return batch

    def _padded_tokens(self, samples: list[dict[str, Any]]) -> dict[str, Any]:
        n = max(len(s["input_ids"]) for s in samples)
        ids = torch.full((len(samples), n), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(samples), n), IGNORE_INDEX, dtype=torch.long)
        mask = torch.zeros((len(samples), n), dtype=torch.long)
        for b, s in enumerate(samples):
            k = len(s["input_ids"])
            ids[b, :k], labels[b, :k], mask[b, :k] = s["input_ids"], s["labels"], s["attention_mask"]
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}

    @staticmethod
    def _packed_tokens(samples: list[dict[str, Any]]) -> dict[str, Any]:
        """One row [1, N] of all samples' tokens (data/packing.py), plus what splits the media back per sample.

        No position_ids here: M-RoPE positions need the model's `get_rope_index`, so the trainer adds them."""
        packed = pack_samples([{"input_ids": s["input_ids"], "labels": s["labels"]} for s in samples])
        counts = {name: torch.tensor([s[key].shape[0] if key in s else 0 for s in samples])
                  for name, key in (("image_counts", "image_grid_thw"), ("video_counts", "video_grid_thw"),
                                    ("audio_counts", "feature_attention_mask"))}
        return {"input_ids": packed["input_ids"], "labels": packed["labels"], "seq_lengths": packed["seq_lengths"],
                **counts}


def padding_ratio(lengths: list[int], order: list[int], batch_size: int, multiple: int = 1) -> float:
    """The share of a padded batch's tokens that are padding, over batches of `batch_size` samples taken in
    `order`, each padded to its longest sample rounded up to `multiple` (the CUDA-graph bucket)."""
    real = padded = 0
    for i in range(0, len(order), batch_size):
        batch = [lengths[k] for k in order[i:i + batch_size]]
        real += sum(batch)
        padded += len(batch) * -(-max(batch) // multiple) * multiple
    return 1 - real / padded if padded else 0.0


def media_batch(samples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
    """The samples' media in sample order: audio clips padded to the longest (+ frame masks), patches, grids and
    stored tower outputs (data/encoder_cache.py; these keep only the frame masks of their audio) concatenated."""
    batch: dict[str, torch.Tensor] = {}
    clips = [s for s in samples if "feature_attention_mask" in s]
    if clips:
        frames = max(s["feature_attention_mask"].shape[-1] for s in clips)
        n = sum(s["feature_attention_mask"].shape[0] for s in clips)
        fmask = torch.zeros((n, frames), dtype=torch.long)
        feats = [s for s in clips if "input_features" in s]
        if feats:
            bins = feats[0]["input_features"].shape[1]
            x = torch.zeros((n, bins, frames), dtype=feats[0]["input_features"].dtype)
        c = 0
        for s in clips:
            m = s["feature_attention_mask"]
            fmask[c:c + m.shape[0], :m.shape[-1]] = m
            if feats:
                x[c:c + m.shape[0], :, :s["input_features"].shape[-1]] = s["input_features"]
            c += m.shape[0]
        batch["feature_attention_mask"] = fmask
        if feats:
            batch["input_features"] = x
    for key in ("pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw", "video_second_per_grid",
                *ENCODED_KEYS):
        parts = [s[key] for s in samples if key in s]
        if parts:
            batch[key] = torch.cat(parts)
    return batch


def speech_batch(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """Target speech for the Talker (train/objectives.py `TalkerCodec`): `speech_codes` [B, T, G] zero-padded to
    the longest, `speech_frames` [B] each sample's frames, `speakers` each sample's voice name (None: the recipe's)."""
    missing = [i for i, s in enumerate(samples) if "speech_codes" not in s]
    if missing:
        raise ValueError(f"a speech batch holds {len(missing)} sample(s) without target speech")
    frames = torch.tensor([s["speech_codes"].shape[0] for s in samples])
    codes = torch.zeros((len(samples), int(frames.max()), samples[0]["speech_codes"].shape[1]), dtype=torch.long)
    for b, s in enumerate(samples):
        codes[b, :frames[b]] = s["speech_codes"]
    return {"speech_codes": codes, "speech_frames": frames, "speakers": [s.get("speaker") for s in samples]}


def to_device(batch: dict[str, Any], device: torch.device, dtype: torch.dtype) -> dict[str, Any]:
    """Tensors to `device`; media features also to the model's dtype (the processor gives float32)."""
    out = {}
    for k, v in batch.items():
        if isinstance(v, torch.Tensor):
            v = v.to(device)
            if v.is_floating_point() and k in ("input_features", "pixel_values", "pixel_values_videos", *ENCODED_KEYS):
                v = v.to(dtype)
        out[k] = v
    return out
