"""Micro-benchmarks of single omnitune kernels against the compiled plain-PyTorch reference they replace.

Each row: one kernel at the real Thinker sizes, GPU time per call (20 calls queued between two CUDA events, median
of 10), effective bandwidth (bytes read + written / time) and whether it equals the reference bit for bit (fp32 sums
in another order may differ by rounding; the expert-LoRA products: within one bf16 step). Prints a table, writes bench_kernels.json to $OUT.
Usage (GPU machine): PYTHONPATH=src python bench/bench_kernels.py
"""
from __future__ import annotations

import json
import os
import statistics

import torch

from omnitune.kernels.fused_ops import (
    gather_sum_reference,
    gather_sum_triton,
    weighted_swiglu_backward_reference,
    weighted_swiglu_backward_triton,
)
from omnitune.kernels.nf4 import dequantize_nf4_reference, dequantize_nf4_triton, quantize_nf4

# the Thinker's experts: gate_up_proj [128, 1536, 2048] and down_proj [128, 2048, 768] per layer
EXPERT_SHAPES = {"gate_up_proj": (128, 1536, 2048), "down_proj": (128, 2048, 768)}


def cuda_ms(fn, calls: int = 20) -> float:
    """GPU time per call: `calls` back-to-back calls between two events, queued behind a sleep kernel, median of 10.
    Timing single synchronized calls (as this did until 2026-11-28) also timed the launch on the CPU, tens of us
    for a Triton kernel with many arguments, while the GPU waited."""
    for _ in range(3):
        fn()
    times = []
    for _ in range(10):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda._sleep(20_000_000)
        start.record()
        for _ in range(calls):
            fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / calls)
    return statistics.median(times)


def nf4_rows() -> list[dict]:
    compiled = torch.compile(dequantize_nf4_reference)
    rows = []
    for name, shape in EXPERT_SHAPES.items():
        q = quantize_nf4(torch.randn(shape, device="cuda", dtype=torch.bfloat16))
        moved = q.packed.numel() + q.absmax.numel() * 4 + q.packed.numel() * 2 * 2  # read packed + scales, write bf16
        ref = compiled(q.packed, q.absmax, q.codes, torch.bfloat16)
        for impl, fn in (("torch.compile reference", compiled), ("triton", dequantize_nf4_triton)):
            ms = cuda_ms(lambda: fn(q.packed, q.absmax, q.codes, torch.bfloat16))
            exact = torch.equal(fn(q.packed, q.absmax, q.codes, torch.bfloat16), ref)
            rows.append(dict(kernel=f"nf4 dequant {name}", impl=impl, ms=ms, gb_s=moved / ms / 1e6, exact=exact))
    return rows


def gather_sum_rows() -> list[dict]:
    """The experts' combine at 4096 tokens, top-8: [32768, 2048] rows (LoRA already added) -> [4096, 2048]."""
    compiled = torch.compile(gather_sum_reference)
    index = torch.randperm(32768, device="cuda")
    inputs = torch.randn(32768, 2048, device="cuda", dtype=torch.bfloat16)
    moved = (32768 + 4096) * 2048 * 2
    ref = compiled(index, 8, inputs)
    rows = []
    for impl, fn in (("torch.compile reference", compiled), ("triton", gather_sum_triton)):
        ms = cuda_ms(lambda: fn(index, 8, inputs))
        out = fn(index, 8, inputs)
        rows.append(dict(kernel="gather_sum", impl=impl, ms=ms, gb_s=moved / ms / 1e6, exact=torch.equal(out, ref),
                         max_rel=float((out.float() - ref.float()).abs().max() / ref.float().abs().max())))
    return rows


def swiglu_backward_rows() -> list[dict]:
    """The experts' SwiGLU backward at 4096 tokens x top-8 (gate_up [32768, 1536]): d gate_up and d row weight."""
    compiled = torch.compile(weighted_swiglu_backward_reference)
    gate_up = torch.randn(32768, 1536, device="cuda", dtype=torch.bfloat16)
    grad = torch.randn(32768, 768, device="cuda", dtype=torch.bfloat16)
    w = torch.rand(32768, device="cuda", dtype=torch.bfloat16)
    moved = 32768 * (1536 * 2 + 768) * 2
    ref = weighted_swiglu_backward_reference(grad.double(), gate_up.double(), w.double())
    rows = []
    for impl, fn in (("torch.compile reference", compiled), ("triton", weighted_swiglu_backward_triton)):
        ms = cuda_ms(lambda: fn(grad, gate_up, w))
        out = fn(grad, gate_up, w)
        rel = [float((o.double() - r).abs().max() / r.abs().max()) for o, r in zip(out, ref)]
        rows.append(dict(kernel="swiglu backward", impl=impl, ms=ms, gb_s=moved / ms / 1e6, max_rel=max(rel),
                         exact=max(rel) < 2 ** -7))  # vs fp64: within one bf16 step
    return rows


def expert_lora_rows() -> list[dict]:
    """The experts' rank-16 LoRA expand and weight-gradient products at 4096 tokens x top-8 (32768 rows, ~256 per
    expert): the Triton kernels (kernels/expert_lora.py) against what ran them before, torch's grouped GEMM (the
    weight gradient as its autograd backward computes it)."""
    import omnitune.kernels.expert_lora as L
    from omnitune.kernels.grouped_gemm import grouped_mm

    S, E, r = 32768, 128, 16
    row_expert = torch.sort(torch.randint(0, E, (S,), device="cuda")).values
    offsets = torch.cumsum(torch.bincount(row_expert, minlength=E), 0).to(torch.int32)
    rnd = lambda *shape: torch.randn(*shape, device="cuda", dtype=torch.bfloat16)  # noqa: E731
    rows = []
    for width in (2048, 1536, 768):
        xa, grad, w = rnd(S, r), rnd(S, width), rnd(E, r, width).requires_grad_(True)
        out = grouped_mm(xa, w, offsets)
        cases = {f"expand [S,16] @ [16,{width}]": (
                     lambda: grouped_mm(xa, w.detach(), offsets), lambda: L.expand(xa, w.detach(), offsets, row_expert, 1.0)),
                 f"weight_grad [16,S] @ [S,{width}]": (
                     lambda: torch.autograd.grad(out, w, grad, retain_graph=True)[0],
                     lambda: L.weight_grad(xa, grad, offsets, 1.0))}
        for kernel, (ref_fn, fast_fn) in cases.items():
            ref = ref_fn().float()
            err = float((fast_fn().float() - ref).abs().max() / ref.abs().max())
            for impl, fn in (("torch grouped_mm", ref_fn), ("triton", fast_fn)):
                ms = cuda_ms(fn)
                rows.append(dict(kernel=kernel, impl=impl, ms=ms, gb_s=S * (r + width) * 2 / ms / 1e6,
                                 exact=impl != "triton" or err < 2 ** -7, max_rel=err if impl == "triton" else 0.0))
    return rows


def tile_sweep_rows() -> list[dict]:
    """Block shapes of the expert-LoRA kernels (rows x columns per program, warps) at the real sizes: expand added
    into the output (as the experts path runs it) and the weight gradient. Picks the kernels' defaults."""
    import triton

    import omnitune.kernels.expert_lora as L

    S, E, r = 32768, 128, 16
    row_expert = torch.sort(torch.randint(0, E, (S,), device="cuda")).values
    offsets = torch.cumsum(torch.bincount(row_expert, minlength=E), 0).to(torch.int32)
    expand, weight_grad = L._kernels()
    rows = []
    for width in (2048, 1536, 768):
        xa = torch.randn(S, r, device="cuda", dtype=torch.bfloat16)
        d = torch.randn(S, width, device="cuda", dtype=torch.bfloat16)
        w = torch.randn(E, r, width, device="cuda", dtype=torch.bfloat16)
        base = torch.randn(S, width, device="cuda", dtype=torch.bfloat16)
        ref_e = L.expand(xa, w, offsets, row_expert, 1.0, out=base.clone())
        ref_g = L.weight_grad(xa, d, offsets, 1.0)
        for bm in (32, 64, 128):
            for bn in (64, 128, 256):
                for warps in (4, 8):
                    out = base.clone()
                    grid = (triton.cdiv(S, bm), triton.cdiv(width, bn))
                    run_e = lambda: expand[grid](xa, w, row_expert, out, S, width, 1.0, R=r, BM=bm, BN=bn,  # noqa: E731
                                                 ACC=True, num_warps=warps)
                    run_e()
                    ok_e = bool(torch.allclose((out - base).float(), (ref_e - base).float(), atol=0.05, rtol=0.02))
                    g = torch.empty(E, r, width, device="cuda", dtype=torch.bfloat16)
                    run_g = lambda: weight_grad[(E, triton.cdiv(width, bn))](xa, d, offsets, g, width, 1.0, R=r,  # noqa: E731
                                                                             BM=bm, BN=bn, num_warps=warps)
                    run_g()
                    ok_g = bool(torch.allclose(g.float(), ref_g.float(), atol=0.5, rtol=0.02))
                    for kernel, fn, ok in (("expand+=", run_e, ok_e), ("weight_grad", run_g, ok_g)):
                        rows.append(dict(kernel=f"{kernel} N={width} BM={bm} BN={bn} warps={warps}", impl="triton",
                                         ms=cuda_ms(fn), gb_s=0.0, exact=ok))
    return rows


def main() -> None:
    rows = expert_lora_rows() + nf4_rows() + gather_sum_rows() + swiglu_backward_rows()
    if os.environ.get("BENCH_SWEEP"):
        rows += tile_sweep_rows()
    print("| kernel | impl | ms | GB/s | equals reference |\n|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['kernel']} | {r['impl']} | {r['ms']:.3f} | {r['gb_s']:.0f} | {r['exact']} |")
    out = os.environ.get("OUT", ".")
    with open(os.path.join(out, "bench_kernels.json"), "w") as f:
        json.dump(dict(device=torch.cuda.get_device_name(0), torch=torch.__version__, rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
