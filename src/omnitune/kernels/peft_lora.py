"""Run PEFT LoRA through omnitune's fast paths, reading PEFT's own tensors (saving/loading/merging unchanged).

Experts: PEFT `target_parameters` LoRA on fused experts goes through the omnitune grouped path.
Linear layers (attention q/k/v/o): PEFT computes LoRA in the adapter dtype (fp32 next to a bf16 base), which
costs several fp32 passes over [tokens, out] per projection; the fast forward computes it in the activation dtype
as one small GEMM plus one fused `addmm` into the base output (fp32 accumulation inside the GEMMs).
`enable_fast_lora(peft_model)` switches both on; `disable_fast_lora` restores PEFT's forwards.

PEFT 0.21 wraps the experts module in nested `ParamWrapper`s (one per targeted parameter). Its forward registers a
parametrization that folds W + s*B@A for ALL experts on every call. `enable_fast_expert_lora(peft_model)` gives
each outermost experts wrapper an instance-level forward that collects the wrappers' lora_A / lora_B weights as
per-expert factors and calls `moe_experts_forward` with them: the adapter parameters, their names, saving,
loading and `merge_and_unload` stay exactly PEFT's. `disable_fast_expert_lora` removes the override.

PEFT's storage, for a parameter [E, out, in] (after its in/out swap): lora_A.weight [E*r, in] with row e*r + j;
lora_B.weight [out, r*E] with column j*E + e. Hence A_e = A.reshape(E, r, in)[e], B_e = B.reshape(out, r, E)[..., e].
"""
from __future__ import annotations

import types

import torch
from peft.tuners.lora.layer import Linear as LoraLinear
from peft.tuners.lora.layer import ParamWrapper

from .moe_experts import PROJECTIONS, ExpertLoRA, moe_experts_forward

_FLAG = "_omnitune_fast_lora"


def _chain(wrapper: ParamWrapper) -> tuple[list[ParamWrapper], torch.nn.Module]:
    wrappers, module = [], wrapper
    while isinstance(module, ParamWrapper):
        wrappers.append(module)
        module = module.base_layer
    return wrappers, module


def _is_fused_experts(module: torch.nn.Module) -> bool:
    # a weight provider (e.g. NF4 experts, model/qlora.py) stands in for [E, out, in] parameters
    stacks = getattr(module, "omnitune_weight_provider", None) is not None or all(
        getattr(module, p, None) is not None and getattr(module, p).dim() == 3 for p in PROJECTIONS)
    return stacks and hasattr(module, "num_experts") and not getattr(module, "is_transposed", False)


def expert_lora_factors(wrapper: ParamWrapper, adapter: str) -> ExpertLoRA:
    """(A [E, r, in], B [E, out, r], scaling) views of one PEFT ParamWrapper adapter; no copies of the weights."""
    num_experts = wrapper.num_experts
    weight_a = wrapper.lora_A[adapter].weight
    weight_b = wrapper.lora_B[adapter].weight
    lora_a = weight_a.reshape(num_experts, -1, weight_a.shape[-1])
    lora_b = weight_b.reshape(weight_b.shape[0], -1, num_experts).permute(2, 0, 1)
    return lora_a, lora_b, wrapper.scaling[adapter]


def _fast_path_applies(wrappers: list[ParamWrapper]) -> bool:
    for w in wrappers:
        if w.disable_adapters or w.merged or not w._did_swap_in_out_features or w.parameter_name not in PROJECTIONS:
            return False
        if any(getattr(w, "lora_bias", {}).get(a, False) for a in w.active_adapters):
            return False
    return True


def _fast_forward(self: ParamWrapper, hidden_states, top_k_index, top_k_weights, *args, **kwargs):
    wrappers, experts = _chain(self)
    if args or kwargs or not _fast_path_applies(wrappers):
        return ParamWrapper.forward(self, hidden_states, top_k_index, top_k_weights, *args, **kwargs)
    lora: dict[str, list[ExpertLoRA]] = {}
    for w in wrappers:
        adapters = [a for a in w.active_adapters if a in w.lora_A]
        lora.setdefault(w.parameter_name, []).extend(expert_lora_factors(w, a) for a in adapters)
    return moe_experts_forward(experts, hidden_states, top_k_index, top_k_weights, lora=lora)


def _outermost_expert_wrappers(model: torch.nn.Module) -> list[ParamWrapper]:
    wrappers = [m for m in model.modules() if isinstance(m, ParamWrapper)]
    inner = {id(w.base_layer) for w in wrappers if isinstance(w.base_layer, ParamWrapper)}
    return [w for w in wrappers if id(w) not in inner and _is_fused_experts(_chain(w)[1])]


def _install(modules: list[torch.nn.Module], forward) -> int:
    # an instance attribute shadows the class's forward; deleting it brings PEFT's back
    for m in modules:
        m.forward = types.MethodType(forward, m)
        setattr(m, _FLAG, True)
    return len(modules)


def _uninstall(modules: list[torch.nn.Module]) -> int:
    restored = [m for m in modules if getattr(m, _FLAG, False)]
    for m in restored:
        del m.forward
        delattr(m, _FLAG)
    return len(restored)


def enable_fast_expert_lora(model: torch.nn.Module) -> int:
    """Route every PEFT-wrapped fused-experts module of `model` through the grouped LoRA path; returns how many."""
    return _install(_outermost_expert_wrappers(model), _fast_forward)


def disable_fast_expert_lora(model: torch.nn.Module) -> int:
    """Undo `enable_fast_expert_lora`: the wrappers run PEFT's own forward again; returns how many were restored."""
    return _uninstall(_outermost_expert_wrappers(model))


def fast_expert_lora_enabled(model: torch.nn.Module) -> bool:
    """True when at least one experts wrapper of `model` runs the omnitune path."""
    return any(getattr(w, _FLAG, False) for w in _outermost_expert_wrappers(model))


# ------------------------------------------------------------------------------------------- LoRA on nn.Linear
def _fast_linear_applies(layer: LoraLinear) -> bool:
    if layer.disable_adapters or layer.merged or layer.fan_in_fan_out:
        return False
    for a in layer.active_adapters:
        if a in layer.lora_A and (a in layer.lora_variant or layer.lora_B[a].bias is not None):
            return False
    return True


def _fast_linear_forward(self: LoraLinear, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    if args or kwargs or not _fast_linear_applies(self):
        return LoraLinear.forward(self, x, *args, **kwargs)
    result = self.base_layer(x)
    out_2d = result.reshape(-1, result.shape[-1])
    for a in self.active_adapters:
        if a not in self.lora_A:
            continue
        x_2d = self.lora_dropout[a](x).reshape(-1, x.shape[-1])
        xa = x_2d @ self.lora_A[a].weight.to(x.dtype).T  # [N, r]
        out_2d = torch.addmm(out_2d, xa, self.lora_B[a].weight.to(x.dtype).T, alpha=self.scaling[a])
    return out_2d.view(result.shape)


def _lora_linears(model: torch.nn.Module) -> list[LoraLinear]:
    return [m for m in model.modules() if isinstance(m, LoraLinear)]


def enable_fast_lora_linear(model: torch.nn.Module) -> int:
    """Compute PEFT LoRA of every `lora.Linear` in `model` in the activation dtype with a fused add; returns count."""
    return _install(_lora_linears(model), _fast_linear_forward)


def disable_fast_lora_linear(model: torch.nn.Module) -> int:
    """Undo `enable_fast_lora_linear`; returns how many layers were restored."""
    return _uninstall(_lora_linears(model))


def enable_fast_lora(model: torch.nn.Module) -> dict[str, int]:
    """The one switch for training: fast experts LoRA and fast linear LoRA on a PEFT model."""
    return {"experts": enable_fast_expert_lora(model), "linear": enable_fast_lora_linear(model)}


def disable_fast_lora(model: torch.nn.Module) -> dict[str, int]:
    """Restore PEFT's own forwards everywhere `enable_fast_lora` changed them."""
    return {"experts": disable_fast_expert_lora(model), "linear": disable_fast_lora_linear(model)}
