"""Batches for `Qwen3OmniMoeThinkerForConditionalGeneration.forward(**batch)`, plus per-sample loss weights.

Token tensors are right-padded (labels -100 on padding); audio features of all clips in the batch are padded to
the longest clip with `feature_attention_mask` marking real frames; image and video patches are concatenated in
sample order with their grids, which is how the model consumes them.

Sample weight rule: a sample's weight is the mean of the recipe's loss weights of the non-text input modalities
it contains (audio, vision; a video counts as vision, and as audio too when its track is used); a text-only
sample gets the text weight. E.g. with text 1.0 / audio 0.8 / vision 0.9, an audio+image sample weighs 0.85.
The trainer pops `sample_weight` before calling the model and scales each sample's token loss by it.
"""

from __future__ import annotations

from typing import Any, Mapping

import torch

from omnitune.data.render import IGNORE


def sample_weight(modalities, weights: Mapping[str, float]) -> float:
    """The loss weight of a sample with these modalities (see the module docstring)."""
    inputs = [m for m in ("audio", "vision") if m in modalities]
    if not inputs:
        return float(weights["text"])
    return sum(float(weights[m]) for m in inputs) / len(inputs)


class OmniCollator:
    """Pad and concatenate rendered samples into one model batch."""

    def __init__(self, pad_token_id: int, loss_weights: Mapping[str, float] | Any):
        self.pad_token_id = pad_token_id
        if hasattr(loss_weights, "model_dump"):
            loss_weights = loss_weights.model_dump()
        self.weights = dict(loss_weights)

    def __call__(self, samples: list[dict[str, Any]]) -> dict[str, Any]:
        n = max(len(s["input_ids"]) for s in samples)
        ids = torch.full((len(samples), n), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(samples), n), IGNORE, dtype=torch.long)
        mask = torch.zeros((len(samples), n), dtype=torch.long)
        for b, s in enumerate(samples):
            k = len(s["input_ids"])
            ids[b, :k], labels[b, :k], mask[b, :k] = s["input_ids"], s["labels"], s["attention_mask"]
        batch: dict[str, Any] = {"input_ids": ids, "attention_mask": mask, "labels": labels}
        feats = [s for s in samples if "input_features" in s]
        if feats:
            frames = max(s["input_features"].shape[-1] for s in feats)
            bins = feats[0]["input_features"].shape[1]
            clips = sum(s["input_features"].shape[0] for s in feats)
            x = torch.zeros((clips, bins, frames), dtype=feats[0]["input_features"].dtype)
            fmask = torch.zeros((clips, frames), dtype=torch.long)
            c = 0
            for s in feats:
                f, m = s["input_features"], s["feature_attention_mask"]
                x[c:c + f.shape[0], :, :f.shape[-1]] = f
                fmask[c:c + f.shape[0], :m.shape[-1]] = m
                c += f.shape[0]
            batch["input_features"], batch["feature_attention_mask"] = x, fmask
        for key in ("pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw",
                    "video_second_per_grid"):
            parts = [s[key] for s in samples if key in s]
            if parts:
                batch[key] = torch.cat(parts)
        batch["use_audio_in_video"] = any(bool(s.get("use_audio_in_video")) for s in samples)
        batch["sample_weight"] = torch.tensor([sample_weight(s["modalities"], self.weights) for s in samples],
                                              dtype=torch.float32)
        return batch
