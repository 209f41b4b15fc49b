"""4-bit NormalFloat (NF4) block quantization of frozen weights, dequantized just in time (QLoRA's format).

Each block of `BLOCK` consecutive weights keeps its absmax and one 4-bit index per weight into the NF4 code book
(the 16 quantiles of a unit normal, scaled to [-1, 1], with an exact 0; Dettmers et al. 2023); two indices share a
byte. The absmax is kept in fp16, not fp32 (QLoRA's double quantization does the same job with 8-bit scales and a
second level): its rounding (2^-11 relative) is far below NF4's own (~10%), and it saves 2 of the 4.5 bits per
weight's overhead. 0.53125 bytes per weight instead of 2 (bf16): the Thinker's 29.0B expert weights go from
54.0 GiB to 14.3 GiB (fp32 scales: 15.2 GiB). `dequantize_nf4` is one Triton kernel on CUDA; elsewhere it is the
reference.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch

from omnitune.errors import OmnituneError

BLOCK = 64
BUFFER_PREFIX = "omnitune_nf4_"  # a module's NF4 buffers: {prefix}[name_]packed / absmax / codes
NF4_CODES = (-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
             -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
             0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
             0.7229568362236023, 1.0)


class NF4RangeError(OmnituneError, ValueError):
    """A weight that NF4 with fp16 block scales cannot represent."""


@dataclass
class NF4Weight:
    """A quantized tensor: packed indices [numel / 2] uint8, absmax [numel / BLOCK] fp16, the 16 codes (kept on
    the weight's device: dequantizing must not copy from the host, e.g. inside a CUDA graph), what it was."""

    packed: torch.Tensor
    absmax: torch.Tensor
    codes: torch.Tensor
    shape: tuple[int, ...]
    dtype: torch.dtype

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.packed, self.absmax, self.codes))


@torch.no_grad()
def quantize_nf4(weight: torch.Tensor, what: str = "a weight") -> NF4Weight:
    """Round every weight to the nearest NF4 code of its block's absmax scale (the scale as fp16 stores it, so the
    indices are chosen against the scale that dequantizing will use). Scales below fp16's normal range stay
    subnormal rather than being raised to it, so a block of tiny weights keeps them; a weight fp16 cannot scale
    (non-finite, or above 65504 in magnitude: no trained bf16 model has one) is refused with `what` named."""
    if weight.numel() % BLOCK:
        raise ValueError(f"NF4 needs a multiple of {BLOCK} weights, got {tuple(weight.shape)}")
    blocks = weight.detach().reshape(-1, BLOCK).float()
    amax = blocks.abs().amax(dim=1)
    peak = float(amax.max()) if amax.numel() else 0.0  # one read per tensor, at load time
    if not math.isfinite(peak) or peak > torch.finfo(torch.float16).max:
        raise NF4RangeError(f"cannot store {what} {tuple(weight.shape)} in NF4: it holds a weight of magnitude "
                            f"{peak:g}, beyond the fp16 block scales (65504); the checkpoint's weights look damaged "
                            "(train with adapter.method=lora to keep them in bf16)")
    absmax = amax.clamp_min(2.0**-24).to(torch.float16)  # fp16's smallest subnormal: a zero block stays zero
    codes = torch.tensor(NF4_CODES, dtype=torch.float32, device=weight.device)
    midpoints = (codes[1:] + codes[:-1]) / 2
    index = torch.bucketize(blocks / absmax.float()[:, None], midpoints).to(torch.uint8).reshape(-1)
    packed = (index[0::2] << 4) | index[1::2]
    return NF4Weight(packed, absmax, codes, tuple(weight.shape), weight.dtype)


def dequantize_nf4_reference(packed: torch.Tensor, absmax: torch.Tensor, codes: torch.Tensor,
                             dtype: torch.dtype) -> torch.Tensor:
    """[numel] weights in `dtype` from the packed indices (high nibble first) and the block scales."""
    index = torch.stack([packed >> 4, packed & 15], dim=-1).reshape(-1).long()
    return (codes[index].view(absmax.shape[0], -1) * absmax.float()[:, None]).reshape(-1).to(dtype)


def dequantize_nf4(q: NF4Weight) -> torch.Tensor:
    """The weight back in its shape and dtype (one Triton kernel on CUDA, the reference elsewhere)."""
    if q.packed.is_cuda:
        return dequantize_nf4_triton(q.packed, q.absmax, q.codes, q.dtype).view(q.shape)
    return dequantize_nf4_reference(q.packed, q.absmax, q.codes, q.dtype).view(q.shape)


BYTES_PER_PROGRAM = 2048  # 4096 weights (64 blocks) per program


@functools.cache
def _nf4_kernel():
    """The Triton kernel, built on first use (triton is imported only where it runs: CUDA, or its interpreter)."""
    import triton
    import triton.language as tl

    @triton.jit
    def dequant(packed_ptr, absmax_ptr, codes_ptr, out_ptr, n_bytes, BYTES: tl.constexpr,
                BYTES_PER_SCALE: tl.constexpr):
        # each byte holds two weights (high nibble first); BLOCK / 2 bytes share one block scale
        offs = tl.program_id(0).to(tl.int64) * BYTES + tl.arange(0, BYTES)
        ok = offs < n_bytes
        byte = tl.load(packed_ptr + offs, mask=ok, other=0).to(tl.int32)
        scale = tl.load(absmax_ptr + offs // BYTES_PER_SCALE, mask=ok, other=0.0).to(tl.float32)
        hi = tl.load(codes_ptr + (byte >> 4)) * scale
        lo = tl.load(codes_ptr + (byte & 15)) * scale
        pair = tl.reshape(tl.join(hi, lo), (2 * BYTES,))
        out_offs = tl.program_id(0).to(tl.int64) * (2 * BYTES) + tl.arange(0, 2 * BYTES)
        tl.store(out_ptr + out_offs, pair.to(out_ptr.dtype.element_ty), mask=out_offs < 2 * n_bytes)

    return dequant


def dequantize_nf4_triton(packed: torch.Tensor, absmax: torch.Tensor, codes: torch.Tensor,
                          dtype: torch.dtype) -> torch.Tensor:
    """`dequantize_nf4_reference` as one memory-bound pass: read each byte once, write its two weights. H100, one
    layer's gate_up stack: 0.386 ms (2.7 TB/s) vs 0.605 ms compiled (bench/bench_kernels.py)."""
    out = torch.empty(packed.numel() * 2, dtype=dtype, device=packed.device)
    grid = (-(-packed.numel() // BYTES_PER_PROGRAM),)
    _nf4_kernel()[grid](packed, absmax, codes, out, packed.numel(), BYTES=BYTES_PER_PROGRAM,
                         BYTES_PER_SCALE=BLOCK // 2)
    return out


# ------------------------------------------------------------------------------------- NF4 weights of modules
def store_nf4(module: torch.nn.Module, name: str, q: NF4Weight,
              parts: tuple[str, ...] = ("packed", "absmax", "codes")) -> None:
    """Keep `q` on `module` for its weight `name`: the `parts` as non-persistent buffers {BUFFER_PREFIX}{name}_{part}
    (the others live elsewhere, e.g. streamed from host memory), shape and dtype in `module.omnitune_nf4_meta`."""
    for part in parts:
        module.register_buffer(f"{BUFFER_PREFIX}{name}_{part}", getattr(q, part), persistent=False)
    if not hasattr(module, "omnitune_nf4_meta"):
        module.omnitune_nf4_meta = {}
    module.omnitune_nf4_meta[name] = (q.shape, q.dtype)


def stored_nf4(module: torch.nn.Module, name: str, packed: torch.Tensor | None = None,
               absmax: torch.Tensor | None = None) -> NF4Weight:
    """The NF4 weight `store_nf4` kept on `module` (`packed` / `absmax`: given where they are not its buffers)."""
    shape, dtype = module.omnitune_nf4_meta[name]

    def part(key: str, given: torch.Tensor | None) -> torch.Tensor:
        return getattr(module, f"{BUFFER_PREFIX}{name}_{key}") if given is None else given
    return NF4Weight(part("packed", packed), part("absmax", absmax), part("codes", None), shape, dtype)


def frozen_weight(linear: torch.nn.Linear) -> torch.Tensor:
    """A frozen linear's weight: dequantized where it is kept in NF4 (model/qlora.py `quantize_attention`), else the
    parameter itself."""
    if "weight" not in getattr(linear, "omnitune_nf4_meta", {}):
        return linear.weight
    return dequantize_nf4(stored_nf4(linear, "weight"))


class NF4Linear(torch.autograd.Function):
    """x W^T (+ b) with W dequantized here and again in the backward (W is frozen: only dX is needed)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, linear: torch.nn.Linear) -> torch.Tensor:
        ctx.linear = linear
        return torch.nn.functional.linear(x, frozen_weight(linear).to(x.dtype), linear.bias)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad @ frozen_weight(ctx.linear).to(grad.dtype), None


def nf4_linear_forward(self: torch.nn.Linear, x: torch.Tensor) -> torch.Tensor:
    return NF4Linear.apply(x, self)
