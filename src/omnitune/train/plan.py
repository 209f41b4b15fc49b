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
    strategy: Literal["single", "ddp"]
    precision: Literal["bf16", "fp16", "fp32"]
    fast_paths: bool  # model.experts=omnitune: fused experts/LoRA/norm/router kernels
    loss: Literal["chunked", "plain"]
    optimizer: Literal["multi_tensor_adamw", "hf_default"]
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
    notes: tuple[str, ...] = field(default=())

    @property
    def world_size(self) -> int:
        return self.hardware.world_size

    def lines(self) -> list[str]:
        """The plan as printed at the start of every run."""
        h = self.hardware
        ckpt = ("off" if not self.gradient_checkpointing else
                f"{self.checkpoint_policy}, uncheckpointed layers: {self.uncheckpointed_layers}")
        return [f"device: {h.name}" + (f" x {h.world_size} processes ({self.strategy})" if h.world_size > 1 else ""),
                f"objective: {self.objective}" + (" + router balance loss" if self.router_trains else ""),
                f"experts path: {'omnitune fused kernels' if self.fast_paths else 'transformers + PEFT (plain)'}; "
                f"loss: {self.loss}; optimizer: {self.optimizer}; precision: {self.precision}",
                f"CUDA graphs: {'on' if self.cuda_graphs else 'off'}, {self.cuda_graphs_why}"
                + (f" (bucket {self.graph_bucket} tokens)" if self.cuda_graphs else ""),
                f"activation checkpointing: {ckpt}",
                f"batches: {'packed rows' if self.packing else 'padded'}, up to {self.micro_batch_tokens} tokens each",
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
    if strategy != "single":
        return f"{strategy}: the gradient all-reduce is driven from the host during the backward"
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
    strategy = "ddp" if recipe.distributed.strategy == "ddp" else "single"
    if hw.world_size > 1 and strategy == "single":
        raise RecipeError(f"launched as {hw.world_size} processes (torchrun / accelerate launch): set "
                          "distributed.strategy=ddp to train data parallel, or launch one process")
    fast = recipe.model.experts == "omnitune"
    why_not = _why_no_graphs(recipe, hw, fast, strategy)
    graphs = why_not is None
    why = ("batches with images or video run eagerly (the vision towers' shapes depend on the data)"
           if graphs else why_not)
    tokens = t.batch_size * recipe.data.max_length
    if graphs:
        tokens = -(-tokens // t.graph_bucket) * t.graph_bucket
    return TrainingPlan(
        objective=objective, hardware=hw, strategy=strategy, precision=t.precision, fast_paths=fast,
        loss="chunked" if fast else "plain",
        optimizer="multi_tensor_adamw" if fast and hw.device == "cuda" else "hf_default",
        cuda_graphs=graphs, cuda_graphs_why=why, graph_bucket=t.graph_bucket,
        gradient_checkpointing=t.gradient_checkpointing, checkpoint_policy=t.checkpoint_policy,
        uncheckpointed_layers=t.uncheckpointed_layers if t.gradient_checkpointing else 0,
        preserve_rng_state=not graphs, packing=recipe.data.packing, micro_batch_tokens=tokens,
        router_trains=trains_router(recipe) and objective == "thinker_lm", unused_parameters=trains_a_tower(recipe))
