"""AdamW over the 48-layer Thinker's LoRA parameters (576 fp32 tensors, 642.5M values): how close to the memory
bandwidth does each way of running the update get?

Rows: torch's fused AdamW (what HF Trainer runs, `adamw_torch_fused`) over the 576 tensors and over one flat tensor
of the same size; a Triton kernel over flat buffers (a bound: it needs the values in one tensor); omnitune's
multi-tensor kernel (kernels/adamw.py, the tensors where they are) at its block shape and at others. Each row: GPU
time per step (bench_kernels.cuda_ms: 20 steps queued behind a sleep kernel, median of 10), bandwidth (7 fp32
passes: p, g, m, v read; p, m, v written) and the largest difference from torch's fused update of the same inputs
after 3 steps. Prints a table, writes bench_optimizer.json to $OUT.
Usage (GPU machine): PYTHONPATH=src:bench python bench/bench_optimizer.py
"""
from __future__ import annotations

import json
import os

import torch
import triton
import triton.language as tl

from bench_kernels import cuda_ms
from omnitune.kernels.adamw import BLOCK, _kernel, adamw_update_

LR, B1, B2, EPS, WD = 1e-4, 0.9, 0.999, 1e-8, 0.01


def lora_shapes(layers: int = 48) -> list[tuple[int, ...]]:
    """The trainable shapes of the bench's LoRA (r16 on q/k/v/o and the fused experts), built on the meta device."""
    from bench_moe_lora import thinker_config
    from peft import LoraConfig, get_peft_model
    from transformers import Qwen3OmniMoeThinkerForConditionalGeneration

    with torch.device("meta"):
        model = Qwen3OmniMoeThinkerForConditionalGeneration(thinker_config(layers))
    prefix = "model.language_model.layers"
    attn = [f"{prefix}.{i}.self_attn.{p}" for i in range(layers) for p in ("q_proj", "k_proj", "v_proj", "o_proj")]
    experts = [f"{prefix}.{i}.mlp.experts.{p}" for i in range(layers) for p in ("gate_up_proj", "down_proj")]
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules=attn, target_parameters=experts))
    return [tuple(p.shape) for p in model.parameters() if p.requires_grad]


@triton.jit
def _adamw_math(p, g, m, v, lr, b1, b2, eps, wd, step_size, inv_sqrt_bc2):
    p = p * (1.0 - lr * wd)
    m = b1 * m + (1.0 - b1) * g
    v = b2 * v + (1.0 - b2) * g * g
    p = p - step_size * m / (tl.sqrt(v) * inv_sqrt_bc2 + eps)
    return p, m, v


@triton.jit
def _adamw_flat_kernel(p_ptr, g_ptr, m_ptr, v_ptr, n, lr, b1, b2, eps, wd, step_size, inv_sqrt_bc2,
                       BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    p, m, v = _adamw_math(tl.load(p_ptr + offs, mask=mask), tl.load(g_ptr + offs, mask=mask),
                          tl.load(m_ptr + offs, mask=mask), tl.load(v_ptr + offs, mask=mask),
                          lr, b1, b2, eps, wd, step_size, inv_sqrt_bc2)
    tl.store(p_ptr + offs, p, mask=mask)
    tl.store(m_ptr + offs, m, mask=mask)
    tl.store(v_ptr + offs, v, mask=mask)


def chunk_table(numels: list[int], block: int) -> tuple[torch.Tensor, torch.Tensor]:
    tensor, start = [], []
    for t, n in enumerate(numels):
        for s in range(0, n, block):
            tensor.append(t)
            start.append(s)
    return (torch.tensor(tensor, dtype=torch.int32, device="cuda"),
            torch.tensor(start, dtype=torch.int64, device="cuda"))


def scalars(step: int) -> dict:
    return dict(lr=LR, b1=B1, b2=B2, eps=EPS, wd=WD, step_size=LR / (1 - B1 ** step),
                inv_sqrt_bc2=1 / (1 - B2 ** step) ** 0.5)


def main() -> None:
    shapes = lora_shapes()
    numels = [int(torch.Size(s).numel()) for s in shapes]
    total = sum(numels)
    gen = torch.Generator(device="cuda").manual_seed(0)

    def fresh() -> list[list[torch.Tensor]]:  # p, g, m, v as separate tensors (the optimizer's own layout)
        ops = [[torch.randn(s, device="cuda", generator=gen) * 0.02 for s in shapes] for _ in range(2)]
        return ops + [[torch.zeros(s, device="cuda") for s in shapes] for _ in range(2)]

    rows = []
    moved = 7 * 4 * total

    def row(name: str, ms: float, err: float | None) -> None:
        rows.append(dict(impl=name, ms=ms, tb_s=moved / ms / 1e9, max_abs_diff_vs_torch_fused=err))
        print(json.dumps(rows[-1]), flush=True)

    # reference: torch fused over the list, 3 steps from the same start, kept to compare every variant against
    p, g, m, v = fresh()
    start = [t.clone() for t in p]
    steps = torch.tensor(0.0, device="cuda")

    def torch_fused(p, g, m, v, step_t):
        step_t += 1
        torch._fused_adamw_(p, g, m, v, [], [step_t] * len(p), lr=LR, beta1=B1, beta2=B2, weight_decay=WD, eps=EPS,
                            amsgrad=False, maximize=False)

    for _ in range(3):
        torch_fused(p, g, m, v, steps)
    expect = [t.clone() for t in p]
    row("torch fused AdamW, 576 tensors", cuda_ms(lambda: torch_fused(p, g, m, v, steps)), 0.0)

    flat = [torch.cat([t.flatten() for t in ts]) for ts in (start, g)] + [torch.zeros(total, device="cuda")
                                                                         for _ in range(2)]
    steps.zero_()
    for _ in range(3):
        torch_fused(*[[t] for t in flat], steps)
    err = (flat[0] - torch.cat([t.flatten() for t in expect])).abs().max().item()
    row("torch fused AdamW, one flat tensor", cuda_ms(lambda: torch_fused(*[[t] for t in flat], steps)), err)

    expect_flat = torch.cat([t.flatten() for t in expect])
    for block, warps in ((1024, 4), (2048, 8)):
        fp = [torch.cat([t.flatten() for t in ts]) for ts in (start, g)] + [torch.zeros(total, device="cuda")
                                                                           for _ in range(2)]
        grid = (triton.cdiv(total, block),)

        def flat_step(k=1):
            _adamw_flat_kernel[grid](*fp, total, **scalars(k), BLOCK=block, num_warps=warps)

        for k in range(1, 4):
            flat_step(k)
        row(f"triton flat, block {block}, {warps} warps", cuda_ms(flat_step), (fp[0] - expect_flat).abs().max().item())

    def separate() -> list[list[torch.Tensor]]:
        return [[t.clone() for t in start], g, [torch.zeros(s, device="cuda") for s in shapes],
                [torch.zeros(s, device="cuda") for s in shapes]]

    ops = separate()
    for k in range(1, 4):
        adamw_update_(*ops, lr=LR, beta1=B1, beta2=B2, eps=EPS, weight_decay=WD, step=k)
    err = max((a - b).abs().max().item() for a, b in zip(ops[0], expect))
    row(f"omnitune adamw_update_ (576 tensors, block {BLOCK})", cuda_ms(
        lambda: adamw_update_(*ops, lr=LR, beta1=B1, beta2=B2, eps=EPS, weight_decay=WD, step=3)), err)
    kernel = _kernel()
    for block, warps in ((512, 4), (1024, 2), (1024, 8), (2048, 4)):  # the same kernel, other block shapes
        ops = separate()
        ct, cs = chunk_table(numels, block)
        addresses = torch.tensor([t.data_ptr() for i in range(len(shapes)) for t in (o[i] for o in ops)],
                                 dtype=torch.int64, device="cuda")
        numels_t = torch.tensor(numels, dtype=torch.int64, device="cuda")

        def multi_step(k=1):
            sc = scalars(k)
            kernel[(ct.numel(),)](addresses, ct, cs, numels_t, 1 - LR * WD, 1 - B1, B2, 1 - B2, EPS,
                                  sc["step_size"], 1 / sc["inv_sqrt_bc2"], BLOCK=block, num_warps=warps)

        for k in range(1, 4):
            multi_step(k)
        err = max((a - b).abs().max().item() for a, b in zip(ops[0], expect))
        row(f"omnitune kernel, block {block}, {warps} warps", cuda_ms(multi_step), err)

    print(f"\n{len(shapes)} tensors, {total / 1e6:.1f}M fp32 values, {moved / 1e9:.1f} GB per step")
    print("| impl | ms/step | TB/s | max diff vs torch fused |\n|---|---|---|---|")
    for r in rows:
        print(f"| {r['impl']} | {r['ms']:.3f} | {r['tb_s']:.2f} | {r['max_abs_diff_vs_torch_fused']:.2e} |")
    out = os.environ.get("OUT", ".")
    with open(os.path.join(out, "bench_optimizer.json"), "w") as f:
        json.dump(dict(device=torch.cuda.get_device_name(0), tensors=len(shapes), values=total, rows=rows), f,
                  indent=1)


if __name__ == "__main__":
    main()
