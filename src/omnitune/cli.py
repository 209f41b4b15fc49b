"""The `omnitune` command line: thin verbs over the library (recipe -> data -> model -> train -> artifacts)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.console import Console

from omnitune.recipe import RecipeError, load_recipe

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Fine-tune, evaluate, serve and export Qwen3-Omni.")
console = Console()

RecipeArg = typer.Argument(..., help="recipe YAML path or preset: instruct, thinking, captioner, demo")
SetOpt = typer.Option(None, "--set", "-s", help="override a recipe key, e.g. --set train.lr=1e-4 (repeatable)")


def _recipe(source: str, overrides: Optional[list[str]]):
    try:
        return load_recipe(source, overrides or [])
    except RecipeError as e:
        console.print(f"[red]error:[/] {e}")
        raise typer.Exit(2) from None


def _fail(e: Exception) -> None:
    console.print(f"[red]error:[/] {e}")
    raise typer.Exit(1) from None


@app.command()
def prepare(recipe: str = RecipeArg, set_: Optional[list[str]] = SetOpt,
            show: int = typer.Option(0, help="print the first N rendered samples with trained spans marked"),
            dump: Optional[Path] = typer.Option(None, help="write {line, input_ids, labels} per kept record")):
    """Validate every record, decode media once, cache processed features, print statistics."""
    from omnitune.data.prepare import run_prepare
    from omnitune.model.load import load_processor
    r = _recipe(recipe, set_)
    try:
        run_prepare(r, load_processor(r.model), show=show, dump=dump, console=console)
    except (ValueError, FileNotFoundError, OSError) as e:
        _fail(e)


@app.command()
def train(recipe: str = RecipeArg, set_: Optional[list[str]] = SetOpt,
          resume: bool = typer.Option(False, "--resume", help="continue from the newest checkpoint")):
    """Train (LoRA or full) as the recipe says; writes the run directory (output_dir)."""
    from omnitune.train.run import train as run_train
    r = _recipe(recipe, set_)
    try:
        run_train(r, resume=resume, console=console)
    except (ValueError, FileNotFoundError, FileExistsError) as e:
        _fail(e)


@app.command()
def demo(out: Path = typer.Option(Path("runs/demo"), help="where the demo writes data and its run"),
         seed: int = typer.Option(0)):
    """The whole chain on a tiny model on the CPU: data -> prepare -> train -> eval -> infer."""
    from omnitune.demo import run_demo
    run_demo(out, seed=seed, console=console)


def main() -> None:
    app()
