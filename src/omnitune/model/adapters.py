"""What to adapt and what to freeze: LoRA through PEFT, or full fine-tuning, over the parts of model/parts.py.

PEFT rewrites regex targets for qwen3_omni_moe into leaf names (so `q_proj` would also hit the audio tower), and
`target_parameters` takes no regex: every target is therefore spelled out as a full module or parameter path,
expanded from the parts map (`adapter.targets`, `adapter.train`, `adapter.freeze` name parts).
"""

from __future__ import annotations

import difflib
import pickle

from peft import LoraConfig, PeftModel, get_peft_model
from torch import nn

from omnitune.errors import OmnituneError
from omnitune.model import parts
from omnitune.recipe import AdapterConfig


class AdapterError(OmnituneError, ValueError):
    """An adapter section that does not fit the model."""


EXPERTS_HINT = (". Qwen3-Omni has 128 fused experts per layer, mlp.experts.gate_up_proj/down_proj: the part "
                "'experts' targets them; use adapter.modules for other nn.Linear names")


def check_adapter_config(cfg: AdapterConfig, model_class: str) -> None:
    """Every part the adapter section names exists in the model's map: checked before any weight is loaded."""
    known = parts.parts_map(model_class).parts
    for key in ("targets", "train", "freeze"):
        for name in getattr(cfg, key):
            if name not in known:
                hint = difflib.get_close_matches(name, known, n=1)
                raise AdapterError(
                    f"adapter.{key}: {name!r} is not a part of {model_class}"
                    + (f"; did you mean {hint[0]!r}?" if hint else "") + f" (parts: {', '.join(sorted(known))})"
                    + (EXPERTS_HINT if "expert" in name else ""))
    if cfg.method != "full" and "llm" in cfg.train:
        raise AdapterError("adapter.train: training the whole language model beside LoRA is a full fine-tune: "
                           "use adapter.method=full")


def lora_targets(model: nn.Module, cfg: AdapterConfig) -> tuple[list[str], list[str]]:
    """(target_modules, target_parameters) as full paths inside the model, from the parts in `cfg.targets`."""
    modules: list[str] = []
    params: list[str] = []
    for name in cfg.targets:
        found = parts.target_parameters(model, name) or parts.target_linears(model, name)
        if not found:
            raise AdapterError(f"adapter.targets: part {name!r} has no LoRA-able weights in this model")
        (params if parts.part(model, name).parameters else modules).extend(found)
    return modules + _expand_user_modules(model, cfg.modules), params


def _expand_user_modules(model: nn.Module, names: list[str]) -> list[str]:
    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    out = []
    for name in names:
        hits = [n for n in linears if n == name or n.endswith("." + name)]
        if not hits:
            hint = difflib.get_close_matches(name, linears, n=3)
            raise AdapterError(f"adapter.modules: '{name}' matches no nn.Linear in the model"
                               + (f"; close: {', '.join(hint)}" if hint else
                                  " (names look like model.language_model.layers.0.self_attn.q_proj)"))
        out += hits
    return out


def full_modules(model: nn.Module, names: list[str]) -> list[str]:
    """The modules of the parts in `names`, as PEFT's `modules_to_save` takes them (no ModuleList: a list is
    given as its entries)."""
    out: list[str] = []
    for name in names:
        for path in parts.module_names(model, name):
            found = model.get_submodule(path)
            out += ([f"{path}.{child}" for child, _ in found.named_children()]
                    if isinstance(found, nn.ModuleList) else [path])
    return out


def apply_adapters(model: nn.Module, cfg: AdapterConfig) -> nn.Module:
    """Wrap the model for training as the recipe says; returns a PeftModel (LoRA, QLoRA) or the model (full).
    QLoRA's experts are quantized afterwards (model/qlora.py), on the device they will train on."""
    check_adapter_config(cfg, type(model).__name__)
    if cfg.method == "full":
        return _apply_full(model, cfg)
    modules, params = lora_targets(model, cfg)
    peft_cfg = LoraConfig(r=cfg.rank, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, bias="none",
                          target_modules=modules or None, target_parameters=params or None,
                          modules_to_save=full_modules(model, cfg.train) or None)
    return get_peft_model(model, peft_cfg)


def _apply_full(model: nn.Module, cfg: AdapterConfig) -> nn.Module:
    """Everything trains but the `freeze` parts; a `train` part inside a frozen one (a projector inside its
    tower) trains all the same: the most specific part named decides."""
    decider = parts.owners(model, [*cfg.freeze, *cfg.train])
    for name, p in model.named_parameters():
        part = decider(name)
        p.requires_grad_(part == "other" or part in cfg.train)
    if not any(p.requires_grad for p in model.parameters()):
        raise AdapterError("adapter.method=full with every part frozen (adapter.freeze): nothing to train")
    return model


def load_adapter(model: nn.Module, adapter_dir: str, trainable: bool = False, name: str = "default") -> PeftModel:
    """A saved PEFT adapter on `model` (the one place adapters are loaded: training's resume aside); on a PeftModel
    it is added beside the adapters already there, under `name` (PEFT multi-adapter). A pickled adapter
    (`adapter_model.bin`) is read with torch's weights-only loader: one that holds code is refused."""
    try:
        if isinstance(model, PeftModel):
            model.load_adapter(adapter_dir, adapter_name=name, is_trainable=trainable)
            return model
        return PeftModel.from_pretrained(model, adapter_dir, adapter_name=name, is_trainable=trainable)
    except pickle.UnpicklingError as e:
        raise AdapterError(f"{adapter_dir}: refused to load the adapter: its pickle holds more than tensors "
                           f"({str(e).split('.')[0][:120]}); only load adapters you trust, as safetensors") from None
    except (OSError, ValueError, RuntimeError) as e:
        raise AdapterError(f"{adapter_dir}: not a loadable PEFT adapter for this model ({type(e).__name__}: "
                           f"{str(e).splitlines()[0][:300]})") from None


def merge(model: nn.Module) -> nn.Module:
    """Fold LoRA into the base weights (full fine-tunes pass through)."""
    return model.merge_and_unload() if isinstance(model, PeftModel) else model


def trainable_summary(model: nn.Module) -> list[tuple[str, int, int]]:
    """(component, trainable params, total params) rows, for the table printed at the start of training: LoRA
    factors in a row of their own, every other parameter under the map's component part that holds it."""
    component = parts.owners(model, [n for n, p in parts.parts_map(model).parts.items() if p.component])
    prefix = parts.prefix_of(model)
    rows: dict[str, list[int]] = {}
    for name, p in model.named_parameters():
        comp = "lora" if "lora_" in name else component(name.removeprefix(prefix))
        r = rows.setdefault(comp, [0, 0])
        r[1] += p.numel()
        if p.requires_grad:
            r[0] += p.numel()
    return [(c, t, n) for c, (t, n) in rows.items()]
