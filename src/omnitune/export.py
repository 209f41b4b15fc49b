"""`omnitune export RUN OUT`: a complete Qwen3-Omni checkpoint in the Hub's own layout, with the training
merged in, that transformers `from_pretrained`, vLLM and vLLM-Omni load like the original release.

What is written (checked against the released checkpoints and vLLM's loader, see tests/test_export.py):
- `model-0000i-of-0000n.safetensors` + `model.safetensors.index.json`, tensor names as released:
  `thinker.model.layers.N.mlp.experts.J.{gate,up,down}_proj.weight` (per expert; in memory transformers 5.23
  fuses them into `experts.gate_up_proj` / `experts.down_proj`, and `save_pretrained` splits them back),
  `thinker.audio_tower.*`, `thinker.visual.*`, `thinker.lm_head.weight`, `talker.*`, `code2wav.*`.
- `config.json`: Qwen3OmniMoeConfig, architectures [Qwen3OmniMoeForConditionalGeneration]. With `thinker_only`
  it has `enable_audio_output: false` and no talker/code2wav tensors: the layout of the released Thinking model,
  which vLLM's Qwen3-Omni Thinker and vLLM-Omni's thinker-only pipeline serve for text.
- `generation_config.json` with eos <|im_end|> (151645) and a pad token.
- the processor, tokenizer and chat template the run trained with (RUN/processor).
No pickle files. Everything is written to a temp dir beside OUT and renamed into place at the end.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from transformers import GenerationConfig, Qwen3OmniMoeForConditionalGeneration

from omnitune.atomic import replace_dir, staging_dir
from omnitune.errors import OmnituneError
from omnitune.model.load import load_full
from omnitune.model.source import Source, load_generation_processor, resolve_source, with_trained_weights
from omnitune.recipe import Recipe
from omnitune.tokens import pad_id

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
# Names that only exist on a model still wrapped by PEFT: seeing one in the output means the merge failed.
WRAPPER_MARKS = ("lora_", "base_layer", "modules_to_save", "original_module", "base_model.model")


class ExportError(OmnituneError, RuntimeError):
    """An export that cannot be done or did not come out right."""


@dataclass
class ExportResult:
    out_dir: Path
    n_tensors: int
    n_shards: int
    thinker_only: bool
    merged: str | None  # 'adapter', 'model' or None (base weights only)


def export_run(run_dir: str | Path | Recipe, out_dir: str | Path, thinker_only: bool = False,
               shard_size: str = "2GB", adapter: str | Path | None = None, dtype: str | None = None,
               overwrite: bool = False) -> ExportResult:
    """Merge the run's LoRA (or take its fine-tuned Thinker) into the base and write a complete checkpoint.

    `run_dir` is a run directory; a recipe or checkpoint with `adapter=` works too. `dtype` defaults to the
    recipe's model.dtype. An existing OUT is replaced only with `overwrite`.
    """
    out = Path(out_dir).expanduser().resolve()
    if out.exists() and not overwrite:
        raise ExportError(f"{out} already exists: choose another directory or pass overwrite (--overwrite)")
    src = resolve_source(run_dir, adapter=adapter, dtype=dtype)
    model = build_merged(src, thinker_only=thinker_only)
    processor = load_generation_processor(src)

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = staging_dir(out.parent, f".{out.name}.export-")
    try:
        model.generation_config = _generation_config(model, processor.tokenizer)
        model.save_pretrained(str(tmp), max_shard_size=shard_size, safe_serialization=True)
        processor.save_pretrained(str(tmp))
        add_legacy_config_keys(tmp / "config.json")
        add_legacy_processor_files(tmp)
        result = verify_export(tmp, thinker_only=thinker_only)
        replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return ExportResult(out, result["n_tensors"], result["n_shards"], thinker_only,
                        src.weights[0] if src.weights else None)


def build_merged(src: Source, thinker_only: bool) -> Qwen3OmniMoeForConditionalGeneration:
    """The top-level model (Talker + Code2Wav from the base unless thinker_only) with the trained Thinker in it."""
    cfg = src.model
    # as training loaded it (model_kwargs registers custom experts implementations)
    model = load_full(cfg, **({"enable_audio_output": False} if thinker_only else {}))
    if not thinker_only and not model.has_talker:
        raise ExportError(f"the base checkpoint '{cfg.path}' has no Talker (enable_audio_output is off): "
                          "export with thinker_only (--thinker-only)")
    model = with_trained_weights(model, src)
    names = [n for n, _ in model.named_parameters() if any(m in n for m in WRAPPER_MARKS)]
    if names:
        raise ExportError(f"the merged model still has adapter parameters (merge failed): {names[:3]}")
    return model


def _generation_config(model, tokenizer) -> GenerationConfig:
    """The base's generation config (sampling defaults of the release), stopping at <|im_end|>."""
    gen = GenerationConfig.from_dict(model.generation_config.to_dict())
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    if im_end is None or im_end == tokenizer.unk_token_id:
        raise ExportError("the tokenizer has no <|im_end|> token")
    gen.eos_token_id = im_end
    gen.pad_token_id = pad_id(tokenizer)
    return gen


def add_legacy_config_keys(config_file: Path) -> None:
    """Also write the config keys transformers 4.x reads, next to the 5.x ones.

    transformers 5 writes `rope_parameters`, `dtype` and (Talker) `num_local_experts`; the release, and loaders
    built on transformers 4.57 (vLLM 0.11-0.12, vLLM-Omni, whose Talker reads `rope_scaling` and `rope_theta`),
    use `rope_scaling` + `rope_theta`, `torch_dtype` and `num_experts`. Without them transformers 4.57 fails to
    build the model (`config.rope_scaling` is None), or builds a 128-expert Talker. transformers 5 reads both
    spellings to the same config (tests/test_export.py checks both versions where 4.57 is installed).
    """
    def walk(node: Any) -> None:
        if isinstance(node, dict):
            rope = node.get("rope_parameters")
            if isinstance(rope, dict):
                node.setdefault("rope_theta", rope.get("rope_theta"))
                scaling = {k: v for k, v in rope.items() if k != "rope_theta"}
                node.setdefault("rope_scaling", scaling if set(scaling) - {"rope_type"} else None)
            if "dtype" in node:
                node.setdefault("torch_dtype", node["dtype"])
            if "num_local_experts" in node:  # 5.x's name in the Talker's text config; 4.57 reads num_experts
                node.setdefault("num_experts", node["num_local_experts"])
            for value in node.values():
                walk(value)

    config = json.loads(config_file.read_text())
    walk(config)
    config_file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def add_legacy_processor_files(out: Path) -> None:
    """Also write the processor files transformers 4.57 reads (vLLM 0.11-0.12 builds its processor with it).

    transformers 5 nests every sub-processor in processor_config.json and keeps the named media tokens under
    `model_specific_special_tokens`; 4.57 reads preprocessor_config.json (feature extractor + image processor),
    video_preprocessor_config.json and `extra_special_tokens`, and without them fails on `tokenizer.image_token`.
    """
    proc_file, tok_file = out / "processor_config.json", out / "tokenizer_config.json"
    proc = json.loads(proc_file.read_text()) if proc_file.exists() else {}
    cls = proc.get("processor_class")
    fe, ip = proc.get("feature_extractor", {}), proc.get("image_processor", {})
    clash = {k for k in set(fe) & set(ip) if fe[k] != ip[k]}
    if clash:
        raise ExportError(f"feature extractor and image processor disagree on {sorted(clash)}: "
                          "cannot write a 4.x preprocessor_config.json")
    legacy = {"preprocessor_config.json": {**fe, **ip}, "video_preprocessor_config.json": proc.get("video_processor")}
    for name, body in legacy.items():
        if body and not (out / name).exists():
            (out / name).write_text(json.dumps({**body, "processor_class": cls}, indent=2, sort_keys=True) + "\n")
    tok = json.loads(tok_file.read_text())
    if "model_specific_special_tokens" in tok and "extra_special_tokens" not in tok:
        tok["extra_special_tokens"] = tok["model_specific_special_tokens"]
        tok_file.write_text(json.dumps(tok, indent=2, ensure_ascii=False) + "\n")


def verify_export(out: Path, thinker_only: bool) -> dict[str, int]:
    """Check what was written: index, shards, no pickles, no adapter names, per-expert tensors, components."""
    files = [p for p in out.rglob("*") if p.is_file()]
    pickles = [p.name for p in files if p.suffix in PICKLE_SUFFIXES]
    if pickles:
        raise ExportError(f"pickle files in the export: {pickles}")
    index_file = out / "model.safetensors.index.json"
    if index_file.exists():
        weight_map = json.loads(index_file.read_text())["weight_map"]
    else:  # small models fit one shard and transformers writes no index: write one, as the release has
        from safetensors import safe_open

        single = out / "model.safetensors"
        with safe_open(str(single), "pt") as f:
            weight_map = {k: single.name for k in f.keys()}
        size = single.stat().st_size
        index_file.write_text(json.dumps({"metadata": {"total_size": size}, "weight_map": weight_map}, indent=2))
    shards = set(weight_map.values())
    missing = [s for s in shards if not (out / s).is_file()]
    if missing:
        raise ExportError(f"the index names shards that were not written: {missing}")
    bad = [k for k in weight_map if any(m in k for m in WRAPPER_MARKS)]
    if bad:
        raise ExportError(f"adapter tensor names in the export: {bad[:3]}")
    if any(".mlp.experts.gate_up_proj" in k or k.endswith("mlp.experts.down_proj") for k in weight_map):
        raise ExportError("fused expert tensors in the export: the Hub layout has one tensor per expert")
    prefixes = {k.split(".", 1)[0] for k in weight_map}
    want = {"thinker"} if thinker_only else {"thinker", "talker", "code2wav"}
    if prefixes != want:
        raise ExportError(f"the export holds components {sorted(prefixes)}, expected {sorted(want)}")
    for name in ("config.json", "generation_config.json", "tokenizer_config.json"):
        if not (out / name).is_file():
            raise ExportError(f"{name} was not written")
    return {"n_tensors": len(weight_map), "n_shards": len(shards)}


