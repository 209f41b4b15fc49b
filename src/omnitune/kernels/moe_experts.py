"""Fast experts forward for the Thinker's fused MoE experts, with per-expert LoRA as grouped low-rank products.

Layout (transformers 5.23, `Qwen3OmniMoeThinkerTextExperts`): `gate_up_proj` [E, 2I, H], `down_proj` [E, H, I],
both stored (out, in) per expert. The router hands over `top_k_index` / `top_k_weights` [T, K].

One forward:
  1. route: ONE stable sort of the T*K (token, slot) pairs by expert -> permutation + int32 offsets;
  2. gather the token rows in expert order (x_g [T*K, H]);
  3. gate_up = x_g @ W_gu[e]^T  (+= s * (x_g @ A_e^T) @ B_e^T per LoRA adapter, in place), one grouped GEMM each;
  4. h = act(gate) * up; down = h @ W_d[e]^T (+= LoRA the same way);
     (the routing weight of each row is applied to h, inside the fused SwiGLU: the down projection is linear);
  5. undo the permutation and sum the K slots of each token.
W + BA is never formed. The three training cases (frozen base + LoRA, trainable router, full fine-tune) differ only
in which tensors require grad: a frozen base goes through one autograd node with its LoRA A products
(`_FrozenExpertsMM`, no weight-gradient GEMM at all), a trainable one through autograd of the grouped GEMM.

Quantized experts (QLoRA) seam: set `experts.omnitune_weight_provider = fn` where `fn(experts, name)` returns the
[E, out, in] compute-dtype stack for `name` in ("gate_up_proj", "down_proj"), e.g. dequantized 4-bit blocks
(model/qlora.py). Provided weights are frozen: the forward calls the provider per projection and the backward calls
it again for dX instead of saving the stack (under checkpointing the recompute's stack serves the backward,
`_FrozenExpertsMM`). LoRA factors are passed separately and are unaffected.

Registered with transformers as experts implementation "omnitune":
`model.set_experts_implementation("omnitune")` or `from_pretrained(..., experts_implementation="omnitune")`.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import torch
from transformers.integrations.moe import _default_apply_gate

from .expert_lora import LoRAExpand, LoRAProject, expand, project, weight_grad
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
    # the radix sort makes one pass per key byte: 8 for the router's int64 indices, 1 for uint8 (H200 profile:
    # 8 passes of ~5.4 us per layer)
    keys = flat.to(torch.uint8) if num_experts <= 256 else flat.to(torch.int32)
    _, perm = torch.sort(keys, stable=True)
    # scatter_add, not bincount: bincount reads the max back to the host, a sync per layer that stalls the
    # CPU/GPU pipeline (the whole training step is launch-bound, so every sync is paid in full)
    counts = torch.zeros(num_experts, dtype=torch.int64, device=flat.device).scatter_add_(0, flat, torch.ones_like(flat))
    offsets = torch.cumsum(counts, dim=0, dtype=torch.int32)
    return perm, offsets


class _ExpertInputs(torch.autograd.Function):
    """The experts' inputs from the token rows x [T, H]: x[token_of_row] [S, H] in expert order, and for each LoRA A
    given (A [E, r, H], few columns) x @ A_e^T [S, r] as one dense GEMM over all experts [T, E*r] and a pick of each
    row's (token, expert) columns. One node, so the backward builds dX in one buffer: the gather-sum of the rows'
    gradients (one fused kernel, no atomics), then each dense A's product added into it by the GEMM (beta=1), where
    autograd would add the two in a pass of its own. (token, expert) pairs are distinct (top-k experts are), so the
    pick's backward is a plain scatter, not the sorting accumulate of advanced indexing's backward."""

    @staticmethod
    def forward(ctx, x, token_of_row, inv_perm, row_expert, top_k, *lora_a):
        num_experts = lora_a[0].shape[0] if lora_a else 0
        # row of (token, expert) in [T * E], for the backward's scatter (only with a dense LoRA A)
        pick = token_of_row * num_experts + row_expert if lora_a else None
        ctx.save_for_backward(x if lora_a else None, inv_perm, pick, *lora_a)
        ctx.top_k = top_k
        # two index tensors on [T, E, r]: an elementwise index kernel (8.4 us per layer in the H200 traces), where
        # one flat index on [T * E, r] ran as a 32-byte-row gather (21 us)
        xas = [(x @ a.reshape(-1, a.shape[-1]).T).view(x.shape[0], num_experts, -1)[token_of_row, row_expert]
               for a in lora_a]
        return (x.index_select(0, token_of_row), *xas)

    @staticmethod
    def backward(ctx, grad_rows, *grad_xas):
        x, inv_perm, pick, *lora_a = ctx.saved_tensors
        dx = gather_sum(inv_perm, ctx.top_k, grad_rows.contiguous()) if ctx.needs_input_grad[0] else None
        grad_as = []
        for i, (a, d_xa) in enumerate(zip(lora_a, grad_xas)):
            num_experts, rank, hidden = a.shape
            d_all = d_xa.new_zeros(x.shape[0] * num_experts, rank).index_copy_(0, pick, d_xa)
            d_all = d_all.view(x.shape[0], num_experts * rank)
            if dx is not None:
                dx.addmm_(d_all, a.reshape(-1, hidden))
            grad_as.append((d_all.T @ x).view_as(a) if ctx.needs_input_grad[5 + i] else None)
        return dx, None, None, None, None, *grad_as


class _SumSlots(torch.autograd.Function):
    """rows [S, H] in expert order (LoRA included, routing weight already applied) ->
    out[t] = sum_k rows[inv_perm[t*K + k]]: one fused gather + sum; backward is one gather of grad_out."""

    @staticmethod
    def forward(ctx, inv_perm, token_of_row, top_k, rows):
        ctx.save_for_backward(token_of_row)
        return gather_sum(inv_perm, top_k, rows)

    @staticmethod
    def backward(ctx, grad_out):
        (token_of_row,) = ctx.saved_tensors
        return None, None, None, grad_out.index_select(0, token_of_row)


# The dense x @ A_all^T trick below costs T*H*E*r MACs against (T*K)*H*r for the grouped product (E/K = 16x more
# at the real size). It was measured faster at E*r = 128*16 = 2048 (H100, bench/); larger ranks take the grouped
# path until a measurement says otherwise.
DENSE_LORA_A_MAX_COLS = 2048


def _cast_factors_reference(dtype: torch.dtype, *factors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """(A, B, A, B, ...) -> A [E, r, in] in `dtype`, B [E, out, r] as a row-major [E, r, out] stack in `dtype` (the
    layout the LoRA kernels read)."""
    return tuple(f.to(dtype) if i % 2 == 0 else f.transpose(-2, -1).to(dtype, memory_format=torch.contiguous_format)
                 for i, f in enumerate(factors))


def _factor_grads_reference(orders: tuple[tuple[int, ...], ...], dtypes: tuple[torch.dtype, ...],
                            *grads: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The gradients of `_cast_factors_reference`'s inputs, each laid out as its input is in memory (dims in
    `orders[i]`, outermost first) and contiguous in that order."""
    return tuple((g if i % 2 == 0 else g.transpose(-2, -1)).permute(order).to(dtype, memory_format=torch.contiguous_format)
                 for i, (g, order, dtype) in enumerate(zip(grads, orders, dtypes)))


def _memory_order(t: torch.Tensor) -> tuple[int, ...]:
    """t's dims from outermost to innermost in memory (t a permuted view of a dense tensor, as PEFT's factors are)."""
    return tuple(sorted(range(t.dim()), key=lambda d: -t.stride(d)))


class _CastFactors(torch.autograd.Function):
    """`_cast_factors_reference` whose backward returns each gradient in its factor's own memory layout. PEFT's
    expert B [out, r*E] arrives as a permuted view; a gradient in the view's logical order would have to be copied
    into the parameter's layout by a strided elementwise copy (H200 profile: ~60 us per layer); here the transpose
    is one fused (tiled) kernel together with the cast back to fp32."""

    @staticmethod
    def forward(ctx, dtype, *factors):
        ctx.orders = tuple(_memory_order(f) for f in factors)
        ctx.dtypes = tuple(f.dtype for f in factors)
        return compiled_on_cuda("lora_factors", _cast_factors_reference, factors[0])(dtype, *factors)

    @staticmethod
    def backward(ctx, *grads):
        fn = compiled_on_cuda("lora_factor_grads", _factor_grads_reference, grads[0])
        laid_out = fn(ctx.orders, ctx.dtypes, *grads)
        inverse = [tuple(sorted(range(len(o)), key=o.__getitem__)) for o in ctx.orders]
        return None, *(g.permute(inv) for g, inv in zip(laid_out, inverse))


def compute_factors(lora: LoRASpec, dtype: torch.dtype) -> dict[str, list[ExpertLoRA]]:
    """Every LoRA factor of the layer in the compute dtype, B as rows [E, r, out], cast by one compiled function on
    CUDA (`_CastFactors`: forward and backward, the gradients in the factors' own layouts). The forward took
    0.160 ms per layer in the H200 profiles against 0.166 for the eager per-tensor copies it replaced."""
    factors = [t for name in PROJECTIONS for a, b, _ in lora.get(name, ()) for t in (a, b)]
    if not factors:
        return {}
    cast = iter(_CastFactors.apply(dtype, *factors))
    return {name: [(next(cast), next(cast), s) for _, _, s in lora.get(name, ())] for name in PROJECTIONS}


def grouped_linear(
    experts: torch.nn.Module, name: str, x: torch.Tensor, offsets: torch.Tensor, row_expert: torch.Tensor,
    loras: Sequence[ExpertLoRA] = (), force_loop: bool = False, xas: Sequence[torch.Tensor] = (),
) -> torch.Tensor:
    """x [S, in] rows grouped by expert -> x @ W_e^T + sum over adapters of s * (x @ A_e^T) @ B_e^T, W = experts.<name>,
    the LoRA factors as `compute_factors` gives them (kernels/expert_lora.py multiplies them). Each LoRA product is
    added into the base output in place. `xas`: x @ A_e^T already computed for the first len(xas) adapters."""
    own = [a for a, _, _ in loras[len(xas):]]
    if getattr(experts, "omnitune_weight_provider", None) is not None or not getattr(experts, name).requires_grad:
        y, *own_xas = _FrozenExpertsMM.apply(x, offsets, row_expert, experts, name, force_loop, *own)
    else:  # full fine-tune: autograd through the grouped GEMM gives the weight gradient
        y = grouped_mm(x, getattr(experts, name).to(x.dtype).transpose(-2, -1), offsets, force_loop=force_loop)
        own_xas = [LoRAProject.apply(x, a, offsets, row_expert) for a in own]
    for (_, b_rows, scaling), xa in zip(loras, [*xas, *own_xas]):
        y = LoRAExpand.apply(xa, b_rows, offsets, row_expert, scaling, y)
    return y


class _FrozenExpertsMM(torch.autograd.Function):
    """(x @ W_e^T, x @ A_e^T for each LoRA A given) for a frozen W (the parameter, or the weight provider's stack, e.g.
    dequantized NF4). One node for both: its backward adds each LoRA's d(xa) @ A_e into dX in place (expand with
    accumulation) instead of autograd adding a separate [S, in] gradient per adapter (H200: 33 us per layer).

    A provided W is rebuilt in the backward, not saved, without activation checkpointing: otherwise every layer's
    dequantized stack would stay alive until its backward. Under saved-tensor hooks (checkpointing) W is saved and
    the hooks decide: the checkpointed forward drops it, the recompute (run just before this layer's backward) keeps
    it for the backward, so each layer is dequantized twice per step instead of three times, for one layer's stack
    held from its recompute to its backward."""

    @staticmethod
    def forward(ctx, x, offsets, row_expert, experts, name, force_loop, *lora_a):
        ctx.experts, ctx.name, ctx.force_loop = experts, name, force_loop
        weight = expert_weight(experts, name)
        # torch.utils.checkpoint asks the same question (its own forward runs under such hooks); a hook that only
        # measures (train/checkpointing.layer_activation_bytes) must see what an unhooked forward keeps
        hooks = torch._C._autograd._top_saved_tensors_default_hooks(False)
        hooked = hooks is not None and not getattr(hooks[0], "omnitune_transparent", False)
        provided = getattr(experts, "omnitune_weight_provider", None) is not None
        ctx.save_for_backward(x if lora_a else None, offsets, row_expert, weight if hooked or not provided else None,
                              *lora_a)
        y = grouped_mm(x, weight.to(x.dtype).transpose(-2, -1), offsets, force_loop=force_loop)
        return (y, *(project(x, a, offsets, 1.0) for a in lora_a))

    @staticmethod
    def backward(ctx, grad_out, *grad_xas):
        x, offsets, row_expert, weight, *lora_a = ctx.saved_tensors
        dx = None
        if ctx.needs_input_grad[0]:
            weight = expert_weight(ctx.experts, ctx.name) if weight is None else weight
            # [E, out, in]: dX = dY @ W_e
            dx = grouped_mm(grad_out.contiguous(), weight.to(grad_out.dtype), offsets, force_loop=ctx.force_loop)
        grad_as = []
        for i, (a, d_xa) in enumerate(zip(lora_a, grad_xas)):
            d_xa = d_xa.contiguous()
            if dx is not None:
                dx = expand(d_xa, a, offsets, row_expert, 1.0, out=dx)
            grad_as.append(weight_grad(d_xa, x, offsets, 1.0).to(a.dtype) if ctx.needs_input_grad[6 + i] else None)
        return dx, None, None, None, None, None, *grad_as


def _apply_gate(experts: torch.nn.Module, gate_up: torch.Tensor, row_weight: torch.Tensor) -> torch.Tensor:
    """act(gate) * up * routing weight of the row. The weight goes in here, not after the down projection: the
    projection (and its LoRA) is linear, and here it rides along in the fused SwiGLU on [S, I]."""
    if type(experts.act_fn).__name__ in ("SiLU", "SiLUActivation") and getattr(
        type(experts), "_apply_gate", _default_apply_gate
    ) is _default_apply_gate:
        return weighted_swiglu(gate_up, row_weight)  # one fused kernel each way on CUDA
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
    top_k = top_k_index.shape[-1]

    perm, offsets = route(top_k_index, experts.num_experts)
    inv_perm = torch.empty_like(perm)
    inv_perm[perm] = torch.arange(perm.numel(), device=perm.device)
    token_of_row = perm // top_k

    gate_up_loras = lora.get("gate_up_proj", ())
    # with few enough columns, x @ A^T for ALL experts is one dense GEMM on the token rows [T, H] (E*r columns)
    # followed by a pick of each row's own r columns: cheaper than a skinny grouped GEMM on the [S, H] rows
    dense = [a for a in gate_up_loras if a[0].shape[0] * a[0].shape[1] <= DENSE_LORA_A_MAX_COLS]
    gate_up_loras = dense + [a for a in gate_up_loras if a[0].shape[0] * a[0].shape[1] > DENSE_LORA_A_MAX_COLS]
    row_expert = top_k_index.reshape(-1)[perm]  # [S], non-decreasing
    # x_g [S, H]: the token rows in expert order
    x_g, *xas = _ExpertInputs.apply(hidden_states, token_of_row, inv_perm, row_expert, top_k,
                                    *(a for a, _, _ in dense))
    gate_up = grouped_linear(experts, "gate_up_proj", x_g, offsets, row_expert, gate_up_loras, force_loop, xas)
    h = _apply_gate(experts, gate_up, top_k_weights.reshape(-1).index_select(0, perm))
    y = grouped_linear(experts, "down_proj", h, offsets, row_expert, lora.get("down_proj", ()), force_loop)
    return _SumSlots.apply(inv_perm, token_of_row, top_k, y).to(hidden_states.dtype)  # token order


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
