"""`omnitune demo`: the whole chain on the tiny model, on a laptop CPU, with no download.

synthetic omni data -> prepare -> held-out scores of the base -> LoRA training -> held-out scores of the tuned
model -> one inference -> a new voice for the Talker (voice preset: held-out codec CE base vs tuned, one spoken
answer) -> a summary table. The data asks for a colour carried by a tone's pitch, an image or a video (with its
audio track), so a tiny model can learn it in a few minutes.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console
from rich.table import Table

from omnitune.recipe import Recipe, load_recipe


@dataclass
class DemoResult:
    before: dict[str, float]
    after: dict[str, float]
    run_dir: Path
    reply: str
    seconds: float
    voice: dict[str, float] | None = None  # held-out codec CE before/after the voice step, and the reply's seconds


def demo_recipe(out: Path, train_file: Path, eval_file: Path, overrides: list[str] | None = None) -> Recipe:
    return load_recipe("demo", [f"data.train={train_file}", f"data.eval={eval_file}",
                                f"output_dir={out / 'run'}", *(overrides or [])])


def run_demo(out: Path, seed: int = 0, n_train: int = 96, n_eval: int = 24, overrides: list[str] | None = None,
             console: Console | None = None) -> DemoResult:
    from omnitune.data.cache import load_or_prepare
    from omnitune.data.collate import OmniCollator
    from omnitune.data.synthetic import make_demo_dataset
    from omnitune.model.adapters import load_adapter
    from omnitune.model.load import load_processor, load_thinker
    from omnitune.eval.heldout import heldout_scores
    from omnitune.tokens import pad_id
    from omnitune.train.run import train

    console = console or Console()
    start = time.time()
    out = Path(out).resolve()
    if (out / "run" / "checkpoints").exists():
        raise FileExistsError(f"{out / 'run'} already holds a run: remove it or pass another --out")
    console.rule("1/6 data")
    train_file, eval_file = make_demo_dataset(out / "data", n_train=n_train, n_eval=n_eval, seed=seed)
    recipe = demo_recipe(out, train_file, eval_file, [f"train.seed={seed}", *(overrides or [])])
    console.print(f"wrote {n_train} train and {n_eval} eval conversations (audio, image, video+audio) "
                  f"under {out / 'data'}")

    console.rule("2/6 prepare")
    processor = load_processor(recipe.model)
    _, eval_ds = load_or_prepare(recipe, processor, console=console)
    collator = OmniCollator(pad_id(processor.tokenizer), recipe.train.loss_weights)

    console.rule("3/6 held-out scores of the base model")
    before = heldout_scores(load_thinker(recipe.model), eval_ds, collator)
    console.print(f"base: loss {before['loss']:.3f} (token cross-entropy over every held-out answer token, "
                  f"unweighted), exact match {before['accuracy']:.1%}")

    console.rule("4/6 train")
    result = train(recipe, console=console)
    tuned = load_adapter(load_thinker(recipe.model), str(result.run.adapter))
    after = heldout_scores(tuned, eval_ds, collator)

    console.rule("5/6 inference with the tuned adapter")
    reply = _one_inference(result.run.root, eval_file, console)

    console.rule("6/6 a new voice for the Talker")
    voice = _voice_step(out, seed, console)

    res = DemoResult(before, after, result.run.root, reply, time.time() - start, voice)
    _print_table(res, result.global_step, console)
    return res


def _one_inference(run_dir: Path, eval_file: Path, console: Console) -> str:
    """Answer the first held-out conversation with the tuned run, as `omnitune infer` would."""
    import json

    from omnitune.infer import Inferencer

    record = json.loads(eval_file.read_text().splitlines()[0])
    turns = record["conversations"]
    prompt = turns[:max(i for i, t in enumerate(turns) if t["role"] == "user") + 1]
    reply = Inferencer(str(run_dir), speech=False).generate(prompt, max_new_tokens=8, base_dir=eval_file.parent).text
    question = next(c["text"] for c in prompt[-1]["content"] if c["type"] == "text")
    console.print(f"Q: {question}\nA: {reply!r} (reference {turns[len(prompt)]['content']!r})")
    return reply


# The voice preset sized for the tiny model on 2 cores (tests/test_voice_train.py overfits with the same values).
VOICE_DEMO = ["model.path=tiny", "model.dtype=float32", "train.precision=fp32", "talker.codec=tiny",
              "train.max_steps=30", "train.batch_size=4", "train.grad_accum=1", "train.lr=1e-2", "train.warmup_ratio=0",
              "train.logging_steps=10", "adapter.rank=16", "adapter.alpha=32", "data.workers=1"]


def _voice_step(out: Path, seed: int, console: Console) -> dict[str, float]:
    """The voice preset on a new speaker's replies; held-out codec CE of base and tuned; one spoken answer."""
    from omnitune.data.synthetic import VOICE, make_voice_dataset
    from omnitune.eval.runner import evaluate
    from omnitune.infer import Inferencer
    from omnitune.train.run import train

    train_file, eval_file = make_voice_dataset(out / "voice-data", seed=seed)
    recipe = load_recipe("voice", [*VOICE_DEMO, f"data.train={train_file}", f"output_dir={out / 'voice-run'}",
                                   f"train.seed={seed}"])
    run = train(recipe, console=console).run
    report = evaluate(str(run.root), eval_file, "speech", compare_base=True, write=False)
    speech = Inferencer(str(run.root), speech=True).generate("Which colour do you like?", speaker=VOICE,
                                                              max_new_tokens=6, max_speech_tokens=24)
    wav = speech.save_wav(out / "voice-reply.wav")
    console.print(f"the tuned Talker speaks as {VOICE!r}: {wav} ({len(speech.audio) / speech.sample_rate:.2f} s "
                  "at 24 kHz; a random tiny Code2Wav, so it sounds like noise)")
    return {"base_ce": report.results["base"].scores["codec_ce"],
            "tuned_ce": report.results["tuned"].scores["codec_ce"]}


def _print_table(res: DemoResult, steps: int, console: Console) -> None:
    table = Table(title=f"demo: {steps} steps, {res.seconds:.0f} s", show_edge=False)
    table.add_column("held-out")
    table.add_column("base", justify="right")
    table.add_column("tuned", justify="right")
    table.add_row("loss (token CE)", f"{res.before['loss']:.3f}", f"{res.after['loss']:.3f}")
    table.add_row("exact match", f"{res.before['accuracy']:.1%}", f"{res.after['accuracy']:.1%}")
    if res.voice:
        table.add_row("voice: codec CE", f"{res.voice['base_ce']:.3f}", f"{res.voice['tuned_ce']:.3f}")
    console.print(table)
    console.print(f"run directory: {res.run_dir} (adapter/, processor/, metrics.jsonl, logs/)")
