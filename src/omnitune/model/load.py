"""Load Qwen3-Omni variants through the normal `from_pretrained` path: the Thinker alone for text-output
training, the full model (Thinker + Talker + Code2Wav) for speech output.

`model.path: tiny` means the cached tiny checkpoint (model/tiny.py); anything else is a local checkpoint
directory or a hub id that the Hugging Face cache already holds.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch
from transformers import (AutoProcessor, Qwen3OmniMoeForConditionalGeneration,
                          Qwen3OmniMoeThinkerForConditionalGeneration)

from omnitune.errors import OmnituneError
from omnitune.model.template import chat_template
from omnitune.recipe import ModelConfig

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


class ModelLoadError(OmnituneError, RuntimeError):
    """A checkpoint that cannot be loaded, with what to do about it."""


def resolve_model_path(path: str) -> str:
    """`tiny` -> the cached tiny checkpoint dir; a local dir stays; a hub id is passed through."""
    if path == "tiny":
        from omnitune.model.tiny import tiny_checkpoint
        return str(tiny_checkpoint())
    local = Path(path).expanduser()
    if local.exists():
        if not (local / "config.json").exists():
            raise ModelLoadError(f"model.path '{path}' is a directory without config.json: not a checkpoint")
        return str(local.resolve())
    return path


def _from_pretrained(cls, path: str, **kwargs):
    try:
        return cls.from_pretrained(path, **kwargs)
    except OSError as e:
        raise ModelLoadError(
            f"could not load '{path}': {e}\nmodel.path must be a local checkpoint directory, a hub id already in "
            "the Hugging Face cache (no hub is reachable from here), or 'tiny'") from e


def model_kwargs(cfg: ModelConfig, device_map: str | dict | None = None) -> dict:
    """from_pretrained kwargs for `cfg`; `device_map` loads straight onto a device (no host copy of 30B)."""
    if cfg.experts == "omnitune":
        from omnitune.kernels import register_experts_implementation

        register_experts_implementation("omnitune")
    if cfg.attention == "flash_attention_2" and importlib.util.find_spec("flash_attn") is None:
        raise ModelLoadError("model.attention=flash_attention_2 needs the flash-attn package; use sdpa or install it")
    kwargs = dict(dtype=DTYPES[cfg.dtype], attn_implementation=cfg.attention, experts_implementation=cfg.experts)
    return kwargs if device_map is None else {**kwargs, "device_map": device_map}


def load_thinker(cfg: ModelConfig, path: str | None = None,
                 device_map: str | dict | None = None) -> Qwen3OmniMoeThinkerForConditionalGeneration:
    """The Thinker alone (Talker keys in the checkpoint are skipped, so no Talker memory is spent)."""
    return _from_pretrained(Qwen3OmniMoeThinkerForConditionalGeneration,
                            resolve_model_path(path or cfg.path), **model_kwargs(cfg, device_map))


def load_full(cfg: ModelConfig, path: str | None = None, device_map: str | dict | None = None,
              **config_overrides) -> Qwen3OmniMoeForConditionalGeneration:
    """Thinker + Talker + Code2Wav, for speech output (`enable_audio_output=False`: the Thinker only)."""
    return _from_pretrained(Qwen3OmniMoeForConditionalGeneration, resolve_model_path(path or cfg.path),
                            **model_kwargs(cfg, device_map), **config_overrides)


def load_processor(cfg: ModelConfig, path: str | None = None):
    """The checkpoint's processor, with our chat template for `cfg.variant` (training and export agree)."""
    # `path`: a saved processor directory (a run's processor/), taken as it is; else the model's checkpoint.
    proc = _from_pretrained(AutoProcessor, path if path is not None else resolve_model_path(cfg.path))
    proc.chat_template = chat_template(cfg.variant)
    return proc
