"""`omnitune demo`: the whole chain on the tiny model, on a laptop CPU, with no download.

synthetic omni data -> prepare -> held-out scores of the base -> LoRA training -> held-out scores of the tuned
model -> one inference -> a summary table. The data asks for a colour carried by a tone's pitch, an image or a
video (with its audio track), so a tiny model can learn it in a few minutes.
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
    console.rule("1/5 data")
    train_file, eval_file = make_demo_dataset(out / "data", n_train=n_train, n_eval=n_eval, seed=seed)
    recipe = demo_recipe(out, train_file, eval_file, [f"train.seed={seed}", *(overrides or [])])
    console.print(f"wrote {n_train} train and {n_eval} eval conversations (audio, image, video+audio) "
                  f"under {out / 'data'}")

    console.rule("2/5 prepare")
    processor = load_processor(recipe.model)
    _, eval_ds = load_or_prepare(recipe, processor, console=console)
    collator = OmniCollator(pad_id(processor.tokenizer), recipe.train.loss_weights)

    console.rule("3/5 held-out scores of the base model")
    before = heldout_scores(load_thinker(recipe.model), eval_ds, collator)
    console.print(f"base: loss {before['loss']:.3f} (token cross-entropy over every held-out answer token, "
                  f"unweighted), exact match {before['accuracy']:.1%}")

    console.rule("4/5 train")
    result = train(recipe, console=console)
    tuned = load_adapter(load_thinker(recipe.model), str(result.run.adapter))
    after = heldout_scores(tuned, eval_ds, collator)

    console.rule("5/5 inference with the tuned adapter")
    reply = _one_inference(result.run.root, eval_file, console)

    res = DemoResult(before, after, result.run.root, reply, time.time() - start)
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


def _print_table(res: DemoResult, steps: int, console: Console) -> None:
    table = Table(title=f"demo: {steps} steps, {res.seconds:.0f} s", show_edge=False)
    table.add_column("held-out")
    table.add_column("base", justify="right")
    table.add_column("tuned", justify="right")
    table.add_row("loss (token CE)", f"{res.before['loss']:.3f}", f"{res.after['loss']:.3f}")
    table.add_row("exact match", f"{res.before['accuracy']:.1%}", f"{res.after['accuracy']:.1%}")
    console.print(table)
    console.print(f"run directory: {res.run_dir} (adapter/, processor/, metrics.jsonl, logs/)")
