"""The model as a run trains it: the loaded Thinker, its adapters, NF4 experts (QLoRA) and omnitune's fast paths.

One function, so that `omnitune train` and the benchmark that measures it (bench/bench_train.py) build the same
model from a recipe; the plan (train/plan.py) says whether the fast paths are on and where the model lives.
"""
from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from omnitune.model import parts
from omnitune.model.adapters import apply_adapters
from omnitune.model.qlora import quantize_experts
from omnitune.recipe import AdapterConfig


def build_for_training(thinker: nn.Module, adapter: AdapterConfig, fast_paths: bool, device: str,
                       report: Callable[[str], object] = print, stack: str = "text") -> nn.Module:
    """Adapters (LoRA / QLoRA / full) on `thinker` (or the full model, for the Talker); QLoRA's experts quantized
    onto `device`; with `fast_paths` the experts and linear LoRA through the fused kernels and, on CUDA, the fused
    norms, rotary and router on the decoder stack that trains (`stack`: "text", the Thinker's; "talker")."""
    model = apply_adapters(thinker, adapter)
    if adapter.method == "qlora":
        before, after = quantize_experts(model, device=device)
        model.to(device)
        report(f"QLoRA: expert weights in 4-bit NF4, {before / 2**30:.2f} GiB -> {after / 2**30:.2f} GiB")
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
