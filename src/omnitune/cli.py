"""The `omnitune` command line: thin verbs over the library (recipe -> data -> model -> train -> artifacts)."""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Optional

import numpy as np
import typer
from rich.console import Console

from omnitune.errors import OmnituneError
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


# What a user can fix gets one line and exit 1; anything else is a bug and keeps its traceback.
USER_ERRORS = (OmnituneError, FileNotFoundError, FileExistsError, PermissionError)


@contextmanager
def user_errors():
    try:
        yield
    except USER_ERRORS as e:
        console.print(f"[red]error:[/] {e}", highlight=False)
        raise typer.Exit(1) from None


@app.command()
def prepare(recipe: str = RecipeArg, set_: Optional[list[str]] = SetOpt,
            show: int = typer.Option(0, help="print the first N rendered samples with trained spans marked"),
            dump: Optional[Path] = typer.Option(None, help="write {line, input_ids, labels} per kept record")):
    """Validate every record, decode media once, cache processed features (and the frozen towers' outputs), print
    statistics."""
    from omnitune.data.encoder_cache import encode_at_prepare
    from omnitune.data.prepare import run_prepare
    from omnitune.model.load import load_processor
    from omnitune.train.plan import make_plan
    r = _recipe(recipe, set_)
    with user_errors():
        done = run_prepare(r, load_processor(r.model), show=show, dump=dump, console=console)
        plan = make_plan(r)
        if plan.encoder_cache:  # the frozen towers run once, here
            encode_at_prepare(r, [done["train_cache"], done["eval_cache"]], plan.hardware.device_str, console)


@app.command()
def train(recipe: str = RecipeArg, set_: Optional[list[str]] = SetOpt,
          resume: bool = typer.Option(False, "--resume", help="continue from the newest checkpoint"),
          nproc: int = typer.Option(1, "--nproc", min=1, help="processes (GPUs) per machine: runs under torchrun "
                                    "with distributed.strategy (docs/scaleout.md)"),
          nnodes: int = typer.Option(1, "--nnodes", min=1, help="machines, each running this same command"),
          rdzv_endpoint: Optional[str] = typer.Option(None, "--rdzv-endpoint",
                                                      help="HOST:PORT every machine reaches (with --nnodes)")):
    """Train (LoRA or full) as the recipe says; writes the run directory (output_dir)."""
    r = _recipe(recipe, set_)
    if nproc > 1 or nnodes > 1:
        from omnitune.train.distributed_launch import launch
        with user_errors():
            code = launch(r, recipe, set_ or [], resume, nproc, nnodes, rdzv_endpoint)
        raise typer.Exit(code)
    from omnitune.train.run import train as run_train
    with user_errors():
        run_train(r, resume=resume, console=console)


@app.command("eval")
def eval_(source: str = typer.Argument(..., help="run directory, recipe (file or preset) or checkpoint"),
          data: Optional[Path] = typer.Option(None, "--data", help="eval JSONL (default: the recipe's data.eval)"),
          task: str = typer.Option("free", help="asr | caption | mcq | qa | free | speech (the Talker's codec CE) | "
                                   "voice (speak, then WER of the speech and speaker similarity)"),
          speaker_model: Optional[str] = typer.Option(None, help="task voice: a local SpeechBrain ECAPA model "
                                                      "folder for speaker similarity"),
          codec: Optional[str] = typer.Option(None, help="task speech: the codec of the target speech "
                                              "(default: the recipe's talker.codec)"),
          adapter: Optional[Path] = typer.Option(None, help="a run directory or adapter dir to apply"),
          compare: Optional[str] = typer.Option(None, "--compare", help="'base': score the base model too"),
          batch_size: int = typer.Option(8), max_new_tokens: int = typer.Option(256),
          limit: Optional[int] = typer.Option(None, help="score only the first N records"),
          on_error: Optional[str] = typer.Option(None, help="fail | skip (default: the recipe's data.on_error)"),
          out: Optional[Path] = typer.Option(None, help="report directory (default: RUN/eval/<task>-<file>)")):
    """Score generations on an eval set (WER/CER, captions, MCQ, QA, loss); base vs tuned with --compare base."""
    from omnitune.eval.runner import evaluate
    with user_errors():
        if compare not in (None, "base"):
            raise RecipeError(f"--compare takes 'base', not {compare!r}")
        report = evaluate(source, data, task, adapter=adapter, compare_base=compare == "base",
                          batch_size=batch_size, max_new_tokens=max_new_tokens, out_dir=out, limit=limit,
                          on_error=on_error, codec=codec, speaker_model=speaker_model)
    from omnitune.eval.report import scores_table

    console.print(scores_table(report))
    for note in sorted({n for res in report.results.values() for n in res.notes}):
        console.print(f"[yellow]note:[/] {note}")
    for name, path in (report.files or {}).items():
        console.print(f"{name}: {path}")


@app.command()
def infer(source: str = typer.Argument(..., help="run directory, recipe (file or preset) or checkpoint"),
          text: Optional[str] = typer.Option(None, "--text", "-t", help="the user's message"),
          audio: Optional[list[Path]] = typer.Option(None, "--audio"),
          image: Optional[list[Path]] = typer.Option(None, "--image"),
          video: Optional[list[Path]] = typer.Option(None, "--video"),
          system: Optional[str] = typer.Option(None, help="system prompt"),
          conversation: Optional[Path] = typer.Option(None, help="a JSON conversation instead of the above"),
          adapter: Optional[Path] = typer.Option(None, help="a run directory or adapter dir to apply"),
          speech: Optional[bool] = typer.Option(None, "--speech/--no-speech",
                                                help="speak the answer (default: when the checkpoint has a Talker)"),
          speaker: Optional[str] = typer.Option(None, help="Ethan, Chelsie, Aiden, or any the checkpoint has"),
          wav: Path = typer.Option(Path("reply.wav"), help="where the spoken answer is written"),
          show_thinking: bool = typer.Option(False, help="Thinking variant: print the thought too"),
          use_audio_in_video: Optional[bool] = typer.Option(None, "--use-audio-in-video/--no-audio-in-video"),
          max_new_tokens: int = typer.Option(512)):
    """Answer one conversation: text streamed to the terminal, speech written as a 24 kHz wav."""
    import time

    from omnitune.infer import Inferencer, WavWriter, build_conversation, read_conversation
    with user_errors():
        if conversation is not None:
            turns, base = read_conversation(conversation)
        else:
            turns, base = build_conversation(text, audio or [], image or [], video or [], system), None
        inf = Inferencer(source, adapter=adapter, speech=speech)
        speaking = WavWriter(wav)  # the wav grows as the Talker speaks
        start = time.perf_counter()
        try:
            out = inf.generate(turns, speaker=speaker, stream=lambda piece: print(piece, end="", flush=True),
                               show_thinking=show_thinking, max_new_tokens=max_new_tokens,
                               use_audio_in_video=use_audio_in_video, base_dir=base, on_audio=speaking.write)
        finally:
            speaking.close()
    print()
    for warning in out.warnings:
        console.print(f"[yellow]warning:[/] {warning}")
    if speaking.first_at is not None:
        console.print(f"speech: {wav} ({speaking.samples / out.sample_rate:.1f} s; first audio after "
                      f"{speaking.first_at - start:.2f} s, last after {time.perf_counter() - start:.2f} s)")


@app.command()
def export(run_dir: str = typer.Argument(..., help="run directory (or a recipe/checkpoint with --adapter)"),
           out_dir: Path = typer.Argument(..., help="where the merged checkpoint is written"),
           thinker_only: bool = typer.Option(False, help="only the Thinker, for text serving"),
           adapter: Optional[Path] = typer.Option(None), shard_size: str = typer.Option("2GB", help="largest safetensors shard"),
           dtype: Optional[str] = typer.Option(None, help="default: the recipe's model.dtype"),
           overwrite: bool = typer.Option(False, help="replace OUT_DIR if it exists")):
    """Merge LoRA and write a complete Qwen3-Omni checkpoint in the Hub layout (sharded safetensors)."""
    from omnitune.export import export_run
    with user_errors():
        res = export_run(run_dir, out_dir, thinker_only=thinker_only, shard_size=shard_size, adapter=adapter,
                         dtype=dtype, overwrite=overwrite)
    console.print(f"[green]exported[/] {res.n_tensors} tensors in {res.n_shards} shard(s) -> {res.out_dir}")


@app.command("codec-check")
def codec_check(audio: list[Path] = typer.Argument(..., help="speech files (any rate; resampled to 24 kHz)"),
                model: str = typer.Option("Qwen/Qwen3-Omni-30B-A3B-Instruct", help="checkpoint, run directory or "
                                          "recipe whose Talker and Code2Wav judge the codes"),
                codec: Optional[list[str]] = typer.Option(None, help="codec(s) to compare: mimi, qwen3-tts-12hz, "
                                                          "tiny, package.module:Class (repeatable; default mimi)"),
                codec_path: Optional[str] = typer.Option(None, help="the codec's weights (default per codec)"),
                text: Optional[list[str]] = typer.Option(None, help="each file's transcript, in order (repeatable)"),
                speaker: str = typer.Option("ethan")):
    """Encode -> Code2Wav round trip and the Talker's codec CE per codec: which encoder matches the checkpoint."""
    from rich.table import Table

    from omnitune.eval.codec_check import codec_check as check
    with user_errors():
        rows = check(model, audio, codec or ["mimi"], codec_path, text, speaker)
    table = Table(title="codec check (lower codec CE and mel distance, higher SI-SDR: the better match)",
                  show_edge=False)
    for col in ("codec", "file", "frames", "codec CE", "mel distance", "SI-SDR dB"):
        table.add_column(col, justify="left" if col in ("codec", "file") else "right")
    for r in rows:
        table.add_row(r["codec"], Path(r["file"]).name, str(r["frames"]), f"{r['codec_ce']:.3f}",
                      f"{r['mel_distance']:.3f}", f"{r['si_sdr_db']:.1f}")
    console.print(table)
    best = {}
    for r in rows:
        best.setdefault(r["codec"], []).append(r["codec_ce"])
    if len(best) > 1:
        name = min(best, key=lambda k: float(np.mean(best[k])))
        console.print(f"lowest mean codec CE: [bold]{name}[/bold] (set talker.codec={name})")
    if not text:
        console.print("[dim]no --text: CEs are conditioned on a neutral sentence (comparable between codecs only)[/]")


@app.command()
def serve(source: str = typer.Argument(..., help="run directory, recipe (file or preset) or checkpoint"),
          host: str = typer.Option("127.0.0.1", help="address to listen on (0.0.0.0: every interface)"),
          port: int = typer.Option(8000),
          adapter: Optional[list[str]] = typer.Option(None, "--adapter",
                                                      help="NAME=RUN_DIR: another run's LoRA over the same base, "
                                                           "served as model NAME (repeatable)"),
          name: Optional[str] = typer.Option(None, help="the model id SOURCE is served as (default: its name)"),
          speech: Optional[bool] = typer.Option(None, "--speech/--no-speech",
                                                help="load the Talker (default: when the checkpoint has one)"),
          api_key: Optional[str] = typer.Option(None, envvar="OMNITUNE_API_KEY",
                                                help="require 'Authorization: Bearer KEY'"),
          allow_media_dir: Optional[list[Path]] = typer.Option(
              None, "--allow-media-dir", help="a folder whose files requests may name by path (repeatable)"),
          max_new_tokens: int = typer.Option(2048, help="the most tokens a request may ask for"),
          max_speech_tokens: int = typer.Option(4096, help="the most Talker frames (12.5/s) a spoken reply lasts"),
          max_prompt_tokens: int = typer.Option(32768, help="longer prompts are refused"),
          max_request_mb: int = typer.Option(64, help="larger request bodies are refused"),
          max_queue: int = typer.Option(64, help="requests waiting beyond this are answered 429")):
    """An OpenAI-compatible server: /v1/chat/completions (text, image, audio, video in; text and speech out,
    streamed) and /v1/models."""
    from omnitune.serve import ServeOptions, serve as run_server
    opts = ServeOptions(source, adapters=tuple(adapter or ()), name=name, speech=speech, api_key=api_key,
                        allowed_media_dirs=tuple(allow_media_dir or ()), max_new_tokens=max_new_tokens,
                        max_speech_tokens=max_speech_tokens, max_prompt_tokens=max_prompt_tokens,
                        max_request_mb=max_request_mb, max_queue=max_queue)
    with user_errors():
        run_server(opts, host=host, port=port, announce=console.print)


@app.command()
def demo(out: Path = typer.Option(Path("runs/demo"), help="where the demo writes data and its run"),
         seed: int = typer.Option(0)):
    """The whole chain on a tiny model on the CPU: data -> prepare -> train -> eval -> infer."""
    from omnitune.demo import run_demo
    with user_errors():
        run_demo(out, seed=seed, console=console)


def main() -> None:
    app()
