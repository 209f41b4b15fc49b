"""What a media batch's graphed step would otherwise read back from the GPU, computed by the collator on the host.

Why: the Thinker's forward finds its M-RoPE positions (`get_rope_index`: Python loops over `.tolist()` values) and
checks and scatters its media features with data-dependent shapes; on GPU tensors each of these makes the host
wait for the previous step's kernels, and the host's work after that wait (the rest of the prefix, the graph launch,
clipping, the optimizer) then runs with the GPU idle. The collator holds the token ids on the host anyway, so it
computes here, before the batch is copied: `position_ids` (the same `get_rope_index`, or per sample for a packed
row) and, for a batch carrying stored tower outputs (data/encoder_cache.py), the flat positions of its audio, image
and video tokens (`audio_index`, ...), where train/graphed_step.py writes the outputs with `index_copy_`: the
scatter the forward does, without a read-back.
"""
from __future__ import annotations

from typing import Any

import torch

from omnitune.model.encoded_inputs import INDEX_KEYS, has_encoded
from omnitune.train.objectives import PACKED_KEYS, packed_position_ids


class HostLayout:
    """Called by the collator (`OmniCollator(layout=...)`) on each batch it builds; returns the keys to add."""

    def __init__(self, backbone: torch.nn.Module):
        self.backbone = backbone  # the Thinker's multimodal model (model/parts.py "backbone"): its rope and ids
        cfg = backbone.config
        self.token_ids = {"audio": cfg.audio_token_id, "image": cfg.image_token_id, "video": cfg.video_token_id}

    def __call__(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        if "seq_lengths" in batch:
            out["position_ids"] = packed_position_ids(self.backbone, batch, *[batch[k] for k in PACKED_KEYS])
        elif batch.get("image_grid_thw") is not None or batch.get("video_grid_thw") is not None:
            fmask = batch.get("feature_attention_mask")
            out["position_ids"] = self.backbone.get_rope_index(
                batch["input_ids"], batch.get("image_grid_thw"), batch.get("video_grid_thw"), batch["attention_mask"],
                bool(batch.get("use_audio_in_video")), None if fmask is None else fmask.sum(-1),
                batch.get("video_second_per_grid"))[0]
        if has_encoded(batch):
            flat = batch["input_ids"].reshape(-1)
            for kind, key in zip(("audio", "image", "video"), INDEX_KEYS):
                if batch.get(f"{kind}_embeds") is not None:
                    out[key] = (flat == self.token_ids[kind]).nonzero().squeeze(1)
        return out
