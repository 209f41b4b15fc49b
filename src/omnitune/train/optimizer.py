"""AdamW whose step is one Triton launch over all adapters (kernels/adamw.py): torch's AdamW otherwise unchanged.

Why: AdamW is a fixed memory-bound cost per optimizer step: in the 48-layer Thinker's LoRA step on an H200 the GPU
spent 6.7-6.8 ms after the graph with torch's fused AdamW and 4.6 ms with this one (bench/, run 18). Same
hyperparameters, same state (`step` on the host, `exp_avg` and `exp_avg_sq` per parameter), so the same checkpoints
as `torch.optim.AdamW`: a run resumes from either. A group takes the kernel when it is plain AdamW (no amsgrad,
maximize, differentiable or capturable; a float lr) and every parameter with a gradient is a contiguous fp32 tensor
on one CUDA device, as are its gradient and states (LoRA adapters are); otherwise torch's own step runs.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable

import torch

from omnitune.kernels.adamw import adamw_update_
from omnitune.train.graphed_optimizer import closure_loss, device_stepped

_PLAIN = {"amsgrad": False, "maximize": False, "differentiable": False, "capturable": False}


def kernel_applies(params: Iterable[torch.Tensor]) -> bool:
    """Whether these tensors (and gradients like them) can take the kernel: contiguous fp32 on one CUDA device."""
    params = list(params)
    return bool(params) and all(
        type(p.data) is torch.Tensor and p.is_cuda and p.device == params[0].device and p.dtype == torch.float32
        and p.layout == torch.strided and p.is_contiguous() for p in params)


class MultiTensorAdamW(torch.optim.AdamW):
    """`torch.optim.AdamW` with the multi-tensor Triton step where it applies (module docstring).

    `skip_if`: a flag tensor (set by train/guard.py before each step) that makes a step a no-op when non-zero. On
    the kernel path the kernel reads it on the device, so no step waits for the GPU to say whether it may run; the
    host still counts the step, and `reconcile()` (called where the host reads the GPU anyway) takes the skipped
    ones back off the step counts. Elsewhere the flag is read before torch's step."""

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 1e-2, **kwargs):
        kwargs.pop("fused", None)  # HF's adamw_torch_fused asks for it; this step replaces torch's fused one
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, **kwargs)
        self.skip_if: torch.Tensor | None = None
        self._pending: list[tuple[torch.Tensor, list[dict]]] = []  # device-skippable steps not yet reconciled
        self._eligible: dict[int, tuple[int, ...]] = {}  # per group: the params whose tensors passed the checks
        # per group, while the same parameters step together from one count: (their ids, the count, their states).
        # The count lives here as an int and reaches the states' step tensors only when someone reads them
        # (state_dict, reconcile): updating 576 host tensors cost ~7 ms of host time per step.
        self._shared_step: dict[int, tuple[tuple[int, ...], int, list[dict]]] = {}

    def load_state_dict(self, state_dict: dict) -> None:
        """Also a checkpoint of torch's fused AdamW, whose step counts live on the GPU: moved to the host once here,
        where this step reads them (left there, every step would take torch's path and read them back)."""
        super().load_state_dict(state_dict)
        for state in self.state.values():
            if torch.is_tensor(state.get("step")) and state["step"].device.type != "cpu":
                state["step"] = state["step"].cpu()
        self._eligible.clear()
        self._shared_step.clear()

    def state_dict(self) -> dict:
        self._write_steps()
        return super().state_dict()

    def _write_steps(self) -> None:
        """Put the counts kept as ints into the states' step tensors."""
        for _, step, states in self._shared_step.values():
            for state in states:
                state["step"].fill_(step)
        self._shared_step.clear()

    def _kernel_params(self, index: int, group: dict) -> list[torch.Tensor] | None:
        """The group's parameters with gradients, or None where the kernel does not apply to the group. Parameters
        and their states keep their dtype, device and layout: checked once while the same parameters step
        together; gradients (new tensors on eager steps) every step."""
        if any(group.get(k, v) != v for k, v in _PLAIN.items()) or torch.is_tensor(group["lr"]):
            return None
        params = [p for p in group["params"] if p.grad is not None]
        if not params:
            return params
        ids = tuple(map(id, params))
        if self._eligible.get(index) != ids:
            tensors = [p.data for p in params] + [t for p in params for k, t in self.state[p].items() if k != "step"]
            if not kernel_applies(tensors):
                return None
            if any(self.state[p] and self.state[p]["step"].device.type != "cpu" for p in params):
                return None  # its value is read on the host: that would wait for the GPU
            if all(self.state[p] for p in params):  # states exist from the first step on: cache from then
                self._eligible[index] = ids
        return params if kernel_applies([p.grad for p in params] + [params[0]]) else None

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None):
        loss = closure_loss(closure)
        groups = [self._kernel_params(i, group) for i, group in enumerate(self.param_groups)]
        if any(params is None for params in groups):
            if self.skip_if is None or not bool(self.skip_if):  # torch's step: the host must know first
                super().step()
            return loss
        for index, (group, params) in enumerate(zip(self.param_groups, groups)):
            if not params:
                continue
            states = [self.state[p] for p in params]
            for p, state in zip(params, states):
                if not state:  # as torch initialises it
                    state["step"] = torch.tensor(0.0, dtype=torch.float32)
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            key = tuple(map(id, params))
            shared = self._shared_step.get(index)
            if shared is not None and shared[0] == key:
                runs = {shared[1] + 1: list(range(len(params)))}
            else:
                self._write_steps()
                steps = [state["step"] for state in states]
                torch._foreach_add_(steps, 1)
                runs = {}  # parameters whose step counts differ (some skipped steps) apart
                for i, s in enumerate(steps):
                    runs.setdefault(int(s.item()), []).append(i)
            if len(runs) == 1:
                self._shared_step[index] = (key, next(iter(runs)), states)
            if self.skip_if is not None:
                self._pending.append((self.skip_if, states))
            beta1, beta2 = group["betas"]
            for step, idx in runs.items():
                adamw_update_([params[i] for i in idx], [params[i].grad for i in idx],
                              [states[i]["exp_avg"] for i in idx], [states[i]["exp_avg_sq"] for i in idx],
                              lr=group["lr"], beta1=beta1, beta2=beta2, eps=group["eps"],
                              weight_decay=group["weight_decay"], step=step, skip=self.skip_if)
        return loss

    def reconcile(self) -> int:
        """Take the steps the kernel skipped on the device back off the host's step counts (reads the flags: a host
        sync). Returns how many optimizer steps were skipped since the last call."""
        self._write_steps()
        skipped: set[int] = set()  # one flag per optimizer step, shared by its groups
        for flag, states in self._pending:
            if bool(flag):
                skipped.add(id(flag))
                torch._foreach_sub_([s["step"] for s in states], 1)
        self._pending.clear()
        return len(skipped)


def low_memory_optimizer(kind: str, groups: list[dict], *, lr: float, betas: tuple[float, float], eps: float,
                         device: str, offload_gradients: bool, in_backward: bool = False) -> torch.optim.Optimizer:
    """The optimizer of `train.optimizer` (plan.optimizer) over HF's parameter groups, from maintained libraries:
    torchao's block-quantized AdamW8bit / AdamW4bit (fp32 math on dequantized moments, stochastic rounding into
    bf16 weights so updates smaller than a bf16 step are kept in expectation), torchao's CPUOffloadOptimizer
    (moments and the AdamW step in host memory, gradients copied out as the backward produces them), or torch's
    AdamW (`hf_default` / `multi_tensor_adamw` in a plan that steps in the backward: one tensor at a time).
    The low-bit ones step as train/graphed_optimizer.py says (a CUDA graph, skipped on the device), except
    `in_backward`, where OptimizerInBackward steps them one tensor at a time."""
    groups = [g for g in groups if g["params"]]
    common = {"lr": lr, "betas": betas, "eps": eps}
    if kind in ("adamw8bit", "adamw4bit"):
        from torchao.optim import AdamW4bit, AdamW8bit

        cls = AdamW8bit if kind == "adamw8bit" else AdamW4bit
        return (cls if in_backward else device_stepped(cls))(groups, **common, bf16_stochastic_round=True)
    if kind == "adamw_cpu":
        from torchao.optim import CPUOffloadOptimizer

        return CPUOffloadOptimizer(groups, torch.optim.AdamW, offload_gradients=offload_gradients, **common)
    return torch.optim.AdamW(groups, **common, fused=device == "cuda")


class OptimizerInBackward(torch.optim.Optimizer):
    """`inner` stepped one tensor at a time, from a post-accumulate-grad hook, as soon as that tensor's gradient of
    this backward is complete; the gradient is freed right after. So the gradients of all trained tensors never
    exist at once (PyTorch's "optimizer step in backward" recipe), which saves their memory (the LoRA of the
    Thinker at rank 64: 4.8 GiB in bf16, 9.6 GiB in fp32).

    To HF's Trainer this is the optimizer: `step()` has nothing left to do, the learning-rate scheduler edits the
    inner optimizer's groups (the same dicts), and checkpoints hold the inner optimizer's state, so a run resumes
    as it would with `inner` itself. Only for one process without gradient accumulation (the plan refuses the
    others): each step happens before any all-reduce or later micro-batch could add to the gradient."""

    def __init__(self, inner: torch.optim.Optimizer):  # Optimizer.__init__ is not called: nothing of its own
        self.inner = inner
        self.defaults = inner.defaults
        # train/guard.py's flag: set, never read. A step has updated the weights by the time the flag exists, so
        # the guard only counts bad steps (the plan says so); taking the flag keeps the guard off the host
        self.skip_if: torch.Tensor | None = None
        self._handles = [p.register_post_accumulate_grad_hook(self._hook(index))
                         for index, group in enumerate(inner.param_groups) for p in group["params"]]

    @property
    def param_groups(self) -> list[dict]:  # type: ignore[override]
        return self.inner.param_groups

    @property
    def state(self):  # type: ignore[override]
        return self.inner.state

    def _hook(self, index: int) -> Callable[[torch.Tensor], None]:
        def step_one(param: torch.Tensor) -> None:
            # the guard cannot skip a step that has already happened: a non-finite gradient entry becomes 0, so a
            # bad step leaves the weights finite (the moments still decay) and the guard counts it by the loss
            param.grad.nan_to_num_(0.0, 0.0, 0.0)
            groups = self.inner.param_groups  # the group is looked up now: loading a checkpoint replaces them
            self.inner.param_groups = [{**groups[index], "params": [param]}]
            try:
                self.inner.step()
            finally:
                self.inner.param_groups = groups
            param.grad = None

        return step_one

    def step(self, closure: Callable[[], float] | None = None):
        """Every tensor has stepped during the backward already."""
        return closure() if closure is not None else None

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.inner.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict:
        return self.inner.state_dict()

    def load_state_dict(self, state_dict: dict) -> None:
        self.inner.load_state_dict(state_dict)

    def remove_hooks(self) -> None:
        """Detach from the parameters (the model may go on to be trained by another optimizer)."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def __repr__(self) -> str:
        return f"OptimizerInBackward({self.inner!r})"
