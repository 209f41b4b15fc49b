"""Evaluation outputs: predictions.json (every record, every model), report.md, and PNG plots (training curves
from RUN/metrics.jsonl, scores before/after). Plots use matplotlib's Agg backend: no display needed."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from omnitune.eval.metrics import HIGHER_IS_BETTER
from omnitune.eval.results import EvalReport

EXAMPLES_IN_REPORT = 5


def write_report(report: EvalReport, metrics_file: Path | None = None) -> dict[str, Path]:
    """Write every output into report.out_dir; returns name -> path."""
    out = Path(report.out_dir)  # type: ignore[arg-type]
    out.mkdir(parents=True, exist_ok=True)
    files = {"predictions": out / "predictions.json", "report": out / "report.md"}
    files["predictions"].write_text(json.dumps(predictions_json(report), indent=2, ensure_ascii=False))
    if metrics_file is not None and (curve := plot_training_curves(metrics_file, out / "training_curves.png")):
        files["training_curves"] = curve
    files["scores"] = plot_scores(report, out / "scores.png")
    files["report"].write_text(markdown(report, {k: v.name for k, v in files.items()}))
    return files


def predictions_json(report: EvalReport) -> dict[str, Any]:
    by_key = {label: {tuple(s["key"]): s for s in res.samples} for label, res in report.results.items()}
    samples = []
    for row in report.records:
        key = (row["file"], row["line"])
        entry = dict(row)
        for label, table in by_key.items():
            if key in table:
                entry[label] = {k: v for k, v in table[key].items() if k != "key"}
        samples.append(entry)
    return {
        "task": report.task, "eval_file": str(report.eval_file), "source": report.source,
        "scores": {label: res.scores for label, res in report.results.items()},
        "speed": {label: {"seconds": res.seconds, "samples_per_s": res.samples_per_s}
                  for label, res in report.results.items()},
        "bad_records": [{"file": e.file, "line": e.line, "reason": e.reason} for e in report.bad],
        "samples": samples,
    }


def scores_table(report: EvalReport):
    """The headline scores as a rich Table (one column per model, plus the change), for the terminal."""
    from rich.table import Table

    labels = list(report.results)
    table = Table(title=f"{report.task}: {len(report.records)} records"
                  + (f", {len(report.bad)} left out" if report.bad else ""), show_edge=False)
    table.add_column("metric")
    for label in labels + (["change"] if len(labels) == 2 else []):
        table.add_column(label, justify="right")
    for k in _headline(report):
        vals = [report.results[label].scores[k] for label in labels]
        table.add_row(k, *map(_fmt, vals), *([f"{vals[1] - vals[0]:+.4f}"] if len(vals) == 2 else []))
    table.add_row("samples/s", *(f"{report.results[label].samples_per_s:.2f}" for label in labels))
    return table


def _headline(report: EvalReport) -> list[str]:
    scores = next(iter(report.results.values())).scores
    return [k for k in scores if not k.endswith("samples") and k not in ("tokens", "frames")]


def _fmt(v: float) -> str:
    return f"{v:.4f}" if abs(v) < 10 else f"{v:.2f}"


def markdown(report: EvalReport, images: dict[str, str]) -> str:
    labels = list(report.results)
    keys = _headline(report)
    lines = [f"# Evaluation: {report.task}", "",
             f"- model: `{report.source}`", f"- eval file: `{report.eval_file}`",
             f"- records scored: {len(report.records)}; left out: {len(report.bad)}", ""]
    lines += ["| metric | " + " | ".join(labels) + (" | change |" if len(labels) == 2 else " |"),
              "| --- | " + " | ".join("---:" for _ in labels) + (" | ---: |" if len(labels) == 2 else " |")]
    for k in keys:
        vals = [report.results[label].scores.get(k) for label in labels]
        row = f"| {k} | " + " | ".join(_fmt(v) if v is not None else "" for v in vals) + " |"
        if len(labels) == 2 and None not in vals:
            delta = vals[1] - vals[0]
            better = (delta > 0) == HIGHER_IS_BETTER.get(k.split("_")[-1], True) if delta else None
            row += f" {delta:+.4f}{'' if better is None else (' (better)' if better else ' (worse)')} |"
        lines.append(row)
    notes = sorted({n for res in report.results.values() for n in res.notes})
    lines += [""] + [f"Note: {n}" for n in notes]
    lines += ["", "Speed: " + ", ".join(f"{label} {res.samples_per_s:.2f} samples/s ({res.seconds:.1f} s)"
                                        for label, res in report.results.items()), ""]
    for name in ("training_curves", "scores"):
        if name in images:
            lines += [f"![{name}]({images[name]})", ""]
    if report.bad:
        lines += ["## Records left out", ""] + [f"- `{e.file}:{e.line}`: {e.reason}" for e in report.bad] + [""]
    if report.task not in ("free", "speech") and report.records:
        lines += ["## Examples", ""]
        preds = predictions_json(report)["samples"][:EXAMPLES_IN_REPORT]
        for s in preds:
            lines.append(f"- `{Path(s['file']).name}:{s['line']}` reference: {s['reference']!r}")
            for label in labels:
                if label in s:
                    lines.append(f"  - {label}: {s[label]['prediction']!r}")
        lines.append("")
    lines.append("Per-sample predictions and scores: `predictions.json`.")
    return "\n".join(lines) + "\n"


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def plot_training_curves(metrics_file: Path, png: Path) -> Path | None:
    """Training loss and eval loss against step, from RUN/metrics.jsonl; None when it holds no losses."""
    train, evals = [], []
    for line in Path(metrics_file).read_text().splitlines():
        if not line.strip():
            continue
        row = json.loads(line)
        if "loss" in row and "step" in row:
            train.append((row["step"], row["loss"]))
        if "eval_loss" in row and "step" in row:
            evals.append((row["step"], row["eval_loss"]))
    if not train and not evals:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    if train:
        ax.plot(*zip(*train), label="train loss")
    if evals:
        ax.plot(*zip(*evals), marker="o", label="eval loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(png)
    plt.close(fig)
    return png


def plot_scores(report: EvalReport, png: Path) -> Path:
    """One bar group per metric, one bar per model (base before tuned)."""
    plt = _pyplot()
    labels = list(report.results)
    keys = _headline(report)
    fig, ax = plt.subplots(figsize=(max(4, 1.4 * len(keys) + 2), 3.5), dpi=100)
    width = 0.8 / len(labels)
    for i, label in enumerate(labels):
        vals = [report.results[label].scores[k] for k in keys]
        bars = ax.bar([j + i * width for j in range(len(keys))], vals, width, label=label)
        ax.bar_label(bars, fmt="%.3g", fontsize=7)
    ax.set_xticks([j + width * (len(labels) - 1) / 2 for j in range(len(keys))], keys)
    ax.set_title(f"{report.task}: " + " vs ".join(labels))
    ax.legend()
    fig.tight_layout()
    fig.savefig(png)
    plt.close(fig)
    return png
