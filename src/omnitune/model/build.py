"""The model as a run trains it: the loaded Thinker, its adapters, NF4 experts and attention (QLoRA), fast paths.

One function, so that `omnitune train` and the benchmark that measures it (bench/bench_train.py) build the same
model from a recipe; the plan (train/plan.py) says whether the fast paths are on and where the model lives.
"""
from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from omnitune.model import parts
from omnitune.model.adapters import apply_adapters
from omnitune.model.qlora import quantize_attention, quantize_experts
from omnitune.recipe import AdapterConfig


def build_for_training(thinker: nn.Module, adapter: AdapterConfig, fast_paths: bool, device: str,
                       report: Callable[[str], object] = print, offload_experts: bool = False,
                       stack: str = "text") -> nn.Module:
    """Adapters (LoRA / QLoRA / full) on `thinker` (or the full model, for the Talker); QLoRA's experts quantized
    onto `device` (or, with `offload_experts`, into pinned host memory, streamed to `device` per layer); with
    `fast_paths` the experts and linear LoRA through the fused kernels and, on CUDA, the fused norms, rotary and
    router on the decoder stack that trains (`stack`: "text", the Thinker's; "talker")."""
    model = apply_adapters(thinker, adapter)
    if adapter.method != "full" and adapter.lora_dtype == "bfloat16":
        cast_lora_(model, torch.bfloat16)
    if adapter.method == "qlora":
        before, after = quantize_experts(model, device=device, offload=offload_experts)
        attn_before, attn_after = quantize_attention(model, device=device)
        model.to(device)
        report(f"QLoRA: expert weights in 4-bit NF4, {before / 2**30:.2f} GiB -> {after / 2**30:.2f} GiB"
               + (" in pinned host memory, streamed per layer" if offload_experts else "")
               + f"; attention weights {attn_before / 2**30:.2f} GiB -> {attn_after / 2**30:.2f} GiB")
    if fast_paths:
        from omnitune import kernels

        if adapter.method != "full":
            report(f"fast LoRA paths: {kernels.enable_fast_lora(model)}")
        if torch.device(device).type == "cuda":
            text = parts.stack_model(model, stack)  # the decoder stack that trains
            kernels.enable_fused_norms(text)
            kernels.enable_fused_rope()
            kernels.enable_fused_router(text)
    return model


@torch.no_grad()
def cast_lora_(model: nn.Module, dtype: torch.dtype) -> int:
    """The LoRA factors in `dtype` (PEFT keeps them fp32 beside a bf16 base); returns how many tensors changed.
    Their gradients follow: with bf16, weights and gradients take half the memory (adapter.lora_dtype)."""
    changed = 0
    for name, p in model.named_parameters():
        if "lora_" in name and p.dtype != dtype:
            p.data = p.data.to(dtype)
            changed += 1
    return changed


FROZEN_TOWERS = ("audio_tower", "vision_tower")


def offload_frozen_towers(model: nn.Module, device: torch.device | str) -> list[str]:
    """Keep each frozen audio/vision tower in host memory; accelerate's `cpu_offload` hooks copy its weights to
    `device` for the length of its forward only (a batch with that modality), so text-only training never holds
    them on the GPU. Returns the towers offloaded (a tower with a trained parameter stays)."""
    from accelerate import cpu_offload

    done = []
    for name in FROZEN_TOWERS:
        for tower in parts.modules(model, name):
            if any(p.requires_grad for p in tower.parameters()):
                continue
            cpu_offload(tower, execution_device=torch.device(device))
            done.append(name)
    return done
