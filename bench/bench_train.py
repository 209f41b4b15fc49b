"""What `omnitune train` delivers on a GPU: the real trainer (plan, data cache, collator, objective, CUDA-graph
step, optimizer, callbacks) for N optimizer steps on a real-width Thinker with random weights, against the plain
transformers + PEFT path through the same trainer (`model.experts=grouped_mm`: full logits, HF's default optimizer,
no graphs, no kernels of ours), each run in its own process.

The only difference from `omnitune train RECIPE` is where the weights come from: no checkpoint of random weights
at the real size exists on disk, so the model is built on the GPU and handed to `train(recipe, thinker=...)`;
everything after loading is the product's code. The data are text conversations of `--seq` tokens (1/8 prompt,
7/8 answer) written as JSONL and prepared by the data pipeline.

Timing: the interval between the optimizer steps `--warmup` and `--steps` (the host synchronised with the GPU at
both ends), so graph captures and the first steps are outside it. MFU = tok/s x 4 x active params / 770e12, with the
active parameters of the depth measured (bench/common.py). Prints a table, writes $OUT/bench_train.json.

Usage (GPU machine, pinned wheels in /tmp/pp): PYTHONPATH=/tmp/pp:src:bench python bench/bench_train.py \\
    --runs ours,peft --seq 4096 --layers 48 [--steps 8 --warmup 3] [--set train.lr=1e-5 ...]
BENCH_DEVICE=cpu BENCH_TINY=1 dry-runs the same code on a CPU at tiny widths (tests/test_bench.py).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from common import active_params, build_on_device, mfu, thinker_config

DEVICE = os.environ.get("BENCH_DEVICE", "cuda")
# named runs: recipe overrides on the `instruct` preset (LoRA on attention + experts; r16 unless said)
RUNS: dict[str, list[str]] = {
    "ours": [],
    "ours-ckpt": ["train.uncheckpointed_layers=0"],
    "ours-r64": ["adapter.rank=64", "adapter.alpha=128"],
    "qlora": ["adapter.method=qlora"],
    "qlora-ckpt": ["adapter.method=qlora", "train.uncheckpointed_layers=0"],
    "peft": ["model.experts=grouped_mm", "train.uncheckpointed_layers=0"],
}
BASE = ["adapter.rank=16", "adapter.alpha=32", "train.batch_size=1", "train.grad_accum=1", "train.lr=1e-5",
        "train.warmup_ratio=0", "train.save_steps=100000", "train.logging_steps=100000", "log.tensorboard=false",
        "data.workers=1", "model.path=tiny",  # the tiny checkpoint only lends its processor (the real tokenizer)
        # the speed path as measured before issue 21: fp32 LoRA and AdamW on the GPU (bench_memory.py measures the
        # presets' memory settings)
        "adapter.lora_dtype=float32", "train.optimizer=adamw", "train.offload_towers=false"]


def write_conversations(path: Path, tokenizer, n: int, seq: int, seed: int) -> int:
    """n text conversations of about `seq` tokens each once rendered; returns the tokens of the longest."""
    import random

    rng = random.Random(seed)
    words = [w for w in (tokenizer.decode([i]).strip() for i in rng.sample(range(1000, 60000), 4000))
             if w.isalpha() and len(w) > 2]
    longest = 0
    with path.open("w") as f:
        for _ in range(n):
            # ~1 token per word plus a space: aim below `seq` and let the chat template's tokens fill up
            answer = " ".join(rng.choice(words) for _ in range(seq * 7 // 8))
            prompt = " ".join(rng.choice(words) for _ in range(seq // 8 - 16))
            text_len = len(tokenizer(prompt + answer)["input_ids"])
            cut = max(0, text_len - (seq - 16))
            if cut:
                answer = " ".join(answer.split()[:-cut])
            longest = max(longest, len(tokenizer(prompt + " " + answer)["input_ids"]) + 16)
            f.write(json.dumps({"conversations": [{"role": "user", "content": prompt},
                                                  {"role": "assistant", "content": answer}]}) + "\n")
    return longest


class StepClock:
    """Host times at each optimizer step's end (synchronised at the two ends of the timed window) and the peak; with
    `profile`, one more optimizer step after the window under torch's profiler: how much of it the GPU was busy."""

    PROFILED_STEPS = 3  # after the timed window: the first starts from a synchronised GPU, the others are steady

    def __init__(self, warmup: int, steps: int, profile: bool = False):
        self.warmup, self.steps, self.marks, self.window = warmup, steps, [], None
        self.profile, self.profiler, self.profile_result = profile, None, None
        self.events: list = []  # a CUDA event at each step's end: the GPU's own step times, host waits aside

    def hook(self):
        from transformers import TrainerCallback

        clock = self

        class Callback(TrainerCallback):
            def on_train_begin(self, args, state, control, **kwargs):
                if DEVICE == "cuda":
                    torch.cuda.reset_peak_memory_stats()

            def on_step_end(self, args, state, control, **kwargs):
                if DEVICE == "cuda" and state.global_step <= clock.steps:
                    clock.events.append(torch.cuda.Event(enable_timing=True))
                    clock.events[-1].record()
                if state.global_step in (clock.warmup, clock.steps) and DEVICE == "cuda":
                    torch.cuda.synchronize()
                clock.marks.append(time.perf_counter())
                if state.global_step == clock.steps:
                    clock.window = clock.marks[-1] - clock.marks[clock.warmup - 1]
                    if clock.profile:
                        clock.start_profile()
                elif state.global_step == clock.steps + clock.PROFILED_STEPS and clock.profiler is not None:
                    clock.stop_profile()

        return Callback()

    def start_profile(self):
        from torch.profiler import ProfilerActivity, profile

        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if DEVICE == "cuda" else [])
        self.profiler = profile(activities=activities)
        self.profiler.__enter__()
        self.t0 = time.perf_counter()

    def stop_profile(self):
        if DEVICE == "cuda":
            torch.cuda.synchronize()
        wall_ms = 1e3 * (time.perf_counter() - self.t0)
        self.profiler.__exit__(None, None, None)
        spans = sorted((e.time_range.start, e.time_range.end) for e in self.profiler.events()
                       if e.device_type == torch.autograd.DeviceType.CUDA)
        busy, end = 0.0, float("-inf")  # the union of kernel intervals, in us
        for a, b in spans:
            busy += max(0.0, b - max(a, end))
            end = max(end, b)
        table = self.profiler.key_averages().table(sort_by="self_cpu_time_total", row_limit=30,
                                                   max_name_column_width=70)
        out = os.environ.get("OUT")
        if out and DEVICE == "cuda":
            trace = Path(out) / "trace.json"
            self.profiler.export_chrome_trace(str(trace))
            subprocess.run(["gzip", "-f", str(trace)], check=False)
        self.profile_result = dict(steps=self.PROFILED_STEPS, wall_ms=wall_ms, gpu_busy_ms=busy / 1e3,
                                   cpu_table=table)
        self.profiler = None


def child(name: str, overrides: list[str], seq: int, layers: int, steps: int, warmup: int,
          profile: bool = False) -> dict:
    from transformers import Qwen3OmniMoeThinkerForConditionalGeneration

    from omnitune.model.load import load_processor
    from omnitune.recipe import load_recipe
    from omnitune.train import run as train_run

    work = Path(tempfile.mkdtemp(prefix=f"bench-{name}-"))
    os.environ.setdefault("OMNITUNE_CACHE", str(work / "cache"))
    total_steps = steps + StepClock.PROFILED_STEPS if profile else steps
    recipe = load_recipe("instruct", [*BASE, *RUNS.get(name, []), *overrides, f"output_dir={work / 'run'}",
                                      f"train.max_steps={total_steps}"])
    processor = load_processor(recipe.model)
    longest = write_conversations(work / "train.jsonl", processor.tokenizer, total_steps, seq, seed=0)
    recipe = load_recipe("instruct", [*BASE, *RUNS.get(name, []), *overrides, f"output_dir={work / 'run'}",
                                      f"train.max_steps={total_steps}", f"data.train={work / 'train.jsonl'}",
                                      f"data.max_length={max(longest, seq)}"])
    t0 = time.time()
    cfg = thinker_config(layers)
    thinker = build_on_device(Qwen3OmniMoeThinkerForConditionalGeneration, cfg, DEVICE,
                              torch.float32 if DEVICE == "cpu" else torch.bfloat16)
    if recipe.model.experts == "omnitune":  # as model/load.py loads a checkpoint for this recipe
        from omnitune.kernels import register_experts_implementation

        register_experts_implementation("omnitune")
    thinker.set_experts_implementation(recipe.model.experts)
    build_s = time.time() - t0
    clock = StepClock(warmup, steps, profile)
    original = train_run.OmniTrainer.__init__
    train_run.save_final = lambda *args, **kwargs: None  # after the timed steps: writing GBs of adapter measures disks

    def with_clock(self, *args, **kwargs):
        kwargs["callbacks"] = [*kwargs.get("callbacks", []), clock.hook()]
        original(self, *args, **kwargs)
        child.trainer = self

    train_run.OmniTrainer.__init__ = with_clock
    result = train_run.train(recipe, thinker=thinker)
    trainer = child.trainer
    ms = 1e3 * clock.window / (steps - warmup)
    tokens = statistics.mean(len(trainer.train_dataset[i]["input_ids"]) for i in range(len(trainer.train_dataset)))
    tok_s = tokens / ms * 1e3
    intervals = [1e3 * (b - a) for a, b in zip(clock.marks, clock.marks[1:])]
    gpu_steps = [a.elapsed_time(b) for a, b in zip(clock.events, clock.events[1:])][warmup - 1:]
    plan = result.plan
    return dict(run=name, overrides=overrides, seq=seq, layers=layers, tokens=tokens, ms=ms, tok_s=tok_s,
                mfu=mfu(tok_s, active_params(cfg.text_config)),
                peak_gib=torch.cuda.max_memory_allocated() / 2**30 if DEVICE == "cuda" else 0.0,
                step_intervals_ms=intervals, gpu_step_ms=gpu_steps, build_s=build_s,
                graphs=trainer.graph_summary(),
                plan=plan.lines(), rank=recipe.adapter.rank, method=recipe.adapter.method,
                trainable=sum(p.numel() for p in trainer.model.parameters() if p.requires_grad),
                profile=clock.profile_result)


def spawn(name: str, overrides: list[str], args) -> dict:
    cmd = [sys.executable, __file__, "--child", name, "--seq", str(args.seq), "--layers", str(args.layers),
           "--steps", str(args.steps), "--warmup", str(args.warmup), *[a for o in overrides for a in ("--set", o)],
           *(["--profile", "1"] if name in args.profile.split(",") else [])]
    t0 = time.time()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
    except subprocess.TimeoutExpired:
        return dict(run=name, error=f"timeout after {args.timeout}s")
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        err = (proc.stdout + proc.stderr).strip().splitlines()
        oom = any("OutOfMemory" in ln or "out of memory" in ln for ln in err)
        return dict(run=name, error="OOM" if oom else "\n".join(err[-25:]), wall_s=time.time() - t0)
    out = json.loads(lines[-1][len("RESULT "):])
    out["wall_s"] = time.time() - t0
    return out


def table(results: list[dict]) -> str:
    rows = ["| run | path | tokens | ms/step | tok/s | MFU | peak GiB | vs transformers + PEFT |",
            "|---|---|---|---|---|---|---|---|"]
    base = {(r["seq"], r["layers"]): r["ms"] for r in results if r.get("run") == "peft" and "ms" in r}
    for r in results:
        if "error" in r:
            rows.append(f"| {r['run']} | error: {r['error'].splitlines()[-1][:80]} | | | | | | |")
            continue
        path = "transformers grouped_mm + PEFT" if r["run"] == "peft" else "omnitune train"
        b = base.get((r["seq"], r["layers"]))
        rows.append(f"| {r['run']} | {path} (r{r['rank']}, {r['layers']} layers) | {r['tokens']:.0f} | {r['ms']:.1f} "
                    f"| {r['tok_s']:.0f} | {100 * r['mfu']:.1f}% | {r['peak_gib']:.1f} | "
                    + (f"{b / r['ms']:.2f}x |" if b else "- |"))
    return "\n".join(rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--child")
    ap.add_argument("--runs", default="ours,peft", help=f"comma-separated, from {', '.join(RUNS)}")
    ap.add_argument("--seq", type=int, default=4096)
    ap.add_argument("--layers", type=int, default=48)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--set", action="append", default=[], help="recipe override for every run")
    ap.add_argument("--timeout", type=int, default=420)
    ap.add_argument("--profile", default="", help="runs to profile one extra step of (GPU busy time, host ops)")
    args = ap.parse_args()
    if args.child:
        result = child(args.child, args.set, args.seq, args.layers, args.steps, args.warmup, args.profile == "1")
        print("RESULT " + json.dumps(result), flush=True)
        return
    import peft
    import transformers

    info = dict(torch=torch.__version__, transformers=transformers.__version__, peft=peft.__version__,
                device=torch.cuda.get_device_name(0) if DEVICE == "cuda" else "cpu")
    print(json.dumps(info), flush=True)
    out_dir = Path(os.environ.get("OUT", "."))
    out_dir.mkdir(parents=True, exist_ok=True)
    results = []
    for name in args.runs.split(","):
        results.append(spawn(name, args.set, args))
        prof = results[-1].get("profile") or {}
        if prof:
            (out_dir / f"profile_{name}.txt").write_text(prof.pop("cpu_table"))
            print(f"{name}: {prof['steps']} profiled steps {prof['wall_ms']:.1f} ms, "
                  f"GPU busy {prof['gpu_busy_ms']:.1f} ms", flush=True)
        print(json.dumps(results[-1]), flush=True)
        (out_dir / "bench_train.json").write_text(json.dumps(dict(info=info, results=results), indent=1))
    print(table(results))


if __name__ == "__main__":
    main()
