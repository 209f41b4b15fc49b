"""Fast training kernels for Qwen3-Omni, each beside the plain PyTorch reference it is tested against.

- `moe_experts`: grouped-GEMM experts forward with per-expert LoRA (experts implementation "omnitune");
  `expert_lora`: its rank-r LoRA products (Triton on CUDA).
- `peft_lora`: `enable_fast_lora(peft_model)` runs PEFT's LoRA (target_parameters experts + linear layers) through
  the fast paths, on PEFT's own adapter tensors.
- `fused_ops`: `enable_fused_norms(model)`: RMSNorm (and the experts' SwiGLU) as fused compiled kernels on CUDA.
- `router`: `enable_fused_router(model)`: the MoE router's softmax -> top-k -> renormalise, one kernel each way.
- `loss`: chunked linear + cross-entropy returning per-token losses without holding [N, V] logits.
"""
from .fused_ops import disable_fused_norms, disable_fused_rope, enable_fused_norms, enable_fused_rope
from .loss import chunked_linear_cross_entropy, reference_linear_cross_entropy
from .router import disable_fused_router, enable_fused_router
from .moe_experts import (
    moe_experts_forward,
    omnitune_experts_forward,
    reference_experts_forward,
    register_experts_implementation,
)



def enable_fast_lora(model):
    """The trainer's switch: experts LoRA through the grouped path + linear LoRA in the activation dtype."""
    from .peft_lora import enable_fast_lora as _enable

    return _enable(model)


def disable_fast_lora(model):
    """Restore PEFT's own forwards everywhere `enable_fast_lora` changed them."""
    from .peft_lora import disable_fast_lora as _disable

    return _disable(model)


def enable_fast_lora_linear(model, share_inputs: bool = True):
    """PEFT lora.Linear layers compute LoRA in the activation dtype with a fused add, q/k/v together (`peft_lora`)."""
    from .peft_lora import enable_fast_lora_linear as _enable

    return _enable(model, share_inputs)


def enable_fast_expert_lora(model):
    """Route PEFT-wrapped fused experts of `model` through the grouped LoRA path (see `peft_lora`)."""
    from .peft_lora import enable_fast_expert_lora as _enable

    return _enable(model)


def disable_fast_expert_lora(model):
    """Restore PEFT's own forward on the experts wrappers (see `peft_lora`)."""
    from .peft_lora import disable_fast_expert_lora as _disable

    return _disable(model)


__all__ = [
    "chunked_linear_cross_entropy",
    "reference_linear_cross_entropy",
    "moe_experts_forward",
    "omnitune_experts_forward",
    "reference_experts_forward",
    "register_experts_implementation",
    "enable_fast_lora",
    "disable_fast_lora",
    "enable_fast_expert_lora",
    "enable_fast_lora_linear",
    "enable_fused_norms",
    "disable_fused_norms",
    "enable_fused_rope",
    "disable_fused_rope",
    "disable_fast_expert_lora",
    "enable_fused_router",
    "disable_fused_router",
]
