"""torchao's low-bit AdamW with its step replayed as one CUDA graph, and a non-finite step skipped on the device.

Why: torchao's AdamW8bit / AdamW4bit (`train.optimizer`, the presets' choice) step each trained tensor with its own
torch.compile'd call, most of a millisecond of host time each. For the Thinker's LoRA (576 tensors, at r16 as at
r64) that was ~500 ms of host time per optimizer step behind ~250 ms of GPU work (H100, 48 layers, 4096 tokens:
751 ms per step with bf16 LoRA and the 8-bit optimizer against 282 ms with fp32 LoRA and the multi-tensor AdamW),
and the guard's host read of the skip flag before it made the GPU wait through all of it. Once the step counts and
the learning rate live on the GPU every op of that step is a device op, so it is captured once and replayed with
one launch. The math is torchao's own, unchanged: this module only decides when it runs as a graph.

When it replays: from the third step on (the first creates the states, whose step counts then move to the GPU; the
second compiles torchao's step for them), while the gradients sit at addresses a step before has already seen
(train/graphed_step.py's static outputs or accumulation buffers, or what the caching allocator hands back to an
eager micro-step in the same place). A set of gradient addresses is captured on its second sighting, so gradients
that land somewhere new each step run eagerly, as torchao's, without a capture (and its memory pool) per step; up
to `MAX_GRAPHS` graphs are kept (one per graph bucket without accumulation), their temporaries in one shared
memory pool (train/cuda_graph.py's reasoning: they never replay at once). Loading a state dict drops them.

Skipping (train/guard.py hands over its flag as `skip_if`, read on the device, never by the host): the gradients
are made finite and the learning rate is multiplied by (1 - flag), so a bad step leaves the weights exactly as they
were (stochastic rounding keeps a bf16 value that did not move) and its step count is taken back; the moments
decay by one step (torchao's betas are constants of its compiled step). The eager path does the same.
"""
from __future__ import annotations

import logging
from collections.abc import Callable

import torch

log = logging.getLogger("omnitune.optimizer")

MAX_GRAPHS = 4


def closure_loss(closure: Callable[[], float] | None) -> float | None:
    """What `Optimizer.step(closure)` returns: the closure's loss, evaluated with gradients on."""
    if closure is None:
        return None
    with torch.enable_grad():
        return closure()


class DeviceSkippedStep:
    """Mixin before a torchao low-bit AdamW class (module docstring); see `device_stepped`."""

    skip_if: torch.Tensor | None = None  # the guard's flag; having the attribute tells the guard we skip on the device

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._graphs: dict[tuple[int, ...], torch.cuda.CUDAGraph] = {}
        self._seen: set[tuple[int, ...]] = set()  # gradient addresses of eager steps: captured when seen again
        self._pool = None  # one memory pool for the step's temporaries in every graph: they never run at once
        self._compiled = False  # an eager step ran with the step counts and learning rates on the GPU
        self._no_graph = False  # a capture failed: eager from then on
        self._flag: torch.Tensor | None = None  # the skip flag the steps read (static for the graphs)
        self._lrs: list[torch.Tensor] = []  # per group: the learning rate the step reads, the scheduler's x (1 - flag)
        self.replays = 0

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(state_dict)
        self._graphs.clear()
        self._seen.clear()
        self._compiled = False

    def _on_device(self, device: torch.device) -> bool:
        """Learning rates and step counts as tensors on `device` (also after a load); whether any moved."""
        moved = False
        for group in self.param_groups:
            if not (torch.is_tensor(group["lr"]) and group["lr"].device == device):
                group["lr"] = torch.tensor(float(group["lr"]), dtype=torch.float32, device=device)
                moved = True
            for p in group["params"]:
                state = self.state.get(p)
                if state and state["step"].device != device:
                    state["step"] = state["step"].to(device)
                    moved = True
        if moved:
            self._graphs.clear()
            self._compiled = False
        return moved

    def _step(self, params: list[torch.Tensor]) -> None:
        """torchao's step, skipped where the flag says so (module docstring): what a graph captures."""
        keep = 1 - self._flag
        grads = [p.grad for p in params]
        for g in grads:
            g.nan_to_num_(0.0, 0.0, 0.0)
        torch._foreach_mul_(grads, keep)
        scheduled = [group["lr"] for group in self.param_groups]
        for group, lr, mine in zip(self.param_groups, scheduled, self._lrs):
            mine.copy_(lr * keep)
            group["lr"] = mine
        try:
            super().step()
        finally:
            for group, lr in zip(self.param_groups, scheduled):
                group["lr"] = lr
        steps = [self.state[p]["step"] for p in params]
        flag = self._flag if steps[0].device == self._flag.device else self._flag.cpu()  # the first step's counts
        torch._foreach_add_(steps, flag, alpha=-1)

    def _remember(self, key: tuple[int, ...]) -> None:
        if len(self._seen) >= 4 * MAX_GRAPHS:  # addresses that keep moving: forget the old ones
            self._seen.clear()
        self._seen.add(key)

    def _capture(self, params: list[torch.Tensor]) -> torch.cuda.CUDAGraph | None:
        graph = torch.cuda.CUDAGraph()
        try:
            # thread_local: a data loader's pin-memory thread may touch CUDA meanwhile
            with torch.cuda.graph(graph, pool=self._pool, capture_error_mode="thread_local"):
                self._step(params)
        except Exception as e:  # nothing ran during the capture: the step runs eagerly instead
            torch.cuda.synchronize()
            self._no_graph = True
            log.warning("the optimizer step could not be captured as a CUDA graph (%s: %s): it runs eagerly",
                        type(e).__name__, e)
            return None
        if self._pool is None:
            self._pool = graph.pool()
        log.info("captured the optimizer step as a CUDA graph (%d tensors)", len(params))
        return graph

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None):
        loss = closure_loss(closure)
        params = [p for group in self.param_groups for p in group["params"] if p.grad is not None]
        if not params:
            return loss
        device = params[0].device
        if self._flag is None or self._flag.device != device:
            self._flag = torch.zeros((), dtype=torch.float32, device=device)
        if len(self._lrs) != len(self.param_groups) or self._lrs[0].device != device:
            self._lrs = [torch.zeros((), dtype=torch.float32, device=device) for _ in self.param_groups]
        if self.skip_if is not None:
            self._flag.copy_(self.skip_if)
        else:
            self._flag.zero_()
        fresh = any(not self.state[p] for p in params)
        cuda = device.type == "cuda" and not self._no_graph
        key = tuple(p.grad.data_ptr() for p in params)
        if not cuda or fresh or self._on_device(device) or not self._compiled:
            self._step(params)
            if cuda:
                self._on_device(device)  # the states the first step made
                self._compiled = not fresh
                self._remember(key)
            return loss
        graph = self._graphs.get(key)
        if graph is None and key in self._seen and len(self._graphs) < MAX_GRAPHS:
            graph = self._graphs[key] = self._capture(params)
            if graph is None:
                del self._graphs[key]
        if graph is None:
            self._remember(key)
            self._step(params)
            return loss
        graph.replay()
        self.replays += 1
        return loss


def device_stepped(cls: type[torch.optim.Optimizer]) -> type[torch.optim.Optimizer]:
    """`cls` (torchao's AdamW8bit or AdamW4bit) with the step of this module: skipped on the device, graphed on
    CUDA. Its state dict is `cls`'s, so checkpoints load into either."""
    return type(cls.__name__, (DeviceSkippedStep, cls), {"__module__": __name__})
