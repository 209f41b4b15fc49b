"""Memory-lean linear + cross-entropy: per-token losses without ever holding the [N, V] logits.

`chunked_linear_cross_entropy(hidden [N, H], weight [V, H], labels [N])` -> per-token loss [N] in fp32, 0 where
labels == ignore_index. Tokens are processed `chunk_size` at a time. With a frozen lm_head (LoRA), the forward
also forms each token's unit hidden gradient (softmax - onehot) @ W while the chunk's logits are at hand, and the
backward only scales its rows by the incoming per-token gradient. When the head itself trains, the forward keeps
the fp32 log-sum-exp per token and the backward recomputes each chunk's logits to accumulate grad_hidden and
grad_weight (fp32). Peak extra memory is
one [chunk, V] block instead of [N, V] bf16 logits + [N, V] fp32 upcast + its softmax. On CUDA the frozen-head
chunk math (log-sum-exp, target logit, softmax - onehot) is one compiled kernel pass over the bf16 logits.
Labels must already be aligned with `hidden` (shift them before calling for causal LM).
"""
from __future__ import annotations

import torch

from omnitune.tokens import IGNORE_INDEX

from .fused_ops import compiled_on_cuda


class _ChunkedLinearCE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, labels, chunk_size, ignore_index):
        n = hidden.shape[0]
        lse = torch.empty(n, dtype=torch.float32, device=hidden.device)
        target_logit = torch.zeros(n, dtype=torch.float32, device=hidden.device)
        valid = labels != ignore_index
        safe_labels = torch.where(valid, labels, torch.zeros_like(labels))
        # d loss_t / d h_t depends on token t alone and the upstream gradient only scales it, so with a frozen head
        # the hidden gradient is formed here, once, and backward is a row scaling: no second pass over the vocab.
        early_grad = ctx.needs_input_grad[0] and not ctx.needs_input_grad[1]
        grad_hidden_unit = torch.empty_like(hidden) if early_grad else None
        for start in range(0, n, chunk_size):
            end = min(start + chunk_size, n)
            logits = hidden[start:end] @ weight.T  # [c, V] in the compute dtype
            if early_grad:
                ce = compiled_on_cuda("ce_chunk", ce_chunk_reference, logits)
                lse[start:end], target_logit[start:end], grad_logits = ce(logits, safe_labels[start:end])
                # ignored tokens: zero their [c, H] rows after the GEMM, not their [c, V] rows before it
                # (where, not a product: an inf/nan row of an ignored token must not leak into the gradient)
                grad_hidden_unit[start:end] = torch.where(valid[start:end, None], grad_logits @ weight, 0)
            else:
                logits = logits.float()
                lse[start:end] = torch.logsumexp(logits, dim=-1)
                target_logit[start:end] = logits.gather(1, safe_labels[start:end, None]).squeeze(1)
        loss = torch.where(valid, lse - target_logit, torch.zeros_like(lse))
        if early_grad:
            ctx.save_for_backward(grad_hidden_unit)
        else:
            ctx.save_for_backward(hidden, weight, safe_labels, valid, lse)
        ctx.early_grad = early_grad
        ctx.chunk_size = chunk_size
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        if ctx.early_grad:
            (grad_hidden_unit,) = ctx.saved_tensors
            return grad_hidden_unit * grad_loss.to(grad_hidden_unit.dtype)[:, None], None, None, None, None
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
            grad_logits = _softmax_minus_onehot_(logits, lse[start:end], labels[start:end])
            grad_logits = grad_logits.mul_(scale[start:end, None]).to(hidden.dtype)
            if need_h:
                grad_hidden[start:end] = grad_logits @ weight
            if need_w:
                grad_weight.addmm_(grad_logits.T.float(), hidden[start:end].float())
        if need_w:
            grad_weight = grad_weight.to(weight.dtype)
        return grad_hidden, grad_weight, None, None, None


def ce_chunk_reference(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One chunk's (log-sum-exp, target logit) in fp32 and d CE / d logits = softmax - onehot in the logits' dtype.
    On CUDA it is compiled into fused kernels that read the [c, V] logits a few times, never upcast them whole."""
    x = logits.to(torch.promote_types(logits.dtype, torch.float32))
    lse = torch.logsumexp(x, dim=-1)
    target = x.gather(1, labels[:, None]).squeeze(1)
    probs = torch.exp(x - lse[:, None])
    cols = torch.arange(x.shape[1], device=x.device)
    grad = torch.where(cols[None, :] == labels[:, None], probs - 1.0, probs)
    return lse, target, grad.to(logits.dtype)


def _softmax_minus_onehot_(logits: torch.Tensor, lse: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """In place on an fp32 logits chunk: softmax(logits) - onehot(labels), i.e. d CE / d logits."""
    probs = logits.sub_(lse[:, None]).exp_()
    probs[torch.arange(probs.shape[0], device=probs.device), labels] -= 1.0
    return probs


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
