"""What a run directory, a recipe or a checkpoint loads to: base model, trained weights, processor, settings.

A source is resolved once (`resolve_source`): a run directory (recipe.yaml + adapter/ or model/), a recipe file or
preset (its base model, plus `adapter=` if given), or a plain checkpoint (a merged export, a hub id in the cache, or
`tiny`). `load_model` turns it into the Thinker (text) or the full model (speech) with the trained weights applied;
eval, infer, export (and serve) load through here and nowhere else.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from omnitune.errors import OmnituneError
from omnitune.model.adapters import load_adapter
from omnitune.model.load import load_full, load_processor, load_thinker, resolve_model_path
from omnitune.model.speakers import load_speakers
from omnitune.recipe import PRESETS, DataConfig, ModelConfig, Recipe, TalkerConfig, load_recipe
from omnitune.run_dir import RunDir


class SourceError(OmnituneError, ValueError):
    """A source that cannot be loaded as asked, said so a user can fix it."""




@dataclass
class Source:
    """Everything needed to load a model for generation: base checkpoint, trained weights, processor, settings."""

    model: ModelConfig
    data: DataConfig = field(default_factory=DataConfig)
    weights: tuple[str, Path] | None = None  # ('adapter', dir) or ('model', dir): applied on top of model.path
    processor_dir: Path | None = None
    label: str = ""
    nf4_experts: bool = False  # a QLoRA run: generate text with its Thinker as it trained (model/qlora.py)
    trains_talker: bool = False  # a voice run (train.objective=talker_codec): its adapter is the full model's
    speakers: Path | None = None  # a voice run's speaker table (RunDir.speakers): new voices by name
    talker: TalkerConfig = field(default_factory=TalkerConfig)  # the codec of target speech (eval --task speech)
    talker_weights: Path | None = None  # talker.preserve_speech: the Talker LoRA for the tuned Thinker

    @property
    def variant(self) -> str:
        return self.model.variant


def _is_recipe(source: str) -> bool:
    return source in PRESETS or (Path(source).is_file() and Path(source).suffix in (".yaml", ".yml"))


def _adapter_weights(adapter: str | Path) -> tuple[str, Path]:
    p = Path(adapter).expanduser()
    if (p / "recipe.yaml").exists():
        return RunDir(p).weights()
    if (p / "adapter_config.json").exists():
        return "adapter", p
    if (p / "config.json").exists():
        return "model", p
    raise SourceError(f"adapter '{adapter}' is neither a run directory nor a PEFT adapter directory "
                     "(no recipe.yaml, adapter_config.json or config.json)")


def resolve_source(source: str | Path | Recipe, adapter: str | Path | None = None,
                   dtype: str | None = None, variant: str | None = None) -> Source:
    """A run dir, recipe (file, preset or object), or checkpoint (dir, hub id, `tiny`) -> Source."""
    processor_dir = None
    speakers = talker_weights = None
    if isinstance(source, Recipe):
        recipe, weights, label = source, None, source.name
    elif (Path(str(source)) / "recipe.yaml").exists():
        run = RunDir(Path(str(source)))
        recipe, weights, label = run.recipe(), run.weights(), str(source)
        processor_dir = run.processor if (run.processor / "tokenizer_config.json").exists() else None
        speakers = run.speakers if run.speakers.is_file() else None
        talker_weights = run.talker_adapter if (run.talker_adapter / "adapter_config.json").is_file() else None
    elif _is_recipe(str(source)):
        recipe, weights, label = load_recipe(str(source)), None, str(source)
    else:
        guess = "thinking" if "thinking" in str(source).lower() else (
            "captioner" if "captioner" in str(source).lower() else "instruct")
        recipe = Recipe(model=ModelConfig(path=str(source), variant=variant or guess))
        weights, label = None, str(source)
        processor_dir = Path(resolve_model_path(str(source)))
    if adapter is not None:
        if weights is not None:
            raise SourceError(f"{source} already carries trained weights ({weights[1]}); pass its base recipe "
                             "or checkpoint with --adapter, not a run directory")
        weights = _adapter_weights(adapter)
        run_proc = Path(adapter) / "processor"
        if (run_proc / "tokenizer_config.json").exists():
            processor_dir = run_proc
        if (Path(adapter) / "recipe.yaml").exists():  # a run directory: what it trained decides how it applies
            adapter_run = RunDir(Path(adapter))
            trained = adapter_run.recipe()
            recipe = recipe.model_copy(update={"train": trained.train, "talker": trained.talker})
            speakers = adapter_run.speakers if adapter_run.speakers.is_file() else None
    model = recipe.model.model_copy(update={k: v for k, v in (("dtype", dtype), ("variant", variant)) if v})
    # Data paths in a recipe are relative to its file: make them absolute while the recipe still knows where.
    data = recipe.data.model_copy(update={k: str(recipe.resolve(getattr(recipe.data, k)))
                                          for k in ("train", "eval") if getattr(recipe.data, k)})
    return Source(model=model, data=data, weights=weights, processor_dir=processor_dir, label=label,
                  nf4_experts=recipe.adapter.method == "qlora",
                  trains_talker=recipe.train.objective == "talker_codec", speakers=speakers, talker=recipe.talker,
                  talker_weights=talker_weights)


def load_generation_processor(src: Source):
    """The run's saved processor (else the checkpoint's), always with our template for the variant: prompts
    render exactly as in training, also for a base checkpoint whose own template differs."""
    saved = src.processor_dir is not None and Path(src.processor_dir).is_dir()
    return load_processor(src.model, str(src.processor_dir) if saved else None)


def check_finite(tensors: Iterable[tuple[str, torch.Tensor]], where: str | Path) -> None:
    """Refuse trained weights with NaN or inf in them (a run that diverged): they would answer with garbage."""
    bad = [name for name, t in tensors if t.is_floating_point() and not bool(torch.isfinite(t).all())]
    if bad:
        raise SourceError(f"{where}: {len(bad)} tensor(s) hold non-finite values (NaN or inf), e.g. {bad[0]}: the "
                          "run diverged. Train again with a lower train.lr, or use one of its earlier checkpoints "
                          "(RUN/checkpoints/checkpoint-N)")


def _adapter(model: torch.nn.Module, adapter_dir: Path, name: str = "default") -> torch.nn.Module:
    """A run's LoRA adapter on `model` (unmerged), its values checked first."""
    from safetensors import safe_open

    for file in sorted(Path(adapter_dir).glob("*.safetensors")):
        with safe_open(str(file), "pt") as f:
            check_finite(((k, f.get_tensor(k)) for k in f.keys()), adapter_dir)
    return load_adapter(model, str(adapter_dir), name=name)


def _trained_thinker(src: Source, device_map: str | dict | None) -> torch.nn.Module:
    """A full fine-tune's Thinker, its values checked."""
    thinker = load_thinker(src.model, str(src.weights[1]), device_map=device_map)  # type: ignore[index]
    check_finite(thinker.named_parameters(), src.weights[1])  # type: ignore[index]
    return thinker


def apply_weights(thinker: torch.nn.Module, src: Source, merge: bool) -> torch.nn.Module:
    """The source's LoRA on `thinker` (merged, or left as a PeftModel); a full fine-tune is loaded elsewhere."""
    kind, wdir = src.weights  # type: ignore[misc]
    if kind == "model":
        return thinker  # handled at load time
    peft = _adapter(thinker, wdir)
    return peft.merge_and_unload() if merge else peft


def with_trained_weights(full: torch.nn.Module, src: Source, device_map: str | dict | None = None) -> torch.nn.Module:
    """`full` (the top-level model) with the source's training in it: a full fine-tune's Thinker replaces the base
    one, a Thinker LoRA is merged into it; a voice run's adapter (on the full model: Talker LoRA, codec embedding)
    is merged into `full` and its new speakers named in the config."""
    if src.trains_talker and src.weights:
        if not getattr(full, "has_talker", False):
            raise SourceError(f"{src.label} trained the Talker: a model without one (thinker-only) cannot take it")
        if src.weights[0] != "adapter":
            raise SourceError(f"{src.label}: a voice run's weights are an adapter, found {src.weights[1]}")
        merged = _adapter(full, src.weights[1]).merge_and_unload()
        if src.speakers is not None:
            load_speakers(merged, src.speakers)
        return merged
    if src.weights and src.weights[0] == "model":
        del full.thinker  # free the base Thinker before loading the fine-tuned one
        full.thinker = _trained_thinker(src, device_map)
    elif src.weights:
        full.thinker = apply_weights(full.thinker, src, merge=True)
    if src.talker_weights is not None and getattr(full, "has_talker", False):
        full = _adapter(full, src.talker_weights).merge_and_unload()  # after the Thinker it was trained with
    return full


def load_model(src: Source, speech: bool, merge: bool = True, device_map: str | dict | None = None) -> torch.nn.Module:
    """The Thinker (speech off) or the full model (speech on), with the source's trained weights applied.

    LoRA is merged by default (generation then runs at base speed); a full fine-tune's Thinker replaces the base
    Thinker of the full model. A QLoRA run's Thinker (text only) keeps its NF4 experts and the adapter unmerged.
    """
    weights = src.weights
    if src.trains_talker and not speech:
        weights = None  # a voice run changed the Talker only: its text is the base Thinker's
    if not speech and src.nf4_experts:
        device = "cuda:0" if device_map is not None and torch.cuda.is_available() else "cpu"
        return _quantized_thinker(src, device).eval()
    if not speech:
        if weights and weights[0] == "model":
            return _trained_thinker(src, device_map).eval()
        thinker = load_thinker(src.model, device_map=device_map)
        return (apply_weights(thinker, src, merge) if weights else thinker).eval()
    full = _speaking(load_full(src.model, device_map=device_map), src)
    return with_trained_weights(full, src, device_map).eval()


def _speaking(full: torch.nn.Module, src: Source) -> torch.nn.Module:
    """The full model, checked to have a Talker and made able to speak about images and videos."""
    if not getattr(full, "has_talker", False):
        raise SourceError(f"{src.model.path} has no Talker (enable_audio_output is off, e.g. a Thinking or "
                         "thinker-only checkpoint): generate with speech=False (--no-speech)")
    # The Talker reuses the Thinker's rope-index code, which reads audio_config.n_window: without this,
    # audio combined with an image or video crashes (QWEN3_OMNI_NOTES.md, Talker).
    full.talker.config.audio_config = full.config.thinker_config.audio_config
    return full


def has_talker(path: str) -> bool:
    """Whether a checkpoint holds the Talker + Code2Wav (config `enable_audio_output`)."""
    from transformers import AutoConfig

    return bool(getattr(AutoConfig.from_pretrained(resolve_model_path(path)), "enable_audio_output", False))


def _quantized_thinker(src: Source, device: str) -> torch.nn.Module:
    """A QLoRA run's Thinker as it trained: loaded on the host, experts (one module at a time) and attention
    quantized onto `device`, the adapter (if any) applied unmerged through the fast LoRA paths (NF4 weights cannot
    take a merge)."""
    from omnitune import kernels
    from omnitune.model.qlora import quantize_attention, quantize_experts

    model = load_thinker(src.model, device_map=None).requires_grad_(False)  # for generation: nothing trains
    if src.weights is not None:
        model = _adapter(model, src.weights[1])
    quantize_experts(model, device=device)
    quantize_attention(model, device=device)
    if src.weights is not None:
        kernels.enable_fast_lora(model)
    return model.to(device)


# ---------------------------------------------------------------------------------------------------------------
# Several runs' adapters over one base model (serve's multi-LoRA)


def check_adapter_runs(src: Source, adapters: dict[str, str | Path]) -> dict[str, Path]:
    """name -> adapter directory for each run (or adapter dir) to be served over `src`'s base; refuses what cannot
    be switched per request: a full fine-tune, a run of another base model or variant."""
    if src.weights is not None and src.weights[0] == "model":
        raise SourceError(f"{src.label} is a full fine-tune: other runs' adapters cannot go over it. Serve a base "
                          "checkpoint, recipe or LoRA run with --adapter, and the full fine-tune on its own")
    out: dict[str, Path] = {}
    for name, path in adapters.items():
        kind, wdir = _adapter_weights(path)
        if kind != "adapter":
            raise SourceError(f"adapter {name}={path} is a full fine-tune (its whole Thinker, not an adapter): it "
                              "cannot be switched per request; serve it on its own")
        if (Path(path) / "recipe.yaml").exists():
            base = RunDir(Path(path)).recipe().model
            if (base.path, base.variant) != (src.model.path, src.model.variant):
                raise SourceError(f"adapter {name}={path} was trained on {base.path} ({base.variant}), not on "
                                  f"{src.model.path} ({src.model.variant}): adapters served together share one base")
        out[name] = wdir
    return out


def load_with_adapters(src: Source, adapters: dict[str, Path], speech: bool,
                       device_map: str | dict | None = None) -> tuple[torch.nn.Module, torch.nn.Module]:
    """(model, peft): `src`'s base model (Thinker, or the full model with speech) with every named LoRA attached
    unmerged through PEFT's multi-adapter support; `peft.set_adapter(name)` picks one per request and
    `peft.disable_adapter()` gives the base. Unmerged LoRA costs speed: a single run is served merged."""
    if not adapters:
        raise SourceError("no adapters to load")
    full = _speaking(load_full(src.model, device_map=device_map), src) if speech else None
    thinker = full.thinker if full is not None else load_thinker(src.model, device_map=device_map)
    peft = thinker
    for name, wdir in adapters.items():
        try:
            peft = _adapter(peft, wdir, name=name)
        except (ValueError, KeyError, RuntimeError) as e:  # PEFT's own refusal, e.g. other target_parameters
            raise SourceError(f"adapter {name} ({wdir}) cannot be loaded beside the others: {e}") from None
    return (peft if full is None else full).eval(), peft
