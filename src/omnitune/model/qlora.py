"""QLoRA of the Thinker (`adapter.method: qlora`): LoRA as usual, the frozen fused-expert weights kept in 4-bit NF4.

The experts hold ~29.0B of the Thinker's weights (48 layers x 128 experts x (1536x2048 + 2048x768)): 54.0 GiB in
bf16, 15.2 GiB in NF4, so the frozen base shrinks by ~39 GiB; attention, router, embeddings and towers stay bf16.
The experts are dequantized just in time, per GEMM (by a Triton kernel, kernels/nf4.py), through the omnitune
experts path's weight-provider seam (kernels/moe_experts.py): the grouped GEMMs, the per-expert LoRA and the
CUDA-graph step are the same code as for LoRA. The backward dequantizes again, or under checkpointing reuses the
recompute's stack (`_FrozenExpertsMM`); a dequantized stack never outlives its layer's backward.
The adapter that comes out is an ordinary PEFT adapter of the bf16 model. Text generation (infer / eval) of a QLoRA
run loads the Thinker the way it trained, NF4 experts + the adapter unmerged (model/source.py), so it fits
where training fit; export (and speech output) merge it into the bf16 base.
"""
from __future__ import annotations

import torch
from torch import nn

from omnitune.kernels.moe_experts import PROJECTIONS
from omnitune.kernels.nf4 import NF4Weight, dequantize_nf4, quantize_nf4

_PREFIX = "omnitune_nf4_"


def _fused_experts(model: nn.Module) -> list[nn.Module]:
    """The experts modules that own [E, out, in] projection parameters (not PEFT's wrappers around them)."""
    return [m for m in model.modules()
            if hasattr(m, "num_experts") and all(p in m._parameters and m._parameters[p].dim() == 3
                                                 for p in PROJECTIONS)]


def nf4_expert_weight(experts: nn.Module, name: str) -> torch.Tensor:
    """The weight provider: the [E, out, in] stack of `name`, dequantized from the module's NF4 buffers."""
    shape, dtype = experts.omnitune_nf4_meta[name]
    return dequantize_nf4(NF4Weight(getattr(experts, f"{_PREFIX}{name}_packed"),
                                    getattr(experts, f"{_PREFIX}{name}_absmax"),
                                    getattr(experts, f"{_PREFIX}{name}_codes"), shape, dtype))


@torch.no_grad()
def quantize_experts(model: nn.Module, device: torch.device | str | None = None) -> tuple[int, int]:
    """Replace every fused-experts weight of `model` by NF4 buffers (on `device`, one module at a time, so the bf16
    experts never all sit there at once) and route the experts forward through them. Needs the omnitune experts
    path. Returns (bytes before, bytes after) of the expert weights."""
    before = after = 0
    for experts in _fused_experts(model):
        experts.omnitune_nf4_meta = {}
        for name in PROJECTIONS:
            param = getattr(experts, name)
            if param.requires_grad:
                raise ValueError(f"cannot quantize a trained weight ({name}): QLoRA keeps the experts frozen")
            weight = param.data.to(device) if device is not None else param.data
            q = quantize_nf4(weight)
            for part in ("packed", "absmax", "codes"):
                experts.register_buffer(f"{_PREFIX}{name}_{part}", getattr(q, part), persistent=False)
            experts.omnitune_nf4_meta[name] = (q.shape, q.dtype)
            before += param.numel() * param.element_size()
            after += q.nbytes()
            # the bf16 stack is gone; the (empty) parameter stays so PEFT's wrappers and names are untouched
            param.data = torch.empty(0, dtype=param.dtype, device=weight.device)
        experts.omnitune_weight_provider = nf4_expert_weight
    return before, after
