"""What `omnitune train` (voice preset: train.objective=talker_codec) delivers on a GPU: the real trainer (plan, data
cache with codec codes, collator, TalkerCodec objective, optimizer) for N optimizer steps on a Talker at the real
widths (20 layers, hidden 1024, 128 experts top-6 + shared expert, 5-layer code predictor) conditioned on a frozen
real-width Thinker (hidden 2048, 128 experts top-8) of reduced depth, with random weights; against the plain
transformers + PEFT path through the same trainer (`model.experts=grouped_mm`: PEFT's own LoRA, HF's default
optimizer, no kernels of ours), each run in its own process.

The Thinker runs without gradients and only its layer-24 state (the released accept_hidden_layer) reaches the
Talker, so the trainer runs its layers 1..24 alone (model/talker_inputs.py `thinker_states`): the benchmark's
Thinker has `--thinker-layers` layers (default 24, all that runs of the released 48; 48 on a card with room).
The data are `--records` conversations: a text prompt of ~`--prompt` tokens, an answer of ~`--answer` tokens and its
speech of `--seconds` s (12.5 codec frames a second), encoded by the `tiny` codec (a random Mimi with the real 16
codebooks of 2048) in `prepare`, like real speech would be by Mimi.

Timing: the interval between optimizer steps `--warmup` and `--steps` (host synchronised at both ends). Prints a
table, writes $OUT/bench_talker.json.

Usage (GPU machine): source bench/gpu_env.sh && python3 bench/bench_talker.py [--runs ours,peft --seconds 20 ...]
BENCH_DEVICE=cpu BENCH_TINY=1 dry-runs the same code on a CPU at tiny widths (tests/test_voice_bench.py).
"""
from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from bench_train import StepClock, write_profile
from common import build_on_device, thinker_config

DEVICE = os.environ.get("BENCH_DEVICE", "cuda")
TINY = bool(os.environ.get("BENCH_TINY"))
# the released Talker (QWEN3_OMNI_NOTES.md, the Instruct checkpoint's config.json)
TALKER = dict(hidden_size=1024, intermediate_size=2048, num_hidden_layers=20, num_attention_heads=16,
              num_key_value_heads=2, head_dim=128, num_experts=128, num_experts_per_tok=6, moe_intermediate_size=384,
              shared_expert_intermediate_size=768, vocab_size=3072, mrope=[24, 20, 20])
CODE_PREDICTOR = dict(hidden_size=1024, intermediate_size=3072, num_hidden_layers=5, num_attention_heads=16,
                      num_key_value_heads=8, head_dim=128, vocab_size=2048, num_code_groups=16)
CODEC_IDS = dict(codec_pad_id=2148, codec_bos_id=2149, codec_eos_token_id=2150, codec_nothink_id=2155,
                 codec_think_bos_id=2156, codec_think_eos_id=2157,
                 speaker_id={"chelsie": 2301, "ethan": 2302, "aiden": 2303})
if TINY:
    TALKER.update(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=16, num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32,
                  shared_expert_intermediate_size=64, mrope=[4, 2, 2])
    CODE_PREDICTOR.update(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
                          num_key_value_heads=2, head_dim=16)

RUNS: dict[str, list[str]] = {
    "ours": [],
    "ours-ckpt": ["train.gradient_checkpointing=true"],
    "peft": ["model.experts=grouped_mm"],
}
BASE = ["train.batch_size=1", "train.grad_accum=1", "train.lr=1e-5", "train.warmup_ratio=0",
        "train.save_steps=100000", "train.logging_steps=100000", "log.tensorboard=false", "data.workers=1",
        "talker.codec=tiny"] + (["model.dtype=float32", "train.precision=fp32"] if DEVICE == "cpu" else [])


def full_config(thinker_layers: int):
    """The full Qwen3-Omni config: the real-width Thinker at `thinker_layers` layers, the released Talker (its
    accept_hidden_layer 24, or the Thinker's last where it has fewer); token ids and a small Code2Wav (never run in training) from the tiny
    model's config."""
    from transformers import Qwen3OmniMoeConfig

    from omnitune.model.tiny import tiny_config

    cfg = tiny_config().to_dict()
    thinker = thinker_config(thinker_layers).to_dict()
    t = dict(TALKER)
    mrope = t.pop("mrope")
    cfg["talker_config"].update(
        text_config=dict(t, norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[], rms_norm_eps=1e-6,
                         max_position_embeddings=65536, router_aux_loss_coef=0.001,
                         rope_parameters=dict(rope_type="default", rope_theta=1e6, mrope_section=mrope,
                                              interleaved=True)),
        code_predictor_config=dict(CODE_PREDICTOR, rms_norm_eps=1e-6,
                                   rope_parameters=dict(rope_type="default", rope_theta=1e6)),
        num_code_groups=CODE_PREDICTOR["num_code_groups"], thinker_hidden_size=thinker["text_config"]["hidden_size"],
        accept_hidden_layer=min(24, thinker_layers), **CODEC_IDS)
    cfg["code2wav_config"].update(codebook_size=CODE_PREDICTOR["vocab_size"],
                                  num_quantizers=CODE_PREDICTOR["num_code_groups"])
    return Qwen3OmniMoeConfig.from_dict({**cfg, "thinker_config": thinker})


def model_dir(work: Path, cfg) -> Path:
    """A checkpoint folder without weights: the config (the codec and the data read its code shape) and the tiny
    checkpoint's processor (the real tokenizer). The weights are built on the device and handed to train()."""
    from omnitune.model.tiny import tiny_checkpoint

    out = work / "model"
    out.mkdir(parents=True)
    tiny = tiny_checkpoint()
    weights = ("config.json", "generation_config.json", "model.safetensors.index.json", "DONE")
    for f in tiny.iterdir():
        if f.is_file() and f.suffix != ".safetensors" and f.name not in weights:
            shutil.copy(f, out / f.name)
    cfg.save_pretrained(out)
    return out


def write_speech_data(folder: Path, tokenizer, n: int, prompt: int, answer: int, seconds: float, seed: int) -> Path:
    """n records: a text prompt of ~`prompt` tokens, an answer of ~`answer` tokens and `seconds` of speech."""
    import soundfile as sf

    rng = random.Random(seed)
    noise = np.random.default_rng(seed)
    words = [w for w in (tokenizer.decode([i]).strip() for i in rng.sample(range(1000, 60000), 4000))
             if w.isalpha() and len(w) > 2]
    lines = []
    for i in range(n):
        t = np.arange(int(seconds * 24000)) / 24000
        wav = 0.3 * np.sin(2 * np.pi * (150 + 10 * i) * t) + 0.05 * noise.standard_normal(t.size)
        sf.write(folder / f"reply{i}.wav", wav.astype(np.float32), 24000)
        lines.append(json.dumps({"conversations": [
            {"role": "user", "content": " ".join(rng.choice(words) for _ in range(prompt))},
            {"role": "assistant", "content": [{"type": "text", "text": " ".join(rng.choice(words)
                                                                                 for _ in range(answer))},
                                              {"type": "audio", "audio": f"reply{i}.wav"}]}]}))
    path = folder / "voice.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def child(name: str, overrides: list[str], args) -> dict:
    from transformers import Qwen3OmniMoeForConditionalGeneration

    from omnitune.model.load import load_processor
    from omnitune.recipe import load_recipe
    from omnitune.train import run as train_run

    work = Path(tempfile.mkdtemp(prefix=f"bench-talker-{name}-"))
    os.environ.setdefault("OMNITUNE_CACHE", str(work / "cache"))
    cfg = full_config(args.thinker_layers)
    path = model_dir(work, cfg)
    common = [*BASE, *RUNS.get(name, []), *overrides, f"model.path={path}", f"output_dir={work / 'run'}",
              f"train.max_steps={args.steps + (StepClock.PROFILED_STEPS if args.profile else 0)}"]
    processor = load_processor(load_recipe("voice", common).model)
    data = write_speech_data(work, processor.tokenizer, args.records, args.prompt, args.answer, args.seconds, 0)
    longest = 4 * (args.prompt + args.answer) + 64  # tokens: a word is one to a few
    recipe = load_recipe("voice", [*common, f"data.train={data}", f"data.max_length={longest}"])
    t0 = time.time()
    model = build_on_device(Qwen3OmniMoeForConditionalGeneration, cfg, DEVICE,
                            torch.float32 if DEVICE == "cpu" else torch.bfloat16)
    if recipe.model.experts == "omnitune":  # as model/load.py loads a checkpoint for this recipe
        from omnitune.kernels import register_experts_implementation

        register_experts_implementation("omnitune")
    model.set_experts_implementation(recipe.model.experts)
    build_s = time.time() - t0
    clock = StepClock(args.warmup, args.steps, args.profile, label=f"_talker_{name}")
    original = train_run.OmniTrainer.__init__
    train_run.save_final = lambda *a, **k: None  # after the timed steps: writing the adapter measures disks

    def with_clock(self, *a, **k):
        k["callbacks"] = [*k.get("callbacks", []), clock.hook()]
        original(self, *a, **k)
        child.trainer = self

    train_run.OmniTrainer.__init__ = with_clock
    result = train_run.train(recipe, thinker=model)
    trainer = child.trainer
    ms = 1e3 * clock.window / (args.steps - args.warmup)
    ds = trainer.train_dataset
    frames = float(np.mean([ds[i]["speech_codes"].shape[0] for i in range(len(ds))]))
    tokens = float(np.mean([len(ds[i]["input_ids"]) for i in range(len(ds))]))
    return dict(run=name, overrides=overrides, thinker_layers=args.thinker_layers, frames=frames,
                thinker_tokens=tokens, ms=ms, frames_s=frames / ms * 1e3,
                peak_gib=torch.cuda.max_memory_allocated() / 2**30 if DEVICE == "cuda" else 0.0,
                build_s=build_s, plan=result.plan.lines(), rank=recipe.adapter.rank,
                trainable=sum(p.numel() for p in trainer.model.parameters() if p.requires_grad),
                talker_layers=TALKER["num_hidden_layers"], profile=clock.profile_result)


def spawn(name: str, overrides: list[str], args) -> dict:
    cmd = [sys.executable, __file__, "--child", name, *[a for o in overrides for a in ("--set", o)]]
    for key in ("thinker_layers", "steps", "warmup", "records", "prompt", "answer", "seconds"):
        cmd += [f"--{key.replace('_', '-')}", str(getattr(args, key))]
    if args.profile:
        cmd.append("--profile")
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
    rows = ["| run | path | Talker layers / Thinker layers | frames | Thinker tokens | ms/step | frames/s | peak GiB "
            "| vs transformers + PEFT |", "|---|---|---|---|---|---|---|---|---|"]
    base = next((r["ms"] for r in results if r.get("run") == "peft" and "ms" in r), None)
    for r in results:
        if "error" in r:
            rows.append(f"| {r['run']} | error: {r['error'].splitlines()[-1][:80]} | | | | | | | |")
            continue
        path = "transformers grouped_mm + PEFT" if r["run"] == "peft" else "omnitune train"
        rows.append(f"| {r['run']} | {path} (r{r['rank']}) | {r['talker_layers']} / {r['thinker_layers']} | "
                    f"{r['frames']:.0f} | {r['thinker_tokens']:.0f} | {r['ms']:.1f} | {r['frames_s']:.0f} | "
                    f"{r['peak_gib']:.1f} | " + (f"{base / r['ms']:.2f}x |" if base else "- |"))
    return "\n".join(rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--child")
    ap.add_argument("--runs", default="ours,peft", help=f"comma-separated, from {', '.join(RUNS)}")
    ap.add_argument("--thinker-layers", type=int, default=24)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--records", type=int, default=10)
    ap.add_argument("--prompt", type=int, default=200, help="words in the user's prompt")
    ap.add_argument("--answer", type=int, default=60, help="words in the spoken answer")
    ap.add_argument("--seconds", type=float, default=20.0, help="seconds of speech per answer")
    ap.add_argument("--set", action="append", default=[], help="recipe override for every run")
    ap.add_argument("--timeout", type=int, default=300)
    ap.add_argument("--profile", action="store_true",
                    help="profile 3 more steps of each run: profile_talker_RUN.txt (host and GPU op tables), trace")
    args = ap.parse_args()
    if args.child:
        print("RESULT " + json.dumps(child(args.child, args.set, args)), flush=True)
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
        write_profile(out_dir, f"talker_{name}", results[-1])
        print(json.dumps(results[-1]), flush=True)
        (out_dir / "bench_talker.json").write_text(json.dumps(dict(info=info, results=results), indent=1))
    print(table(results))


if __name__ == "__main__":
    main()
