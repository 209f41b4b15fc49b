"""Trainer callbacks: the run's metrics file, and activation keeping decided when training starts."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Literal

from transformers import TrainerCallback

from omnitune.model import parts
from omnitune.train.checkpointing import auto_uncheckpointed_layers, keep_activations


class MetricsLog(TrainerCallback):
    """Appends every log (loss, lr, eval_loss, ...) to RUN/metrics.jsonl, the run's curve for eval plots."""

    def __init__(self, path: Path):
        self.path = path

    def on_train_begin(self, args, state, control, **kwargs):
        # On resume, drop entries past the checkpoint so the file is one clean curve.
        if self.path.exists():
            kept = [ln for ln in self.path.read_text().splitlines()
                    if ln.strip() and json.loads(ln).get("step", 0) <= state.global_step]
            self.path.write_text("".join(ln + "\n" for ln in kept))

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_world_process_zero and logs:
            entry = {"step": state.global_step, "epoch": state.epoch, **logs}
            with self.path.open("a") as f:
                f.write(json.dumps(entry) + "\n")

    def run_loss(self) -> float | None:
        """The training loss of the whole run, resumed parts included: each logged window's mean loss weighted by
        its optimizer steps (HF's own figure covers only the steps since the last resume)."""
        if not self.path.exists():
            return None
        total = steps = 0.0
        last = 0
        for line in self.path.read_text().splitlines():
            row = json.loads(line)
            if "loss" in row and math.isfinite(row["loss"]):
                total += row["loss"] * (row["step"] - last)
                steps += row["step"] - last
            if "loss" in row:
                last = row["step"]
        return total / steps if steps else None


class KeepActivations(TrainerCallback):
    """Takes checkpointing off the last `layers` decoder layers once the Trainer has switched it on for all of them
    (it does so inside train(), before on_train_begin). "auto": as many as the GPU's memory holds at `tokens`
    tokens per micro-batch (train/checkpointing.auto_uncheckpointed_layers); none on CPU."""

    def __init__(self, layers: int | Literal["auto"], tokens: int, report: Callable[[str], object] = print,
                 state_bytes: float | None = None):
        # state_bytes: the gradients and optimizer state the estimate expects (train/memory.py), not yet allocated
        self.layers, self.tokens, self.report, self.state_bytes = layers, tokens, report, state_bytes

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        stack = parts.decoder_layers(model)
        if not any(getattr(layer, "gradient_checkpointing", False) for layer in stack):
            return
        layers = self.layers
        if layers == "auto":
            if next(stack[0].parameters()).device.type != "cuda":  # the decoder's (the towers may be on the host)
                return
            plan = auto_uncheckpointed_layers(model, self.tokens, replicas=args.world_size,
                                              state_bytes=self.state_bytes)
            layers = plan.layers
            self.report(f"activations: the last {layers} of {len(stack)} layers skip checkpointing "
                        f"({plan.per_layer_bytes / 2**30:.2f} GiB each at {self.tokens} tokens, "
                        f"{plan.headroom_bytes / 2**30:.1f} GiB free for them)")
        keep_activations(model, layers)


class OffloadTowers(TrainerCallback):
    """Moves the frozen towers to host memory once the Trainer has placed the model (plan.offload_towers): after
    its `.to(device)`, which cannot move the offloaded (meta) parameters."""

    def __init__(self, report: Callable[[str], object] = print):
        self.report = report

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        from omnitune.model.build import offload_frozen_towers

        done = offload_frozen_towers(model, args.device)
        if done:
            self.report(f"towers in host memory until a batch needs them: {', '.join(done)}")


class StepStarted(TrainerCallback):
    """Whether a training step began: a failure before that happened while loading the checkpoint."""

    def __init__(self):
        self.yes = False

    def on_step_begin(self, args, state, control, **kwargs):
        self.yes = True
