"""Divergence guard: a step whose loss or gradients are not finite is skipped, and a run that keeps producing them
stops with a message, its last good weights and checkpoints intact.

Why on the device: reading the loss back every step makes the host wait for the GPU once per step, and the host's
work after that wait (clipping, the optimizer's bookkeeping, the next batch) then runs with the GPU idle (about a
quarter of the 48-layer step on an H200, issue 22). So each optimizer step the guard only queues a few tiny
kernels: the flag `~isfinite(grad_norm) | ~isfinite(loss)` (the gradient norm that clipping computes anyway reaches
every gradient), a running count of skipped steps and of bad steps in a row. MultiTensorAdamW reads the flag inside
its kernel and leaves weights and moments as they were; the low-bit AdamW (train/graphed_optimizer.py) reads it on
the device too and leaves the weights as they were; the host reads the counts where it reads the GPU anyway
(logging and saving steps, the end of training) and stops the run after `patience` bad steps in a row. An
optimizer that cannot skip on the device (torch's, off CUDA or on the plain path) gets the flag read before its
step instead.
"""
from __future__ import annotations

from collections.abc import Callable

import torch

from omnitune.errors import OmnituneError


class DivergenceError(OmnituneError, RuntimeError):
    """Training produced non-finite losses or gradients for too many optimizer steps in a row."""


class NonFiniteGuard:
    """Per optimizer step: `observe(grad_norm, loss)` (no host sync); `check(step)` at sync points."""

    def __init__(self, patience: int, device: torch.device | str, lr: float,
                 report: Callable[[str], object] = print):
        self.patience, self.lr, self.report = patience, lr, report
        # [bad steps in a row, bad steps in all, optimizer steps seen, the step that began the current streak]
        self.counts = torch.zeros(4, dtype=torch.int64, device=device)
        self.flag: torch.Tensor | None = None  # the last step's flag (int32, 1 = skip)
        self.reported = 0  # bad steps already reported
        self.optimizer = None

    @property
    def on_device(self) -> bool:
        """Whether the optimizer skips on the device (else it reads the flag, and the guard checks, every step)."""
        return hasattr(self.optimizer, "skip_if")

    def attach(self, optimizer: torch.optim.Optimizer) -> None:
        """Give the optimizer the flag: one with `skip_if` (MultiTensorAdamW, the graphed low-bit AdamW) takes it on
        the device; any other has its step wrapped."""
        if optimizer is self.optimizer:
            return
        self.optimizer = optimizer
        if self.on_device:
            return
        step = optimizer.step

        def guarded_step(*args, **kwargs):
            if self.flag is not None and bool(self.flag):  # a host read: this optimizer cannot skip otherwise
                return None
            return step(*args, **kwargs)

        optimizer.step = guarded_step

    @torch.no_grad()
    def observe(self, grad_norm: torch.Tensor | float, loss: torch.Tensor | None) -> torch.Tensor:
        """Queue this step's flag and counts on the device; returns the flag."""
        norm = torch.as_tensor(grad_norm, device=self.counts.device).float()
        bad = ~torch.isfinite(norm)
        if loss is not None:
            bad = bad | ~torch.isfinite(loss.detach().float().sum())
        run, total, seen, start = self.counts.unbind()
        seen = seen + 1
        start = torch.where(bad & (run == 0), seen, start)
        run = (run + 1) * bad
        self.counts = torch.stack([run, total + bad, seen, start])
        self.flag = bad.to(torch.int32)  # a new tensor each step: the optimizer keeps the ones it skipped by
        if self.on_device:
            self.optimizer.skip_if = self.flag
        return self.flag

    def check(self, global_step: int) -> None:
        """Read the counts (a host sync): report newly skipped steps, give the optimizer its step counts back, and
        raise DivergenceError after `patience` bad steps in a row."""
        run, total, seen, start = self.counts.tolist()
        if hasattr(self.optimizer, "reconcile"):
            self.optimizer.reconcile()
        if total > self.reported:
            self.report(f"[yellow]warning:[/] {total - self.reported} optimizer step(s) skipped before step "
                        f"{global_step}: the loss or gradients were not finite; the weights were left as they were")
            self.reported = total
        if run >= self.patience:
            first = global_step - (seen - start)
            raise DivergenceError(
                f"training diverged: the loss or gradients were not finite for {run} optimizer steps in a row "
                f"(steps {first}-{global_step}, train.nonfinite_patience={self.patience}); {self.likely_cause()}. "
                "The weights were not changed by those steps: the checkpoints written so far hold the last good "
                "ones (resume from one with --resume after changing the recipe)")

    def likely_cause(self) -> str:
        if self.lr > 1e-2:
            return f"the likely cause is the learning rate (train.lr={self.lr:g}): try 1e-4 to 2e-5"
        return ("likely causes: a learning rate too high for this data, fp16 overflow (use train.precision=bf16), "
                "or a record whose values overflow (check the data with omnitune prepare --show)")
