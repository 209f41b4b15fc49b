"""What `omnitune train` delivers on a GPU: the real trainer (plan, data cache, collator, objective, CUDA-graph
step, optimizer, callbacks) for N optimizer steps on a real-width Thinker with random weights, against the plain
transformers + PEFT path through the same trainer (`model.experts=grouped_mm`: full logits, HF's default optimizer,
no graphs, no kernels of ours), each run in its own process.

The only difference from `omnitune train RECIPE` is where the weights come from: no checkpoint of random weights
at the real size exists on disk, so the model is built on the GPU and handed to `train(recipe, thinker=...)`;
everything after loading is the product's code. The data (`--data`, each kind a row per run) are conversations of
about `--seq` tokens written as JSONL with real media files and prepared by the data pipeline:
- `text`: 1/8 prompt, 7/8 answer;
- `image_audio`: a 448x448 image and 10 s of audio in the prompt (196 + 130 tokens), the rest text;
- `video`: 30 s of 320x320 video at 2 fps with its audio track (use_audio_in_video: 3000 + 390 tokens).
Each row's text fills up to the same length as the text row's samples (~3940 tokens at --seq 4096), so that every
row is one 4096-token graph bucket.
Media rows build the Thinker with real-width audio and vision towers. With the encoder cache on (the default for
frozen towers, `ours`), the towers run once before training (`encode_s`); where it is off (`ours-nocache`, and the
plain `peft` path, which runs the towers in every step as transformers + PEFT do) the towers' GPU time per step is
measured with CUDA events around their forwards (`tower_ms`).

Timing: the interval between the optimizer steps `--warmup` and `--steps` (the host synchronised with the GPU at
both ends), so graph captures and the first steps are outside it. MFU = tok/s x 4 x active params / 770e12, with the
active parameters of the depth measured (bench/common.py). Prints a table, writes $OUT/bench_train.json.

Usage: the video rows need PyAV on the GPU machine: `bash bench/fetch_wheels.sh video` here, carry .wheels. Then
(GPU machine) source bench/gpu_env.sh && python3 bench/bench_train.py \\
    --runs ours,peft --data text,image_audio,video --seq 4096 --layers 48 [--steps 8 --warmup 3] [--set ...]
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
    "ours-nocache": ["data.encoder_cache=false"],
    "qlora": ["adapter.method=qlora"],
    "qlora-ckpt": ["adapter.method=qlora", "train.uncheckpointed_layers=0"],
    "peft": ["model.experts=grouped_mm", "train.uncheckpointed_layers=0", "data.encoder_cache=false"],
}
TINY = bool(os.environ.get("BENCH_TINY"))
# per data kind: (image side, audio seconds, video seconds, video side); BENCH_TINY shrinks them for a CPU dry run
MEDIA = {"text": (0, 0.0, 0.0, 0), "image_audio": (64, 1.0, 0.0, 0) if TINY else (448, 10.0, 0.0, 0),
         "video": (0, 0.0, 2.0, 64) if TINY else (0, 0.0, 30.0, 320)}
BASE = ["adapter.rank=16", "adapter.alpha=32", "train.batch_size=1", "train.grad_accum=1", "train.lr=1e-5",
        "train.warmup_ratio=0", "train.save_steps=100000", "train.logging_steps=100000", "log.tensorboard=false",
        "data.workers=1", "model.path=tiny",  # the tiny checkpoint only lends its processor (the real tokenizer)
        # the speed path as measured before issue 21: fp32 LoRA and AdamW on the GPU (bench_memory.py measures the
        # presets' memory settings)
        "adapter.lora_dtype=float32", "train.optimizer=adamw", "train.offload_towers=false"]


def media_tokens(kind: str) -> int:
    """The tokens the media of a `kind` sample take (model: 16-pixel patches merged 2x2, two frames per temporal
    patch at 2 fps, 13 audio tokens per second), with their start/end markers."""
    from omnitune.data.render import audio_token_count

    side, audio_s, video_s, video_side = MEDIA[kind]
    n = (side // 32) ** 2 + 2 if side else 0
    n += audio_token_count(int(audio_s * 16000)) + 2 if audio_s else 0
    if video_s:
        n += int(video_s) * (video_side // 32) ** 2 + audio_token_count(int(video_s * 16000)) + 4
    return n


def write_media(folder: Path, kind: str) -> list[dict]:
    """The media items of a `kind` sample, written once under `folder` (every sample shows the same files)."""
    import numpy as np

    from omnitune.data.synthetic import tone, write_mp4, write_png, write_wav

    rng = np.random.default_rng(0)
    side, audio_s, video_s, video_side = MEDIA[kind]
    folder.mkdir(parents=True, exist_ok=True)
    items = []

    def frame(n: int, k: int = 0) -> np.ndarray:  # a smooth gradient with noise: a quickly encoded, varied picture
        y, x = np.mgrid[0:n, 0:n]
        base = np.stack([(x + 3 * k) % 256, (y + 5 * k) % 256, (x + y) % 256], axis=-1).astype(np.float32)
        return np.clip(base + rng.normal(0, 8, base.shape), 0, 255).astype(np.uint8)

    if side:
        items.append({"type": "image", "image": f"media/{write_png(folder / 'image.png', frame(side)).name}"})
    if audio_s:
        wav = write_wav(folder / "audio.wav", tone(440.0, audio_s, rng))
        items.append({"type": "audio", "audio": f"media/{wav.name}"})
    if video_s:
        frames = np.stack([frame(video_side, k) for k in range(int(video_s * 2))])
        mp4 = write_mp4(folder / "video.mp4", frames, fps=2, audio=tone(330.0, video_s, rng))
        items.append({"type": "video", "video": f"media/{mp4.name}"})
    return items


def write_conversations(path: Path, tokenizer, n: int, seq: int, seed: int, kind: str = "text") -> int:
    """n conversations of about `seq` tokens each once rendered, with the media of `kind`; returns the tokens of the
    longest."""
    import random

    media = write_media(path.parent / "media", kind) if kind != "text" else []
    extra = media_tokens(kind)
    seq = max(64, seq - extra - 160 * (extra > 0))  # the text around the media: as long as a text row's in all
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
            longest = max(longest, len(tokenizer(prompt + " " + answer)["input_ids"]) + 16 + extra)
            user = [*media, {"type": "text", "text": prompt}] if media else prompt
            f.write(json.dumps({"conversations": [{"role": "user", "content": user},
                                                  {"role": "assistant", "content": answer}]}) + "\n")
    return longest


class StepClock:
    """Host times at each optimizer step's end (synchronised at the two ends of the timed window) and the peak; with
    `profile`, one more optimizer step after the window under torch's profiler: how much of it the GPU was busy."""

    PROFILED_STEPS = 3  # after the timed window: the first starts from a synchronised GPU, the others are steady

    def __init__(self, warmup: int, steps: int, profile: bool = False, label: str = ""):
        self.warmup, self.steps, self.marks, self.window, self.label = warmup, steps, [], None, label
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
            trace = Path(out) / f"trace{self.label}.json"
            self.profiler.export_chrome_trace(str(trace))
            subprocess.run(["gzip", "-f", str(trace)], check=False)
        gpu_table = (self.profiler.key_averages().table(sort_by="self_device_time_total", row_limit=30,
                                                        max_name_column_width=70) if DEVICE == "cuda" else "")
        self.profile_result = dict(steps=self.PROFILED_STEPS, wall_ms=wall_ms, gpu_busy_ms=busy / 1e3,
                                   cpu_table=table, gpu_table=gpu_table)
        self.profiler = None


def write_profile(out_dir: Path, label: str, result: dict) -> None:
    """A profiled run's host and GPU op tables to profile_LABEL.txt (out of the JSON) and its busy time printed."""
    prof = result.get("profile") or {}
    if prof:
        tables = [prof.pop("cpu_table"), prof.pop("gpu_table", "")]
        (out_dir / f"profile_{label}.txt").write_text("\n\n".join(t for t in tables if t))
        print(f"{label}: {prof['steps']} profiled steps {prof['wall_ms']:.1f} ms, "
              f"GPU busy {prof['gpu_busy_ms']:.1f} ms", flush=True)


class TowerClock:
    """CUDA events around every forward of the audio and vision towers: their GPU time inside the timed window."""

    def __init__(self, thinker, clock: StepClock):
        from omnitune.model import parts

        self.clock, self.spans = clock, []
        for name in ("audio_tower", "vision_tower"):
            tower = parts.module(thinker, name)
            tower.register_forward_pre_hook(self._start)
            tower.register_forward_hook(self._end)

    def _start(self, module, args):
        if DEVICE == "cuda":
            self.begin = torch.cuda.Event(enable_timing=True)
            self.begin.record()

    def _end(self, module, args, out):
        if DEVICE == "cuda":
            end = torch.cuda.Event(enable_timing=True)
            end.record()
            self.spans.append((len(self.clock.marks), self.begin, end))  # marks so far = steps finished

    def ms_per_step(self) -> float:
        """Tower GPU ms per optimizer step over the timed window (steps warmup+1 .. steps)."""
        c = self.clock
        inside = [b.elapsed_time(e) for k, b, e in self.spans if c.warmup <= k < c.steps]
        return sum(inside) / (c.steps - c.warmup)


def child(name: str, overrides: list[str], seq: int, layers: int, steps: int, warmup: int,
          profile: bool = False, data: str = "text") -> dict:
    from transformers import Qwen3OmniMoeThinkerForConditionalGeneration

    from omnitune.data import encoder_cache
    from omnitune.model.load import load_processor
    from omnitune.recipe import load_recipe
    from omnitune.train import run as train_run

    work = Path(tempfile.mkdtemp(prefix=f"bench-{name}-"))
    os.environ.setdefault("OMNITUNE_CACHE", str(work / "cache"))
    total_steps = steps + StepClock.PROFILED_STEPS if profile else steps
    recipe = load_recipe("instruct", [*BASE, *RUNS.get(name, []), *overrides, f"output_dir={work / 'run'}",
                                      f"train.max_steps={total_steps}"])
    processor = load_processor(recipe.model)
    samples = total_steps * recipe.train.grad_accum * recipe.train.batch_size  # every step sees new samples
    longest = write_conversations(work / "train.jsonl", processor.tokenizer, samples, seq, seed=0, kind=data)
    # the same max_length as the text rows: it sizes the micro-batch that `auto` keeps activations for
    media = [f"data.max_length={max(longest, seq)}"]
    if data == "video":
        media.append("data.use_audio_in_video=true")
    recipe = load_recipe("instruct", [*BASE, *RUNS.get(name, []), *overrides, f"output_dir={work / 'run'}",
                                      f"train.max_steps={total_steps}", f"data.train={work / 'train.jsonl'}", *media])
    t0 = time.time()
    cfg = thinker_config(layers, real_towers=data != "text" and not TINY)
    thinker = build_on_device(Qwen3OmniMoeThinkerForConditionalGeneration, cfg, DEVICE,
                              torch.float32 if DEVICE == "cpu" else torch.bfloat16)
    if recipe.model.experts == "omnitune":  # as model/load.py loads a checkpoint for this recipe
        from omnitune.kernels import register_experts_implementation

        register_experts_implementation("omnitune")
    thinker.set_experts_implementation(recipe.model.experts)
    build_s = time.time() - t0
    clock = StepClock(warmup, steps, profile, label="" if data == "text" else f"_{data}")
    towers = TowerClock(thinker, clock)
    encode = {"s": 0.0}
    encode_all = encoder_cache.with_encoder_outputs

    def timed_encode(*args, **kwargs):
        t = time.time()
        out = encode_all(*args, **kwargs)
        if DEVICE == "cuda":
            torch.cuda.synchronize()
        encode["s"] += time.time() - t
        return out

    encoder_cache.with_encoder_outputs = timed_encode
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
    # an optimizer step trains grad_accum x batch_size samples
    tok_s = tokens * recipe.train.grad_accum * recipe.train.batch_size / ms * 1e3
    intervals = [1e3 * (b - a) for a, b in zip(clock.marks, clock.marks[1:])]
    gpu_steps = [a.elapsed_time(b) for a, b in zip(clock.events, clock.events[1:])][warmup - 1:]
    plan = result.plan
    return dict(run=name, data=data, overrides=overrides, seq=seq, layers=layers, tokens=tokens, ms=ms, tok_s=tok_s,
                tower_ms=towers.ms_per_step() if DEVICE == "cuda" else 0.0, encode_s=encode["s"],
                encoder_cache=plan.encoder_cache,
                mfu=mfu(tok_s, active_params(cfg.text_config)),
                peak_gib=torch.cuda.max_memory_allocated() / 2**30 if DEVICE == "cuda" else 0.0,
                step_intervals_ms=intervals, gpu_step_ms=gpu_steps, build_s=build_s,
                graphs=trainer.graph_summary(),
                plan=plan.lines(), rank=recipe.adapter.rank, method=recipe.adapter.method,
                trainable=sum(p.numel() for p in trainer.model.parameters() if p.requires_grad),
                profile=clock.profile_result)


def spawn(name: str, data: str, overrides: list[str], args) -> dict:
    cmd = [sys.executable, __file__, "--child", name, "--data", data, "--seq", str(args.seq),
           "--layers", str(args.layers), "--steps", str(args.steps), "--warmup", str(args.warmup),
           *[a for o in overrides for a in ("--set", o)],
           *(["--profile", "1"] if name in args.profile.split(",") else [])]
    t0 = time.time()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
    except subprocess.TimeoutExpired:
        return dict(run=name, data=data, error=f"timeout after {args.timeout}s")
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        err = (proc.stdout + proc.stderr).strip().splitlines()
        oom = any("OutOfMemory" in ln or "out of memory" in ln for ln in err)
        return dict(run=name, data=data, error="OOM" if oom else "\n".join(err[-25:]), wall_s=time.time() - t0)
    out = json.loads(lines[-1][len("RESULT "):])
    out["wall_s"] = time.time() - t0
    return out


def table(results: list[dict]) -> str:
    """Markdown rows; speed-ups against the plain path's run on the same data and size, tok/s of a media row also
    as a share of the same run's text row."""
    rows = ["| run | data | path | tokens | ms/step | tok/s | MFU | towers ms/step | peak GiB | vs text "
            "| vs transformers + PEFT |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    ok = [r for r in results if "ms" in r]
    base = {(r["data"], r["seq"], r["layers"]): r["ms"] for r in ok if r["run"] == "peft"}
    text = {(r["run"], r["seq"], r["layers"]): r["tok_s"] for r in ok if r["data"] == "text"}
    for r in results:
        if "error" in r:
            rows.append(f"| {r['run']} | {r.get('data', '')} | error: {r['error'].splitlines()[-1][:80]} "
                        "| | | | | | | | |")
            continue
        path = "transformers grouped_mm + PEFT" if r["run"] == "peft" else "omnitune train"
        b = base.get((r["data"], r["seq"], r["layers"]))
        t = text.get((r["run"], r["seq"], r["layers"])) if r["data"] != "text" else None
        towers = ("cached" if r["encoder_cache"] and r["data"] != "text" else f"{r['tower_ms']:.1f}")
        rows.append(f"| {r['run']} | {r['data']} | {path} (r{r['rank']}, {r['layers']} layers) | {r['tokens']:.0f} "
                    f"| {r['ms']:.1f} | {r['tok_s']:.0f} | {100 * r['mfu']:.1f}% | {towers} | {r['peak_gib']:.1f} | "
                    + (f"{100 * r['tok_s'] / t:.0f}% |" if t else "- |") + (f" {b / r['ms']:.2f}x |" if b else " - |"))
    return "\n".join(rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--child")
    ap.add_argument("--runs", default="ours,peft", help=f"comma-separated, from {', '.join(RUNS)}")
    ap.add_argument("--data", default="text", help="comma-separated, from text, image_audio, video (module doc)")
    ap.add_argument("--seq", type=int, default=4096)
    ap.add_argument("--layers", type=int, default=48)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--set", action="append", default=[], help="recipe override for every run")
    ap.add_argument("--timeout", type=int, default=420)
    ap.add_argument("--profile", default="", help="runs to profile one extra step of (GPU busy time, host ops)")
    args = ap.parse_args()
    if args.child:
        result = child(args.child, args.set, args.seq, args.layers, args.steps, args.warmup, args.profile == "1",
                       args.data)
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
    for name, data in [(n, d) for d in args.data.split(",") for n in args.runs.split(",")]:
        results.append(spawn(name, data, args.set, args))
        write_profile(out_dir, f"{name}_{data}", results[-1])
        print(json.dumps(results[-1]), flush=True)
        (out_dir / "bench_train.json").write_text(json.dumps(dict(info=info, results=results), indent=1))
    print(table(results))


if __name__ == "__main__":
    main()
