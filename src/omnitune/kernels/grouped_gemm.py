"""Grouped GEMM over rows sorted by expert: `torch._grouped_mm` on CUDA in bf16, a plain loop elsewhere.

`grouped_mm(x, w, offs)`: x [S, K] with rows grouped by expert, w [E, K, N] (any strides), offs [E] int32
cumulative row counts. Row block e (offs[e-1]:offs[e]) is multiplied by w[e]. Both paths are differentiable
through ordinary autograd, so the callers decide which gradients exist by `requires_grad`, nothing else.
"""
from __future__ import annotations

import torch

_HAS_F_GROUPED_MM = hasattr(torch.nn.functional, "grouped_mm")
_HAS_TORCH_GROUPED_MM = hasattr(torch, "_grouped_mm")


def grouped_mm_available(x: torch.Tensor, w: torch.Tensor) -> bool:
    """True when the fused CUDA kernel takes these operands: bf16 on an sm80+ GPU, 16-byte aligned widths."""
    if not (x.is_cuda and w.is_cuda) or x.dtype != torch.bfloat16 or w.dtype != torch.bfloat16:
        return False
    if not (_HAS_F_GROUPED_MM or _HAS_TORCH_GROUPED_MM):
        return False
    if torch.cuda.get_device_capability(x.device) < (8, 0):
        return False
    # CUTLASS grouped GEMM wants every leading dimension a multiple of 16 bytes (8 bf16 elements).
    return x.shape[-1] % 8 == 0 and w.shape[-1] % 8 == 0


def grouped_mm_loop(x: torch.Tensor, w: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """Reference grouped GEMM: one `mm` per non-empty group (one host sync to read the offsets)."""
    outs, start = [], 0
    for e, end in enumerate(offs.tolist()):
        if end > start:
            outs.append(x[start:end] @ w[e].to(x.dtype))
        start = end
    if start < x.shape[0]:  # rows past the last offset belong to no expert: zeros, like the CUDA kernel's contract
        outs.append(x.new_zeros(x.shape[0] - start, w.shape[-1]))
    if not outs:
        return x.new_zeros(x.shape[0], w.shape[-1])
    return torch.cat(outs, dim=0)


def kernel_layout(w: torch.Tensor) -> torch.Tensor:
    """`w` [E, K, N] as the CUDA kernel takes it: each expert's matrix row- or column-major (one of the last two
    strides 1). Other layouts (e.g. bf16 LoRA weights whose expert dimension is the innermost) are copied to
    row-major; `torch._grouped_mm` refuses them ("Invalid strides/sizes")."""
    return w if 1 in (w.stride(-1), w.stride(-2)) else w.contiguous()


def grouped_mm(x: torch.Tensor, w: torch.Tensor, offs: torch.Tensor, force_loop: bool = False) -> torch.Tensor:
    """x [S, K] @ w[e] [K, N] per expert group given by offs -> [S, N]."""
    if not force_loop and grouped_mm_available(x, w):
        w = kernel_layout(w)
        if _HAS_F_GROUPED_MM:
            return torch.nn.functional.grouped_mm(x, w, offs=offs)
        return torch._grouped_mm(x, w, offs=offs)
    return grouped_mm_loop(x, w, offs)
