"""Resumable state of an FSDP2 run: the trained parameters and the optimizer state, each process writing its own
shards with torch.distributed.checkpoint (DCP) into checkpoint-N/sharded/.

Why: HF's Trainer saves one `optimizer.pt` from the main process, which under FSDP2 would hold only that process's
shards, and loads an adapter into parameters with plain `load_state_dict`, which DTensors refuse. DCP writes and
reads shards in parallel and re-shards on load, so a run may resume on another number of processes. Only trained
parameters are written: a LoRA run's checkpoint never carries the frozen 30B base. (DeepSpeed ZeRO checkpoints are
DeepSpeed's own, written and read by the Trainer's DeepSpeed integration.) Beside the shards each checkpoint holds
the consolidated adapter (trainer.OmniTrainer.save_model), so eval/infer/export read it as a one-GPU checkpoint.
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    get_optimizer_state_dict,
    set_optimizer_state_dict,
)

SHARDED = "sharded"


def trained(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def save_sharded(checkpoint: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Every process writes its shards of the trained parameters and their optimizer state (a collective)."""
    state = {"model": trained(model), "optimizer": get_optimizer_state_dict(model, optimizer)}
    dcp.save(state, checkpoint_id=str(Path(checkpoint) / SHARDED))


def has_sharded(checkpoint: str | Path) -> bool:
    return (Path(checkpoint) / SHARDED / ".metadata").is_file()


def load_sharded_model(checkpoint: str | Path, model: nn.Module) -> None:
    """The trained parameters, loaded in place into this process's shards."""
    state = {"model": trained(model)}
    dcp.load(state, checkpoint_id=str(Path(checkpoint) / SHARDED))


def load_sharded_optimizer(checkpoint: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    state = {"optimizer": get_optimizer_state_dict(model, optimizer)}
    dcp.load(state, checkpoint_id=str(Path(checkpoint) / SHARDED))
    set_optimizer_state_dict(model, optimizer, state["optimizer"])
