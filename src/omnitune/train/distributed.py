"""The engines a multi-process run trains on (distributed.strategy), applied to the model the run built.

- `ddp`: HF's Trainer wraps the model in DistributedDataParallel (accelerate); nothing to do here.
- `fsdp2`: PyTorch FSDP2. `shard_fsdp2` calls `fully_shard` itself, per decoder layer of every stack in the parts
  map, per tower, then the root, and the Trainer is told that the model owns its gradient reduction. Why not
  accelerate's FSDP plugin: it applies FSDP only on GPUs and silently falls back to DDP on the CPU, so no CPU test
  could show that the run is sharded; and its wrap policy knows neither the towers nor the Talker.
- `zero2` / `zero3`: DeepSpeed through the Trainer's own integration (accelerate's DeepSpeed plugin: its engine
  owns the backward, the optimizer step and the checkpoints), with the config made from the recipe
  (`deepspeed_config`) or the user's JSON. On the CPU it runs with `DS_ACCELERATOR=cpu` (set here).
  ZeRO-3 partitions every parameter and gathers a module's own parameters around its forward; two things of this
  model need telling: each sparse MoE block is one leaf (its experts are indexed by the router's choice, which
  DeepSpeed's prefetch trace cannot follow), and the loss reads the head's weight outside the head's forward.

The objective runs as the forward of the engine's outermost module (trainer.OmniTrainer.compute_loss), so each
engine's hooks see one forward per micro-step, as they expect.
"""
from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import TrainerCallback

from omnitune.model import parts
from omnitune.recipe import Recipe, RecipeError
from omnitune.train.plan import TrainingPlan

TOWERS = ("audio_tower", "vision_tower")  # parts sharded as one unit each (their layers are small)


def process_state(plan: TrainingPlan):
    """accelerate's process state, made before the Trainer makes it (it is one per process), so that it is the one
    the plan's engine needs. Joins the process group under torchrun; a no-op for one process.

    CPU: `cpu=True`, or accelerate takes a single-process CPU launch and every process believes it is the main one.
    ZeRO: DeepSpeed's path of accelerate, which it takes only when not told `cpu`; on a CPU-only machine that needs
    DeepSpeed's CPU accelerator and an explicit gloo backend, or accelerate counts one process while DeepSpeed
    reduces over all (every process would then read the same batches)."""
    from accelerate import PartialState

    cpu = plan.hardware.device == "cpu"
    if plan.deepspeed:
        os.environ["ACCELERATE_USE_DEEPSPEED"] = "true"
        if cpu:
            os.environ.setdefault("DS_ACCELERATOR", "cpu")  # DeepSpeed picks its accelerator at import
        return PartialState(cpu=False, backend=engine_backend(plan))
    return PartialState(cpu=cpu)


def engine_backend(plan: TrainingPlan) -> str | None:
    """The process group's backend where accelerate would not find it: gloo for DeepSpeed on the CPU."""
    return "gloo" if plan.deepspeed and plan.hardware.device == "cpu" else None


def deepspeed_config(recipe: Recipe, plan: TrainingPlan) -> dict[str, Any] | None:
    """The DeepSpeed config of a zero2/zero3 run: the user's JSON (distributed.deepspeed_config), else one made
    from the recipe. Batch size, accumulation, clipping and precision are 'auto': the Trainer fills them in from
    train.* so they cannot disagree. None for the other strategies."""
    if not plan.deepspeed:
        return None
    d = recipe.distributed
    if d.deepspeed_config is not None:
        path = recipe.resolve(d.deepspeed_config)
        try:
            return json.loads(Path(path).read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise RecipeError(f"distributed.deepspeed_config: {path} is not a readable JSON file ({e})") from None
    zero: dict[str, Any] = {"stage": 3 if plan.strategy == "zero3" else 2, "overlap_comm": True,
                            "contiguous_gradients": True, "reduce_bucket_size": "auto"}
    if plan.strategy == "zero3":
        # 0: every parameter is partitioned, also the small ones (norms, LoRA factors); on the real model they are
        # a few MB, and the tiny test model would otherwise keep everything whole and prove nothing
        zero.update(stage3_param_persistence_threshold=0, stage3_prefetch_bucket_size="auto",
                    stage3_gather_16bit_weights_on_model_save=True)
    if d.offload in ("optimizer", "params"):
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
    if d.offload == "params":
        zero["offload_param"] = {"device": "cpu", "pin_memory": True}
    config: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
        "gradient_clipping": "auto", "bf16": {"enabled": "auto"}, "fp16": {"enabled": "auto"},
        "zero_optimization": zero, "steps_per_print": 10**9, "wall_clock_breakdown": False}
    if d.offload != "none":
        # the optimizer step runs on the host: DeepSpeed's CPU Adam (vectorised C++), not torch's, does it fast
        config["optimizer"] = {"type": "AdamW", "params": {"lr": "auto", "betas": "auto", "eps": "auto",
                                                            "weight_decay": "auto"}}
    return config


def shard_units(model: nn.Module) -> list[nn.Module]:
    """The modules FSDP2 shards as one unit each: every decoder layer of every stack, then each tower."""
    units: list[nn.Module] = []
    for stack in parts.parts_map(model).stacks:
        units.extend(parts.decoder_layers(model, stack))
    pmap = parts.parts_map(model).parts
    for tower in TOWERS:
        for name in (n for n in pmap if n == tower or n.endswith("." + tower)):
            units.extend(parts.modules(model, name))
    return units


def shard_fsdp2(model: nn.Module, plan: TrainingPlan) -> nn.Module:
    """`fully_shard` per unit (`shard_units`), then the root (embeddings, head, final norms): each process keeps
    1/world of every parameter, its gradient and its optimizer state. bf16: parameters are gathered and computed in
    bf16, gradients reduced in fp32."""
    from torch.distributed.fsdp import (
        CPUOffloadPolicy,
        MixedPrecisionPolicy,
        OffloadPolicy,
        fully_shard,
    )

    mp = (MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
          if plan.precision == "bf16" else MixedPrecisionPolicy())
    offload = CPUOffloadPolicy() if plan.offload == "params" else OffloadPolicy()
    for unit in shard_units(model):
        fully_shard(unit, mp_policy=mp, offload_policy=offload)
    fully_shard(model, mp_policy=mp, offload_policy=offload)
    return model


def prepare_zero3(model: nn.Module) -> None:
    """What ZeRO-3 must know of this model before the engine is built (module docstring)."""
    from deepspeed.utils import set_z3_leaf_modules

    set_z3_leaf_modules(model, parts.moe_block_classes(model))


def zero3_external_head(engine_module: nn.Module) -> None:
    """The fused loss reads the head's weight without calling the head: gather it around the root's forward."""
    import deepspeed

    head = parts.module(parts.thinker_of(engine_module), "lm_head")
    if type(head) is nn.Linear:
        deepspeed.zero.register_external_parameter(engine_module, head.weight)


def shard(model: nn.Module, plan: TrainingPlan) -> nn.Module:
    """The model as the plan's engine takes it (module docstring); unchanged for single and ddp."""
    if plan.strategy == "fsdp2":
        return shard_fsdp2(model, plan)
    if plan.strategy == "zero3":
        prepare_zero3(model)
    return model


def forward_owner(model: nn.Module) -> nn.Module | None:
    """The module whose forward the engine hooks (the objective runs as it): DDP's and DeepSpeed's wrapped module,
    or the FSDP2 root itself. None for a plain model."""
    from torch.distributed.fsdp import FSDPModule
    from torch.nn.parallel import DistributedDataParallel

    if isinstance(model, DistributedDataParallel) or type(model).__name__ == "DeepSpeedEngine":
        return model.module
    if isinstance(model, FSDPModule):
        return model
    return None


def is_sharded_tensor(t: torch.Tensor) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def full_trained_state(model: nn.Module, plan: TrainingPlan, trainable_only: bool) -> dict[str, torch.Tensor] | None:
    """The weights as one process would hold them (a collective: every process calls it), for the adapter (or, for
    a full fine-tune, the model) saved beside sharded checkpoints and at the end; None where every process holds
    whole parameters already (single, ddp, zero2). `trainable_only`: the trained parameters only (an adapter), never
    the whole 30B model gathered for a few MB of LoRA."""
    if plan.strategy == "fsdp2":
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_model_state_dict,
        )

        if trainable_only:
            return {n: p.full_tensor().detach().cpu() for n, p in model.named_parameters() if p.requires_grad}
        return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if plan.strategy == "zero3":
        import deepspeed

        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad or not trainable_only]
        out = {}
        for name, p in named:  # one at a time: never the whole model gathered at once
            with deepspeed.zero.GatheredParameters([p]):
                out[name] = p.detach().cpu().clone()
        return out
    return None


def held_values(model: nn.Module) -> tuple[int, int]:
    """(values this process holds, values of the whole model) over every parameter: a DTensor's local shard,
    a ZeRO-3 parameter's partition, else the whole parameter."""
    local = total = 0
    for p in model.parameters():
        if is_sharded_tensor(p):
            here, full = p.to_local().numel(), p.numel()
        elif hasattr(p, "ds_tensor"):  # ZeRO-3: p itself is an empty placeholder between forwards
            here, full = p.ds_tensor.numel(), p.ds_numel
        else:
            here = full = p.numel()
        local, total = local + here, total + full
    return local, total


def optimizer_values(optimizer) -> int | None:
    """The trained values whose optimizer state this process keeps, where an engine partitions it (ZeRO-1/2:
    its fp32 partitions); None where the state follows the parameters."""
    inner = getattr(optimizer, "optimizer", optimizer)  # accelerate's wrapper
    groups = getattr(inner, "single_partition_of_fp32_groups", None)
    return None if groups is None else sum(g.numel() for g in groups)


class ShardReport(TrainerCallback):
    """Says at the start of training how much of the model and of its optimizer state this process holds: the
    proof that a run is sharded (accelerate falls back to DDP silently where it cannot shard)."""

    def __init__(self, plan: TrainingPlan, report: Callable[[str], object] = print):
        self.plan, self.report = plan, report

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        local, total = held_values(model)
        line = (f"{self.plan.strategy}: this process holds {100 * local / max(total, 1):.1f}% of the "
                f"{total:,} parameter values")
        trained = sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters() if p.requires_grad)
        opt = optimizer_values(optimizer)
        if opt is not None and trained:
            line += f" and optimizer state for {100 * opt / trained:.1f}% of the {trained:,} trained values"
        self.report(line)
