"""Fast experts forward for the Thinker's fused MoE experts, with per-expert LoRA as grouped low-rank products.

Layout (transformers 5.23, `Qwen3OmniMoeThinkerTextExperts`): `gate_up_proj` [E, 2I, H], `down_proj` [E, H, I],
both stored (out, in) per expert. The router hands over `top_k_index` / `top_k_weights` [T, K].

One forward:
  1. route: ONE stable sort of the T*K (token, slot) pairs by expert -> permutation + int32 offsets;
  2. gather the token rows in expert order (x_g [T*K, H]);
  3. gate_up = x_g @ W_gu[e]^T  (+ s * (x_g @ A_e^T) @ B_e^T per LoRA adapter), one grouped GEMM each;
  4. h = act(gate) * up; down = h @ W_d[e]^T (+ LoRA the same way);
     (the routing weight of each row is applied to h, inside the fused SwiGLU: the down projection is linear);
  5. undo the permutation and sum the K slots of each token.
W + BA is never formed. Gradients come from autograd through the grouped GEMMs, so the three training cases
(frozen base + LoRA, trainable router, full fine-tune) differ only in which tensors require grad; a frozen base
weight gets no weight-gradient GEMM at all.

Quantized experts (QLoRA) seam: set `experts.omnitune_weight_provider = fn` where `fn(experts, name)` returns the
[E, out, in] compute-dtype stack for `name` in ("gate_up_proj", "down_proj"), e.g. dequantized 4-bit blocks
(model/qlora.py). Provided weights are frozen: the forward calls the provider per projection and the backward calls
it again for dX instead of saving the stack (under checkpointing the recompute's stack serves the backward,
`_ProvidedWeightMM`). LoRA factors are passed separately and are unaffected.

Registered with transformers as experts implementation "omnitune":
`model.set_experts_implementation("omnitune")` or `from_pretrained(..., experts_implementation="omnitune")`.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import torch
from transformers.integrations.moe import _default_apply_gate

from .expert_lora import LoRAExpand, LoRAProject
from .fused_ops import compiled_on_cuda, gather_sum, weighted_swiglu
from .grouped_gemm import grouped_mm

# One LoRA adapter on one fused projection: A [E, r, in], B [E, out, r], scaling. Delta W_e = scaling * B_e @ A_e.
ExpertLoRA = tuple[torch.Tensor, torch.Tensor, float]
LoRASpec = Mapping[str, Sequence[ExpertLoRA]]  # {"gate_up_proj": [...], "down_proj": [...]}
WeightProvider = Callable[[torch.nn.Module, str], torch.Tensor]

PROJECTIONS = ("gate_up_proj", "down_proj")


def expert_weight(experts: torch.nn.Module, name: str) -> torch.Tensor:
    """The [E, out, in] weight stack of one projection: from the weight provider if one is set, else the parameter."""
    provider: WeightProvider | None = getattr(experts, "omnitune_weight_provider", None)
    if provider is not None:
        return provider(experts, name)
    return getattr(experts, name)


def route(top_k_index: torch.Tensor, num_experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One stable sort of the flattened (token, slot) pairs by expert: (perm [T*K], offsets [E] int32)."""
    flat = top_k_index.reshape(-1)
    _, perm = torch.sort(flat, stable=True)
    # scatter_add, not bincount: bincount reads the max back to the host, a sync per layer that stalls the
    # CPU/GPU pipeline (the whole training step is launch-bound, so every sync is paid in full)
    counts = torch.zeros(num_experts, dtype=torch.int64, device=flat.device).scatter_add_(0, flat, torch.ones_like(flat))
    offsets = torch.cumsum(counts, dim=0, dtype=torch.int32)
    return perm, offsets


class _GatherTokens(torch.autograd.Function):
    """x [T, H] -> x[perm // K] [S, H]; backward gathers back and sums the K copies (one fused kernel, no atomics)."""

    @staticmethod
    def forward(ctx, x, token_of_row, inv_perm, top_k):
        ctx.save_for_backward(inv_perm)
        ctx.top_k = top_k
        return x.index_select(0, token_of_row)

    @staticmethod
    def backward(ctx, grad_rows):
        (inv_perm,) = ctx.saved_tensors
        return gather_sum(inv_perm, ctx.top_k, grad_rows), None, None, None


class _SumSlots(torch.autograd.Function):
    """rows [S, H] in expert order (base output + LoRA deltas, routing weight already applied) ->
    out[t] = sum_k sum_i rows_i[inv_perm[t*K + k]]: one fused gather + sum; backward is one gather of grad_out,
    shared by all the rows' tensors."""

    @staticmethod
    def forward(ctx, inv_perm, token_of_row, top_k, *rows):
        ctx.save_for_backward(token_of_row)
        return gather_sum(inv_perm, top_k, *rows)

    @staticmethod
    def backward(ctx, grad_out):
        (token_of_row,) = ctx.saved_tensors
        grad = grad_out.index_select(0, token_of_row)
        return (None, None, None, *([grad] * (len(ctx.needs_input_grad) - 3)))


# The dense x @ A_all^T trick below costs T*H*E*r MACs against (T*K)*H*r for the grouped product (E/K = 16x more
# at the real size). It was measured faster at E*r = 128*16 = 2048 (H100, bench/); larger ranks take the grouped
# path until a measurement says otherwise.
DENSE_LORA_A_MAX_COLS = 2048


def _cast_factors_reference(dtype: torch.dtype, *factors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """(A, B, A, B, ...) -> A [E, r, in] in `dtype`, B [E, out, r] as a row-major [E, r, out] stack in `dtype` (the
    layout the LoRA kernels read)."""
    return tuple(f.to(dtype) if i % 2 == 0 else f.transpose(-2, -1).to(dtype, memory_format=torch.contiguous_format)
                 for i, f in enumerate(factors))


def compute_factors(lora: LoRASpec, dtype: torch.dtype) -> dict[str, list[ExpertLoRA]]:
    """Every LoRA factor of the layer in the compute dtype, B as rows [E, r, out], cast by one compiled function on
    CUDA (forward and backward: the gradients go back to fp32 in PEFT's [out, r*E] layout). In the H200 profiles
    this took 0.160 ms per layer against 0.166 for the eager per-tensor copies it replaced: no measurable gain, the
    transposing copies of B are bound by their strided reads either way."""
    factors = [t for name in PROJECTIONS for a, b, _ in lora.get(name, ()) for t in (a, b)]
    if not factors:
        return {}
    cast = iter(compiled_on_cuda("lora_factors", _cast_factors_reference, factors[0])(dtype, *factors))
    return {name: [(next(cast), next(cast), s) for _, _, s in lora.get(name, ())] for name in PROJECTIONS}


def grouped_linear(
    experts: torch.nn.Module, name: str, x: torch.Tensor, offsets: torch.Tensor, row_expert: torch.Tensor,
    loras: Sequence[ExpertLoRA] = (), force_loop: bool = False,
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """x [S, in] rows grouped by expert -> (x @ W_e^T, [s * (x @ A_e^T) @ B_e^T per adapter]), W = experts.<name>,
    the LoRA factors as `compute_factors` gives them (kernels/expert_lora.py multiplies them). The LoRA deltas come
    back separate: the next fused kernel adds them while reading (no [S, out] add pass)."""
    if getattr(experts, "omnitune_weight_provider", None) is not None:
        y = _ProvidedWeightMM.apply(x, offsets, experts, name, force_loop)
    else:
        weight = getattr(experts, name)
        y = grouped_mm(x, weight.to(x.dtype).transpose(-2, -1), offsets, force_loop=force_loop)
    deltas = []
    for lora_a, b_rows, scaling in loras:
        xa = LoRAProject.apply(x, lora_a, offsets, row_expert)  # [S, r]
        deltas.append(LoRAExpand.apply(xa, b_rows, offsets, row_expert, scaling))
    return y, deltas


class _ProvidedWeightMM(torch.autograd.Function):
    """x @ W_e^T with W from the weight provider (frozen, e.g. dequantized NF4).

    Without activation checkpointing W is rebuilt in the backward, not saved: otherwise every layer's dequantized
    stack would stay alive until its backward. Under saved-tensor hooks (checkpointing) W is saved and the hooks
    decide: the checkpointed forward drops it, the recompute (run just before this layer's backward) keeps it for
    the backward, so each layer is dequantized twice per step instead of three times, for one layer's stack held
    from its recompute to its backward."""

    @staticmethod
    def forward(ctx, x, offsets, experts, name, force_loop):
        ctx.experts, ctx.name, ctx.force_loop = experts, name, force_loop
        weight = expert_weight(experts, name)
        # torch.utils.checkpoint asks the same question (its own forward runs under such hooks); a hook that only
        # measures (kernels/checkpointing.layer_activation_bytes) must see what an unhooked forward keeps
        hooks = torch._C._autograd._top_saved_tensors_default_hooks(False)
        hooked = hooks is not None and not getattr(hooks[0], "omnitune_transparent", False)
        ctx.save_for_backward(offsets, weight if hooked else None)
        return grouped_mm(x, weight.to(x.dtype).transpose(-2, -1), offsets, force_loop=force_loop)

    @staticmethod
    def backward(ctx, grad_out):
        offsets, weight = ctx.saved_tensors
        if weight is None:
            weight = expert_weight(ctx.experts, ctx.name)
        weight = weight.to(grad_out.dtype)  # [E, out, in]: dX = dY @ W_e
        return grouped_mm(grad_out, weight, offsets, force_loop=ctx.force_loop), None, None, None, None


def _apply_gate(experts: torch.nn.Module, gate_up: torch.Tensor, row_weight: torch.Tensor,
                deltas: Sequence[torch.Tensor]) -> torch.Tensor:
    """act(gate_up + deltas) (gate * up) * routing weight of the row. The weight goes in here, not after the down
    projection: the projection (and its LoRA) is linear, and here it rides along in the fused SwiGLU on [S, I]."""
    if type(experts.act_fn).__name__ in ("SiLU", "SiLUActivation") and getattr(
        type(experts), "_apply_gate", _default_apply_gate
    ) is _default_apply_gate:
        return weighted_swiglu(gate_up, row_weight, *deltas)  # one fused kernel each way on CUDA
    for d in deltas:
        gate_up = gate_up + d
    apply_gate = getattr(experts, "_apply_gate", None)
    if apply_gate is not None:
        h = apply_gate(gate_up)
    else:
        gate, up = gate_up.chunk(2, dim=-1)
        h = experts.act_fn(gate) * up
    return h * row_weight.to(h.dtype)[:, None]


def moe_experts_forward(
    experts: torch.nn.Module,
    hidden_states: torch.Tensor,
    top_k_index: torch.Tensor,
    top_k_weights: torch.Tensor,
    lora: LoRASpec | None = None,
    force_loop: bool = False,
) -> torch.Tensor:
    """Experts forward: hidden [T, H], top_k_index/weights [T, K] -> [T, H], LoRA applied without materialising."""
    if getattr(experts, "_is_expert_parallel", False):
        raise NotImplementedError("omnitune experts: expert parallelism is not supported; use 'grouped_mm' there")
    if getattr(experts, "is_transposed", False) or getattr(experts, "has_bias", False):
        raise NotImplementedError("omnitune experts expect (out, in) weights without bias, as in Qwen3-Omni")
    lora = compute_factors(lora or {}, hidden_states.dtype)
    num_tokens, hidden_dim = hidden_states.shape
    top_k = top_k_index.shape[-1]

    perm, offsets = route(top_k_index, experts.num_experts)
    inv_perm = torch.empty_like(perm)
    inv_perm[perm] = torch.arange(perm.numel(), device=perm.device)
    token_of_row = perm // top_k
    x_g = _GatherTokens.apply(hidden_states, token_of_row, inv_perm, top_k)  # [S, H] token rows in expert order

    gate_up_loras = lora.get("gate_up_proj", ())
    dense_a = [a for a in gate_up_loras if a[0].shape[0] * a[0].shape[1] <= DENSE_LORA_A_MAX_COLS]
    grouped_a = [a for a in gate_up_loras if a[0].shape[0] * a[0].shape[1] > DENSE_LORA_A_MAX_COLS]
    row_expert = top_k_index.reshape(-1)[perm]  # [S], non-decreasing
    gate_up, gate_up_deltas = grouped_linear(experts, "gate_up_proj", x_g, offsets, row_expert, grouped_a,
                                             force_loop)
    for lora_a, b_rows, scaling in dense_a:
        # every expert sees the same token rows here, so x @ A^T for ALL experts is one dense GEMM on [T, H]
        # (E*r columns) followed by a gather of each row's own r columns: cheaper than a skinny grouped GEMM.
        num_experts, rank, _ = lora_a.shape
        xa_all = hidden_states @ lora_a.reshape(num_experts * rank, -1).T  # [T, E*r]
        xa = xa_all.view(-1, num_experts, rank)[token_of_row, row_expert]  # [S, r]
        gate_up_deltas.append(LoRAExpand.apply(xa, b_rows, offsets, row_expert, scaling))
    h = _apply_gate(experts, gate_up, top_k_weights.reshape(-1).index_select(0, perm), gate_up_deltas)
    y, y_deltas = grouped_linear(experts, "down_proj", h, offsets, row_expert, lora.get("down_proj", ()),
                                 force_loop)
    return _SumSlots.apply(inv_perm, token_of_row, top_k, y, *y_deltas).to(hidden_states.dtype)  # token order


def omnitune_experts_forward(
    self: torch.nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
) -> torch.Tensor:
    """transformers experts-interface entry point (name "omnitune"): base weights only, LoRA comes via PEFT glue."""
    return moe_experts_forward(self, hidden_states, top_k_index, top_k_weights)


def register_experts_implementation(name: str = "omnitune") -> None:
    """Make `experts_implementation=name` select the omnitune experts forward in every transformers model."""
    from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

    ALL_EXPERTS_FUNCTIONS.register(name, omnitune_experts_forward)


# ---------------------------------------------------------------------------------------------------------------
# Plain PyTorch reference: per-expert loop over a dense W_e + s * B_e A_e, as the eager transformers code does.
# ---------------------------------------------------------------------------------------------------------------
def reference_experts_forward(
    gate_up_proj: torch.Tensor,
    down_proj: torch.Tensor,
    hidden_states: torch.Tensor,
    top_k_index: torch.Tensor,
    top_k_weights: torch.Tensor,
    act_fn: Callable[[torch.Tensor], torch.Tensor] = torch.nn.functional.silu,
    lora: LoRASpec | None = None,
) -> torch.Tensor:
    """Slow, obvious experts forward (materialises W + s*BA per expert) that the fast path is tested against."""
    lora = lora or {}

    def effective(w: torch.Tensor, name: str, e: int) -> torch.Tensor:
        w_e = w[e]
        for a, b, s in lora.get(name, ()):
            w_e = w_e + s * (b[e].to(w.dtype) @ a[e].to(w.dtype))
        return w_e

    out = torch.zeros_like(hidden_states)
    for e in range(gate_up_proj.shape[0]):
        token_idx, slot = torch.where(top_k_index == e)
        if token_idx.numel() == 0:
            continue
        x = hidden_states[token_idx]
        gate, up = (x @ effective(gate_up_proj, "gate_up_proj", e).T).chunk(2, dim=-1)
        y = (act_fn(gate) * up) @ effective(down_proj, "down_proj", e).T
        out = out.index_add(0, token_idx, y * top_k_weights[token_idx, slot, None].to(y.dtype))
    return out
