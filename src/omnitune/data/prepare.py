"""`omnitune prepare`: prepare (or reuse) the caches, print statistics, show or dump rendered samples."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from omnitune.data.cache import CachedDataset, load_or_prepare
from omnitune.data.render import render_segments
from omnitune.recipe import Recipe


def run_prepare(recipe: Recipe, processor, show: int = 0, dump: Path | None = None, console=None) -> dict[str, Any]:
    """Prepare train (and eval) data; print the first `show` samples with trained spans marked; dump to JSONL."""
    from rich.console import Console
    from rich.text import Text

    console = console or Console()
    train, evals = load_or_prepare(recipe, processor, console)
    kept = CachedDataset(train.dir)  # every kept record of the train file, held-out ones included, in file order
    # Colour where the console has it, brackets where it does not (a pipe, a log file).
    mark = ("", "") if console.color_system else ("[[", "]]")
    for k in range(min(show, len(kept))):
        s = kept[k]
        text = Text()
        for piece, trained in render_segments(s["input_ids"], s["labels"], processor.tokenizer):
            text.append(f"{mark[0]}{piece}{mark[1]}" if trained else piece, style="bold green" if trained else None)
        console.rule(f"sample {k} (line {kept.lines[k]}): trained spans in " + ("green" if mark[0] == "" else mark[0] + " " + mark[1]))
        console.print(text)
    if dump is not None:
        dump = Path(dump)
        dump.parent.mkdir(parents=True, exist_ok=True)
        with open(dump, "w") as f:
            for i, line in enumerate(kept.lines):
                s = kept[i]
                f.write(json.dumps({"line": line, "input_ids": s["input_ids"].tolist(),
                                    "labels": s["labels"].tolist()}) + "\n")
        console.print(f"wrote {len(kept)} records to {dump}")
    return {"train": train.stats(), "eval": evals.stats() if evals is not None else None,
            "train_cache": str(train.dir), "eval_cache": str(evals.dir) if evals is not None else None}
