"""A training micro-step (forward + loss + backward) replayed as ONE CUDA graph.

Why: with the grouped experts path the Thinker step is CPU-launch-bound: ~1000 kernel launches per decoder layer
(forward, checkpoint recompute, backward) cost more host time than the GPU needs to run them (H100, 48 layers,
4096 tokens: 827 ms eager vs 572 ms replayed, bench/). Every op of the step has static shapes once the batch shape
is fixed (the routing is a device-side sort, the grouped GEMMs read their offsets from device memory, nothing reads
back to the host), so the micro-step can be captured once per batch shape and replayed with a single launch.

`GraphedGrads(loss_fn, params)(*inputs)` runs `loss_fn(*inputs)` (a scalar loss, or a tuple whose first item is
the loss and the rest extra outputs) and its backward, and leaves the gradients in `p.grad` of `params` as
`loss.backward()` would: set where they were None, added where they were not (gradient accumulation and both
`zero_grad` modes work unchanged). It returns `(loss, extras)`. The first call for a new input signature (shapes,
dtypes) and window position (a window's first micro-step, or one that accumulates) warms up on a side stream and
captures; later calls copy the inputs into the graph's buffers and replay. The returned tensors are the graph's
static outputs: the next call overwrites them, so read them before calling again.

Memory: an accumulating graph runs the backward into the shared buffers in place (`.grad` += each gradient as it is
produced, as eager `backward` does), so it holds one copy of the gradients, not a second one beside them. With
`accumulating=True` (the trainer steps every several micro-steps) a window's first micro-step accumulates into
zeroed buffers too: the gradients live once, as in the eager step. Before both (H100, r64 bf16 LoRA, 2.57B trained
values, grad_accum 8): the buffers, the first graph's outputs and the accumulating graph's own gradients were three
copies, 2 x 4.8 GiB more than `grad_accum` 1, and the shipped `instruct` preset ran out of memory on an 80 GB card.

What the captured function must keep (capture raises otherwise; callers fall back to eager): no host syncs
(`.item()`, `.tolist()`, `nonzero`, data-dependent shapes or branches), no RNG that checkpointing must restore
(`preserve_rng_state=False`, no dropout), and every value that changes per batch passed in as a tensor input.
Without CUDA the same object runs the step eagerly, so callers have one code path.
"""
from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

import torch

log = logging.getLogger("omnitune.cuda_graph")

Signature = tuple[tuple[tuple[int, ...], torch.dtype], ...]


def _signature(inputs: Sequence[torch.Tensor]) -> Signature:
    return tuple((tuple(x.shape), x.dtype) for x in inputs)


class GraphCaptureError(RuntimeError):
    """The step could not be captured (a host sync, RNG, an unsupported op): run it eagerly instead."""


class _Captured:
    """One captured graph: its input buffers, its static outputs, the params it reaches and the tensors that hold
    their gradients after a replay (the shared accumulation buffers, or for a window's first micro-step the graph's
    own gradient outputs)."""

    def __init__(self, graph: torch.cuda.CUDAGraph, inputs: list[torch.Tensor], outputs: tuple,
                 params: list[torch.Tensor], grads: list[torch.Tensor], accumulates: bool):
        self.graph, self.inputs, self.outputs = graph, inputs, outputs
        self.params, self.grads, self.accumulates = params, grads, accumulates


class GraphedGrads:
    """Loss + gradient accumulation of `loss_fn` captured as a CUDA graph per input signature (module docstring)."""

    def __init__(self, loss_fn: Callable[..., torch.Tensor | tuple], params: Sequence[torch.Tensor],
                 max_graphs: int = 16, warmup: int = 2, accumulating: bool = False):
        # accumulating: every micro-step adds into the buffers, also a window's first (module docstring, Memory)
        self.accumulating = accumulating
        self.loss_fn = loss_fn
        self.params = list(params)
        self.max_graphs = max_graphs
        self.warmup = warmup
        # per input signature and window position (first micro-step of an accumulation window or not)
        self.graphs: dict[tuple[Signature, bool], _Captured] = {}
        self.pool = None  # one memory pool for all graphs: they never run at the same time
        self.grad_buffers: list[torch.Tensor] | None = None  # the .grad tensors the graphs accumulate into
        self.eager_calls = 0
        self.replays = 0

    # ------------------------------------------------------------------------------------------------ eager
    def _run(self, inputs: Sequence[torch.Tensor]) -> tuple[torch.Tensor, tuple]:
        """`loss_fn`'s loss and its extra outputs."""
        out = self.loss_fn(*inputs)
        return (out[0], tuple(out[1:])) if isinstance(out, tuple) else (out, ())

    def _forward_backward(self, inputs: Sequence[torch.Tensor]) -> tuple[torch.Tensor, tuple, list]:
        """The loss, extras and the params' gradients as outputs (`.grad` untouched)."""
        loss, extras = self._run(inputs)
        grads = torch.autograd.grad(loss, self.params, allow_unused=True)
        return loss.detach(), tuple(e.detach() for e in extras), list(grads)

    def _into_grads(self, inputs: Sequence[torch.Tensor], params: list[torch.Tensor] | None = None
                    ) -> tuple[torch.Tensor, tuple]:
        """The loss and extras, each gradient added into `.grad` as it is produced (of `params`, or of every leaf)."""
        loss, extras = self._run(inputs)
        torch.autograd.backward(loss, inputs=params)
        return loss.detach(), tuple(e.detach() for e in extras)

    def _reached(self, inputs: Sequence[torch.Tensor]) -> list[int]:
        """Runs the micro-step, dropping each gradient as it lands (no set of gradients beside the live ones), and
        says which of the params it reaches. The params' .grad (a window's gradients so far) are left as they were."""
        reached: set[int] = set()
        held = [p.grad for p in self.params]
        hooks = []
        for i, p in enumerate(self.params):
            p.grad = None

            def drop(param: torch.Tensor, i: int = i) -> None:
                reached.add(i)
                param.grad = None
            hooks.append(p.register_post_accumulate_grad_hook(drop))
        try:
            self._into_grads(inputs, self.params)
        finally:
            for hook in hooks:
                hook.remove()
            for p, g in zip(self.params, held):
                p.grad = g
        return sorted(reached)

    def _eager(self, inputs: Sequence[torch.Tensor]) -> tuple[torch.Tensor, tuple]:
        self.eager_calls += 1
        return self._into_grads(inputs)

    # ------------------------------------------------------------------------------------------------ graphs
    def _capture(self, inputs: Sequence[torch.Tensor], accumulates: bool) -> _Captured:
        if accumulates and self.grad_buffers is None:  # only gradient accumulation needs them
            self.grad_buffers = [torch.zeros_like(p) for p in self.params]
        static = [x.detach().clone() for x in inputs]
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(self.warmup):  # lazy init, cuBLAS workspaces, torch.compile happen here, not in capture
                reached = self._reached(static)
        torch.cuda.current_stream().wait_stream(side)
        torch.cuda.synchronize()
        torch.cuda.empty_cache()  # the warm-up's cached blocks would otherwise sit beside the graph's own pool
        graph = torch.cuda.CUDAGraph()
        if accumulates:  # backward adds into the buffers in place: point .grad at them for the capture only
            targets = [self.params[i] for i in reached]
            before = [p.grad for p in targets]
            for p, i in zip(targets, reached):
                p.grad = self.grad_buffers[i]
            try:
                with torch.cuda.graph(graph, pool=self.pool):
                    loss, extras = self._into_grads(static, targets)
            finally:
                for p, g in zip(targets, before):
                    p.grad = g
            grads = None
        else:
            with torch.cuda.graph(graph, pool=self.pool):
                loss, extras, grads = self._forward_backward(static)
        if self.pool is None:
            self.pool = graph.pool()
        # A window's first micro-step hands out the graph's own gradient outputs as .grad: no zeroing pass and no
        # add over every trainable parameter (for the 642.5M fp32 LoRA parameters of the 48-layer Thinker, ~10 GB
        # of memory traffic per step). They live in the shared pool, which another graph's replay may reuse: the
        # next micro-step of the window (an accumulating one) copies them into the buffers before it replays, and
        # after the optimizer step `zero_grad` drops them.
        held = [self.grad_buffers[i] for i in reached] if accumulates else [grads[i] for i in reached]
        del grads
        return _Captured(graph, static, (loss, extras), [self.params[i] for i in reached], held, accumulates)

    @torch.no_grad()
    def _replay(self, captured: _Captured, inputs: Sequence[torch.Tensor]) -> tuple[torch.Tensor, tuple]:
        for buf, x in zip(captured.inputs, inputs):
            buf.copy_(x, non_blocking=True)
        params, targets = captured.params, captured.grads
        if captured.accumulates:
            fresh = [b for p, b in zip(params, targets) if p.grad is None]
            if fresh:  # some of the reached params start their window here
                torch._foreach_zero_(fresh)
            held = [(b, p.grad) for p, b in zip(params, targets) if p.grad is not None and p.grad is not b]
            if held:  # from an eager or a first micro-step: carried over, one launch for all
                torch._foreach_copy_([b for b, _ in held], [g for _, g in held])
        captured.graph.replay()
        self.replays += 1
        for p, b in zip(params, targets):
            p.grad = b
        return captured.outputs

    def _window_open(self) -> bool:
        """Whether gradients are already held (not the first micro-step of a window, which needs no accumulation)."""
        return any(p.grad is not None for p in self.params)

    def __call__(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, tuple]:
        if not (torch.cuda.is_available() and all(x.is_cuda for x in inputs)):
            return self._eager(inputs)
        key = (_signature(inputs), self.accumulating or self._window_open())
        captured = self.graphs.get(key)
        if captured is None:
            if len(self.graphs) >= self.max_graphs:
                return self._eager(inputs)
            try:
                captured = self._capture(inputs, accumulates=key[1])
            except Exception as e:  # a capture accumulates nothing: the caller can run this step eagerly instead
                torch.cuda.synchronize()
                raise GraphCaptureError(f"CUDA graph capture failed: {type(e).__name__}: {e}") from e
            self.graphs[key] = captured
            log.info("captured a CUDA graph for input shapes %s (%d graphs)", [s for s, _ in key[0]], len(self.graphs))
        return self._replay(captured, inputs)
