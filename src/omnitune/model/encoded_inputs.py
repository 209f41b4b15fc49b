"""Stored tower outputs (data/encoder_cache.py) as the Thinker's forward takes them: the towers never run.

The Thinker's forward accepts precomputed vision outputs (`mm_encoder_outputs`, transformers' own hook, which also
merges the deepstack features of images and video), but has no such hook for audio: the audio tower's outputs are
merged into the token embeddings here (`inputs_embeds`), exactly as the forward merges them, and the audio frame
masks stay in the batch for the M-RoPE positions of audio inside video.
"""
from __future__ import annotations

from typing import Any

import torch
from transformers.models.qwen3_omni_moe.modeling_qwen3_omni_moe import BaseModelOutputWithDeepstackFeatures

# per sample: [tokens, H] outputs, and [tokens, deepstack layers, H] for the vision deepstack features
ENCODED_KEYS = ("audio_embeds", "image_embeds", "image_deepstack", "video_embeds", "video_deepstack")
# per batch, when the collator adds them (train/host_layout.py): where each modality's tokens are, flat
INDEX_KEYS = ("audio_index", "image_index", "video_index")


def has_encoded(batch: dict[str, Any]) -> bool:
    return any(batch.get(k) is not None for k in ENCODED_KEYS)


def forward_inputs(backbone: torch.nn.Module, batch: dict[str, Any]) -> dict[str, Any]:
    """`batch` as kwargs of the Thinker backbone's forward (model/parts.py "backbone"): stored tower outputs become
    `inputs_embeds` (audio merged) and `mm_encoder_outputs` (images, video); a batch without them is returned as is."""
    if not has_encoded(batch):
        return batch
    out = {k: v for k, v in batch.items() if k not in ENCODED_KEYS and k not in INDEX_KEYS}
    ids = batch["input_ids"]
    embeds = backbone.get_input_embeddings()(ids)
    audio = batch.get("audio_embeds")
    if audio is not None:
        mask = (ids == backbone.config.audio_token_id).unsqueeze(-1)
        embeds = embeds.masked_scatter(mask, audio.to(embeds.device, embeds.dtype))
    outputs = {}
    for kind in ("image", "video"):
        if batch.get(f"{kind}_embeds") is not None:
            deep = batch[f"{kind}_deepstack"]
            outputs[kind] = BaseModelOutputWithDeepstackFeatures(
                pooler_output=(batch[f"{kind}_embeds"],),
                deepstack_features=[(deep[:, j],) for j in range(deep.shape[1])])
    out["inputs_embeds"] = embeds
    if outputs:
        out["mm_encoder_outputs"] = outputs
    return out
