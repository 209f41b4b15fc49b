"""The MoE router's softmax -> top-k -> renormalise as one Triton kernel each way on CUDA.

transformers' `Qwen3OmniMoeThinkerTextTopKRouter` runs it as ~8 kernels forward (fp32 copy, softmax, a top-k of
~39 us at 4096 tokens x 128 experts, sum, divide, cast) and a dozen small ones backward; per layer on the H200
that is ~50 us forward and ~30 us backward for a [4096, 128] tensor (profile in bench/results/). Here each
direction is one pass over the logits. The router's linear layer stays a cuBLAS GEMM.

Same math as transformers (softmax in fp32, the k largest probabilities in descending order, divided by their sum
when `norm_topk_prob`, cast back to the logits' dtype). Ties between equal probabilities go to the lower expert
index; torch.topk leaves that order unspecified. `enable_fused_router(model)` swaps the forward of every such
router module; `disable_fused_router(model)` restores them.
"""
from __future__ import annotations

import functools

import torch

from .forward_swap import restore_forwards, swap_forwards

_FLAG = "_omnitune_fused_router"
TOKENS_PER_PROGRAM = 16


def top_k_softmax_reference(logits: torch.Tensor, top_k: int, normalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(scores [T, k] in logits' dtype, expert indices [T, k] int64), exactly as the transformers router computes."""
    probs = torch.nn.functional.softmax(logits, dtype=torch.float, dim=-1)
    values, indices = torch.topk(probs, top_k, dim=-1)
    if normalize:
        values = values / values.sum(dim=-1, keepdim=True)
    return values.to(logits.dtype), indices


@functools.cache
def _kernels():
    """The Triton kernels, built on first use (triton is imported only where they run: CUDA, or its interpreter)."""
    import triton
    import triton.language as tl

    @triton.jit
    def top_k_forward(logits_ptr, scores_ptr, indices_ptr, tokens, E: tl.constexpr, K: tl.constexpr,
                      NORMALIZE: tl.constexpr, BT: tl.constexpr):
        t = tl.program_id(0) * BT + tl.arange(0, BT)
        t_ok = t < tokens
        e = tl.arange(0, E)
        k_col = tl.arange(0, K)[None, :]
        x = tl.load(logits_ptr + t.to(tl.int64)[:, None] * E + e[None, :], mask=t_ok[:, None], other=0.0)
        left = tl.softmax(x.to(tl.float32), 1, keep_dims=True)
        values = tl.zeros([BT, K], dtype=tl.float32)
        indices = tl.zeros([BT, K], dtype=tl.int32)
        for k in tl.static_range(K):
            best = tl.max(left, axis=1)
            at = tl.min(tl.where(left == best[:, None], e[None, :], E), axis=1)  # lowest index among ties
            values = tl.where(k_col == k, best[:, None], values)
            indices = tl.where(k_col == k, at[:, None], indices)
            left = tl.where(e[None, :] == at[:, None], -1.0, left)
        if NORMALIZE:
            values = values / tl.sum(values, axis=1)[:, None]
        out = t.to(tl.int64)[:, None] * K + k_col
        tl.store(scores_ptr + out, values.to(scores_ptr.dtype.element_ty), mask=t_ok[:, None])
        tl.store(indices_ptr + out, indices.to(tl.int64), mask=t_ok[:, None])

    @triton.jit
    def top_k_backward(logits_ptr, indices_ptr, grad_ptr, d_logits_ptr, tokens, E: tl.constexpr, K: tl.constexpr,
                       NORMALIZE: tl.constexpr, BT: tl.constexpr):
        t = tl.program_id(0) * BT + tl.arange(0, BT)
        t_ok = t < tokens
        e = tl.arange(0, E)
        k_col = tl.arange(0, K)[None, :]
        p = tl.softmax(tl.load(logits_ptr + t.to(tl.int64)[:, None] * E + e[None, :], mask=t_ok[:, None],
                               other=0.0).to(tl.float32), 1, keep_dims=True)  # recomputed
        at = t.to(tl.int64)[:, None] * K + k_col
        indices = tl.load(indices_ptr + at, mask=t_ok[:, None], other=0)
        grad = tl.load(grad_ptr + at, mask=t_ok[:, None], other=0.0).to(tl.float32)
        values = tl.zeros([BT, K], dtype=tl.float32)  # the chosen probabilities, before renormalising
        for k in tl.static_range(K):
            idx_k = tl.sum(tl.where(k_col == k, indices, 0), axis=1)
            p_k = tl.sum(tl.where(e[None, :] == idx_k[:, None], p, 0.0), axis=1)
            values = tl.where(k_col == k, p_k[:, None], values)
        if NORMALIZE:  # s = v / sum(v): dv = (ds - sum(ds * s)) / sum(v)
            total = tl.sum(values, axis=1)[:, None]
            grad = (grad - tl.sum(grad * values / total, axis=1)[:, None]) / total
        d_p = tl.zeros([BT, E], dtype=tl.float32)
        for k in tl.static_range(K):
            idx_k = tl.sum(tl.where(k_col == k, indices, 0), axis=1)
            g_k = tl.sum(tl.where(k_col == k, grad, 0.0), axis=1)
            d_p = tl.where(e[None, :] == idx_k[:, None], g_k[:, None], d_p)
        d_logits = p * (d_p - tl.sum(p * d_p, axis=1)[:, None])  # softmax backward
        tl.store(d_logits_ptr + t.to(tl.int64)[:, None] * E + e[None, :],
                 d_logits.to(d_logits_ptr.dtype.element_ty), mask=t_ok[:, None])

    return top_k_forward, top_k_backward


def _triton_applies(logits: torch.Tensor, top_k: int) -> bool:
    """CUDA, and expert and k counts that are powers of two (Triton's block shapes)."""
    num_experts = logits.shape[-1]
    return logits.is_cuda and num_experts & (num_experts - 1) == 0 and top_k & (top_k - 1) == 0 and top_k <= num_experts


def top_k_softmax_triton(logits: torch.Tensor, top_k: int, normalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """`top_k_softmax_reference` in one kernel (no autograd)."""
    logits = logits.contiguous()
    tokens, num_experts = logits.shape
    scores = torch.empty(tokens, top_k, dtype=logits.dtype, device=logits.device)
    indices = torch.empty(tokens, top_k, dtype=torch.int64, device=logits.device)
    grid = (-(-tokens // TOKENS_PER_PROGRAM),)
    _kernels()[0][grid](logits, scores, indices, tokens, E=num_experts, K=top_k, NORMALIZE=normalize,
                        BT=TOKENS_PER_PROGRAM)
    return scores, indices


def top_k_softmax_backward_triton(logits: torch.Tensor, indices: torch.Tensor, grad_scores: torch.Tensor,
                                  normalize: bool) -> torch.Tensor:
    """d logits [T, E] of `top_k_softmax_reference`'s scores, from the logits (the softmax is recomputed)."""
    logits, indices, grad_scores = logits.contiguous(), indices.contiguous(), grad_scores.contiguous()
    tokens, num_experts = logits.shape
    d_logits = torch.empty_like(logits)
    grid = (-(-tokens // TOKENS_PER_PROGRAM),)
    _kernels()[1][grid](logits, indices, grad_scores, d_logits, tokens, E=num_experts, K=indices.shape[1],
                        NORMALIZE=normalize, BT=TOKENS_PER_PROGRAM)
    return d_logits


class _TopKSoftmax(torch.autograd.Function):
    """Saves the logits and the chosen indices: the backward recomputes the softmax in registers."""

    @staticmethod
    def forward(ctx, logits, top_k, normalize):
        scores, indices = top_k_softmax_triton(logits, top_k, normalize)
        ctx.save_for_backward(logits, indices)
        ctx.normalize = normalize
        ctx.mark_non_differentiable(indices)
        return scores, indices

    @staticmethod
    def backward(ctx, grad_scores, _):
        logits, indices = ctx.saved_tensors
        return top_k_softmax_backward_triton(logits, indices, grad_scores, ctx.normalize), None, None


def top_k_softmax(logits: torch.Tensor, top_k: int, normalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Router scores and expert indices: fused on CUDA (powers of two), the reference elsewhere."""
    if _triton_applies(logits, top_k):
        return _TopKSoftmax.apply(logits, top_k, normalize)
    return top_k_softmax_reference(logits, top_k, normalize)


def _fused_router_forward(self, hidden_states: torch.Tensor):
    router_logits = torch.nn.functional.linear(hidden_states.reshape(-1, self.hidden_dim), self.weight)
    scores, indices = top_k_softmax(router_logits, self.top_k, self.norm_topk_prob)
    return router_logits, scores, indices


def _routers(model: torch.nn.Module) -> list[torch.nn.Module]:
    return [m for m in model.modules() if type(m).__name__.endswith("TopKRouter")
            and all(hasattr(m, a) for a in ("weight", "top_k", "norm_topk_prob", "hidden_dim"))
            and getattr(m, "bias", None) is None]


def enable_fused_router(model: torch.nn.Module) -> int:
    """Run every transformers top-k MoE router of `model` through `top_k_softmax`; returns how many."""
    return swap_forwards(_routers(model), _fused_router_forward, _FLAG)


def disable_fused_router(model: torch.nn.Module) -> int:
    """Undo `enable_fused_router`; returns how many were restored."""
    return restore_forwards(_routers(model), _FLAG)
