"""The experts' rank-r LoRA products over rows sorted by expert, partly as Triton kernels on CUDA.

Per layer the expert LoRA runs nine skinny grouped GEMMs (r = 16 on one side). They take three shapes:

  expand       out [S, N] (+)= s * xa [S, r] @ W_e [r, N]     (LoRA B forward; dX of LoRA A)   Triton
  project      y [S, r]   = s * X [S, K] @ V_e [r, K]^T       (LoRA A forward; d(xa) of LoRA B) torch grouped GEMM
  weight_grad  G_e [r, N] = s * P_e [S_e, r]^T @ D_e [S_e, N] (the gradients of A and B)        Triton

Measured inside the eager training step (H200, 4096 tokens, 4 layers, torch profiler; per layer, all calls of one
shape): torch's grouped GEMM (CUTLASS) took 194 us for the expands, 147 us for the projects and 218 us for the
weight gradients; the Triton kernels below 107 us and 135 us, and a Triton project kernel 268 us, so projects stay
on the grouped GEMM. Rows are sorted by expert (`row_expert` [S], non-decreasing; `offsets` [E] int32 cumulative
row counts). A block of rows can span several experts: expand loops over the experts of its block, masking the
rows of the others. `LoRAExpand` / `LoRAProject` are the autograd functions the experts path calls; elsewhere than
CUDA they compute the same with the plain grouped GEMM (`grouped_mm`), which is also the tests' reference.
The LoRA B product is added into the base projection's output in place (`LoRAExpand`): the next kernel (SwiGLU,
the gather-sum) then reads one [S, N] tensor instead of two, and no delta tensor is ever written or kept.
"""
from __future__ import annotations

import functools

import torch

from .grouped_gemm import grouped_mm

BLOCK_ROWS = 64
BLOCK_COLS = 128


def _triton_applies(rank: int, *tensors: torch.Tensor) -> bool:
    """Triton path: CUDA tensors, and a rank the tensor-core dot takes (a power of two, at least 16)."""
    return all(t.is_cuda for t in tensors) and rank >= 16 and rank & (rank - 1) == 0


@functools.cache
def _kernels():
    """The two Triton kernels, built on first use (triton is imported only where they run)."""
    import triton
    import triton.language as tl

    @triton.jit
    def expand(xa_ptr, w_ptr, row_expert_ptr, out_ptr, rows, cols, scale,
               R: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, ACC: tl.constexpr):
        m = tl.program_id(0) * BM + tl.arange(0, BM)
        n = tl.program_id(1) * BN + tl.arange(0, BN)
        r = tl.arange(0, R)
        m_ok, n_ok = m < rows, n < cols
        row_e = tl.load(row_expert_ptr + m, mask=m_ok, other=-1)
        first = tl.program_id(0) * BM
        e_lo = tl.load(row_expert_ptr + first)
        e_hi = tl.load(row_expert_ptr + tl.minimum(first + BM, rows) - 1)
        xa = tl.load(xa_ptr + m.to(tl.int64)[:, None] * R + r[None, :], mask=m_ok[:, None], other=0.0)
        acc = tl.zeros([BM, BN], dtype=tl.float32)
        for e in range(e_lo, e_hi + 1):
            w = tl.load(w_ptr + e * R * cols + r[:, None] * cols + n[None, :], mask=n_ok[None, :],
                        other=0.0)
            acc += tl.dot(tl.where((row_e == e)[:, None], xa, 0.0).to(w.dtype), w)
        out = out_ptr + m.to(tl.int64)[:, None] * cols + n[None, :]
        ok = m_ok[:, None] & n_ok[None, :]
        acc = acc * scale
        if ACC:  # out += s * xa @ W_e: one read-modify-write of the base output, summed in fp32
            acc += tl.load(out, mask=ok, other=0.0).to(tl.float32)
        tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=ok)

    @triton.jit
    def weight_grad(p_ptr, d_ptr, offsets_ptr, out_ptr, cols, scale,
                    R: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr):
        e = tl.program_id(0)
        n = tl.program_id(1) * BN + tl.arange(0, BN)
        r = tl.arange(0, R)
        n_ok = n < cols
        start = tl.load(offsets_ptr + e - 1, mask=e > 0, other=0)
        end = tl.load(offsets_ptr + e)
        acc = tl.zeros([R, BN], dtype=tl.float32)
        for m0 in range(start, end, BM):
            m = m0 + tl.arange(0, BM)
            m_ok = m < end
            p = tl.load(p_ptr + m.to(tl.int64)[None, :] * R + r[:, None], mask=m_ok[None, :], other=0.0)  # [R, BM]
            d = tl.load(d_ptr + m.to(tl.int64)[:, None] * cols + n[None, :], mask=m_ok[:, None] & n_ok[None, :],
                        other=0.0)
            acc += tl.dot(p.to(d.dtype), d)
        out = out_ptr + e * R * cols + r[:, None] * cols + n[None, :]
        tl.store(out, (acc * scale).to(out_ptr.dtype.element_ty), mask=n_ok[None, :])

    return expand, weight_grad


# ------------------------------------------------------------------------------------- the three products
def _scaled(t: torch.Tensor, scale: float) -> torch.Tensor:
    return t if scale == 1.0 else t * scale


def expand(xa: torch.Tensor, w: torch.Tensor, offsets: torch.Tensor, row_expert: torch.Tensor,
           scale: float, out: torch.Tensor | None = None) -> torch.Tensor:
    """s * xa [S, r] @ w[e] [r, N] per expert group -> [S, N] (w: [E, r, N]); with `out` (contiguous [S, N]) the
    product is added into it in place and `out` is returned."""
    if not _triton_applies(xa.shape[1], xa, w):
        product = _scaled(grouped_mm(xa, w, offsets), scale)
        return product if out is None else out.add_(product)
    xa, w = xa.contiguous(), w.contiguous()
    rows, rank = xa.shape
    cols = w.shape[-1]
    acc = out is not None
    if out is None:
        out = torch.empty(rows, cols, dtype=xa.dtype, device=xa.device)
    elif not out.is_contiguous():
        raise ValueError("expand: `out` must be contiguous")
    grid = (-(-rows // BLOCK_ROWS), -(-cols // BLOCK_COLS))
    _kernels()[0][grid](xa, w, row_expert, out, rows, cols, scale, R=rank, BM=BLOCK_ROWS, BN=BLOCK_COLS, ACC=acc)
    return out


def project(x: torch.Tensor, v: torch.Tensor, offsets: torch.Tensor, scale: float) -> torch.Tensor:
    """s * x [S, K] @ v[e]^T [K, r] per expert group -> [S, r] (v: [E, r, K]): torch's grouped GEMM, which ran
    these faster inside the training step than a Triton kernel of the same shape (see the module docstring)."""
    return _scaled(grouped_mm(x, v.transpose(-2, -1), offsets), scale)


def weight_grad(p: torch.Tensor, d: torch.Tensor, offsets: torch.Tensor, scale: float) -> torch.Tensor:
    """s * p_e^T [r, S_e] @ d_e [S_e, N] per expert -> [E, r, N] (zeros for an expert without rows)."""
    num_experts, rank, cols = offsets.numel(), p.shape[1], d.shape[1]
    if not _triton_applies(rank, p, d):
        # the grouped GEMM's own weight-gradient backward (what ran before these kernels): no host sync, so it
        # captures in a CUDA graph, at the price of one throw-away forward product in this fallback
        w = p.new_zeros(num_experts, rank, cols).requires_grad_(True)
        with torch.enable_grad():
            (grad,) = torch.autograd.grad(grouped_mm(p, w, offsets), w, d, allow_unused=True)
        return w.detach() if grad is None else _scaled(grad, scale)  # None: no rows at all
    p, d = p.contiguous(), d.contiguous()
    out = torch.empty(num_experts, rank, cols, dtype=d.dtype, device=d.device)
    grid = (num_experts, -(-cols // BLOCK_COLS))
    _kernels()[1][grid](p, d, offsets, out, cols, scale, R=rank, BM=BLOCK_ROWS, BN=BLOCK_COLS)
    return out


# ------------------------------------------------------------------------------------- autograd
class LoRAExpand(torch.autograd.Function):
    """base += s * xa @ B_e-rows per expert, in place (the LoRA B product added into the base projection's output):
    dxa = s * dbase @ B_e^T, dB = s * xa_e^T dbase_e, and dbase passes through unchanged."""

    @staticmethod
    def forward(ctx, xa, b_rows, offsets, row_expert, scale, base):
        ctx.save_for_backward(xa, b_rows, offsets, row_expert)
        ctx.scale = scale
        ctx.mark_dirty(base)
        return expand(xa, b_rows, offsets, row_expert, scale, out=base)

    @staticmethod
    def backward(ctx, grad_out):
        xa, b_rows, offsets, row_expert = ctx.saved_tensors
        grad_out = grad_out.contiguous()
        d_xa = project(grad_out, b_rows, offsets, ctx.scale) if ctx.needs_input_grad[0] else None
        d_b = weight_grad(xa, grad_out, offsets, ctx.scale).to(b_rows.dtype) if ctx.needs_input_grad[1] else None
        return d_xa, d_b, None, None, None, grad_out


class LoRAProject(torch.autograd.Function):
    """y = x @ A_e^T per expert (the LoRA A product, A [E, r, K]): dx = dy @ A_e, dA = dy_e^T x_e."""

    @staticmethod
    def forward(ctx, x, lora_a, offsets, row_expert):
        ctx.save_for_backward(x, lora_a, offsets, row_expert)
        return project(x, lora_a, offsets, 1.0)

    @staticmethod
    def backward(ctx, grad_y):
        x, lora_a, offsets, row_expert = ctx.saved_tensors
        grad_y = grad_y.contiguous()
        dx = expand(grad_y, lora_a, offsets, row_expert, 1.0) if ctx.needs_input_grad[0] else None
        d_a = weight_grad(grad_y, x, offsets, 1.0).to(lora_a.dtype) if ctx.needs_input_grad[1] else None
        return dx, d_a, None, None
