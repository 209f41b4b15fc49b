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

    compile_for_h100(_nf4_kernel(), {"packed_ptr": "*u8", "absmax_ptr": "*fp16", "codes_ptr": "*fp32",
                                     "out_ptr": "*bf16", "n_bytes": "i64"},
                     {"BYTES": BYTES_PER_PROGRAM, "BYTES_PER_SCALE": BLOCK // 2})
    compile_for_h100(_gather_sum_kernel(), {"index_ptr": "*i64", "rows_ptr": "*bf16", "out_ptr": "*bf16",
                                            "width": "i32"}, {"TOP_K": 8, "COLS": GATHER_SUM_COLS})
    from omnitune.kernels.fused_ops import SWIGLU_COLS, SWIGLU_ROWS, _swiglu_backward_kernel

    compile_for_h100(_swiglu_backward_kernel(), {"gate_up_ptr": "*bf16", "grad_ptr": "*bf16", "w_ptr": "*bf16",
                                                 "d_gate_up_ptr": "*bf16", "d_w_ptr": "*bf16", "rows": "i32",
                                                 "inter": "i32"}, {"BM": SWIGLU_ROWS, "BN": SWIGLU_COLS})
    from omnitune.kernels.router import TOKENS_PER_PROGRAM
    from omnitune.kernels.router import _kernels as router_kernels

    forward, backward = router_kernels()
    for normalize in (False, True):
        compile_for_h100(forward, {"logits_ptr": "*bf16", "scores_ptr": "*bf16", "indices_ptr": "*i64",
                                   "tokens": "i32"}, {"E": 128, "K": 8, "NORMALIZE": normalize,
                                                      "BT": TOKENS_PER_PROGRAM})
        compile_for_h100(backward, {"logits_ptr": "*bf16", "indices_ptr": "*i64", "grad_ptr": "*bf16",
                                    "d_logits_ptr": "*bf16", "tokens": "i32"},
                         {"E": 128, "K": 8, "NORMALIZE": normalize, "BT": TOKENS_PER_PROGRAM})
    from omnitune.kernels.expert_lora import BLOCK_COLS, BLOCK_ROWS, _kernels

    expand, weight_grad = _kernels()
    tiles = {"R": 16, "BM": BLOCK_ROWS}
    for acc in (False, True):
        compile_for_h100(expand, {"xa_ptr": "*bf16", "w_ptr": "*bf16", "row_expert_ptr": "*i64", "out_ptr": "*bf16",
                                  "rows": "i32", "cols": "i32", "scale": "fp32"},
                         {**tiles, "BN": BLOCK_COLS, "ACC": acc})
    compile_for_h100(weight_grad, {"p_ptr": "*bf16", "d_ptr": "*bf16", "offsets_ptr": "*i32", "out_ptr": "*bf16",
                                   "cols": "i32", "scale": "fp32"}, {**tiles, "BN": BLOCK_COLS})
    from omnitune.kernels.adamw import BLOCK as ADAMW_BLOCK
    from omnitune.kernels.adamw import _kernel as adamw_kernel

    compile_for_h100(adamw_kernel(), {"addresses": "*i64", "block_tensor": "*i32", "block_start": "*i64",
                                      "numels": "*i64", "skip": "*i32",
                                      **dict.fromkeys(("keep", "w1", "beta2", "w2", "eps",
                                                                         "step_size", "bias2_sqrt"), "fp32")},
                     {"BLOCK": ADAMW_BLOCK})


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


def test_gather_sum_kernel_matches_the_reference():
    run_interpreted("""
import torch
from omnitune.kernels.fused_ops import gather_sum_reference, gather_sum_triton
torch.manual_seed(0)
S, K, H = 48, 4, 1500  # H not a multiple of the columns per program: masked tail
perm = torch.randperm(S)
rows = torch.randn(S, H)
fast, ref = gather_sum_triton(perm, K, rows), gather_sum_reference(perm, K, rows)
assert fast.shape == (S // K, H)
torch.testing.assert_close(fast, ref, rtol=1e-6, atol=1e-5)
rows = rows.bfloat16()
fast, ref = gather_sum_triton(perm, K, rows).float(), gather_sum_reference(perm, K, rows).float()
assert float((fast - ref).abs().max() / ref.abs().max()) < 2 ** -7
print("ok")
""")


def test_swiglu_backward_kernel_matches_the_reference():
    """Rows and columns not multiples of the kernel's blocks (masked tails), in fp32 and bf16 (elementwise math and
    a row sum: no tl.dot, so the interpreter's bf16 is usable)."""
    run_interpreted("""
import torch
from omnitune.kernels.fused_ops import weighted_swiglu_backward_reference, weighted_swiglu_backward_triton
torch.manual_seed(0)
S, I = 37, 300
gate_up, grad, w = torch.randn(S, 2 * I), torch.randn(S, I), torch.rand(S)
fast = weighted_swiglu_backward_triton(grad, gate_up, w)
ref = weighted_swiglu_backward_reference(grad, gate_up, w)
for f, r in zip(fast, ref):
    assert f.shape == r.shape and f.dtype == r.dtype
    torch.testing.assert_close(f, r, rtol=1e-5, atol=1e-5)
fast = weighted_swiglu_backward_triton(grad.bfloat16(), gate_up.bfloat16(), w.bfloat16())
ref = weighted_swiglu_backward_reference(grad.double(), gate_up.bfloat16().double(), w.bfloat16().double())
for f, r in zip(fast, ref):
    assert f.dtype == torch.bfloat16
    assert float((f.double() - r).abs().max() / r.abs().max()) < 2 ** -7
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
base = torch.randn(S, N)
got = [L.expand(xa, b_rows, offsets, row_expert, 0.5), L.weight_grad(xa, d, offsets, 0.5)]
into = L.expand(xa, b_rows, offsets, row_expert, 0.5, out=base.clone())  # accumulated in place
torch.testing.assert_close(into, base + ref_expand, rtol=1e-5, atol=1e-5)
for g, ref in zip(got, (ref_expand, ref_grad)):
    assert g.shape == ref.shape
    torch.testing.assert_close(g, ref, rtol=1e-5, atol=1e-5)
assert not got[1][[0, 3, 4, 8]].any()  # experts without rows: zero gradient
try:
    L.expand(xa, b_rows, offsets, row_expert, 0.5, out=torch.zeros(N, S).T)
    raise AssertionError("a strided `out` must be refused, not written through wrong strides")
except ValueError:
    pass
print("ok")
""")


def test_router_top_k_kernels_match_the_transformers_math():
    """Forward (scores, indices, descending) and backward (d logits through softmax, top-k and renormalising) against
    autograd of the reference, with and without renormalising; tokens not a multiple of the block (masked tail)."""
    run_interpreted("""
import torch
from omnitune.kernels.router import (top_k_softmax_backward_triton, top_k_softmax_reference,
                                     top_k_softmax_triton)
torch.manual_seed(0)
for normalize in (False, True):
    logits = torch.randn(37, 64, requires_grad=True)
    ref_scores, ref_idx = top_k_softmax_reference(logits, 8, normalize)
    scores, idx = top_k_softmax_triton(logits.detach(), 8, normalize)
    assert torch.equal(idx, ref_idx)
    torch.testing.assert_close(scores, ref_scores.detach(), rtol=1e-6, atol=1e-7)
    grad = torch.randn(37, 8)
    (expected,) = torch.autograd.grad((ref_scores * grad).sum(), logits)
    got = top_k_softmax_backward_triton(logits.detach(), idx, grad, normalize)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
# bf16 logits tie often: tied experts may come in another slot order (and a tie at the k-th place may pick another
# expert), so compare rows with the same experts, with the upstream gradient keyed by expert as the experts path has it
logits = torch.randn(64, 128).bfloat16().requires_grad_(True)
ref_scores, ref_idx = top_k_softmax_reference(logits, 8, True)
scores, idx = top_k_softmax_triton(logits.detach(), 8, True)
g_expert = torch.randn(64, 128).bfloat16()
(expected,) = torch.autograd.grad((ref_scores * g_expert.gather(1, ref_idx)).sum(), logits)
got = top_k_softmax_backward_triton(logits.detach(), idx, g_expert.gather(1, idx), True)
same = (idx.sort(-1).values == ref_idx.sort(-1).values).all(-1)
assert same.float().mean() > 0.9
rel = lambda a, b: float((a.double() - b.double()).norm() / b.double().norm())
assert rel(scores[same].sort(-1).values, ref_scores[same].sort(-1).values) < 1e-2
assert rel(got[same], expected[same]) < 1e-2, rel(got[same], expected[same])
print("ok")
""")


def test_adamw_kernel_and_optimizer_match_torch_adamw():
    """The multi-tensor kernel (tails, a tensor smaller than a block, new gradient tensors every step) and the
    optimizer around it (two groups, a parameter that skips a step, a checkpoint resumed by torch's AdamW) against
    torch.optim.AdamW. The optimizer takes the kernel only on CUDA; here its test for that accepts CPU tensors."""
    run_interpreted("""
import torch
import omnitune.train.optimizer as O
from omnitune.kernels.adamw import BLOCK, adamw_update_
torch.manual_seed(0)
shapes = [(3, BLOCK + 5), (7,), (16, 64), (2 * BLOCK,)]
ps = [torch.randn(s) for s in shapes]
ref = [torch.nn.Parameter(p.clone()) for p in ps]
opt = torch.optim.AdamW(ref, lr=3e-3, betas=(0.8, 0.95), eps=1e-6, weight_decay=0.1, foreach=False)
ms, vs = [torch.zeros_like(p) for p in ps], [torch.zeros_like(p) for p in ps]
for step in range(1, 4):
    grads = [torch.randn(s) for s in shapes]
    for p, g in zip(ref, grads):
        p.grad = g.clone()
    opt.step()
    adamw_update_(ps, grads, ms, vs, lr=3e-3, beta1=0.8, beta2=0.95, eps=1e-6, weight_decay=0.1, step=step)
for p, m, v, q in zip(ps, ms, vs, ref):
    torch.testing.assert_close(p, q.detach(), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(m, opt.state[q]["exp_avg"], rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(v, opt.state[q]["exp_avg_sq"], rtol=1e-6, atol=1e-7)

O.kernel_applies = lambda ts: all(t.dtype == torch.float32 and t.is_contiguous() for t in ts)
calls = []
update = O.adamw_update_
O.adamw_update_ = lambda *a, **k: calls.append(k["step"]) or update(*a, **k)
init = [torch.randn(s) for s in shapes]
mine = [torch.nn.Parameter(p.clone()) for p in init]
theirs = [torch.nn.Parameter(p.clone()) for p in init]
groups = lambda ps: [dict(params=ps[:2]), dict(params=ps[2:], weight_decay=0.0)]
a = O.MultiTensorAdamW(groups(mine), lr=1e-2, weight_decay=0.05, fused=True)
b = torch.optim.AdamW(groups(theirs), lr=1e-2, weight_decay=0.05, foreach=False)
for step in range(4):
    grads = [torch.randn(s) for s in shapes]
    for x, y, g in zip(mine, theirs, grads):
        x.grad = y.grad = None if step == 1 and x.shape == (7,) else g.clone()  # skips a step: its count lags
    a.step()
    b.step()
assert calls == [1, 1, 2, 2, 3, 2, 3, 4, 3, 4], calls  # per group and step count, one launch each
resumed = torch.optim.AdamW(groups(mine), lr=1e-2, weight_decay=0.05, foreach=False)
resumed.load_state_dict(a.state_dict())
grads = [torch.randn(s) for s in shapes]
for x, y, g in zip(mine, theirs, grads):
    x.grad, y.grad = g.clone(), g.clone()
resumed.step()
b.step()
for x, y in zip(mine, theirs):
    torch.testing.assert_close(x.detach(), y.detach(), rtol=1e-6, atol=1e-7)

# a step skipped on the device (train/guard.py's flag): nothing changes, and reconcile() gives the count back
before = [x.detach().clone() for x in mine]
moments = [a.state[x]["exp_avg"].clone() for x in mine]
steps = [a.state[x]["step"].item() for x in mine]
for x in mine:
    x.grad = torch.full_like(x, float("nan"))
a.skip_if = torch.ones((), dtype=torch.int32)
a.step()
assert all(torch.equal(x.detach(), b) for x, b in zip(mine, before))
assert all(torch.equal(a.state[x]["exp_avg"], m) for x, m in zip(mine, moments))
assert a.reconcile() == 1 and a.reconcile() == 0
assert [a.state[x]["step"].item() for x in mine] == steps  # as before the skipped step
print("ok")
""")
