"""The recipe: one YAML file says everything about a run, validated before any work starts.

Unknown keys and bad values are errors that name the key, the valid choices and the closest valid
spelling, so a typo never silently falls back to a default.
"""

from __future__ import annotations

import difflib
from importlib import resources
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from omnitune.errors import OmnituneError

PRESETS = ("instruct", "thinking", "captioner", "demo", "voice")
Variant = Literal["instruct", "thinking", "captioner"]


class RecipeError(OmnituneError, ValueError):
    """A recipe that cannot run, said in words a user can act on."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelConfig(_Section):
    path: str = Field("Qwen/Qwen3-Omni-30B-A3B-Instruct", description="hub id, local checkpoint dir, or 'tiny'")
    variant: Variant = "instruct"
    dtype: Literal["bfloat16", "float16", "float32"] = "bfloat16"
    attention: Literal["sdpa", "eager", "flash_attention_2"] = "sdpa"
    experts: Literal["omnitune", "grouped_mm", "eager"] = Field(
        "omnitune", description="experts implementation: omnitune (grouped GEMMs + fused expert LoRA, kernels/), "
        "grouped_mm (transformers + PEFT as they ship), eager")


class DataConfig(_Section):
    train: str | None = Field(None, description="JSONL or JSON list of conversations")
    eval: str | None = None
    eval_fraction: float = Field(0.0, ge=0.0, lt=1.0, description="held out from train when no eval file")
    max_length: int = Field(4096, gt=16)
    on_error: Literal["fail", "skip"] = "fail"
    use_audio_in_video: bool = False
    video_fps: float = Field(2.0, gt=0)
    video_max_frames: int = Field(64, ge=2)
    video_max_pixels: int = Field(128 * 32 * 32, ge=32 * 32, description="per frame")
    image_max_pixels: int = Field(1024 * 32 * 32, ge=32 * 32)
    image_min_pixels: int = Field(4 * 32 * 32, ge=32 * 32)
    media_roots: list[str] = Field(default_factory=list, description="folders (relative to the recipe file) media "
                                   "may also be read from; media must resolve inside one of them or inside the "
                                   "data file's folder")
    cache_dir: str | None = Field(None, description="default: <output_dir>/cache")
    workers: int = Field(0, ge=0, description="decode processes; 0 = one per CPU core")
    encoder_cache: bool | None = Field(None, description="run the frozen audio/vision towers once before training "
                                       "and train on their stored outputs (data/encoder_cache.py); default: on "
                                       "when the towers, projector and merger are all frozen")
    group_by_length: bool | None = Field(None, description="batches of samples of similar length (HF's length-grouped "
                                         "sampler: random mega-batches of 50 batches, sorted by length), so padding "
                                         "stays low; default: on for padded batches of more than one sample")
    packing: bool = Field(False, description="padding-free packing: each batch of train.batch_size samples "
                          "becomes ONE row of their unpadded tokens (batch size = samples per packed row), "
                          "attention masked per sample, M-RoPE positions per sample")

    @model_validator(mode="after")
    def _consistent(self) -> "DataConfig":
        if self.image_min_pixels > self.image_max_pixels:
            raise ValueError("data.image_min_pixels must not exceed data.image_max_pixels")
        if self.eval and self.eval_fraction > 0:
            raise ValueError("data.eval and data.eval_fraction are both set: hold out a fraction OR give an eval file")
        return self


LEGACY_FREEZE_KEYS = ("audio_tower", "audio_projector", "vision_tower", "vision_merger", "llm")


class AdapterConfig(_Section):
    """What trains. Part names (`targets`, `train`, `freeze`) are those of model/parts.py; they are checked against
    the model's parts map before any weight is loaded."""
    method: Literal["lora", "qlora", "full"] = Field(
        "lora", description="qlora: LoRA with the frozen fused-expert and attention weights stored in 4-bit NF4 "
                            "(model/qlora.py)")
    rank: int = Field(64, gt=0)
    alpha: float = Field(128, gt=0)
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    targets: list[str] = Field(default_factory=lambda: ["attention", "experts"],
                               description="parts that get LoRA: attention, experts, router (Thinker), ...")
    modules: list[str] = Field(default_factory=list, description="extra full module names (nn.Linear) to adapt")
    train: list[str] = Field(default_factory=list, description="parts trained in full: beside the LoRA adapter "
                             "(saved with it), or inside a frozen part under method=full (e.g. audio_projector)")
    freeze: list[str] = Field(default_factory=lambda: ["audio_tower", "vision_tower"],
                              description="method=full: parts kept frozen (under LoRA every base weight is)")
    lora_dtype: Literal["float32", "bfloat16"] = Field(
        "float32", description="dtype of the LoRA weights (and so of their gradients): bfloat16 halves both; the "
        "optimizer then does its math in fp32 and rounds stochastically (train.optimizer adamw8bit / adamw4bit); "
        "method=full trains in model.dtype")

    @model_validator(mode="before")
    @classmethod
    def _legacy_freeze_switches(cls, raw: Any) -> Any:
        """Recipes written before the parts map said `freeze_<part>: bool`; read them as `train` / `freeze`."""
        if not isinstance(raw, dict) or not any(f"freeze_{k}" in raw for k in LEGACY_FREEZE_KEYS):
            return raw
        raw = dict(raw)
        train = list(raw.get("train", []))
        freeze = list(raw.get("freeze", ["audio_tower", "vision_tower"]))
        for key in LEGACY_FREEZE_KEYS:
            frozen = raw.pop(f"freeze_{key}", None)
            if frozen is None:
                continue
            if frozen:
                freeze = freeze if key in freeze else freeze + [key]
                train = [t for t in train if t != key]
            else:
                freeze = [f for f in freeze if f != key]
                if key != "llm" and key not in train:
                    train.append(key)
        return {**raw, "train": train, "freeze": freeze}

    @model_validator(mode="after")
    def _dropout_with_experts(self) -> "AdapterConfig":
        if self.method != "full" and self.dropout > 0 and ({"experts", "router"} & set(self.targets)):
            raise ValueError("adapter.dropout must be 0 when adapter.targets has experts or router "
                             "(PEFT's parameter LoRA has no dropout)")
        if self.method != "full" and not (self.targets or self.modules):
            raise ValueError("adapter.targets and adapter.modules are both empty: LoRA would train nothing")
        return self


class LossWeights(_Section):
    text: float = Field(1.0, ge=0)
    audio: float = Field(0.8, ge=0)
    vision: float = Field(0.9, ge=0)


class TrainConfig(_Section):
    objective: Literal["thinker_lm", "talker_codec"] = Field(
        "thinker_lm", description="thinker_lm: the Thinker's next-token loss; talker_codec: the Talker learns "
        "target speech, teacher-forced on the frozen Thinker (the voice preset)")
    lr: float = Field(2e-5, gt=0)
    scheduler: Literal["cosine", "linear", "constant"] = "cosine"
    warmup_ratio: float = Field(0.03, ge=0, lt=1)
    epochs: float = Field(3, gt=0)
    max_steps: int = Field(-1, description="> 0 overrides epochs")
    batch_size: int = Field(1, gt=0)
    grad_accum: int = Field(16, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    max_grad_norm: float = Field(1.0, gt=0)
    precision: Literal["bf16", "fp16", "fp32"] = "bf16"
    gradient_checkpointing: bool = True
    checkpoint_policy: Literal["full", "selective"] = Field(
        "full", description="selective: keep attention outputs through the recompute (train/checkpointing.py)")
    uncheckpointed_layers: Annotated[int, Field(ge=0)] | Literal["auto"] = Field(
        "auto", description="with gradient_checkpointing: the last N decoder layers keep their activations (no "
        "recompute in the backward): faster, for ~0.3 GiB per layer at 4096 tokens. auto: as many as the GPU's "
        "free memory holds, measured at the start of training (none on CPU)")
    cuda_graphs: bool = Field(True, description="on CUDA, replay each micro-step (decoder + loss + backward) as one "
                              "CUDA graph where the batch allows (train/graphed_step.py); same results, fewer launches")
    graph_bucket: int = Field(512, gt=0, description="with cuda_graphs: pad each batch to a multiple of this many "
                              "tokens, so a run captures few graphs")
    nonfinite_patience: int = Field(3, gt=0, description="stop after this many optimizer steps in a row whose loss "
                                    "or gradients were not finite (each is skipped, the weights left as they were)")
    optimizer: Literal["adamw", "adamw8bit", "adamw4bit", "adamw_cpu"] = Field(
        "adamw", description="adamw: fp32 moments on the GPU (8 bytes per trained value); adamw8bit / adamw4bit: "
        "torchao's block-quantized moments (2 / 1 bytes); adamw_cpu: moments and the step in host memory "
        "(torchao's CPUOffloadOptimizer, CUDA only)")
    optimizer_in_backward: bool = Field(
        False, description="step each trained tensor as soon as its gradient is complete, inside the backward, and "
        "free the gradient then (needs grad_accum=1; no global-norm clipping, no CUDA graphs, one process)")
    offload_towers: bool = Field(
        False, description="keep the frozen audio/vision towers in host memory, brought to the GPU only for a batch "
        "that has their modality (accelerate's cpu_offload): ~2 GiB less on the GPU for text-only data")
    offload_experts: bool = Field(
        False, description="adapter.method=qlora: the frozen NF4 experts in pinned host memory, each layer's copied "
        "to the GPU one layer ahead of its use (model/qlora.py): ~15 GiB less on the GPU, ~30 GiB of copies a step")
    check_memory: bool = Field(True, description="refuse, before loading weights, a run whose memory estimate "
                               "(train/memory.py, printed at the start) exceeds the GPU; false: try anyway")
    seed: int = 42
    logging_steps: int = Field(10, gt=0)
    save_steps: int = Field(500, gt=0)
    save_total_limit: int | None = Field(3, gt=0)
    eval_steps: int | None = Field(None, gt=0, description="default: at every save")
    loss_weights: LossWeights = Field(default_factory=LossWeights)
    router_aux_coef: float | None = Field(None, ge=0, description="default: the checkpoint's router_aux_loss_coef")

    @model_validator(mode="after")
    def _check(self) -> TrainConfig:
        if self.uncheckpointed_layers not in (0, "auto") and not self.gradient_checkpointing:
            raise ValueError("train.uncheckpointed_layers needs train.gradient_checkpointing=true (without "
                             "checkpointing every layer keeps its activations already)")
        if self.optimizer_in_backward and self.grad_accum > 1:
            raise ValueError(f"train.optimizer_in_backward steps during each backward, so gradients cannot "
                             f"accumulate: set train.grad_accum=1 (got {self.grad_accum}) or the option off")
        if self.optimizer_in_backward and self.optimizer == "adamw_cpu":
            raise ValueError("train.optimizer=adamw_cpu already overlaps its host step with the backward: set "
                             "train.optimizer_in_backward=false")
        return self


class DistributedConfig(_Section):
    """How a multi-process launch (`omnitune train --nproc N`, or torchrun) trains (docs/scaleout.md)."""
    strategy: Literal["none", "ddp", "fsdp2", "zero2", "zero3"] = Field(
        "none", description="ddp: every process holds the whole model, gradients all-reduced; fsdp2: PyTorch "
        "FSDP2, parameters, gradients and optimizer state sharded per decoder layer and tower; zero2: DeepSpeed "
        "ZeRO-2 (gradients and optimizer state sharded); zero3: DeepSpeed ZeRO-3 (parameters too)")
    offload: Literal["none", "optimizer", "params"] = Field(
        "none", description="to host memory: optimizer (zero2, zero3: optimizer state and its step on the CPU), "
        "params (zero3: parameters too; fsdp2: parameters, gradients and optimizer state)")
    deepspeed_config: str | None = Field(
        None, description="zero2/zero3: your own DeepSpeed JSON instead of the one made from the recipe "
        "(batch size, accumulation, clipping and precision set to 'auto' are filled in from train.*)")

    @model_validator(mode="after")
    def _engine_supports(self) -> DistributedConfig:
        if self.offload != "none" and self.strategy in ("none", "ddp"):
            raise ValueError(f"distributed.offload={self.offload} needs a sharded strategy (fsdp2, zero2, zero3)")
        if self.offload == "params" and self.strategy == "zero2":
            raise ValueError("distributed.offload=params needs zero3 (ZeRO-2 does not shard parameters); "
                             "use offload=optimizer")
        if self.offload == "optimizer" and self.strategy == "fsdp2":
            raise ValueError("distributed.offload=optimizer: FSDP2 offloads parameters, gradients and optimizer "
                             "state together; use offload=params")
        if self.deepspeed_config is not None and self.strategy not in ("zero2", "zero3"):
            raise ValueError("distributed.deepspeed_config needs distributed.strategy zero2 or zero3")
        return self


CODECS = ("mimi", "qwen3-tts-12hz", "tiny")


class TalkerConfig(_Section):
    """Speech output: the codec that turns target speech into the Talker's codes, the Talker objective's loss
    weights, and speakers (model/codec.py, train/objectives.py `TalkerCodec`, model/speakers.py)."""
    codec: str = Field("mimi", description="speech -> codes encoder: mimi (Kyutai's Mimi, first 16 codebooks), "
                       "qwen3-tts-12hz (Qwen3-TTS's 12 Hz tokenizer encoder), tiny (a random Mimi for tests), or "
                       "package.module:Class (model/codec.py `SpeechCodec`)")
    codec_path: str | None = Field(None, description="the codec's weights (dir or cached hub id); default "
                                   "kyutai/mimi for mimi, Qwen/Qwen3-TTS-Tokenizer-12Hz for qwen3-tts-12hz")
    codec_sliding_window: int | None = Field(None, gt=0, description="the Mimi encoder's attention window in "
                                             "frames; transformers 5.23 defaults to 250, 4.57 used the "
                                             "checkpoint's: set it to match the codes the Talker was trained on")
    code_predictor_weight: float = Field(0.3, ge=0, description="loss = CE(codebook 0, incl. end of speech) + "
                                         "this x CE(code predictor, codebooks 1..15)")
    speaker: str = Field("ethan", description="the voice of records that name no `speaker`")
    new_speaker_init: str | None = Field("ethan", description="a new speaker's embedding row starts as this "
                                         "voice's (null: random)")
    preserve_speech: bool = Field(False, description="train.objective=thinker_lm: after the Thinker, train a "
                                  "Talker LoRA on the speech the base model makes for the same answers "
                                  "(self-distillation), so the tuned Thinker keeps the base voice "
                                  "(train/speech_preserve.py)")
    preserve_steps: int = Field(200, gt=0, description="preserve_speech: Talker LoRA steps (one answer each)")
    preserve_lr: float = Field(1e-4, gt=0)
    preserve_rank: int = Field(16, gt=0)
    preserve_samples: int = Field(256, gt=0, description="preserve_speech: answers the base model speaks (per split)")

    @field_validator("codec")
    @classmethod
    def _codec_name(cls, v: str) -> str:
        if v not in CODECS and ":" not in v:
            hint = difflib.get_close_matches(v, CODECS, n=1)
            raise ValueError(f"talker.codec {v!r} is not one of {', '.join(CODECS)} or a package.module:Class"
                             + (f"; did you mean {hint[0]!r}?" if hint else ""))
        return v

    @field_validator("speaker", "new_speaker_init")
    @classmethod
    def _lower(cls, v: str | None) -> str | None:
        return v.lower() if v else v  # generate() looks speakers up in lower case


class LogConfig(_Section):
    tensorboard: bool = True
    wandb: bool = False
    wandb_project: str = "omnitune"


class Recipe(_Section):
    name: str = "run"
    output_dir: str = "runs/run"
    model: ModelConfig = Field(default_factory=ModelConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    adapter: AdapterConfig = Field(default_factory=AdapterConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    distributed: DistributedConfig = Field(default_factory=DistributedConfig)
    talker: TalkerConfig = Field(default_factory=TalkerConfig)
    log: LogConfig = Field(default_factory=LogConfig)
    # Where the recipe came from; relative data paths resolve against it.
    base_dir: str = Field(".", exclude=True)

    @field_validator("name")
    @classmethod
    def _name_is_a_path_part(cls, v: str) -> str:
        if not v or "/" in v:
            raise ValueError("name must be non-empty and contain no '/'")
        return v

    @model_validator(mode="after")
    def _media_roots_are_absolute(self) -> "Recipe":
        # Relative to the recipe file, like data paths; kept absolute so RUN/recipe.yaml means the same anywhere.
        self.data.media_roots = [str(self.resolve(r)) for r in self.data.media_roots]
        return self

    @model_validator(mode="after")
    def _bf16_lora_needs_fp32_optimizer_math(self) -> "Recipe":
        if (self.adapter.method != "full" and self.adapter.lora_dtype == "bfloat16"
                and self.train.optimizer not in ("adamw8bit", "adamw4bit")):
            raise ValueError(f"adapter.lora_dtype=bfloat16 needs train.optimizer adamw8bit or adamw4bit (fp32 math, "
                             f"stochastic rounding into bf16); {self.train.optimizer} would lose updates smaller "
                             "than a bf16 step")
        return self

    @model_validator(mode="after")
    def _offloaded_experts_are_nf4(self) -> "Recipe":
        if self.train.offload_experts and self.adapter.method != "qlora":
            raise ValueError("train.offload_experts streams the NF4 experts of adapter.method=qlora; set "
                             f"adapter.method=qlora (got {self.adapter.method})")
        return self

    @model_validator(mode="after")
    def _qlora_needs_the_omnitune_experts(self) -> "Recipe":
        if self.adapter.method == "qlora" and self.model.experts != "omnitune":
            raise ValueError("adapter.method=qlora needs model.experts=omnitune: only that experts path "
                             "dequantizes the 4-bit expert weights")
        return self

    @model_validator(mode="after")
    def _talker_needs_instruct(self) -> "Recipe":
        if self.train.objective == "talker_codec" and self.model.variant != "instruct":
            raise ValueError("train.objective=talker_codec needs model.variant=instruct: only the Instruct "
                             "checkpoint has a Talker")
        if self.talker.preserve_speech and (self.train.objective != "thinker_lm" or self.model.variant != "instruct"
                                            or self.adapter.method != "lora"):
            raise ValueError("talker.preserve_speech needs train.objective=thinker_lm, adapter.method=lora and "
                             "model.variant=instruct: it keeps the voice of an Instruct Thinker LoRA")
        return self

    def resolve(self, path: str | None) -> Path | None:
        """A path from the recipe, relative to the recipe file's directory."""
        if path is None:
            return None
        p = Path(path).expanduser()
        return p if p.is_absolute() else (Path(self.base_dir) / p).resolve()

    @property
    def out(self) -> Path:
        return self.resolve(self.output_dir)  # type: ignore[return-value]

    def dump(self) -> dict[str, Any]:
        return self.model_dump(mode="json")



def preset_path(name: str) -> Path:
    return Path(str(resources.files("omnitune") / "recipes" / f"{name}.yaml"))


def load_recipe(source: str | Path, overrides: list[str] | None = None) -> Recipe:
    """Load a recipe from a YAML path or a preset name, apply `a.b=c` overrides, validate."""
    source = str(source)
    path = Path(source)
    if path.is_file():
        base = path.resolve().parent
    elif source in PRESETS:
        path, base = preset_path(source), Path.cwd()
    else:
        hint = difflib.get_close_matches(source, PRESETS, n=1)
        raise RecipeError(f"recipe '{source}' is neither a file nor a preset ({', '.join(PRESETS)})"
                          + (f"; did you mean '{hint[0]}'?" if hint else ""))
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise RecipeError(f"{path}: not valid YAML: {e}") from e
    if not isinstance(raw, dict):
        raise RecipeError(f"{path}: a recipe is a mapping of sections, got {type(raw).__name__}")
    for item in overrides or []:
        _apply_override(raw, item)
    raw["base_dir"] = str(base)
    recipe = validate_recipe(raw, origin=str(path))
    local = recipe.resolve(recipe.model.path)
    if recipe.model.path != "tiny" and local is not None and local.exists():  # a local checkpoint, like data paths
        recipe.model.path = str(local)
    return recipe


def validate_recipe(raw: dict[str, Any], origin: str = "recipe") -> Recipe:
    try:
        return Recipe.model_validate(raw)
    except ValidationError as e:
        raise RecipeError(f"{origin}: invalid recipe\n" + "\n".join(_explain(err) for err in e.errors())) from None


def _apply_override(raw: dict[str, Any], item: str) -> None:
    if "=" not in item:
        raise RecipeError(f"--set '{item}': expected KEY=VALUE, e.g. train.lr=1e-4")
    key, value = item.split("=", 1)
    parts = key.strip().split(".")
    node = raw
    for p in parts[:-1]:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise RecipeError(f"--set '{item}': '{p}' is not a section")
    node[parts[-1]] = yaml.safe_load(value) if value != "" else None


def _explain(err: dict[str, Any]) -> str:
    loc = ".".join(str(x) for x in err["loc"])
    if err["type"] == "extra_forbidden":
        return f"  {loc}: unknown key" + _closest(err["loc"])
    if err["type"] == "literal_error":
        return f"  {loc}: {err['input']!r} is not one of {err['ctx']['expected']}"
    return f"  {loc}: {err['msg']} (got {err.get('input')!r})"


def _closest(loc: tuple) -> str:
    model: type[BaseModel] = Recipe
    for part in loc[:-1]:
        field = model.model_fields.get(str(part))
        ann = getattr(field, "annotation", None)
        if not (isinstance(ann, type) and issubclass(ann, BaseModel)):
            return ""
        model = ann
    valid = [k for k in model.model_fields if k != "base_dir"]
    hint = difflib.get_close_matches(str(loc[-1]), valid, n=1)
    return (f"; did you mean '{hint[0]}'?" if hint else "") + f" (valid: {', '.join(valid)})"
