"""Fast experts forward for the Thinker's fused MoE experts, with per-expert LoRA as grouped low-rank products.

Layout (transformers 5.23, `Qwen3OmniMoeThinkerTextExperts`): `gate_up_proj` [E, 2I, H], `down_proj` [E, H, I],
both stored (out, in) per expert. The router hands over `top_k_index` / `top_k_weights` [T, K].

One forward:
  1. route: ONE stable sort of the T*K (token, slot) pairs by expert -> permutation + int32 offsets;
  2. gather the token rows in expert order (x_g [T*K, H]);
  3. gate_up = x_g @ W_gu[e]^T  (+ s * (x_g @ A_e^T) @ B_e^T per LoRA adapter), one grouped GEMM each;
  4. h = act(gate) * up; down = h @ W_d[e]^T (+ LoRA the same way);
  5. scale rows by their routing weight, undo the permutation, sum the K slots of each token.
W + BA is never formed. Gradients come from autograd through the grouped GEMMs, so the three training cases
(frozen base + LoRA, trainable router, full fine-tune) differ only in which tensors require grad; a frozen base
weight gets no weight-gradient GEMM at all.

Quantized experts (QLoRA) seam: set `experts.omnitune_weight_provider = fn` where `fn(experts, name)` returns the
[E, out, in] compute-dtype stack for `name` in ("gate_up_proj", "down_proj"), e.g. dequantized 4-bit blocks. It is
called once per projection inside the forward (and again in the recompute under gradient checkpointing), so the
dequantized stack lives only while that layer runs. LoRA factors are passed separately and are unaffected.

Registered with transformers as experts implementation "omnitune":
`model.set_experts_implementation("omnitune")` or `from_pretrained(..., experts_implementation="omnitune")`.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import torch

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
    counts = torch.bincount(flat, minlength=num_experts)
    offsets = torch.cumsum(counts, dim=0, dtype=torch.int32)
    return perm, offsets


def grouped_linear(
    x: torch.Tensor, weight: torch.Tensor, offsets: torch.Tensor, loras: Sequence[ExpertLoRA] = (), force_loop: bool = False
) -> torch.Tensor:
    """x [S, in] rows grouped by expert -> x @ W_e^T + sum_adapters s * (x @ A_e^T) @ B_e^T, W [E, out, in]."""
    y = grouped_mm(x, weight.to(x.dtype).transpose(-2, -1), offsets, force_loop=force_loop)
    for lora_a, lora_b, scaling in loras:
        xa = grouped_mm(x, lora_a.to(x.dtype).transpose(-2, -1), offsets, force_loop=force_loop)  # [S, r]
        # row-major [E, r, out] copy of B: tiny (E*r*out), and the layout the grouped kernel reads fastest
        b_t = lora_b.to(x.dtype).transpose(-2, -1).contiguous()
        y = y + grouped_mm(xa * scaling, b_t, offsets, force_loop=force_loop)
    return y


def _apply_gate(experts: torch.nn.Module, gate_up: torch.Tensor) -> torch.Tensor:
    apply_gate = getattr(experts, "_apply_gate", None)
    if apply_gate is not None:
        return apply_gate(gate_up)
    gate, up = gate_up.chunk(2, dim=-1)
    return experts.act_fn(gate) * up


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
    lora = lora or {}
    num_tokens, hidden_dim = hidden_states.shape
    top_k = top_k_index.shape[-1]

    perm, offsets = route(top_k_index, experts.num_experts)
    x_g = hidden_states[perm // top_k]  # [S, H] token rows in expert order

    gate_up = grouped_linear(x_g, expert_weight(experts, "gate_up_proj"), offsets, lora.get("gate_up_proj", ()), force_loop)
    h = _apply_gate(experts, gate_up)
    y = grouped_linear(h, expert_weight(experts, "down_proj"), offsets, lora.get("down_proj", ()), force_loop)

    y = y * top_k_weights.reshape(-1)[perm].unsqueeze(-1).to(y.dtype)
    inv_perm = torch.empty_like(perm)
    inv_perm[perm] = torch.arange(perm.numel(), device=perm.device)
    # deterministic: gather back to (token, slot) order and sum the K slots (no atomics)
    out = y[inv_perm].view(num_tokens, top_k, hidden_dim).sum(dim=1)
    return out.to(hidden_states.dtype)


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
