"""Memory-lean linear + cross-entropy: per-token losses without ever holding the [N, V] logits.

`chunked_linear_cross_entropy(hidden [N, H], weight [V, H], labels [N])` -> per-token loss [N] in fp32, 0 where
labels == ignore_index. Tokens are processed `chunk_size` at a time: the forward keeps only the fp32 log-sum-exp
per token; the backward recomputes each chunk's logits, forms softmax - onehot scaled by the incoming per-token
gradient, and accumulates grad_hidden and (only if the weight needs it) grad_weight in fp32. Peak extra memory is
one [chunk, V] fp32 block instead of [N, V] bf16 logits + [N, V] fp32 upcast + its softmax.
Labels must already be aligned with `hidden` (shift them before calling for causal LM).
"""
from __future__ import annotations

import torch

IGNORE_INDEX = -100


class _ChunkedLinearCE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, labels, chunk_size, ignore_index):
        n = hidden.shape[0]
        lse = torch.empty(n, dtype=torch.float32, device=hidden.device)
        target_logit = torch.zeros(n, dtype=torch.float32, device=hidden.device)
        valid = labels != ignore_index
        safe_labels = torch.where(valid, labels, torch.zeros_like(labels))
        for start in range(0, n, chunk_size):
            end = min(start + chunk_size, n)
            logits = (hidden[start:end] @ weight.T).float()  # [c, V] fp32
            lse[start:end] = torch.logsumexp(logits, dim=-1)
            target_logit[start:end] = logits.gather(1, safe_labels[start:end, None]).squeeze(1)
        loss = torch.where(valid, lse - target_logit, torch.zeros_like(lse))
        ctx.save_for_backward(hidden, weight, safe_labels, valid, lse)
        ctx.chunk_size = chunk_size
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        hidden, weight, labels, valid, lse = ctx.saved_tensors
        chunk_size = ctx.chunk_size
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_hidden = torch.empty_like(hidden) if need_h else None
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        scale = torch.where(valid, grad_loss.float(), torch.zeros_like(lse))
        n = hidden.shape[0]
        for start in range(0, n, chunk_size):
            end = min(start + chunk_size, n)
            logits = (hidden[start:end] @ weight.T).float()
            # d loss / d logits = (softmax - onehot) * g, built in place in the fp32 chunk
            grad_logits = logits.sub_(lse[start:end, None]).exp_()
            grad_logits[torch.arange(end - start, device=hidden.device), labels[start:end]] -= 1.0
            grad_logits.mul_(scale[start:end, None])
            grad_logits = grad_logits.to(hidden.dtype)
            if need_h:
                grad_hidden[start:end] = grad_logits @ weight
            if need_w:
                grad_weight.addmm_(grad_logits.T.float(), hidden[start:end].float())
        if need_w:
            grad_weight = grad_weight.to(weight.dtype)
        return grad_hidden, grad_weight, None, None, None


def chunked_linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    chunk_size: int = 2048,
    ignore_index: int = IGNORE_INDEX,
) -> torch.Tensor:
    """Per-token CE of softmax(hidden @ weight.T) vs labels, fp32, 0 at ignore_index; [N, V] logits never whole."""
    if hidden.dim() != 2 or labels.shape != hidden.shape[:1]:
        raise ValueError(f"expected hidden [N, H] and labels [N], got {tuple(hidden.shape)} and {tuple(labels.shape)}")
    return _ChunkedLinearCE.apply(hidden, weight, labels, chunk_size, ignore_index)


def reference_linear_cross_entropy(
    hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, ignore_index: int = IGNORE_INDEX
) -> torch.Tensor:
    """Plain per-token CE over full fp32 logits (what transformers' ForCausalLMLoss computes before reduction)."""
    logits = (hidden @ weight.T).float()
    return torch.nn.functional.cross_entropy(logits, labels, ignore_index=ignore_index, reduction="none")
