"""Padding-free packing: several samples in one row, each with its own positions, no pad tokens.

`pack_samples(samples)` concatenates samples into a [1, N] row and builds `position_ids` of shape (4, 1, N): row 0
the text positions (0..L_i-1 per sample), rows 1-3 the M-RoPE t/h/w positions (the sample's own (3, L_i) from
`get_rope_index` for media samples, else the text positions). Pass the result to the Thinker WITHOUT an
`attention_mask`: transformers then finds the sample boundaries in row 0 (a position that does not follow its
predecessor starts a new sample) and masks attention block-causally per sample (`find_packed_sequence_indices`),
for sdpa, eager and flex attention alike. That detection runs only without a KV cache: pass `use_cache=False`
(training does; in eval the default cache silently turns the packed row into ONE sequence, checked on 5.23).
The first label of every sample after the first is set to -100, so the shifted loss never trains the last token of
one sample to predict the first of the next.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch

from omnitune.tokens import IGNORE_INDEX


def pack_samples(samples: Sequence[dict], ignore_index: int = IGNORE_INDEX) -> dict[str, torch.Tensor]:
    """samples: dicts with input_ids [L] (+ labels [L], + mrope_position_ids [3, L]) -> one packed batch of 1 row."""
    if not samples:
        raise ValueError("pack_samples needs at least one sample")
    ids, labels, positions, lengths = [], [], [], []
    for i, s in enumerate(samples):
        x = torch.as_tensor(s["input_ids"]).reshape(-1)
        n = x.numel()
        if n == 0:
            raise ValueError(f"sample {i} is empty")
        lab = torch.as_tensor(s["labels"]).reshape(-1).clone() if "labels" in s else x.clone()
        if lab.numel() != n:
            raise ValueError(f"sample {i}: {lab.numel()} labels for {n} input ids")
        if i > 0:
            lab[0] = ignore_index  # the previous sample's last token must not learn to predict this one
        text = torch.arange(n, dtype=torch.long)
        mrope = s.get("mrope_position_ids")
        # get_rope_index gives float positions (video times can be fractional): never truncate them
        mrope = text.expand(3, n) if mrope is None else torch.as_tensor(mrope).reshape(3, n)
        ids.append(x)
        labels.append(lab)
        positions.append(torch.cat([text[None].to(mrope.dtype), mrope], dim=0))
        lengths.append(n)
    return {
        "input_ids": torch.cat(ids)[None],
        "labels": torch.cat(labels)[None],
        "position_ids": torch.cat(positions, dim=1)[:, None, :],  # (4, 1, N)
        "seq_lengths": torch.tensor(lengths),
    }
