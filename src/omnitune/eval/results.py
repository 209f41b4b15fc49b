"""What an evaluation produced: per model its scores and per-record samples, and the report over all models.
Its own module so that the runner (which fills it) and the report writer (which reads it) need not import each other."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omnitune.data.schema import RecordError


@dataclass
class ModelResult:
    label: str  # 'base' or 'tuned' (or the source's name when nothing is compared)
    scores: dict[str, float]
    samples: list[dict[str, Any]]  # per record: prediction (or loss) and its scores, in eval-file order
    seconds: float
    notes: list[str] = field(default_factory=list)  # what a score could not be computed from, said in words

    @property
    def samples_per_s(self) -> float:
        return len(self.samples) / max(self.seconds, 1e-9)


@dataclass
class EvalReport:
    task: str
    eval_file: Path
    source: str
    records: list[dict[str, Any]]  # file, line, prompt text, reference of every scored record
    results: dict[str, ModelResult]
    bad: list[RecordError] = field(default_factory=list)  # every record left out, with file:line and reason
    out_dir: Path | None = None
    files: dict[str, Path] = field(default_factory=dict)
