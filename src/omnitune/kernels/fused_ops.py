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

import torch

from .forward_swap import restore_forwards, swap_forwards

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


def weighted_swiglu_reference(gate_up: torch.Tensor, row_weight: torch.Tensor) -> torch.Tensor:
    """h = silu(gate) * up * w per row, computed in fp32 (LoRA, if any, is already added into gate_up)."""
    gate, up = _wide(gate_up).chunk(2, dim=-1)
    return (torch.nn.functional.silu(gate) * up * _wide(row_weight)[:, None]).to(gate_up.dtype)


def weighted_swiglu_backward_reference(grad_h: torch.Tensor, gate_up: torch.Tensor,
                                       row_weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(d gate_up [S, 2I], d row_weight [S]) of `weighted_swiglu_reference`."""
    gate, up = _wide(gate_up).chunk(2, dim=-1)
    sig = torch.sigmoid(gate)
    silu = gate * sig
    g = _wide(grad_h)
    w = _wide(row_weight)[:, None]
    d_up = g * silu * w
    d_gate = g * up * w * sig * (1 + gate * (1 - sig))
    d_w = (g * silu * up).sum(dim=-1)
    return torch.cat([d_gate, d_up], dim=-1).to(gate_up.dtype), d_w.to(row_weight.dtype)


SWIGLU_ROWS, SWIGLU_COLS = 16, 256  # rows per program; columns of gate (and of up) per loop step


@functools.cache
def _swiglu_backward_kernel():
    """The Triton backward, built on first use (triton is imported only where it runs: CUDA, or its interpreter)."""
    import triton
    import triton.language as tl

    @triton.jit
    def swiglu_backward(gate_up_ptr, grad_ptr, w_ptr, d_gate_up_ptr, d_w_ptr, rows, inter,
                        BM: tl.constexpr, BN: tl.constexpr):
        m = tl.program_id(0) * BM + tl.arange(0, BM)
        m_ok = m < rows
        row = m.to(tl.int64)[:, None]
        w = tl.load(w_ptr + m, mask=m_ok, other=0.0).to(tl.float32)[:, None]
        d_w = tl.zeros([BM], dtype=tl.float32)
        for n0 in range(0, inter, BN):
            n = n0 + tl.arange(0, BN)[None, :]
            ok = m_ok[:, None] & (n < inter)
            gate_at = row * (2 * inter) + n
            gate = tl.load(gate_up_ptr + gate_at, mask=ok, other=0.0).to(tl.float32)
            up = tl.load(gate_up_ptr + gate_at + inter, mask=ok, other=0.0).to(tl.float32)
            g = tl.load(grad_ptr + row * inter + n, mask=ok, other=0.0).to(tl.float32)
            sig = tl.sigmoid(gate)
            silu = gate * sig
            d_w += tl.sum(g * silu * up, axis=1)
            d_gate = g * up * w * sig * (1 + gate * (1 - sig))
            tl.store(d_gate_up_ptr + gate_at, d_gate.to(d_gate_up_ptr.dtype.element_ty), mask=ok)
            tl.store(d_gate_up_ptr + gate_at + inter, (g * silu * w).to(d_gate_up_ptr.dtype.element_ty), mask=ok)
        tl.store(d_w_ptr + m, d_w.to(d_w_ptr.dtype.element_ty), mask=m_ok)

    return swiglu_backward


def weighted_swiglu_backward_triton(grad_h: torch.Tensor, gate_up: torch.Tensor,
                                    row_weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`weighted_swiglu_backward_reference` in one pass: each program reads its rows' gate_up and grad once and
    writes d gate_up and the row sums of d row_weight. Compiled, the same math took two kernels (the reduction apart),
    reading gate_up twice: 105 + 45 us per layer at 4096 tokens (H200 profile)."""
    grad_h, gate_up, row_weight = grad_h.contiguous(), gate_up.contiguous(), row_weight.contiguous()
    rows, inter = grad_h.shape
    d_gate_up = torch.empty_like(gate_up)
    d_w = torch.empty_like(row_weight)
    _swiglu_backward_kernel()[(-(-rows // SWIGLU_ROWS),)](gate_up, grad_h, row_weight, d_gate_up, d_w, rows, inter,
                                                           BM=SWIGLU_ROWS, BN=SWIGLU_COLS)
    return d_gate_up, d_w


class _WeightedSwiGLU(torch.autograd.Function):
    """One fused kernel each way on CUDA (compiled forward, Triton backward); saves gate_up and the row weights."""

    @staticmethod
    def forward(ctx, gate_up, row_weight):
        ctx.save_for_backward(gate_up, row_weight)
        return compiled_on_cuda("weighted_swiglu", weighted_swiglu_reference, gate_up)(gate_up, row_weight)

    @staticmethod
    def backward(ctx, grad_h):
        gate_up, row_weight = ctx.saved_tensors
        backward = weighted_swiglu_backward_triton if gate_up.is_cuda else weighted_swiglu_backward_reference
        return backward(grad_h, gate_up, row_weight)


def weighted_swiglu(gate_up: torch.Tensor, row_weight: torch.Tensor) -> torch.Tensor:
    """SwiGLU of gate_up times a per-row weight, differentiable in both inputs."""
    return _WeightedSwiGLU.apply(gate_up, row_weight)


def gather_sum_reference(index: torch.Tensor, top_k: int, rows: torch.Tensor) -> torch.Tensor:
    """out[t] = sum_k rows[index[t*K + k]] in fp32: undo the expert sort and sum each token's K slots."""
    acc = _wide(rows.index_select(0, index))
    return acc.view(-1, top_k, acc.shape[-1]).sum(dim=1).to(rows.dtype)


def gather_sum(index: torch.Tensor, top_k: int, rows: torch.Tensor) -> torch.Tensor:
    """`gather_sum_reference` as one fused gather + reduction kernel on CUDA (no [S, H] intermediate)."""
    if rows.is_cuda:
        return gather_sum_triton(index, top_k, rows)
    return gather_sum_reference(index, top_k, rows)


GATHER_SUM_COLS = 1024  # columns per program: each gathered row segment is one contiguous 2 KiB read (bf16)


@functools.cache
def _gather_sum_kernel():
    """The Triton kernel, built on first use (triton is imported only where it runs: CUDA, or its interpreter)."""
    import triton
    import triton.language as tl

    @triton.jit
    def gather_sum_rows(index_ptr, rows_ptr, out_ptr, width, TOP_K: tl.constexpr, COLS: tl.constexpr):
        token = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * COLS + tl.arange(0, COLS)
        ok = cols < width
        acc = tl.zeros([COLS], dtype=tl.float32)
        for k in tl.static_range(TOP_K):
            row = tl.load(index_ptr + token * TOP_K + k).to(tl.int64) * width
            acc += tl.load(rows_ptr + row + cols, mask=ok, other=0.0).to(tl.float32)
        tl.store(out_ptr + token * width + cols, acc.to(out_ptr.dtype.element_ty), mask=ok)

    return gather_sum_rows


def gather_sum_triton(index: torch.Tensor, top_k: int, rows: torch.Tensor) -> torch.Tensor:
    """`gather_sum_reference` for [S, H] rows: one program per (token, column block) reads its K rows' segments
    once. H100, 4096 tokens x top-8: 0.140 ms vs 0.291 ms compiled (bench/bench_kernels.py)."""
    rows = rows.contiguous()
    width = rows.shape[-1]
    out = torch.empty(index.numel() // top_k, width, dtype=rows.dtype, device=rows.device)
    grid = (out.shape[0], -(-width // GATHER_SUM_COLS))
    _gather_sum_kernel()[grid](index, rows, out, width, TOP_K=top_k, COLS=GATHER_SUM_COLS)
    return out


def _fused_norm_forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
    return rms_norm(hidden_states, self.weight, self.variance_epsilon)


def _rms_norms(model: torch.nn.Module) -> list[torch.nn.Module]:
    return [m for m in model.modules() if type(m).__name__.endswith("RMSNorm")
            and isinstance(getattr(m, "weight", None), torch.Tensor) and hasattr(m, "variance_epsilon")]


def add_rms_norm_reference(residual: torch.Tensor, x: torch.Tensor, weight: torch.Tensor,
                           eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(residual + x, RMSNorm of it): a decoder layer's residual add and the norm that reads its result."""
    total = residual + x
    return total, rms_norm_reference(total, weight, eps)


def add_rms_norm(residual: torch.Tensor, x: torch.Tensor, weight: torch.Tensor,
                 eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """`add_rms_norm_reference` as one kernel each way on CUDA: the backward also adds the residual stream's
    gradient, which autograd would otherwise add in a pass of its own (H200: ~11 us each way per layer)."""
    return compiled_on_cuda("add_rms_norm", add_rms_norm_reference, x)(residual, x, weight, eps)


def _decoder_layer_types() -> tuple[type, ...]:
    """The decoder layers whose forward `_fused_decoder_layer_forward` restates (transformers 5.23)."""
    from transformers.models.qwen3_omni_moe import modeling_qwen3_omni_moe as modeling

    return (modeling.Qwen3OmniMoeThinkerTextDecoderLayer,)


def _fused_decoder_layer_forward(self, hidden_states, attention_mask=None, position_ids=None, past_key_values=None,
                                 use_cache=False, position_embeddings=None, **kwargs):
    """The Thinker decoder layer's forward with the post-attention residual add fused into its norm."""
    residual = hidden_states
    hidden_states, _ = self.self_attn(
        hidden_states=self.input_layernorm(hidden_states), attention_mask=attention_mask, position_ids=position_ids,
        past_key_values=past_key_values, use_cache=use_cache, position_embeddings=position_embeddings, **kwargs)
    norm = self.post_attention_layernorm
    residual, hidden_states = add_rms_norm(residual, hidden_states, norm.weight, norm.variance_epsilon)
    return residual + self.mlp(hidden_states)


_FUSED_FROM = "_omnitune_fused_from"  # on a fused layer class: the transformers class it was made from


@functools.cache
def _fused_layer_class(cls: type) -> type:
    """`cls` with the fused forward, as a subclass of the same name: transformers' GradientCheckpointingLayer
    checkpoints inside a class's `forward` (its __init_subclass__ wraps every subclass's forward too), so the fused
    layer is checkpointed, and honours `keep_activations`, exactly as `cls` is. An instance forward would bypass it."""
    return type(cls.__name__, (cls,), {"forward": _fused_decoder_layer_forward, _FUSED_FROM: cls,
                                       "__module__": cls.__module__, "__qualname__": cls.__qualname__})


def enable_fused_norms(model: torch.nn.Module) -> int:
    """Run every transformers-style RMSNorm of `model` through the fused `rms_norm`, and fuse each Thinker decoder
    layer's post-attention residual add into its norm (`add_rms_norm`); returns how many norms."""
    for m in model.modules():
        if type(m) in _decoder_layer_types():
            m.__class__ = _fused_layer_class(type(m))
    return swap_forwards(_rms_norms(model), _fused_norm_forward, _FLAG)


def disable_fused_norms(model: torch.nn.Module) -> int:
    """Undo `enable_fused_norms`; returns how many norms were restored."""
    for m in model.modules():
        if _FUSED_FROM in vars(type(m)):
            m.__class__ = vars(type(m))[_FUSED_FROM]
    return restore_forwards(_rms_norms(model), _FLAG)


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
