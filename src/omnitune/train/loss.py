"""The training loss: per-sample modality-weighted token cross-entropy plus the MoE router balance loss.

loss = sum_i w_i * sum_t CE(i, t) / N, where w_i is the sample's modality weight (data/collate.py) and N the
number of trained tokens in the whole optimizer step (all micro-batches of the gradient accumulation). So
uniform weights give exactly the mean token CE, and a weight of 0.8 makes that sample's tokens count 0.8x.

The [tokens x vocab] logits are never held whole: the head and the fp32 cross-entropy run chunk by chunk and
are recomputed chunk by chunk in backward.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from omnitune.kernels.loss import chunked_linear_cross_entropy
from omnitune.tokens import IGNORE_INDEX


def _chunk_ce(head: nn.Module, hidden: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    logits = head(hidden).float()
    return F.cross_entropy(logits, labels, ignore_index=IGNORE_INDEX, reduction="none")


def token_losses(hidden: torch.Tensor, head: nn.Module, labels: torch.Tensor, chunk: int = 2048,
                 fused: bool = True) -> torch.Tensor:
    """Per-token CE of next-token prediction: hidden [B, L, H], labels [B, L] -> losses [B, L-1] (0 where masked).

    A plain nn.Linear head goes through the fused chunked kernel (kernels/loss.py: one pass over the vocabulary
    when the head is frozen); an adapted head (LoRA, modules_to_save) runs as a module, chunk by chunk. `fused`
    False: the plain path, full fp32 logits over every position, as transformers' own loss computes them."""
    if not fused:
        logits = head(hidden[:, :-1]).float()
        y = labels[:, 1:].to(logits.device)
        return F.cross_entropy(logits.transpose(1, 2), y, ignore_index=IGNORE_INDEX, reduction="none")
    h = hidden[:, :-1].reshape(-1, hidden.shape[-1])
    y = labels[:, 1:].reshape(-1).to(h.device)
    keep = (y != IGNORE_INDEX).nonzero(as_tuple=True)[0]  # only trained positions reach the vocab projection
    out = torch.zeros(y.shape, dtype=torch.float32, device=h.device)
    if keep.numel():
        hk, yk = h.index_select(0, keep), y.index_select(0, keep)
        if type(head) is nn.Linear and head.bias is None:
            losses = chunked_linear_cross_entropy(hk, head.weight, yk, chunk_size=chunk)
        else:
            parts = []
            for s in range(0, hk.shape[0], chunk):
                args = (head, hk[s:s + chunk], yk[s:s + chunk])
                parts.append(checkpoint(_chunk_ce, *args, use_reentrant=False) if torch.is_grad_enabled()
                             else _chunk_ce(*args))
            losses = torch.cat(parts)
        out = out.index_put((keep,), losses)
    return out.view(labels.shape[0], -1)


def trained_logits(hidden: torch.Tensor, head: nn.Module, labels: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """fp32 logits at the trained next-token positions only: (logits [n, V], targets [n], row of each [n]).
    For scoring (argmax, CE) without [B, L, V] logits."""
    y = labels[:, 1:].to(hidden.device)
    rows, cols = (y != IGNORE_INDEX).nonzero(as_tuple=True)
    return head(hidden[:, :-1][rows, cols]).float(), y[rows, cols], rows


def weighted_loss(losses: torch.Tensor, labels: torch.Tensor, sample_weight: torch.Tensor | None,
                  num_items: int | torch.Tensor | None) -> torch.Tensor:
    """sum_i w_i sum_t CE / N, N = trained tokens in the optimizer step (or in this batch when not given).

    sample_weight: [B], one per row (padded batch), or [B, L], one per token like labels (a packed row, where each
    token carries its own sample's weight)."""
    if sample_weight is not None:
        w = sample_weight.to(losses)
        losses = losses * (w[:, None] if w.dim() == 1 else w[:, 1:])  # the weight of the predicted token's sample
    n = num_items if num_items is not None else (labels[:, 1:] != IGNORE_INDEX).sum()
    return losses.sum() / torch.as_tensor(n, device=losses.device).clamp(min=1)
