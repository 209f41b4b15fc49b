"""Run PEFT LoRA through omnitune's fast paths, reading PEFT's own tensors (saving/loading/merging unchanged).

Experts: PEFT `target_parameters` LoRA on fused experts goes through the omnitune grouped path.
Linear layers (attention q/k/v/o): PEFT computes LoRA in the adapter dtype (fp32 next to a bf16 base), which
costs several fp32 passes over [tokens, out] per projection; the fast forward computes it in the activation dtype
as one small GEMM plus one fused `addmm` into the base output (fp32 accumulation inside the GEMMs); q/k/v, which
read the same input, share one GEMM for their LoRA A products and one for their gradients (`SharedInputLoRA`).
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

import torch
from peft.tuners.lora.layer import Linear as LoraLinear
from peft.tuners.lora.layer import ParamWrapper

from .forward_swap import restore_forwards, swap_forwards
from .moe_experts import PROJECTIONS, ExpertLoRA, moe_experts_forward
from .nf4 import frozen_weight

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


def enable_fast_expert_lora(model: torch.nn.Module) -> int:
    """Route every PEFT-wrapped fused-experts module of `model` through the grouped LoRA path; returns how many."""
    return swap_forwards(_outermost_expert_wrappers(model), _fast_forward, _FLAG)


def disable_fast_expert_lora(model: torch.nn.Module) -> int:
    """Undo `enable_fast_expert_lora`: the wrappers run PEFT's own forward again; returns how many were restored."""
    return restore_forwards(_outermost_expert_wrappers(model), _FLAG)


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
    group: SharedInputLoRA | None = getattr(self, _GROUP, None)
    if group is not None:
        out = group.output(self, x)
        if out is not None:
            return out
    result = self.base_layer(x)
    out_2d = result.reshape(-1, result.shape[-1])
    for a in self.active_adapters:
        if a not in self.lora_A:
            continue
        x_2d = self.lora_dropout[a](x).reshape(-1, x.shape[-1])
        xa = x_2d @ self.lora_A[a].weight.to(x.dtype).T  # [N, r]
        out_2d = torch.addmm(out_2d, xa, self.lora_B[a].weight.to(x.dtype).T, alpha=self.scaling[a])
    return out_2d.view(result.shape)


# ------------------------------------------------------------- q/k/v: LoRA layers that read the same input
_GROUP = "_omnitune_shared_input"
SHARED_INPUT_PROJECTIONS = ("q_proj", "k_proj", "v_proj")


def _scaled_mm(a: torch.Tensor, b: torch.Tensor, scale: float, dtype: torch.dtype) -> torch.Tensor:
    """scale * a @ b in `dtype`. On CUDA with half-precision operands and an fp32 result: one cuBLAS call that scales
    and writes fp32 (the adapters' gradient dtype), where the plain ops take a GEMM, a scale pass and a cast pass."""
    if a.is_cuda and a.dtype in (torch.bfloat16, torch.float16) and dtype == torch.float32:
        out = a.new_empty(a.shape[0], b.shape[1], dtype=dtype)
        return torch.addmm(out, a, b, out_dtype=dtype, beta=0, alpha=scale)
    out = a @ b
    return (out if scale == 1.0 else out * scale).to(dtype)


class _SharedInputLoRAFunction(torch.autograd.Function):
    """y_i = x W_i^T + s_i (x A_i^T) B_i^T for projections i that read the same x. Forward: ONE GEMM for x A^T of
    all of them; backward: ONE GEMM for all the A gradients, and dX accumulated in place by the GEMMs (beta=1)
    instead of one add pass per projection and adapter. Frozen base weights (LoRA): no weight gradient.
    The backward writes each s_i * dY_i B_i straight into its rows of d(xa)^T and the adapter gradients straight in
    their dtype, scaled inside the GEMMs (`_scaled_mm`): per layer ~20 small scale/copy/cast kernels fewer."""

    @staticmethod
    def forward(ctx, x, scalings, ranks, linears, *tensors):
        # linears: the frozen base layers; their weights are read here and again in the backward (`frozen_weight`:
        # the parameter, or a dequantized NF4 copy that must not live from the forward to the backward)
        n = len(scalings)
        weights, lora_a, lora_b = [frozen_weight(m) for m in linears], tensors[:n], tensors[n:]
        a_cat = torch.cat([a.to(x.dtype) for a in lora_a])  # [sum r, in]
        xa = x @ a_cat.T
        b_cast = [b.to(x.dtype) for b in lora_b]
        outs, start = [], 0
        for w, b, s, r in zip(weights, b_cast, scalings, ranks):
            # out of place: selective checkpointing may have cached the base product for its recompute
            outs.append(torch.addmm(x @ w.to(x.dtype).T, xa[:, start:start + r], b.T, alpha=s))
            start += r
        ctx.save_for_backward(x, xa, a_cat, *b_cast)
        ctx.linears, ctx.scalings, ctx.ranks = linears, scalings, ranks
        ctx.dtypes = [t.dtype for t in (*lora_a, *lora_b)]
        return tuple(outs)

    @staticmethod
    def backward(ctx, *grads):
        x, xa, a_cat, *b_cast = ctx.saved_tensors
        n = len(ctx.scalings)
        weights = [frozen_weight(m) for m in ctx.linears]
        dx = torch.zeros_like(x) if all(g is None for g in grads) else None
        d_xa_t = xa.new_zeros(xa.shape[1], xa.shape[0])  # d(xa)^T: each projection's rows are one contiguous block
        grad_b, start = [], 0
        for g, w, b, s, r, dtype in zip(grads, weights, b_cast, ctx.scalings, ctx.ranks, ctx.dtypes[n:]):
            sl = slice(start, start + r)
            start += r
            if g is None:
                grad_b.append(torch.zeros_like(b, dtype=dtype))
                continue
            dx = g @ w.to(g.dtype) if dx is None else dx.addmm_(g, w.to(g.dtype))
            d_xa_t[sl].addmm_(b.T, g.T, beta=0, alpha=s)  # (s * dY B)^T
            grad_b.append(_scaled_mm(g.T, xa[:, sl], s, dtype))
        grad_a = _scaled_mm(d_xa_t, x, 1.0, ctx.dtypes[0]).split(list(ctx.ranks))
        dx.addmm_(d_xa_t.T, a_cat)
        grad_a = [t.to(dtype) for t, dtype in zip(grad_a, ctx.dtypes[:n])]
        return (dx, None, None, None, *grad_a, *grad_b)


class SharedInputLoRA:
    """LoRA layers that read one input: the q/k/v of an attention module (or one layer alone). The first of them
    called with an input computes all of their outputs through `_SharedInputLoRAFunction` and hands the others
    theirs when they are called with the SAME tensor (the attention forward projects one normed input three
    times); any other call computes alone."""

    def __init__(self, layers: list[LoraLinear]):
        self.layers = layers
        self._pending: tuple[torch.Tensor, dict[int, torch.Tensor]] | None = None

    def _applies(self) -> bool:
        names = [tuple(a for a in layer.active_adapters if a in layer.lora_A) for layer in self.layers]
        return len(set(names)) == 1 and len(names[0]) == 1 and all(
            type(layer.base_layer) is torch.nn.Linear and layer.base_layer.bias is None
            and not layer.base_layer.weight.requires_grad
            and isinstance(layer.lora_dropout[names[0][0]], torch.nn.Identity) and _fast_linear_applies(layer)
            for layer in self.layers)

    def output(self, layer: LoraLinear, x: torch.Tensor) -> torch.Tensor | None:
        """This layer's output for x (from the shared computation), or None when it must compute alone."""
        if self._pending is not None and self._pending[0] is x and id(layer) in self._pending[1]:
            out = self._pending[1].pop(id(layer))
            if not self._pending[1]:
                self._pending = None
            return out
        self._pending = None
        if not self._applies():
            return None
        adapter = next(a for a in layer.active_adapters if a in layer.lora_A)
        x2d = x.reshape(-1, x.shape[-1])
        outs = _SharedInputLoRAFunction.apply(
            x2d, tuple(m.scaling[adapter] for m in self.layers), tuple(m.r[adapter] for m in self.layers),
            tuple(m.base_layer for m in self.layers), *(m.lora_A[adapter].weight for m in self.layers),
            *(m.lora_B[adapter].weight for m in self.layers))
        outs = {id(m): y.view(*x.shape[:-1], y.shape[-1]) for m, y in zip(self.layers, outs)}
        mine = outs.pop(id(layer))
        self._pending = (x, outs) if outs else None
        return mine


def _shared_input_groups(model: torch.nn.Module, share_inputs: bool) -> list[list[LoraLinear]]:
    """The q/k/v LoRA layers of each attention module as one group (if `share_inputs`), every other one alone:
    a group of one still gets the in-place dX accumulation of `_SharedInputLoRAFunction`."""
    groups, grouped = [], set()
    for module in model.modules() if share_inputs else ():
        layers = [getattr(module, n, None) for n in SHARED_INPUT_PROJECTIONS]
        layers = [m for m in layers if isinstance(m, LoraLinear)]
        if len(layers) >= 2:
            groups.append(layers)
            grouped.update(id(m) for m in layers)
    return groups + [[m] for m in _lora_linears(model) if id(m) not in grouped]


def _lora_linears(model: torch.nn.Module) -> list[LoraLinear]:
    return [m for m in model.modules() if isinstance(m, LoraLinear)]


def enable_fast_lora_linear(model: torch.nn.Module, share_inputs: bool = True) -> int:
    """Compute PEFT LoRA of every `lora.Linear` in `model` in the activation dtype with a fused add, the q/k/v ones
    of each attention module together (`SharedInputLoRA`, unless `share_inputs` is False); returns how many.
    Layers the shared function does not cover (biases, dropout, several adapters, ...) fall back per call."""
    for layers in _shared_input_groups(model, share_inputs):
        group = SharedInputLoRA(layers)
        for layer in layers:
            setattr(layer, _GROUP, group)
    return swap_forwards(_lora_linears(model), _fast_linear_forward, _FLAG)


def disable_fast_lora_linear(model: torch.nn.Module) -> int:
    """Undo `enable_fast_lora_linear`; returns how many layers were restored."""
    for layer in _lora_linears(model):
        if hasattr(layer, _GROUP):
            delattr(layer, _GROUP)
    return restore_forwards(_lora_linears(model), _FLAG)


def enable_fast_lora(model: torch.nn.Module) -> dict[str, int]:
    """The one switch for training: fast experts LoRA and fast linear LoRA on a PEFT model."""
    return {"experts": enable_fast_expert_lora(model), "linear": enable_fast_lora_linear(model)}


def disable_fast_lora(model: torch.nn.Module) -> dict[str, int]:
    """Restore PEFT's own forwards everywhere `enable_fast_lora` changed them."""
    return {"experts": disable_fast_expert_lora(model), "linear": disable_fast_lora_linear(model)}
