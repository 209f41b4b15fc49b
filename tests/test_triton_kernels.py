"""The hand-written Triton kernels (CUDA-only in use), checked without a GPU: (1) they compile for an H100 (sm90,
down to the cubin): the interpreter below accepts code that the GPU compiler rejects, e.g. a plain global read in a
kernel; (2) they run under triton's CPU interpreter against their plain PyTorch references. The interpreter casts
fp32 -> bf16 by truncation where the GPU rounds to nearest, so bf16 results are compared within one bf16 step;
fp32 ones exactly or to fp32 summation-order rounding."""
import os
import subprocess
import sys

import pytest

triton = pytest.importorskip("triton")


def run_interpreted(code: str) -> None:
    env = {**os.environ, "TRITON_INTERPRET": "1"}  # read when the kernels are built: a fresh process
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 0 and res.stdout.strip() == "ok", res.stdout[-2000:] + res.stderr[-3000:]


def compile_for_h100(kernel, signature: dict, constexprs: dict) -> None:
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    signature = {**signature, **dict.fromkeys(constexprs, "constexpr")}
    compiled = triton.compile(ASTSource(kernel, signature=signature, constexprs=constexprs),
                              target=GPUTarget("cuda", 90, 32))
    assert compiled.asm["cubin"]


def test_the_kernels_compile_for_an_h100():
    from omnitune.kernels.fused_ops import GATHER_SUM_COLS, _gather_sum_kernel
    from omnitune.kernels.nf4 import BLOCK, BYTES_PER_PROGRAM, _nf4_kernel

    compile_for_h100(_nf4_kernel(), {"packed_ptr": "*u8", "absmax_ptr": "*fp32", "codes_ptr": "*fp32",
                                     "out_ptr": "*bf16", "n_bytes": "i64"},
                     {"BYTES": BYTES_PER_PROGRAM, "BYTES_PER_SCALE": BLOCK // 2})
    for two in (False, True):
        compile_for_h100(_gather_sum_kernel(), {"index_ptr": "*i64", "a_ptr": "*bf16", "b_ptr": "*bf16",
                                                "out_ptr": "*bf16", "width": "i32"},
                         {"TOP_K": 8, "TWO": two, "COLS": GATHER_SUM_COLS})
    from omnitune.kernels.expert_lora import BLOCK_COLS, BLOCK_ROWS, _kernels

    expand, weight_grad = _kernels()
    tiles = {"R": 16, "BM": BLOCK_ROWS}
    compile_for_h100(expand, {"xa_ptr": "*bf16", "w_ptr": "*bf16", "row_expert_ptr": "*i64", "out_ptr": "*bf16",
                              "rows": "i32", "cols": "i32", "scale": "fp32"}, {**tiles, "BN": BLOCK_COLS})
    compile_for_h100(weight_grad, {"p_ptr": "*bf16", "d_ptr": "*bf16", "offsets_ptr": "*i32", "out_ptr": "*bf16",
                                   "cols": "i32", "scale": "fp32"}, {**tiles, "BN": BLOCK_COLS})


def test_nf4_dequant_kernel_matches_the_reference():
    run_interpreted("""
import torch
from omnitune.kernels.nf4 import dequantize_nf4_reference, dequantize_nf4_triton, quantize_nf4
torch.manual_seed(0)
q = quantize_nf4(torch.randn(3, 700, 128))  # not a multiple of the kernel's bytes per program: masked tail
for dtype in (torch.float32, torch.bfloat16):
    fast = dequantize_nf4_triton(q.packed, q.absmax, q.codes, dtype).float()
    ref = dequantize_nf4_reference(q.packed, q.absmax, q.codes, dtype).float()
    err = float((fast - ref).abs().max() / ref.abs().max())
    assert torch.equal(fast, ref) if dtype == torch.float32 else err < 2 ** -7, (dtype, err)
print("ok")
""")


def test_gather_sum_kernel_matches_the_reference_for_one_and_two_row_tensors():
    run_interpreted("""
import torch
from omnitune.kernels.fused_ops import gather_sum_reference, gather_sum_triton
torch.manual_seed(0)
S, K, H = 48, 4, 1500  # H not a multiple of the columns per program: masked tail
perm = torch.randperm(S)
for n in (1, 2):
    rows = [torch.randn(S, H) for _ in range(n)]
    fast, ref = gather_sum_triton(perm, K, *rows), gather_sum_reference(perm, K, *rows)
    assert fast.shape == (S // K, H)
    torch.testing.assert_close(fast, ref, rtol=1e-6, atol=1e-5)
    rows = [r.bfloat16() for r in rows]
    fast, ref = gather_sum_triton(perm, K, *rows).float(), gather_sum_reference(perm, K, *rows).float()
    assert float((fast - ref).abs().max() / ref.abs().max()) < 2 ** -7
print("ok")
""")


def test_expert_lora_kernels_match_the_grouped_gemm_reference():
    """Blocks of rows that span several experts, experts without rows (also the first and the last), widths not a
    multiple of the tile: against the plain grouped GEMM. In fp32 only: the interpreter's bf16 tl.dot returns
    garbage (the GPU smoke in bench/bench_moe_lora.py checks the bf16 experts path, these kernels included)."""
    run_interpreted("""
import torch
import omnitune.kernels.expert_lora as L
from omnitune.kernels.grouped_gemm import grouped_mm_loop
torch.manual_seed(0)
counts = torch.tensor([0, 70, 3, 0, 0, 150, 1, 29, 0])  # 253 rows: blocks of 64 span up to 5 experts
E, S, r, N = len(counts), int(counts.sum()), 16, 150
offsets = torch.cumsum(counts, 0).to(torch.int32)
row_expert = torch.repeat_interleave(torch.arange(E), counts)
xa, d = torch.randn(S, r), torch.randn(S, N)
b_rows = torch.randn(E, r, N)
ref_expand = grouped_mm_loop(xa, b_rows, offsets) * 0.5
ref_grad = torch.stack([xa[offsets[e] - counts[e]:offsets[e]].T @ d[offsets[e] - counts[e]:offsets[e]]
                        for e in range(E)]) * 0.5
L._triton_applies = lambda rank, *ts: True  # the kernels under the interpreter, on CPU tensors
got = [L.expand(xa, b_rows, offsets, row_expert, 0.5), L.weight_grad(xa, d, offsets, 0.5)]
for g, ref in zip(got, (ref_expand, ref_grad)):
    assert g.shape == ref.shape
    torch.testing.assert_close(g, ref, rtol=1e-5, atol=1e-5)
assert not got[1][[0, 3, 4, 8]].any()  # experts without rows: zero gradient
print("ok")
""")
