"""`omnitune train` on each distributed engine (distributed.strategy) next to plain one-GPU training: ms/step,
tokens/s per GPU, MFU and peak memory per GPU, on the real-width Thinker with random weights.

Each run is bench/bench_train.py's measured child (the real trainer, the same data, the same clock) launched
under torchrun with `--nproc` processes (1: the engine at world size 1 on one GPU, issue 19; 2/4/8 on a
multi-GPU machine, issue 20); `single` is the plain one-GPU run without torchrun, the baseline of the table.
Scaling efficiency = (tokens/s per GPU at N GPUs) / (tokens/s of `single`).

Usage (GPU machine): source bench/gpu_env.sh && python3 bench/bench_scaleout.py \\
    --runs single,fsdp2,zero3 --nproc 1 --seq 4096 --layers 48          # one GPU (issue 19)
    --runs single,ddp,fsdp2,zero3 --nproc 2,4 --seq 4096 --layers 48    # several GPUs (issue 20)
    --runs zero3-full,fsdp2-full --nproc 4,8 --seq 4096 --layers 48     # full fine-tune (issue 20)
BENCH_DEVICE=cpu BENCH_TINY=1 dry-runs the same code on a CPU (tests/test_distributed_bench.py).
Writes $OUT/bench_scaleout.json and prints a table.
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

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))
import bench_train

DEVICE = bench_train.DEVICE
# named runs: recipe overrides on bench_train's base (LoRA r16 on attention + experts)
RUNS: dict[str, list[str]] = {
    "single": [],
    "ddp": ["distributed.strategy=ddp"],
    "fsdp2": ["distributed.strategy=fsdp2"],
    "zero2": ["distributed.strategy=zero2"],
    "zero3": ["distributed.strategy=zero3"],
    "fsdp2-full": ["distributed.strategy=fsdp2", "adapter.method=full", "adapter.freeze=[audio_tower,vision_tower]"],
    "zero3-full": ["distributed.strategy=zero3", "adapter.method=full", "adapter.freeze=[audio_tower,vision_tower]"],
    "zero3-offload": ["distributed.strategy=zero3", "distributed.offload=optimizer"],
}


def child(name: str, overrides: list[str], seq: int, layers: int, steps: int, warmup: int) -> dict:
    """One process of a run (under torchrun for the engines): bench_train's measured child on this process's GPU."""
    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    if DEVICE == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))  # build_on_device uses the current GPU
    bench_train.RUNS[name] = RUNS[name]
    result = bench_train.child(name, overrides, seq, layers, steps, warmup)
    peaks = [result["peak_gib"]]
    if world > 1:
        gathered = [None] * world
        torch.distributed.all_gather_object(gathered, result["peak_gib"])
        peaks = gathered
    # bench_train's tok/s is this process's tokens over the step time: tokens/s per GPU
    return dict(result, process=rank, world=world, peak_gib_per_rank=peaks, peak_gib=max(peaks))


def spawn(name: str, nproc: int, args) -> dict:
    child_args = [str(BENCH / "bench_scaleout.py"), "--child", name, "--seq", str(args.seq), "--layers",
                  str(args.layers), "--steps", str(args.steps), "--warmup", str(args.warmup),
                  *[a for o in args.set for a in ("--set", o)]]
    if name == "single":
        cmd = [sys.executable, *child_args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc),
               *child_args]
    t0 = time.time()
    try:
        proc = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=args.timeout)
    except subprocess.TimeoutExpired:
        return {"run": name, "nproc": nproc, "error": f"timeout after {args.timeout}s"}
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        err = (proc.stdout + proc.stderr).strip().splitlines()
        oom = any("OutOfMemory" in ln or "out of memory" in ln for ln in err)
        # the workers' own error, not torchrun's summary of it
        cause = [ln for ln in err if "Error" in ln and "ChildFailedError" not in ln and "elastic" not in ln]
        return {"run": name, "nproc": nproc, "error": "OOM" if oom else "\n".join(err[-25:] + cause[-1:]),
                    "wall_s": time.time() - t0}
    out = json.loads(lines[-1][len("RESULT "):])
    out.update(nproc=1 if name == "single" else nproc, wall_s=time.time() - t0)
    return out


def table(results: list[dict]) -> str:
    rows = ["| run | GPUs | method | tokens/GPU | ms/step | tok/s per GPU | MFU | peak GiB per GPU | scaling |",
            "|---|---|---|---|---|---|---|---|---|"]
    base = {(r["seq"], r["layers"], r["method"]): r["tok_s"] for r in results
            if r.get("run") == "single" and "tok_s" in r}
    for r in results:
        if "error" in r:
            rows.append(f"| {r['run']} | {r['nproc']} | error: {r['error'].splitlines()[-1][:90]} | | | | | | |")
            continue
        b = base.get((r["seq"], r["layers"], r["method"]))
        rows.append(f"| {r['run']} | {r['nproc']} | {r['method']} r{r['rank']} | {r['tokens']:.0f} "
                    f"| {r['ms']:.1f} | {r['tok_s']:.0f} | {100 * r['mfu']:.1f}% | {r['peak_gib']:.1f} | "
                    + (f"{100 * r['tok_s'] / b:.0f}% |" if b else "- |"))
    return "\n".join(rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--child")
    ap.add_argument("--runs", default="single,fsdp2,zero3", help=f"comma-separated, from {', '.join(RUNS)}")
    ap.add_argument("--nproc", default="1", help="comma-separated process (GPU) counts for the engine runs")
    ap.add_argument("--seq", type=int, default=4096)
    ap.add_argument("--layers", type=int, default=48)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--set", action="append", default=[], help="recipe override for every run")
    ap.add_argument("--timeout", type=int, default=240)
    args = ap.parse_args()
    if args.child:
        result = child(args.child, args.set, args.seq, args.layers, args.steps, args.warmup)
        if result["process"] == 0:
            print("RESULT " + json.dumps(result), flush=True)
        return
    import peft
    import transformers

    info = {"torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__,
                "device": torch.cuda.get_device_name(0) if DEVICE == "cuda" else "cpu",
                "gpus": torch.cuda.device_count() if DEVICE == "cuda" else 0}
    try:
        import deepspeed
        info["deepspeed"] = deepspeed.__version__
    except ImportError:
        info["deepspeed"] = None
    print(json.dumps(info), flush=True)
    out_dir = Path(os.environ.get("OUT", "."))
    out_dir.mkdir(parents=True, exist_ok=True)
    results = []
    for name in args.runs.split(","):
        for nproc in ([1] if name == "single" else [int(n) for n in args.nproc.split(",")]):
            results.append(spawn(name, nproc, args))
            print(json.dumps({k: v for k, v in results[-1].items() if k != "step_intervals_ms"}), flush=True)
            (out_dir / "bench_scaleout.json").write_text(json.dumps({"info": info, "results": results}, indent=1))
    print(table(results))


if __name__ == "__main__":
    main()
