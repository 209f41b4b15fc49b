"""QLoRA of the Thinker (`adapter.method: qlora`): LoRA as usual, the frozen fused-expert weights and the frozen
attention projections kept in 4-bit NF4.

The experts hold ~29.0B of the Thinker's weights (48 layers x 128 experts x (1536x2048 + 2048x768)): 54.0 GiB in
bf16, 15.2 GiB in NF4, so the frozen base shrinks by ~39 GiB. The attention projections (q/k/v/o, 0.9B weights):
1.69 GiB in bf16, 0.47 GiB in NF4 (`quantize_attention`): what takes QLoRA r16 under a 24 GB card's 22 GiB (the
estimate, train/memory.py: 23.0 -> 21.8 GiB). Router, embeddings, head and towers stay bf16. An NF4 projection
dequantizes its weight in the forward and again in the backward (kernels/nf4.py `NF4Linear`, and the shared q/k/v
LoRA function): no bf16 copy outlives the op, also in layers that are not checkpointed.
The experts are dequantized just in time, per GEMM (by a Triton kernel, kernels/nf4.py), through the omnitune
experts path's weight-provider seam (kernels/moe_experts.py): the grouped GEMMs, the per-expert LoRA and the
CUDA-graph step are the same code as for LoRA. The backward dequantizes again, or under checkpointing reuses the
recompute's stack (`_FrozenExpertsMM`); a dequantized stack never outlives its layer's backward.
With `offload` (train.offload_experts) the NF4 stacks live in pinned host memory instead and `ExpertStream` copies
each layer's to the GPU one layer ahead of its use, on a side stream (forward: the next layer; backward: the one
before), so the GPU holds two layers' experts (0.6 GiB) instead of 48 (15.2 GiB), for ~30 GiB of host-to-device
copies per step (each layer is used by the forward and again by the recompute / backward).
The adapter that comes out is an ordinary PEFT adapter of the bf16 model. Text generation (infer / eval) of a QLoRA
run loads the Thinker the way it trained, NF4 experts + the adapter unmerged (model/source.py), so it fits
where training fit; export (and speech output) merge it into the bf16 base.
"""
from __future__ import annotations

import torch
from torch import nn

from omnitune.kernels.forward_swap import swap_forwards
from omnitune.kernels.moe_experts import PROJECTIONS
from omnitune.kernels.nf4 import dequantize_nf4, nf4_linear_forward, quantize_nf4, store_nf4, stored_nf4
from omnitune.model import parts


def _fused_experts(model: nn.Module) -> list[nn.Module]:
    """The experts modules that own [E, out, in] projection parameters (not PEFT's wrappers around them)."""
    return [m for m in model.modules()
            if hasattr(m, "num_experts") and all(p in m._parameters and m._parameters[p].dim() == 3
                                                 for p in PROJECTIONS)]


def nf4_expert_weight(experts: nn.Module, name: str) -> torch.Tensor:
    """The weight provider: the [E, out, in] stack of `name`, dequantized from the module's NF4 buffers."""
    return dequantize_nf4(stored_nf4(experts, name))


class ExpertStream:
    """The weight provider of host-offloaded NF4 experts: each experts module's packed codes and scales are copied
    from pinned host memory to `device` before their layer runs (a side stream, one layer ahead in the direction
    the calls go: up in the forward, down in the backward) and dropped two layers later. Why our own: the stream
    follows the experts path's weight-provider seam (kernels/moe_experts.py), which no offloading library sees."""

    def __init__(self, modules: list[nn.Module], device: torch.device | str):
        self.modules = modules
        self.index = {id(m): i for i, m in enumerate(modules)}
        self.device = torch.device(device)
        self.copies = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        self.resident: dict[int, tuple[dict[str, tuple[torch.Tensor, torch.Tensor]], torch.cuda.Event | None]] = {}
        self.last = 0
        self.copied_bytes = 0  # host-to-device traffic so far (for the benchmark)

    def _fetch(self, i: int) -> None:
        if i in self.resident or not 0 <= i < len(self.modules):
            return
        host = self.modules[i].omnitune_nf4_host
        if self.copies is None:
            self.resident[i] = ({n: (p.to(self.device), a.to(self.device)) for n, (p, a) in host.items()}, None)
        else:
            with torch.cuda.stream(self.copies):
                tensors = {n: (p.to(self.device, non_blocking=True), a.to(self.device, non_blocking=True))
                           for n, (p, a) in host.items()}
                event = torch.cuda.Event()
                event.record(self.copies)
            self.resident[i] = (tensors, event)
        self.copied_bytes += sum(p.numel() + a.numel() * a.element_size() for p, a in host.values())

    def __call__(self, experts: nn.Module, name: str) -> torch.Tensor:
        i = self.index[id(experts)]
        step = 1 if i >= self.last else -1
        self.last = i
        self._fetch(i)
        tensors, event = self.resident[i]
        packed, absmax = tensors[name]
        if event is not None:
            current = torch.cuda.current_stream(self.device)
            current.wait_event(event)
            packed.record_stream(current)  # made on the copy stream: not reused before this stream is done
            absmax.record_stream(current)
        ahead = i + step if 0 <= i + step < len(self.modules) else i - step
        for j in [j for j in self.resident if j not in (i, ahead)]:
            del self.resident[j]
        self._fetch(ahead)
        return dequantize_nf4(stored_nf4(experts, name, packed, absmax))


@torch.no_grad()
def quantize_experts(model: nn.Module, device: torch.device | str | None = None,
                     offload: bool = False) -> tuple[int, int]:
    """Replace every fused-experts weight of `model` by NF4 buffers (on `device`, one module at a time, so the bf16
    experts never all sit there at once) and route the experts forward through them. Needs the omnitune experts
    path. With `offload`, the NF4 codes and scales go to pinned host memory (plain attributes: `.to()` leaves
    them) and an `ExpertStream` provides them. Returns (bytes before, bytes after) of the expert weights."""
    before = after = 0
    found = _fused_experts(model)
    stream = ExpertStream(found, device if device is not None else "cpu") if offload else None
    pin = stream is not None and torch.cuda.is_available()
    for experts in found:
        experts.omnitune_nf4_host = {}
        for name in PROJECTIONS:
            param = getattr(experts, name)
            if param.requires_grad:
                raise ValueError(f"cannot quantize a trained weight ({name}): QLoRA keeps the experts frozen")
            weight = param.data.to(device) if device is not None else param.data
            q = quantize_nf4(weight, f"the experts' {name}")
            store_nf4(experts, name, q, ("packed", "absmax", "codes") if stream is None else ("codes",))
            if stream is not None:
                host = [t.cpu().pin_memory() if pin else t.cpu() for t in (q.packed, q.absmax)]
                experts.omnitune_nf4_host[name] = tuple(host)
            before += param.numel() * param.element_size()
            after += q.nbytes()
            # the bf16 stack is gone; the (empty) parameter stays so PEFT's wrappers and names are untouched
            param.data = torch.empty(0, dtype=param.dtype, device=weight.device)
        experts.omnitune_weight_provider = nf4_expert_weight if stream is None else stream
    return before, after


# ------------------------------------------------------------------------------------------ attention projections
def attention_linears(model: nn.Module) -> list[tuple[str, nn.Linear]]:
    """(name, module) of the Thinker's q/k/v/o projections as plain linears (PEFT's base layer where LoRA wraps
    one), named structurally so the memory estimate counts the same ones on a meta-device model."""
    thinker = parts.thinker_of(model)
    out = []
    for name in parts.module_names(thinker, "attention"):
        module = thinker.get_submodule(name)
        base = getattr(module, "base_layer", module)
        if type(base) is nn.Linear:
            out.append((f"{name}.base_layer" if base is not module else name, base))
    return out


@torch.no_grad()
def quantize_attention(model: nn.Module, device: torch.device | str | None = None) -> tuple[int, int]:
    """The Thinker's frozen q/k/v/o weights in NF4 buffers on `device` (the emptied parameter stays, so names and
    PEFT's wrappers are unchanged); their forward goes through kernels/nf4.py `NF4Linear`. Returns (bytes before,
    bytes after)."""
    before = after = 0
    for name, linear in attention_linears(model):
        if linear.weight.requires_grad:
            raise ValueError("cannot quantize a trained attention weight: QLoRA keeps the base frozen")
        weight = linear.weight.data.to(device) if device is not None else linear.weight.data
        q = quantize_nf4(weight, name)
        store_nf4(linear, "weight", q)
        before += weight.numel() * weight.element_size()
        after += q.nbytes()
        linear.weight.data = torch.empty(0, dtype=weight.dtype, device=weight.device)
        swap_forwards([linear], nf4_linear_forward, "_omnitune_nf4_linear")
    return before, after
