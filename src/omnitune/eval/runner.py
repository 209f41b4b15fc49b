"""`omnitune eval`: batched greedy generation (or teacher-forced loss for `free`) over an eval JSONL in the
conversation format, scored per task, optionally side by side with the base model.

The reference of a record is its final assistant turn; the prompt is everything before it. A record that cannot
be read, rendered or decoded is listed with file:line in the outputs and the report (with data.on_error=fail, the
default, the run stops before any generation instead).
"""

from __future__ import annotations

import gc
import math
import time
from dataclasses import replace
from pathlib import Path
from typing import Callable, Iterable

import torch
from tqdm.auto import tqdm

from omnitune.data.collate import OmniCollator, to_device
from omnitune.data.render import render
from omnitune.data.schema import Record, RecordError, read_records
from omnitune.eval import metrics
from omnitune.eval.results import EvalReport, ModelResult
from omnitune.errors import OmnituneError
from omnitune.infer import collate_prompts, split_thinking
from omnitune.model import parts
from omnitune.model.source import Source, apply_weights, load_generation_processor, load_model, resolve_source
from omnitune.recipe import DataConfig, Recipe, TalkerConfig
from omnitune.tokens import IGNORE_INDEX, IM_END, pad_id
from omnitune.train.loss import token_losses as per_token_ce


class EvalError(OmnituneError, ValueError):
    """An evaluation that cannot run, with what to change."""


def reference_of(record: Record) -> str:
    """The final assistant turn's text (for Thinking records, the answer after the think block)."""
    content = record.messages[-1]["content"]
    return split_thinking(content)[1] if isinstance(content, str) else str(content)


def prompt_of(record: Record) -> Record:
    """The record without its final assistant turn: what the model must answer."""
    return replace(record, messages=record.messages[:-1])


def prompt_text(record: Record) -> str:
    """The last user turn's text items (options of a multiple-choice question live there)."""
    for msg in reversed(record.messages[:-1]):
        if msg["role"] == "user":
            c = msg["content"]
            return c if isinstance(c, str) else "\n".join(i["text"] for i in c if i["type"] == "text")
    return ""


def read_eval_records(path: str | Path, variant: str, limit: int | None = None,
                      media_roots: list[str] = ()) -> tuple[list[Record], list[RecordError]]:
    """(records, bad) from an eval file: every unreadable or invalid record is in `bad`, with file:line. Media
    must resolve inside the eval file's folder or `media_roots` (the recipe's data.media_roots)."""
    good: list[Record] = []
    bad: list[RecordError] = []
    try:
        for item in read_records(path, variant, [Path(path).resolve().parent, *media_roots]):
            if isinstance(item, RecordError):
                bad.append(item)
            else:
                good.append(item)
            if limit is not None and len(good) >= limit:
                break
    except RecordError as e:
        raise EvalError(str(e)) from None
    return good, bad


def _batches(items: list, size: int) -> Iterable[list]:
    for i in range(0, len(items), size):
        yield items[i:i + size]


def _encode_all(records: list[Record], fn: Callable[[Record], dict],
                bad: list[RecordError] | None) -> list[tuple[Record, dict]]:
    """Encode each record; a RecordError is collected in `bad`, or raised when `bad` is None."""
    out = []
    for rec in records:
        try:
            out.append((rec, fn(rec)))
        except RecordError as e:
            if bad is None:
                raise
            bad.append(e)
    return out


@torch.no_grad()
def generate_predictions(model: torch.nn.Module, processor, records: list[Record], data: DataConfig,
                         batch_size: int = 8, max_new_tokens: int = 256, bad: list[RecordError] | None = None,
                         desc: str = "generate") -> list[tuple[Record, str]]:
    """Greedy answers to each record's prompt, batched (left-padded), with a samples/s progress bar.

    A record whose media cannot be decoded raises RecordError, or with a `bad` list is added to it and left out.
    """
    thinker = parts.thinker_of(model)
    tok = processor.tokenizer
    im_end = tok.convert_tokens_to_ids(IM_END)
    pad = pad_id(tok)
    device = next(thinker.parameters()).device
    out: list[tuple[Record, str]] = []
    with tqdm(total=len(records), unit="sample", desc=desc, dynamic_ncols=True) as bar:
        for chunk in _batches(records, batch_size):
            encoded = _encode_all(chunk, lambda r: render(processor, prompt_of(r), data, generation=True), bad)
            if encoded:
                batch = to_device(collate_prompts([s for _, s in encoded], pad), device, thinker.dtype)
                seqs = thinker.generate(**batch, max_new_tokens=max_new_tokens, eos_token_id=im_end,
                                        pad_token_id=pad, do_sample=False)
                width = batch["input_ids"].shape[1]
                for (rec, _), row in zip(encoded, seqs[:, width:]):
                    out.append((rec, tok.decode(row, skip_special_tokens=True)))
            bar.update(len(chunk))
    return out


@torch.no_grad()
def record_losses(model: torch.nn.Module, processor, records: list[Record], data: DataConfig,
                 batch_size: int = 8, bad: list[RecordError] | None = None,
                 desc: str = "loss") -> list[tuple[Record, float, int]]:
    """(record, summed token CE over the assistant turns, trained tokens) per record, teacher-forced.
    Bad records: as in generate_predictions."""
    thinker = parts.thinker_of(model)
    collate = OmniCollator(pad_id(processor.tokenizer))
    device = next(thinker.parameters()).device
    out = []
    with tqdm(total=len(records), unit="sample", desc=desc, dynamic_ncols=True) as bar:
        for chunk in _batches(records, batch_size):
            encoded = _encode_all(chunk, lambda r: render(processor, r, data), bad)
            if encoded:
                batch = collate([s for _, s in encoded])
                labels = batch.pop("labels").to(device)
                hidden = thinker.model(**to_device(batch, device, thinker.dtype), use_cache=False).last_hidden_state
                ce = per_token_ce(hidden, thinker.lm_head, labels)  # chunked: no [B, L, V] logits
                trained = labels[:, 1:] != IGNORE_INDEX
                for (rec, _), row_ce, row_mask in zip(encoded, ce, trained):
                    out.append((rec, float((row_ce * row_mask).sum()), int(row_mask.sum())))
            bar.update(len(chunk))
    return out


def _score_model(label: str, task: str, model, processor, records: list[Record], data: DataConfig,
                 batch_size: int, max_new_tokens: int, bad: list[RecordError] | None,
                 src: Source | None = None, speaker_model: str | None = None) -> ModelResult:
    start = time.time()
    if task == "speech":
        from omnitune.data.speech import SpeechTargets
        from omnitune.eval.speech import score_speech

        targets = SpeechTargets(Recipe(model=src.model, data=data, talker=src.talker))
        return score_speech(label, model, processor, records, data, targets, src.talker, bad)
    if task == "voice":
        from omnitune.eval.voice import score_voice

        return score_voice(label, model, processor, records, data, src.talker, bad, max_new_tokens, speaker_model)
    if task == "free":
        rows = record_losses(model, processor, records, data, batch_size, bad, desc=label)
        samples = [{"key": (r.file, r.line), "loss": s / max(n, 1), "tokens": n,
                    "perplexity": math.exp(min(s / max(n, 1), 50.0))} for r, s, n in rows]
        total, count = sum(s for _, s, _ in rows), sum(n for _, _, n in rows)
        loss = total / max(count, 1)
        scores = {"loss": loss, "perplexity": math.exp(min(loss, 50.0)), "tokens": float(count)}
    else:
        preds = generate_predictions(model, processor, records, data, batch_size, max_new_tokens, bad, desc=label)
        samples, predictions, references = [], [], []
        for rec, raw in preds:
            thought, answer = split_thinking(raw)
            ref = reference_of(rec)
            sample = {"key": (rec.file, rec.line), "prediction": answer,
                      **metrics.sample_scores(task, answer, ref, prompt_text(rec))}
            if thought is not None:
                sample["thinking"] = thought
            samples.append(sample)
            predictions.append(answer)
            references.append(ref)
        scores = metrics.corpus_scores(task, predictions, references, samples)
    return ModelResult(label, scores, samples, time.time() - start)


def evaluate(source: str | Path | Recipe, eval_file: str | Path | None, task: str,
             adapter: str | Path | None = None, compare_base: bool = False, batch_size: int = 8,
             max_new_tokens: int = 256, out_dir: str | Path | None = None, limit: int | None = None,
             on_error: str | None = None, dtype: str | None = None, write: bool = True,
             codec: str | None = None, speaker_model: str | None = None) -> EvalReport:
    """Evaluate a run dir / recipe (+ adapter) / checkpoint on an eval JSONL; write predictions.json, report.md
    and plots to `out_dir` (default: RUN/eval/<task>-<file stem>, or ./eval/<task>-<file stem>). `codec`: for
    task speech, the codec of the target speech (default: the recipe's talker.codec). `speaker_model`: for task
    voice, a local SpeechBrain ECAPA model for speaker similarity (eval/voice.py)."""
    if task not in metrics.TASKS:
        raise EvalError(f"unknown task {task!r}; tasks: {', '.join(metrics.TASKS)}")
    src = resolve_source(source, adapter=adapter, dtype=dtype)
    if codec is not None:
        src.talker = TalkerConfig(**{**src.talker.model_dump(), "codec": codec})
    speech = task in ("speech", "voice")  # the full model: the Talker is what is scored
    eval_path = Path(eval_file) if eval_file is not None else (
        Path(src.data.eval) if src.data.eval else None)
    if eval_path is None:
        raise EvalError("no eval file: pass one, or set data.eval in the recipe")
    if compare_base and src.weights is None:
        raise EvalError(f"--compare base: {src.label} has no trained weights to compare with its base "
                        "(pass a run directory, or --adapter)")
    on_error = on_error or src.data.on_error
    if on_error not in ("fail", "skip"):
        raise EvalError(f"on_error must be 'fail' or 'skip', not {on_error!r}")
    records, bad = read_eval_records(eval_path, src.variant, limit, src.data.media_roots)
    if bad and on_error == "fail":
        raise EvalError(f"{len(bad)} bad record(s) in {eval_path}:\n  " + "\n  ".join(map(str, bad[:10]))
                        + ("\n  ..." if len(bad) > 10 else "")
                        + "\nfix them, or pass on_error='skip' (--set data.on_error=skip) to score the rest")
    if not records:
        raise EvalError(f"{eval_path}: no usable records")

    processor = load_generation_processor(src)
    runs: list[tuple[str, Source]] = []
    if compare_base:
        runs.append(("base", replace(src, weights=None)))
    runs.append(("tuned" if src.weights else "model", src))
    results: dict[str, ModelResult] = {}
    render_bad: list[RecordError] = []
    # base vs a LoRA: load the base once, score it, then merge the adapter into it (one load of ~60 GB, not two)
    merge_into_base = (compare_base and src.weights is not None and src.weights[0] != "model"
                       and not src.nf4_experts  # NF4 experts take no merge: each model loads as it trained
                       and not speech)  # the full model: load_model puts the training where it belongs
    model = None
    for label, s in runs:
        if model is not None and merge_into_base:
            model = apply_weights(model, s, merge=True).eval()
        else:
            model = load_model(s, speech=speech, device_map={"": 0} if torch.cuda.is_available() else None)
        errors: list[RecordError] = []
        try:
            results[label] = _score_model(label, task, model, processor, records, src.data, batch_size,
                                          max_new_tokens, errors if on_error == "skip" else None, src,
                                          speaker_model)
        except RecordError as e:
            raise EvalError(f"{e}\n(data.on_error=fail: fix the record, or pass on_error='skip' "
                            "(--set data.on_error=skip) to score the rest)") from None
        render_bad = render_bad or errors  # the same records fail for every model
        if not merge_into_base or label != "base":
            model = None
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
    bad += render_bad

    kept = {(r.file, r.line) for r in records} - {(e.file, e.line) for e in bad}
    rows = [{"file": r.file, "line": r.line, "prompt": prompt_text(r), "reference": reference_of(r)}
            for r in records if (r.file, r.line) in kept]
    report = EvalReport(task, eval_path, src.label, rows, results, bad)
    if write:
        from omnitune.eval.report import write_report

        default = (Path(src.label) / "eval" if (Path(src.label) / "recipe.yaml").exists() else Path("eval"))
        report.out_dir = Path(out_dir) if out_dir else default / f"{task}-{eval_path.stem}"
        report.files = write_report(report, metrics_file=_metrics_file(src))
    return report


def _metrics_file(src: Source) -> Path | None:
    if src.weights is None:
        return None
    candidate = Path(src.weights[1]).parent / "metrics.jsonl"  # RUN/adapter -> RUN/metrics.jsonl
    return candidate if candidate.exists() else None
