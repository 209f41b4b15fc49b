"""Issue 21's memory table: peak GPU memory, ms per step and tok/s of `omnitune train` runs under the memory cap
of the card each row targets (`torch.cuda.set_per_process_memory_fraction`), on a real-width Thinker with random
weights, beside the plain transformers + PEFT path, each run in its own process.

Every run is bench/bench_train.py's child (the real trainer: plan, data cache, collator, objective, optimizer,
callbacks), the cap set once the model is built (the bench builds its random bf16 weights on the GPU); the plan's
memory estimate (train/memory.py, against the cap), printed at the start of the run, is recorded beside the
measured peak. A row that runs out of memory under its cap says OOM.

Rows (recipe overrides on bench_train's base: the `instruct` preset at r16, batch 1, grad_accum 1, seq --seq):
  r16           today's bf16 LoRA r16 path (fp32 LoRA, AdamW on the GPU): the speed reference, no cap
  instruct      the `instruct` preset as shipped (r64; its memory settings), cap 76 GiB (an 80 GB card)
  instruct-accum the instruct row with grad_accum 8: the 8-bit optimizer's step spread as in training
  instruct-fp32 r64 with fp32 LoRA and fp32 AdamW states (before issue 21), no cap
  qlora         QLoRA r16 with bf16 LoRA, 8-bit AdamW stepped in the backward, cap 22 GiB (a 24 GB card)
  qlora-graphs  the qlora row with the optimizer after the backward (so the step replays as a CUDA graph)
  qlora-accum   the qlora-graphs row with grad_accum 8 (the gradients held across micro-batches)
  qlora-offload the qlora row with the NF4 experts streamed from pinned host memory, cap 14 GiB (a 16 GB card)
  qlora-plain   QLoRA r16 with fp32 LoRA and AdamW (before issue 21), no cap
  peft          transformers grouped_mm + PEFT r16 as they ship, no cap
  video30       the instruct row with one 30 s video sample (bench_train's video data), its real-width towers run in
                the step (no encoder cache: the stricter measure), no cap

Usage (GPU machine; .wheels holds torchao, bench/fetch_wheels.sh): source bench/gpu_env.sh &&
    python3 bench/bench_memory.py [--runs r16,instruct,qlora,qlora-offload,peft] [--seq 4096 --layers 48 --steps 6
    --warmup 2 --profile ROWS --no-cap]   (the default rows take ~6 minutes; instruct-fp32 and qlora-plain re-measure
    issue 21's "before"; --profile writes profile_ROW.txt: the GPU and host op tables of 3 steps after the window)
The optimizer steps every micro-batch here (grad_accum 1): the presets accumulate 16, which spreads the low-bit
optimizer's per-tensor step over 16 micro-batches.
BENCH_DEVICE=cpu BENCH_TINY=1 dry-runs the same code on a CPU at tiny widths (tests/test_bench.py; no cap there).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

import bench_train

DEVICE = bench_train.DEVICE


def shipped(preset: str = "instruct") -> list[str]:
    """The preset's memory settings as overrides (bench_train's base pins the plain ones)."""
    from omnitune.recipe import load_recipe

    r = load_recipe(preset)
    return [f"adapter.lora_dtype={r.adapter.lora_dtype}", f"train.optimizer={r.train.optimizer}",
            f"train.optimizer_in_backward={str(r.train.optimizer_in_backward).lower()}",
            f"train.offload_towers={str(r.train.offload_towers).lower()}"]


PLAIN = ["adapter.lora_dtype=float32", "train.optimizer=adamw", "train.optimizer_in_backward=false",
         "train.offload_towers=false"]
LOW = ["adapter.lora_dtype=bfloat16", "train.optimizer=adamw8bit", "train.optimizer_in_backward=true"]
GRAPHED = [*LOW[:2], "train.optimizer_in_backward=false"]  # the optimizer after the graph
# name: (overrides, cap in GiB or None, what the row targets)
RUNS: dict[str, tuple[list[str], float | None, str]] = {
    "r16": (PLAIN, None, "speed reference"),
    "instruct": (["adapter.rank=64", "adapter.alpha=128", *shipped()], 76.0, "<= 76 GiB, >= 80% of r16 tok/s"),
    "instruct-accum": (["adapter.rank=64", "adapter.alpha=128", *shipped(), "train.grad_accum=8"], 76.0,
                       "the instruct row stepping every 8 micro-batches (the preset accumulates 16)"),
    "instruct-fp32": (["adapter.rank=64", "adapter.alpha=128", *PLAIN], None, "before: 95.4 GiB measured"),
    "qlora": (["adapter.method=qlora", *LOW], 22.0, "<= 22 GiB, >= 70% of r16 tok/s"),
    "qlora-graphs": (["adapter.method=qlora", *GRAPHED], 22.0, "<= 22 GiB, >= 70% of r16 tok/s (CUDA graphs)"),
    "qlora-accum": (["adapter.method=qlora", *GRAPHED, "train.grad_accum=8"], 22.0,
                    "the qlora-graphs row accumulating 8 micro-batches (the presets accumulate 16)"),
    "qlora-offload": (["adapter.method=qlora", *LOW, "train.offload_experts=true"], 14.0,
                      "<= 14 GiB (community best 7.2 GB at seq 2048)"),
    "qlora-plain": (["adapter.method=qlora", *PLAIN], None, "before: 27.9 GiB measured"),
    "peft": (["model.experts=grouped_mm", "train.uncheckpointed_layers=0", *PLAIN], None, "plain baseline"),
    "video30": (["adapter.rank=64", "adapter.alpha=128", *shipped(), "data.encoder_cache=false"], None,
                "below 88.5 GB (82.4 GiB), the seed's inference figure for a 30 s video"),
}
DATA = {"video30": "video"}  # rows whose sample is not text: bench_train's 30 s video, real-width towers


def row_cap(name: str, args) -> float | None:
    """The row's memory cap in GiB, None without one (or with --no-cap)."""
    return None if args.no_cap else RUNS[name][1]


def child(name: str, args) -> dict:
    """One row, in this process: cap the allocator, then run bench_train's child (the real trainer)."""
    overrides, cap = RUNS[name][0], row_cap(name, args)
    from omnitune.train import memory
    from omnitune.train import run as train_run

    if cap is not None and DEVICE == "cuda":
        # The estimate and `auto` see the card's cap; the allocator gets it once the model is built: the bench
        # makes its random bf16 Thinker on the GPU (57 GiB), where `omnitune train` loads QLoRA on the host and
        # quantizes onto the GPU module by module.
        memory.device_budget = lambda *_: cap * 2**30
        build = train_run.build_for_training

        def capped(*a, **kw):
            model = build(*a, **kw)
            torch.cuda.empty_cache()
            total = torch.cuda.get_device_properties(0).total_memory
            torch.cuda.set_per_process_memory_fraction(min(1.0, cap * 2**30 / total))
            return model

        train_run.build_for_training = capped

    seen = {}
    check = train_run.check_fits

    def recording(*a, **kw):
        seen["estimate"] = est = check(*a, **kw)
        return est

    train_run.check_fits = recording
    # measured even where the estimate says it won't fit: the estimate is recorded beside the peak
    result = bench_train.child(name, [*overrides, "train.check_memory=false", *args.set], args.seq, args.layers,
                               args.steps, args.warmup, profile=args.child_profile, data=DATA.get(name, "text"))
    est = seen.get("estimate")
    result.update(cap_gib=cap, estimate_gib=est.total / 2**30 if est else None,
                  estimate_parts={k: v / 2**30 for k, v in est.parts.items()} if est else None,
                  reserved_gib=torch.cuda.max_memory_reserved() / 2**30 if DEVICE == "cuda" else 0.0)
    return result


def stream_check(layers: int = 4) -> dict:
    """QLoRA with the experts streamed from host memory against QLoRA with them on the GPU, on a small-width
    Thinker on this GPU: the same loss and LoRA gradients (the CPU tests cannot exercise the copy stream). The
    gradients may differ in the last bits, as two runs on the GPU do (atomic adds in the backward; H100: 8.4e-10
    against |grad| ~1): `ok` allows 1e-6 of the largest gradient, and the GPU path's own rerun difference is
    reported beside it."""
    import copy

    from transformers import Qwen3OmniMoeThinkerForConditionalGeneration

    from common import build_on_device, thinker_config
    from omnitune.kernels import register_experts_implementation
    from omnitune.model.build import build_for_training
    from omnitune.recipe import AdapterConfig

    register_experts_implementation("omnitune")
    torch.manual_seed(0)
    cfg = thinker_config(layers, hidden=512, experts=32, moe_inter=256)
    base = build_on_device(Qwen3OmniMoeThinkerForConditionalGeneration, cfg, DEVICE)
    base.set_experts_implementation("omnitune")
    adapter = AdapterConfig(method="qlora", rank=16, alpha=32, targets=["attention", "experts"])
    out = {}
    ids = torch.randint(10, 150000, (1, 1024), device=DEVICE)
    for offload in (False, True, "rerun"):
        torch.manual_seed(1)
        model = build_for_training(copy.deepcopy(base), adapter, fast_paths=True, device=DEVICE,
                                   report=lambda _: None, offload_experts=offload is True)
        with torch.autocast(DEVICE, dtype=torch.bfloat16):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        out[offload] = (loss.detach().float(), {n: p.grad.float() for n, p in model.named_parameters()
                                                if p.grad is not None})
    (loss0, g0), (loss1, g1), (_, again) = out[False], out[True], out["rerun"]
    diff = max(float((g0[n] - g1[n]).abs().max()) for n in g0)
    scale = max(float(g.abs().max()) for g in g0.values())
    return dict(loss_on_gpu=float(loss0), loss_streamed=float(loss1), max_grad_diff=diff,
                gpu_rerun_grad_diff=max(float((g0[n] - again[n]).abs().max()) for n in g0), max_grad=scale,
                ok=bool(torch.equal(loss0, loss1)) and diff <= 1e-6 * scale and g0.keys() == g1.keys())


def spawn(name: str, args) -> dict:
    cmd = [sys.executable, __file__, "--child", name, "--seq", str(args.seq), "--layers", str(args.layers),
           "--steps", str(args.steps), "--warmup", str(args.warmup), *[a for o in args.set for a in ("--set", o)],
           *(["--no-cap"] if args.no_cap else []), *(["--child-profile"] if name in args.profile.split(",") else [])]
    cap = row_cap(name, args)
    t0 = time.time()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
    except subprocess.TimeoutExpired:
        return dict(run=name, cap_gib=cap, error=f"timeout after {args.timeout}s")
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        err = (proc.stdout + proc.stderr).strip().splitlines()
        oom = any("OutOfMemory" in ln or "out of memory" in ln for ln in err)
        refused = [ln for ln in err if "this recipe needs" in ln]
        return dict(run=name, cap_gib=cap, wall_s=time.time() - t0,
                    error="OOM" if oom else refused[-1] if refused else "\n".join(err[-25:]))
    out = json.loads(lines[-1][len("RESULT "):])
    out["wall_s"] = time.time() - t0
    return out


def table(results: list[dict]) -> str:
    rows = ["| run | rank | cap GiB | peak GiB | estimate GiB | ms/step | tok/s | vs r16 tok/s | target |",
            "|---|---|---|---|---|---|---|---|---|"]
    ref = next((r["tok_s"] for r in results if r.get("run") == "r16" and "tok_s" in r), None)
    for r in results:
        cap = f"{r['cap_gib']:.0f}" if r.get("cap_gib") else "-"
        target = RUNS.get(r["run"], ([], None, ""))[2]
        if "error" in r:
            rows.append(f"| {r['run']} | | {cap} | {r['error'].splitlines()[-1][:60]} | | | | | {target} |")
            continue
        est = f"{r['estimate_gib']:.1f}" if r.get("estimate_gib") is not None else "-"
        rel = f"{100 * r['tok_s'] / ref:.0f}%" if ref else "-"
        rows.append(f"| {r['run']} | {r['method']} r{r['rank']} | {cap} | {r['peak_gib']:.1f} | {est} | "
                    f"{r['ms']:.0f} | {r['tok_s']:.0f} | {rel} | {target} |")
    return "\n".join(rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--child")
    ap.add_argument("--runs", default="r16,instruct,qlora,qlora-offload,peft",
                    help=f"comma-separated, from {', '.join(RUNS)}")
    ap.add_argument("--seq", type=int, default=4096)
    ap.add_argument("--layers", type=int, default=48)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--set", action="append", default=[], help="recipe override for every run")
    ap.add_argument("--timeout", type=int, default=300)
    ap.add_argument("--no-cap", action="store_true", help="run the rows without their cap: each one's own peak")
    ap.add_argument("--profile", default="", help="rows to profile extra steps of (bench_train's --profile)")
    ap.add_argument("--child-profile", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print("RESULT " + json.dumps(child(args.child, args)), flush=True)
        return
    unknown = [n for n in args.runs.split(",") if n not in RUNS]
    if unknown:
        sys.exit(f"unknown runs {unknown}: choose from {', '.join(RUNS)}")
    unprofiled = [n for n in args.profile.split(",") if n and n not in args.runs.split(",")]
    if unprofiled:
        sys.exit(f"--profile names rows not in --runs: {unprofiled}")
    import peft
    import transformers

    info = dict(torch=torch.__version__, transformers=transformers.__version__, peft=peft.__version__,
                device=torch.cuda.get_device_name(0) if DEVICE == "cuda" else "cpu", seq=args.seq, layers=args.layers)
    print(json.dumps(info), flush=True)
    out_dir = Path(os.environ.get("OUT", "."))
    out_dir.mkdir(parents=True, exist_ok=True)
    results = []
    if "qlora-offload" in args.runs.split(",") and DEVICE == "cuda":
        info["stream_check"] = stream_check()
        print(f"stream check: {info['stream_check']}", flush=True)
    for name in args.runs.split(","):
        results.append(spawn(name, args))
        bench_train.write_profile(out_dir, name, results[-1])
        print(json.dumps({k: v for k, v in results[-1].items() if k not in ("plan", "step_intervals_ms",
                                                                          "gpu_step_ms", "profile")}), flush=True)
        (out_dir / "bench_memory.json").write_text(json.dumps(dict(info=info, results=results), indent=1))
    print(table(results))


if __name__ == "__main__":
    main()
