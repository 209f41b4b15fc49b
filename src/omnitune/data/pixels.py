"""Pixel values stored as the uint8 levels they came from: a quarter of the bytes, restored bit for bit.

The vision processors resize uint8 frames and then normalise with a fused (x - mean') / std', so every value
is (level - mean') / std' for an integer level. Packing is used only where unpacking reproduces the float32
tensor exactly; anything else stays float32.
"""

from __future__ import annotations

from typing import Any

import torch


def pixel_norms(processor) -> dict[str, tuple[list[float], list[float]]]:
    """Per pixel key, the fused (mean / rescale, std / rescale) per channel the vision processors normalise with."""
    out = {}
    for key, proc in (("pixel_values", getattr(processor, "image_processor", None)),
                      ("pixel_values_videos", getattr(processor, "video_processor", None))):
        if proc is not None and getattr(proc, "image_mean", None) is not None:
            r = getattr(proc, "rescale_factor", None) or 1 / 255
            out[key] = ([m / r for m in proc.image_mean], [d / r for d in proc.image_std])
    return out


def pack_pixels(sample: dict[str, Any], norms: dict[str, tuple[list[float], list[float]]]) -> dict[str, Any]:
    """Replace float32 pixel values by uint8 levels (+ their norm) where unpacking gives them back exactly."""
    for key, (mean, std) in norms.items():
        v = sample.get(key)
        if not isinstance(v, torch.Tensor) or v.dtype != torch.float32 or v.ndim != 2 or v.shape[1] % len(mean):
            continue
        norm = torch.tensor([mean, std], dtype=torch.float32)
        m, d = (norm.repeat_interleave(v.shape[1] // len(mean), dim=1))
        levels = torch.round(v * d + m)
        if levels.min() < 0 or levels.max() > 255:
            continue
        packed = levels.to(torch.uint8)
        if torch.equal((packed.float() - m) / d, v):
            sample = {**sample, key: packed, key + ":norm": norm}
    return sample


def unpack_pixels(sample: dict[str, Any]) -> dict[str, Any]:
    """The float32 pixel values the processor produced, from pack_pixels' uint8 form."""
    keys = [k for k in sample if k.endswith(":norm")]
    if not keys:
        return sample
    out = {k: v for k, v in sample.items() if not k.endswith(":norm")}
    for k in keys:
        key, norm = k[:-len(":norm")], sample[k]
        m, d = norm.repeat_interleave(out[key].shape[1] // norm.shape[1], dim=1)
        out[key] = (out[key].float() - m) / d
    return out
