"""Fused elementwise ops of the Thinker layer (RMSNorm, rotary, the experts' SwiGLU and gather-sum) on CUDA.

The transformers RMSNorm runs ~5 kernels forward and ~8 backward, each a full pass over [tokens, hidden] in fp32;
four norms per layer (input, post-attention, q_norm, k_norm), run again in the checkpoint recompute, cost about
as much as the attention itself. Compiled, each is one pass forward and one backward. The math is the plain
PyTorch below (also the CPU path and the reference): compilation only fuses it.
`enable_fused_norms(model)` swaps the forward of every `*RMSNorm` module with `weight` + `variance_epsilon`;
`disable_fused_norms(model)` restores them. `enable_fused_rope()` does the same for the rotary embedding that the
Qwen3-Omni attention calls (~14 small ops each way per layer, one fused kernel compiled); it replaces the
module-level function of transformers' qwen3_omni_moe modeling file, so it is process-wide (`disable_fused_rope`).
"""
from __future__ import annotations

import functools
import types

import torch

_FLAG = "_omnitune_fused_norm"


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Qwen3 RMSNorm exactly as transformers computes it (fp32 statistics, cast back, then scale)."""
    xf = x.float()
    y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * y.to(x.dtype)


_compiled: dict[str, object] = {}


def compiled_on_cuda(name: str, fn, like: torch.Tensor):
    """`fn` compiled into fused kernels (once per name) when `like` is on CUDA, else `fn` itself (the reference)."""
    if not like.is_cuda:
        return fn
    if name not in _compiled:
        _compiled[name] = torch.compile(fn, dynamic=None)
    return _compiled[name]


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm: one fused kernel each way on CUDA, the reference elsewhere."""
    return compiled_on_cuda("rms_norm", rms_norm_reference, x)(x, weight, eps)


# ----------------------------------------------------------------------------- the experts' fused elementwise work
def _wide(t: torch.Tensor) -> torch.Tensor:
    """At least fp32: the math precision of the fused kernels (fp64 stays fp64 in tests)."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


def _pre_activation(gate_up: torch.Tensor, deltas: tuple[torch.Tensor, ...]) -> torch.Tensor:
    x = _wide(gate_up)
    for d in deltas:
        x = x + _wide(d)
    return x


def weighted_swiglu_reference(gate_up: torch.Tensor, row_weight: torch.Tensor, *deltas: torch.Tensor) -> torch.Tensor:
    """h = silu(gate) * up * w per row, with gate_up = base + LoRA deltas summed in fp32 (never added in memory)."""
    gate, up = _pre_activation(gate_up, deltas).chunk(2, dim=-1)
    return (torch.nn.functional.silu(gate) * up * _wide(row_weight)[:, None]).to(gate_up.dtype)


def weighted_swiglu_and_sum_reference(gate_up: torch.Tensor, row_weight: torch.Tensor,
                                      *deltas: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(`weighted_swiglu_reference`, the pre-activation gate_up + deltas in gate_up's dtype): one pass writes both."""
    pre = _pre_activation(gate_up, deltas)
    gate, up = pre.chunk(2, dim=-1)
    h = (torch.nn.functional.silu(gate) * up * _wide(row_weight)[:, None]).to(gate_up.dtype)
    return h, pre.to(gate_up.dtype)


def weighted_swiglu_backward_reference(grad_h: torch.Tensor, pre: torch.Tensor,
                                       row_weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(d pre-activation [S, 2I] (the gradient of gate_up and of each delta), d row_weight [S]) of
    `weighted_swiglu_reference`, from the pre-activation gate_up + deltas."""
    gate, up = _wide(pre).chunk(2, dim=-1)
    sig = torch.sigmoid(gate)
    silu = gate * sig
    g = _wide(grad_h)
    w = _wide(row_weight)[:, None]
    d_up = g * silu * w
    d_gate = g * up * w * sig * (1 + gate * (1 - sig))
    d_w = (g * silu * up).sum(dim=-1)
    return torch.cat([d_gate, d_up], dim=-1).to(pre.dtype), d_w.to(row_weight.dtype)


class _WeightedSwiGLU(torch.autograd.Function):
    """One fused kernel each way (CUDA). With LoRA deltas the forward also writes their sum with gate_up, the one
    tensor the backward needs: saved instead of gate_up and every delta (at 4096 tokens, 100 MB less per layer whose
    activations are kept). The gradient of gate_up is shared by the deltas, not copied per delta."""

    @staticmethod
    def forward(ctx, gate_up, row_weight, *deltas):
        if deltas:
            fn = compiled_on_cuda("weighted_swiglu_and_sum", weighted_swiglu_and_sum_reference, gate_up)
            h, pre = fn(gate_up, row_weight, *deltas)
        else:
            h = compiled_on_cuda("weighted_swiglu", weighted_swiglu_reference, gate_up)(gate_up, row_weight)
            pre = gate_up
        ctx.save_for_backward(pre, row_weight)
        ctx.num_deltas = len(deltas)
        return h

    @staticmethod
    def backward(ctx, grad_h):
        pre, row_weight = ctx.saved_tensors
        fn = compiled_on_cuda("weighted_swiglu_backward", weighted_swiglu_backward_reference, pre)
        d_pre, d_w = fn(grad_h.contiguous(), pre, row_weight)
        return (d_pre, d_w, *([d_pre] * ctx.num_deltas))


def weighted_swiglu(gate_up: torch.Tensor, row_weight: torch.Tensor, *deltas: torch.Tensor) -> torch.Tensor:
    """SwiGLU of (gate_up + deltas) times a per-row weight, differentiable in all inputs."""
    return _WeightedSwiGLU.apply(gate_up, row_weight, *deltas)


def gather_sum_reference(index: torch.Tensor, top_k: int, *rows: torch.Tensor) -> torch.Tensor:
    """out[t] = sum_k sum_i rows_i[index[t*K + k]] in fp32: undo the expert sort and sum each token's K slots."""
    acc = _wide(rows[0].index_select(0, index))
    for r in rows[1:]:
        acc = acc + _wide(r.index_select(0, index))
    return acc.view(-1, top_k, acc.shape[-1]).sum(dim=1).to(rows[0].dtype)


def gather_sum(index: torch.Tensor, top_k: int, *rows: torch.Tensor) -> torch.Tensor:
    """`gather_sum_reference` as one fused gather + reduction kernel on CUDA (no [S, H] intermediate)."""
    if rows[0].is_cuda and len(rows) <= 2:
        return gather_sum_triton(index, top_k, *rows)
    return compiled_on_cuda("gather_sum", gather_sum_reference, rows[0])(index, top_k, *rows)


GATHER_SUM_COLS = 1024  # columns per program: each gathered row segment is one contiguous 2 KiB read (bf16)


@functools.cache
def _gather_sum_kernel():
    """The Triton kernel, built on first use (triton is imported only where it runs: CUDA, or its interpreter)."""
    import triton
    import triton.language as tl

    @triton.jit
    def gather_sum_rows(index_ptr, a_ptr, b_ptr, out_ptr, width, TOP_K: tl.constexpr, TWO: tl.constexpr,
                        COLS: tl.constexpr):
        token = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * COLS + tl.arange(0, COLS)
        ok = cols < width
        acc = tl.zeros([COLS], dtype=tl.float32)
        for k in tl.static_range(TOP_K):
            row = tl.load(index_ptr + token * TOP_K + k).to(tl.int64) * width
            acc += tl.load(a_ptr + row + cols, mask=ok, other=0.0).to(tl.float32)
            if TWO:
                acc += tl.load(b_ptr + row + cols, mask=ok, other=0.0).to(tl.float32)
        tl.store(out_ptr + token * width + cols, acc.to(out_ptr.dtype.element_ty), mask=ok)

    return gather_sum_rows


def gather_sum_triton(index: torch.Tensor, top_k: int, *rows: torch.Tensor) -> torch.Tensor:
    """`gather_sum_reference` for one or two [S, H] row tensors: one program per (token, column block) reads its
    K rows' segments once. H100, 4096 tokens x top-8: 0.140 ms vs 0.291 ms compiled (bench/bench_kernels.py)."""
    a = rows[0].contiguous()
    b = rows[1].contiguous() if len(rows) == 2 else a
    width = a.shape[-1]
    out = torch.empty(index.numel() // top_k, width, dtype=a.dtype, device=a.device)
    grid = (out.shape[0], -(-width // GATHER_SUM_COLS))
    _gather_sum_kernel()[grid](index, a, b, out, width, TOP_K=top_k, TWO=len(rows) == 2, COLS=GATHER_SUM_COLS)
    return out


def _fused_norm_forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
    return rms_norm(hidden_states, self.weight, self.variance_epsilon)


def _rms_norms(model: torch.nn.Module) -> list[torch.nn.Module]:
    return [m for m in model.modules() if type(m).__name__.endswith("RMSNorm")
            and isinstance(getattr(m, "weight", None), torch.Tensor) and hasattr(m, "variance_epsilon")]


def enable_fused_norms(model: torch.nn.Module) -> int:
    """Run every transformers-style RMSNorm of `model` through the fused `rms_norm`; returns how many."""
    norms = _rms_norms(model)
    for m in norms:
        m.forward = types.MethodType(_fused_norm_forward, m)
        setattr(m, _FLAG, True)
    return len(norms)


def disable_fused_norms(model: torch.nn.Module) -> int:
    """Undo `enable_fused_norms`; returns how many were restored."""
    restored = [m for m in _rms_norms(model) if getattr(m, _FLAG, False)]
    for m in restored:
        del m.forward
        delattr(m, _FLAG)
    return len(restored)


# ------------------------------------------------------------------------------------------------- rotary
def _rope_reference(q, k, cos, sin, unsqueeze_dim=1):
    from transformers.models.qwen3_omni_moe.modeling_qwen3_omni_moe import rotate_half

    cos = cos.unsqueeze(unsqueeze_dim)
    sin = sin.unsqueeze(unsqueeze_dim)
    return (q * cos) + (rotate_half(q) * sin), (k * cos) + (rotate_half(k) * sin)


def apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=1):
    """transformers' apply_rotary_pos_emb (same math), one fused kernel each way on CUDA.

    q and k arrive as [B, H, S, D] views of [B, S, H, D] projections. They are rotated in that memory order: the
    attention kernel then reads, and writes its output, in [B, S, H, D] order, so the attention's transpose back
    to [B, S, H*D] is free instead of one copy forward and one backward per layer."""
    fn = compiled_on_cuda("rope", _rope_reference, q)
    if unsqueeze_dim == 1 and q.dim() == 4:
        q_rot, k_rot = fn(q.transpose(1, 2), k.transpose(1, 2), cos, sin, 2)
        return q_rot.transpose(1, 2), k_rot.transpose(1, 2)
    return fn(q, k, cos, sin, unsqueeze_dim)


_original_rope = None


def enable_fused_rope() -> None:
    """Make the qwen3_omni_moe attention layers (all models in this process) use the fused rotary embedding."""
    global _original_rope
    from transformers.models.qwen3_omni_moe import modeling_qwen3_omni_moe as modeling

    if _original_rope is None:
        _original_rope = modeling.apply_rotary_pos_emb
        modeling.apply_rotary_pos_emb = apply_rotary_pos_emb


def disable_fused_rope() -> None:
    """Restore transformers' own rotary embedding function."""
    global _original_rope
    from transformers.models.qwen3_omni_moe import modeling_qwen3_omni_moe as modeling

    if _original_rope is not None:
        modeling.apply_rotary_pos_emb = _original_rope
        _original_rope = None
