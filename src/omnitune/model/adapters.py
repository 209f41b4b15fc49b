"""What to adapt and what to freeze on the Thinker: LoRA through PEFT, or full fine-tuning.

PEFT rewrites regex targets for qwen3_omni_moe into leaf names (so `q_proj` would also hit the audio tower), and
`target_parameters` takes no regex: every target is therefore spelled out as a full module or parameter path.
"""

from __future__ import annotations

import difflib
import re

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from torch import nn

from omnitune.errors import OmnituneError
from omnitune.recipe import AdapterConfig

LM = "model.language_model"
ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
# Component -> module-name prefixes, for freezing and for the trainable summary.
COMPONENTS = {
    "audio_projector": ("model.audio_tower.proj1", "model.audio_tower.proj2"),
    "audio_tower": ("model.audio_tower",),
    "vision_merger": ("model.visual.merger", "model.visual.merger_list"),
    "vision_tower": ("model.visual",),
    "llm": (LM, "lm_head"),
}


class AdapterError(OmnituneError, ValueError):
    """An adapter section that does not fit the model."""


def _layers(model: nn.Module) -> list[int]:
    return sorted({int(m.group(1)) for n, _ in model.named_modules()
                   if (m := re.fullmatch(rf"{re.escape(LM)}\.layers\.(\d+)", n))})


def _moe_layers(model: nn.Module) -> list[int]:
    names = dict(model.named_parameters())
    return [i for i in _layers(model) if f"{LM}.layers.{i}.mlp.experts.gate_up_proj" in names]


def lora_targets(model: nn.Module, cfg: AdapterConfig) -> tuple[list[str], list[str]]:
    """(target_modules, target_parameters) as full paths inside the Thinker."""
    modules: list[str] = []
    params: list[str] = []
    if "attention" in cfg.targets:
        modules += [f"{LM}.layers.{i}.self_attn.{p}" for i in _layers(model) for p in ATTENTION]
    if "experts" in cfg.targets:
        params += [f"{LM}.layers.{i}.mlp.experts.{p}" for i in _moe_layers(model)
                   for p in ("gate_up_proj", "down_proj")]
    if "router" in cfg.targets:
        params += [f"{LM}.layers.{i}.mlp.gate.weight" for i in _moe_layers(model)]
    modules += _expand_user_modules(model, cfg.modules)
    return modules, params


def _expand_user_modules(model: nn.Module, names: list[str]) -> list[str]:
    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    out = []
    for name in names:
        hits = [n for n in linears if n == name or n.endswith("." + name)]
        if not hits:
            hint = difflib.get_close_matches(name, linears, n=3)
            raise AdapterError(f"adapter.modules: '{name}' matches no nn.Linear in the Thinker"
                               + (f"; close: {', '.join(hint)}" if hint else
                                  " (names look like model.language_model.layers.0.self_attn.q_proj)"))
        out += hits
    return out


def _unfrozen_towers(model: nn.Module, cfg: AdapterConfig) -> list[str]:
    """Modules the recipe trains in full (LoRA: saved with the adapter via modules_to_save, which takes no
    ModuleList, so lists are expanded into their entries)."""
    out: list[str] = []
    if not cfg.freeze_audio_tower:
        out += ["model.audio_tower"]
    elif not cfg.freeze_audio_projector:
        out += list(COMPONENTS["audio_projector"])
    if not cfg.freeze_vision_tower:
        out += ["model.visual"]
    elif not cfg.freeze_vision_merger:
        out += list(COMPONENTS["vision_merger"])
    modules = dict(model.named_modules())
    expanded = []
    for name in out:
        if isinstance(modules.get(name), nn.ModuleList):
            expanded += [f"{name}.{child}" for child, _ in modules[name].named_children()]
        elif name in modules:
            expanded.append(name)
    return expanded


def apply_adapters(model: nn.Module, cfg: AdapterConfig) -> nn.Module:
    """Wrap the Thinker for training as the recipe says; returns a PeftModel (LoRA, QLoRA) or the model (full).
    QLoRA's experts are quantized afterwards (model/qlora.py), on the device they will train on."""
    if cfg.method == "full":
        return _apply_full(model, cfg)
    modules, params = lora_targets(model, cfg)
    if not modules and not params:
        raise AdapterError(f"adapter.targets {cfg.targets} matched nothing in this model")
    peft_cfg = LoraConfig(r=cfg.rank, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, bias="none",
                          target_modules=modules or None, target_parameters=params or None,
                          modules_to_save=_unfrozen_towers(model, cfg) or None)
    return get_peft_model(model, peft_cfg)


def _apply_full(model: nn.Module, cfg: AdapterConfig) -> nn.Module:
    frozen = [p for on, c in ((cfg.freeze_audio_tower, "audio_tower"), (cfg.freeze_vision_tower, "vision_tower"),
                              (cfg.freeze_llm, "llm")) if on for p in COMPONENTS[c]]
    thawed = _unfrozen_towers(model, cfg)  # a projector/merger may be trained inside a frozen tower
    for name, p in model.named_parameters():
        in_frozen = any(name.startswith(f + ".") for f in frozen)
        in_thawed = any(name.startswith(t + ".") for t in thawed)
        p.requires_grad_(not in_frozen or in_thawed)
    if not any(p.requires_grad for p in model.parameters()):
        raise AdapterError("adapter.method=full with every component frozen: nothing to train")
    return model


def load_adapter(model: nn.Module, adapter_dir: str, trainable: bool = False) -> PeftModel:
    return PeftModel.from_pretrained(model, adapter_dir, is_trainable=trainable)


def component_of(name: str) -> str:
    name = name.removeprefix("base_model.model.")
    for comp, prefixes in COMPONENTS.items():
        if any(name.startswith(p + ".") or name == p for p in prefixes) or any(
                f".{p}." in name for p in prefixes):
            return comp
    return "other"


def trainable_summary(model: nn.Module) -> list[tuple[str, int, int]]:
    """(component, trainable params, total params) rows, for the table printed at the start of training."""
    rows: dict[str, list[int]] = {}
    for name, p in model.named_parameters():
        comp = "lora" if "lora_" in name else component_of(name)
        r = rows.setdefault(comp, [0, 0])
        r[1] += p.numel()
        if p.requires_grad:
            r[0] += p.numel()
    return [(c, t, n) for c, (t, n) in rows.items()]


def count_trainable(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def merge(model: nn.Module) -> nn.Module:
    """Fold LoRA into the base weights (full fine-tunes pass through)."""
    return model.merge_and_unload() if isinstance(model, PeftModel) else model


@torch.no_grad()
def randomize_lora(model: nn.Module, std: float = 0.02, seed: int = 0) -> None:
    """Give lora_B non-zero values (PEFT inits it to zero) so tests can tell an adapter from none."""
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            p.copy_(torch.randn(p.shape, generator=g) * std)
