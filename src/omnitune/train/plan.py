"""The training plan: every switch of a run decided once, from the recipe and the hardware, before any weight loads.

Why one object: whether CUDA graphs run (and why not), how layers are checkpointed, packing, the graph bucket, the
loss and optimizer implementations, the distributed strategy and the world size were decided in several places that
could disagree. `make_plan(recipe)` decides them here; the trainer, the benchmark (bench/bench_train.py) and the
start-of-run printout all read the same `TrainingPlan`, so the benchmark measures what `omnitune train` runs.

Two paths, by `model.experts`:
- `omnitune` (the presets): the fused experts/LoRA kernels, the chunked fused cross-entropy, MultiTensorAdamW and,
  on CUDA, the micro-step replayed as a CUDA graph where the batch allows (train/graphed_step.py).
- `grouped_mm` / `eager`: transformers + PEFT as they ship, the plain baseline: full logits and torch's
  cross-entropy, HF's default optimizer (torch's fused AdamW on CUDA), no graphs, no kernels of ours.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Literal

import torch

from omnitune.recipe import Recipe, RecipeError

# Parts whose training puts weights before or after the decoder stack in the backward: the graphed micro-step runs
# the embeddings and towers eagerly without gradients, and the head as a frozen matrix (train/graphed_step.py).
SHARDED = ("fsdp2", "zero2", "zero3")  # strategies whose engine splits model state across processes

OUTSIDE_DECODER = ("llm", "embed_tokens", "lm_head", "backbone", "audio_tower", "audio_projector", "vision_tower",
                   "vision_merger")


@dataclass(frozen=True)
class Hardware:
    """What this process trains on: the device and the launch (torchrun sets WORLD_SIZE / LOCAL_RANK)."""
    device: Literal["cuda", "cpu"]
    name: str
    memory_bytes: int | None
    world_size: int = 1
    local_rank: int = 0

    @classmethod
    def detect(cls) -> Hardware:
        world, rank = int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("LOCAL_RANK", "0"))
        if torch.cuda.is_available():
            props = torch.cuda.get_device_properties(rank % torch.cuda.device_count())
            return cls("cuda", props.name, props.total_memory, world, rank)
        return cls("cpu", "cpu", None, world, rank)

    @property
    def device_str(self) -> str:
        return f"cuda:{self.local_rank}" if self.device == "cuda" else "cpu"


@dataclass(frozen=True)
class TrainingPlan:
    """Every switch of one run (module docstring). Built by `make_plan`; read, never changed."""
    objective: str
    hardware: Hardware
    strategy: Literal["single", "ddp", "fsdp2", "zero2", "zero3"]
    offload: Literal["none", "optimizer", "params"]
    precision: Literal["bf16", "fp16", "fp32"]
    fast_paths: bool  # model.experts=omnitune: fused experts/LoRA/norm/router kernels
    loss: Literal["chunked", "plain"]
    optimizer: Literal["multi_tensor_adamw", "hf_default", "adamw8bit", "adamw4bit", "adamw_cpu"]
    optimizer_in_backward: bool  # each tensor steps when its gradient is complete (train/optimizer.py)
    lora_dtype: Literal["float32", "bfloat16"]
    offload_towers: bool  # frozen audio/vision towers in host memory, streamed in for media batches
    offload_experts: bool  # QLoRA's NF4 experts in pinned host memory, streamed one layer ahead
    cuda_graphs: bool
    cuda_graphs_why: str  # why on or off, for the printout
    graph_bucket: int  # pad micro-batches to a multiple of this many tokens (with cuda_graphs)
    gradient_checkpointing: bool
    checkpoint_policy: Literal["full", "selective"]
    uncheckpointed_layers: int | Literal["auto"]
    preserve_rng_state: bool  # checkpointing restores RNG state in the recompute (impossible inside a capture)
    packing: bool
    micro_batch_tokens: int  # the most tokens one micro-batch holds (padded or packed), for memory sizing
    router_trains: bool  # the MoE router's balance loss joins the objective
    unused_parameters: bool  # a trained tower gets no gradient from batches without its modality (DDP must know)
    group_by_length: bool = False  # HF's length-grouped sampler (padded batches of several samples)
    encoder_cache: bool = False  # train on stored frozen-tower outputs (data/encoder_cache.py)
    encoder_cache_why: str = ""
    notes: tuple[str, ...] = field(default=())

    @property
    def world_size(self) -> int:
        return self.hardware.world_size

    @property
    def sharded(self) -> bool:
        """Whether parameters, gradients or optimizer state are split across processes (FSDP2, ZeRO)."""
        return self.strategy in SHARDED

    @property
    def deepspeed(self) -> bool:
        """Whether DeepSpeed (ZeRO) is the engine."""
        return self.strategy in ("zero2", "zero3")

    @property
    def towers_on_host(self) -> bool:
        """Whether training keeps the frozen towers off the GPU: streamed in for media batches (offload_towers), or
        never needed because their outputs are stored (encoder_cache, one process: DDP and the sharding engines
        want every parameter on its device)."""
        return self.offload_towers or (self.encoder_cache and self.world_size == 1 and not self.sharded)

    def lines(self) -> list[str]:
        """The plan as printed at the start of every run."""
        h = self.hardware
        ckpt = ("off" if not self.gradient_checkpointing else
                f"{self.checkpoint_policy}, uncheckpointed layers: {self.uncheckpointed_layers}")
        engine = self.strategy + (f", offload {self.offload}" if self.offload != "none" else "")
        return [f"device: {h.name}" + (f" x {h.world_size} processes ({engine})" if h.world_size > 1
                                       else f" ({engine})" if self.sharded else ""),
                f"objective: {self.objective}" + (" + router balance loss" if self.router_trains else ""),
                f"experts path: {'omnitune fused kernels' if self.fast_paths else 'transformers + PEFT (plain)'}; "
                f"loss: {self.loss}; optimizer: {self.optimizer}"
                + (" (stepped inside the backward)" if self.optimizer_in_backward else "")
                + f"; precision: {self.precision}" + (", LoRA weights bf16" if self.lora_dtype == "bfloat16" else ""),
                f"CUDA graphs: {'on' if self.cuda_graphs else 'off'}, {self.cuda_graphs_why}"
                + (f" (bucket {self.graph_bucket} tokens)" if self.cuda_graphs else ""),
                f"activation checkpointing: {ckpt}",
                f"batches: {'packed rows' if self.packing else 'padded'}"
                + (", length-grouped" if self.group_by_length else "")
                + f", up to {self.micro_batch_tokens} tokens each",
                f"encoder cache: {'on' if self.encoder_cache else 'off'}, {self.encoder_cache_why}",
                *self.notes]


def trains_router(recipe: Recipe) -> bool:
    """Whether router weights train: LoRA on the router, or a full fine-tune of the language model."""
    a = recipe.adapter
    return "router" in a.targets if a.method != "full" else "llm" not in a.freeze


def trains_a_tower(recipe: Recipe) -> bool:
    """Whether an audio/vision part trains in full, which only batches with that modality reach."""
    a = recipe.adapter
    towers = ("audio_tower", "audio_projector", "vision_tower", "vision_merger")
    return any(t in a.train for t in towers) or (a.method == "full" and not {"audio_tower", "vision_tower"}
                                                  <= set(a.freeze))


def trains_an_encoder(recipe: Recipe) -> bool:
    """Whether any weight of the audio/vision towers (projector and mergers included) trains or gets LoRA."""
    tower_names = ("audio_tower", "visual")  # the towers' module paths (model/parts.py), for adapter.modules
    return trains_a_tower(recipe) or any(t in m for m in recipe.adapter.modules for t in tower_names)


def _encoder_cache(recipe: Recipe) -> tuple[bool, str]:
    """(on, why): on by default when every tower weight is frozen; asking for it with a training tower is an error."""
    asked = recipe.data.encoder_cache
    if recipe.train.objective != "thinker_lm":
        if asked:
            raise RecipeError(f"data.encoder_cache=true is for train.objective=thinker_lm, not "
                              f"{recipe.train.objective}: set data.encoder_cache=false")
        return False, f"train.objective={recipe.train.objective} runs the whole frozen Thinker itself"
    if trains_an_encoder(recipe):
        if asked:
            raise RecipeError("data.encoder_cache=true needs the audio/vision towers frozen, but the adapter trains "
                              "or adapts one: set data.encoder_cache=false or freeze the towers")
        return False, "a tower trains, so its outputs change every step"
    if asked is False:
        return False, "data.encoder_cache=false"
    return True, "the frozen towers run once before training; batches carry their stored outputs"


def _group_by_length(recipe: Recipe) -> bool:
    """data.group_by_length, by default on where it lowers padding: padded batches of more than one sample."""
    asked = recipe.data.group_by_length
    if asked and recipe.data.packing:
        raise RecipeError("data.group_by_length and data.packing are both on: a packed row has no padding to "
                          "lower; turn one of them off")
    return asked if asked is not None else recipe.train.batch_size > 1 and not recipe.data.packing


def _why_no_graphs(recipe: Recipe, hw: Hardware, fast: bool, strategy: str) -> str | None:
    t, a = recipe.train, recipe.adapter
    if not t.cuda_graphs:
        return "train.cuda_graphs=false"
    if t.objective != "thinker_lm":
        return f"train.objective={t.objective} runs eagerly (its sequence length follows the speech)"
    if hw.device != "cuda":
        return "no CUDA device"
    if not fast:
        return f"model.experts={recipe.model.experts} is the plain transformers + PEFT path"
    if strategy == "ddp":
        return f"{strategy}: the gradient all-reduce is driven from the host during the backward"
    if strategy in SHARDED:
        return (f"{strategy}: the engine gathers parameters and reduces gradients layer by layer from the host "
                "(hooks around every layer, its own streams and buffers), which a captured graph cannot replay")
    if t.optimizer_in_backward:
        return "train.optimizer_in_backward: the optimizer steps from the host inside the backward"
    if t.offload_experts:
        return "train.offload_experts: the host streams each layer's experts in"
    if t.precision == "fp16":
        return "fp16 needs a gradient scaler, which reads back to the host"
    if a.method == "full":
        return "a full fine-tune trains the embeddings and head, which the graphed step runs outside the graph"
    if a.dropout > 0:
        return "LoRA dropout draws random numbers that checkpointing would have to restore"
    if trains_router(recipe):
        return "the router trains: its balance loss needs the router logits of every layer"
    outside = [p for p in a.train if p in OUTSIDE_DECODER]
    if outside:
        return f"adapter.train has {', '.join(outside)}, which run outside the graphed decoder"
    return None


def make_plan(recipe: Recipe, hardware: Hardware | None = None, objective: str | None = None) -> TrainingPlan:
    """Decide every switch of a run from the recipe and the hardware (module docstring)."""
    hw = hardware or Hardware.detect()
    objective = objective or recipe.train.objective
    t = recipe.train
    strategy = "single" if recipe.distributed.strategy == "none" else recipe.distributed.strategy
    if hw.world_size > 1 and strategy == "single":
        raise RecipeError(f"launched as {hw.world_size} processes (torchrun / accelerate launch): set "
                          "distributed.strategy=ddp to train data parallel (or fsdp2 / zero2 / zero3 to shard), "
                          "or launch one process")
    if t.optimizer_in_backward and strategy != "single":
        raise RecipeError("train.optimizer_in_backward steps each tensor before the gradient all-reduce: it "
                          "trains one process only; set it false for distributed.strategy=" + strategy)
    if strategy in ("fsdp2", "zero3") and recipe.adapter.method == "qlora":
        raise RecipeError(f"adapter.method=qlora with distributed.strategy={strategy}: the 4-bit experts cannot be "
                          "sharded by the engine; use ddp (QLoRA fits one GPU)")
    if strategy == "fsdp2" and t.precision == "fp16":
        raise RecipeError("distributed.strategy=fsdp2 trains in bf16 or fp32 (fp16 would need a sharded gradient "
                          "scaler): set train.precision=bf16")
    fast = recipe.model.experts == "omnitune"
    optimizer, notes = _optimizer(recipe, hw, fast)
    lora_dtype = recipe.adapter.lora_dtype if recipe.adapter.method != "full" else "float32"
    if strategy in SHARDED and optimizer != "hf_default":
        # the engines step sharded (FSDP2) or flattened (ZeRO) parameters: torch's AdamW, whose state they shard;
        # over fp32 LoRA (bf16 weights need the low-bit optimizers' fp32 math and stochastic rounding)
        notes.append(f"optimizer: AdamW under {strategy}, which shards its state over the processes (train.optimizer="
                     f"{t.optimizer} is for one process or ddp); distributed.offload=optimizer moves it to the host"
                     + ("; LoRA weights fp32" if lora_dtype == "bfloat16" else ""))
        optimizer, lora_dtype = "hf_default", "float32"
    cached, cached_why = _encoder_cache(recipe)
    offload_towers = (t.offload_towers and hw.device == "cuda" and not trains_a_tower(recipe) and not cached
                      and strategy not in SHARDED)
    if t.offload_towers and cached:
        notes.append("towers: their stored outputs replace them (data.encoder_cache), so they stay in host memory")
    elif t.offload_towers and not offload_towers:
        notes.append("towers: kept where the model is (" + (
            "no CUDA device: already in host memory" if hw.device != "cuda" else
            f"{strategy} shards them with the rest of the model" if strategy in SHARDED else
            "a tower trains, so it stays on the GPU") + ")")
    elif offload_towers:
        notes.append("towers: frozen audio/vision towers in host memory, brought to the GPU for media batches only")
    if t.offload_experts:
        notes.append("experts: NF4 in pinned host memory, each layer's copied to the GPU one layer ahead")
    keep = t.uncheckpointed_layers if t.gradient_checkpointing else 0
    if keep == "auto" and strategy in ("fsdp2", "zero3"):
        # auto measures one whole decoder layer on the GPU once training begins, when these engines hold 1/world
        # of every parameter (a ZeRO-3 weight is empty there): the H100 run failed on exactly that
        notes.append(f"activations: every layer checkpointed (train.uncheckpointed_layers=auto measures a whole "
                     f"layer, which {strategy} has sharded; give a number to keep some)")
        keep = 0
    why_not = _why_no_graphs(recipe, hw, fast, strategy)
    graphs = why_not is None
    why = ("text and media batches alike: towers (or their stored outputs) and M-RoPE positions run eagerly before "
           "the graphed decoder" if graphs else why_not)
    tokens = t.batch_size * recipe.data.max_length
    if graphs:
        tokens = -(-tokens // t.graph_bucket) * t.graph_bucket
    return TrainingPlan(
        objective=objective, hardware=hw, strategy=strategy, precision=t.precision, fast_paths=fast,
        loss="chunked" if fast else "plain",
        optimizer=optimizer, optimizer_in_backward=t.optimizer_in_backward,
        lora_dtype=lora_dtype,
        offload_towers=offload_towers, offload_experts=t.offload_experts, offload=recipe.distributed.offload,
        cuda_graphs=graphs, cuda_graphs_why=why, graph_bucket=t.graph_bucket,
        gradient_checkpointing=t.gradient_checkpointing, checkpoint_policy=t.checkpoint_policy,
        uncheckpointed_layers=keep,
        preserve_rng_state=not graphs, packing=recipe.data.packing, micro_batch_tokens=tokens,
        router_trains=trains_router(recipe) and objective == "thinker_lm", unused_parameters=trains_a_tower(recipe),
        group_by_length=_group_by_length(recipe), encoder_cache=cached, encoder_cache_why=cached_why,
        notes=tuple(notes))


def _optimizer(recipe: Recipe, hw: Hardware, fast: bool) -> tuple[str, list[str]]:
    """The optimizer implementation, and what the printout should say about the choice."""
    t = recipe.train
    notes = []
    if t.optimizer_in_backward:
        notes.append("optimizer in backward: gradients are freed as they are produced; no global-norm clipping "
                     "(train.max_grad_norm unused); a non-finite gradient entry is zeroed, and such steps are "
                     "counted, not skipped")
    if t.optimizer == "adamw_cpu" and hw.device != "cuda":
        notes.append("optimizer: adamw_cpu without a CUDA device is AdamW (its state is in host memory already)")
    elif t.optimizer != "adamw":
        return t.optimizer, notes
    plain = "multi_tensor_adamw" if fast and hw.device == "cuda" and not t.optimizer_in_backward else "hf_default"
    return plain, notes
