"""HF Trainer glue: the objective's loss (train/objectives.py), the plan's CUDA-graph micro-step, and checkpoints
that are never seen half-written. The loop, schedules, logging and checkpoints are HF's; what a step computes is the
objective's; which path it takes is the plan's (train/plan.py)."""

from __future__ import annotations

import math
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from transformers import Trainer
from transformers.trainer import SCHEDULER_NAME
from transformers.trainer_pt_utils import LengthGroupedSampler
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, rotate_checkpoints
from transformers.utils import logging

from omnitune.train.cuda_graph import GraphCaptureError
from omnitune.train.distributed import forward_owner, full_trained_state, is_sharded_tensor, zero3_external_head
from omnitune.train.distributed_checkpoint import load_sharded_model, load_sharded_optimizer, save_sharded
from omnitune.train.guard import NonFiniteGuard
from omnitune.train.objectives import PACKED_KEYS, Objective, packed_position_ids
from omnitune.train.optimizer import MultiTensorAdamW, OptimizerInBackward, kernel_applies, low_memory_optimizer
from omnitune.train.plan import TrainingPlan
from omnitune.transfer import scalar

logger = logging.get_logger(__name__)


class OmniTrainer(Trainer):
    """HF's Trainer whose micro-step is the objective's loss, replayed as a CUDA graph where the plan allows."""

    def __init__(self, *args: Any, objective: Objective, plan: TrainingPlan | None = None,
                 guard: NonFiniteGuard | None = None, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.objective = objective
        self.plan = plan
        self.guard = guard
        self._window_loss: torch.Tensor | None = None  # the optimizer step's loss so far (micro-steps summed)
        self._good_loss: torch.Tensor | None = None  # since the last log: [loss of finite steps, their count]
        self._flop_params: int | None = None
        self.graphs_on = plan is not None and plan.cuda_graphs
        self.graphed = None  # built at the first step: the optimizer's params are known then
        self.eager_micro_steps = 0  # with graphs on: micro-steps that ran eagerly, and why (logged once each)
        self.eager_reasons: set[str] = set()
        # The objective's loss is already normalised by the items (trained tokens) of the whole optimizer step.
        self.model_accepts_loss_kwargs = True
        self.loss_is_scaled_for_ga = True
        self._head_registered = False
        if plan is not None and plan.strategy == "fsdp2":
            # the model was sharded by train/distributed.py and reduces its own gradients: no DDP wrapper on top
            self.is_distributed_loading_by_transformers = True

    @staticmethod
    def get_optimizer_cls_and_kwargs(args, model=None) -> tuple[Any, Any]:
        """HF's choice, except that torch's AdamW over CUDA fp32 adapters becomes MultiTensorAdamW: the same
        update and state in one Triton launch (train/optimizer.py). The plan picks HF's default instead for the
        plain path (`OmniTrainer.create_optimizer`)."""
        cls, kwargs = Trainer.get_optimizer_cls_and_kwargs(args, model)
        if cls is torch.optim.AdamW and model is not None and kernel_applies(
                p for p in model.parameters() if p.requires_grad):
            return MultiTensorAdamW, kwargs
        return cls, kwargs

    def _get_train_sampler(self, train_dataset=None):
        """HF's sampler; the length-grouped one takes the lengths from the data cache's manifest instead of reading
        every sample (HF's fallback for datasets that are not `datasets.Dataset`)."""
        dataset = train_dataset if train_dataset is not None else self.train_dataset
        if self.args.train_sampling_strategy == "group_by_length" and hasattr(dataset, "lengths"):
            return LengthGroupedSampler(self.args.train_batch_size * self.args.gradient_accumulation_steps,
                                        lengths=dataset.lengths)
        return super()._get_train_sampler(train_dataset)

    def create_optimizer(self, model=None):
        optimizer = self._create_optimizer(model)
        if self.guard is not None:
            self.guard.attach(optimizer)
        return optimizer

    def _create_optimizer(self, model=None):
        plan = self.plan
        if plan is not None and self.optimizer is None and (plan.optimizer_in_backward or plan.optimizer in (
                "adamw8bit", "adamw4bit", "adamw_cpu")):
            _, kwargs = Trainer.get_optimizer_cls_and_kwargs(self.args, self.model)
            self.optimizer = low_memory_optimizer(
                plan.optimizer, self._parameter_groups(), lr=kwargs["lr"], betas=kwargs["betas"], eps=kwargs["eps"],
                device=plan.hardware.device, offload_gradients=self.args.gradient_accumulation_steps == 1,
                in_backward=plan.optimizer_in_backward)
            if plan.optimizer_in_backward:
                self.optimizer = OptimizerInBackward(self.optimizer)
            return self.optimizer
        if self.plan is not None and self.plan.optimizer == "hf_default" and self.optimizer is None:
            cls, kwargs = Trainer.get_optimizer_cls_and_kwargs(self.args, self.model)
            self.optimizer = cls(self._parameter_groups(), **kwargs)
            return self.optimizer
        return super().create_optimizer(model)

    def _parameter_groups(self) -> list[dict]:
        """HF's two groups: weights that decay, and those that don't (biases, norms)."""
        decay = self.get_decay_parameter_names(self.model)
        return [{"params": [p for n, p in self.model.named_parameters() if p.requires_grad and n in decay],
                 "weight_decay": self.args.weight_decay},
                {"params": [p for n, p in self.model.named_parameters() if p.requires_grad and n not in decay],
                 "weight_decay": 0.0}]

    def _get_num_items_in_batch(self, batch_samples: list, device: torch.device) -> torch.Tensor | None:
        """The objective's items (trained tokens) of an optimizer step's micro-batches, summed over processes."""
        if not batch_samples:
            return None
        count = sum(self.objective.count(b) for b in batch_samples)
        count = count.to(device) if torch.is_tensor(count) else scalar(count, device, torch.int64)
        if self._items_are_global(count):
            count = self.accelerator.gather(count).sum()
        return count

    def floating_point_ops(self, inputs: dict[str, Any]) -> int:
        """HF's estimate (6 x tokens x non-embedding parameters), with the parameters counted once: HF walks every
        parameter each micro-step (16 ms per step on the 48-layer Thinker, issue 22)."""
        if self._flop_params is None:
            self._flop_params = self.model.num_parameters(exclude_embeddings=True)
        return 6 * inputs["input_ids"].numel() * self._flop_params

    def training_step(self, model, inputs, num_items_in_batch=None):
        loss = self._micro_step(model, inputs, num_items_in_batch)
        self._window_loss = loss if self._window_loss is None else self._window_loss + loss
        return loss

    def _get_grad_norm(self, model, grad_norm=None):
        """HF's gradient norm (computed by clipping), and the guard's look at it: every optimizer step."""
        grad_norm = super()._get_grad_norm(model, grad_norm)
        if torch.is_tensor(grad_norm) and is_sharded_tensor(grad_norm):
            grad_norm = grad_norm.full_tensor()  # FSDP2: the norm over every process's shards
        if self.guard is not None and torch.is_tensor(grad_norm):
            bad = self.guard.observe(grad_norm, self._window_loss)
            if self._window_loss is not None:
                good = 1 - bad.float()
                acc = torch.stack([self._window_loss.detach().float().nan_to_num(0.0, 0.0, 0.0) * good, good,
                                   torch.ones_like(good)])
                self._good_loss = acc if self._good_loss is None else self._good_loss + acc
            if not self.guard.on_device:
                self.guard.check(self.state.global_step + 1)  # the optimizer reads the flag on the host anyway
        self._window_loss = None
        return grad_norm

    def _maybe_log_save_evaluate(self, tr_loss, grad_norm, model, *args, **kwargs):
        if self.guard is not None and (self.control.should_log or self.control.should_save
                                       or self.control.should_training_stop):
            self.guard.check(self.state.global_step)  # where the host reads the GPU anyway
        return super()._maybe_log_save_evaluate(tr_loss, grad_norm, model, *args, **kwargs)

    def log(self, logs: dict[str, float], *args, **kwargs) -> None:
        """HF's log, except that a training loss with skipped (non-finite) steps in its window is the mean over the
        window's finite steps (NaN when none was, never a 0.0), with the count of skipped steps beside it."""
        if "loss" in logs and self._good_loss is not None:
            total, good, steps = self._good_loss.tolist()
            if not math.isfinite(logs["loss"]):
                logs["loss"] = total / good if good else float("nan")
            if steps > good:
                logs["skipped_steps"] = int(steps - good)
            self._good_loss = None
        super().log(logs, *args, **kwargs)

    def _micro_step(self, model, inputs, num_items_in_batch=None):
        """A CUDA-graph replay of the micro-step where the plan and the batch allow one, else HF's eager step."""
        if not self.graphs_on:
            return super().training_step(model, inputs, num_items_in_batch)
        inputs = self._prepare_inputs(inputs)
        if self.graphed is None:
            params = [p for p in model.parameters() if p.requires_grad]
            self.graphed = self.objective.graphed_step(self.accelerator.unwrap_model(model), params,
                                                       self.plan.graph_bucket,
                                                       accumulating=self.args.gradient_accumulation_steps > 1)
        reason = "the objective has no graphed step" if self.graphed is None else self.graphed.eager_reason(inputs)
        if reason is not None:
            return self._eager_step(model, inputs, num_items_in_batch, reason)
        model.train()
        batch = dict(inputs)
        position_ids = batch.pop("position_ids", None)  # the collator's, computed on the host (train/host_layout.py)
        if "seq_lengths" in batch:
            packed = [batch.pop(k) for k in PACKED_KEYS]
            if position_ids is None:
                position_ids = packed_position_ids(self.graphed.backbone, batch, *packed)
        try:
            with self.compute_loss_context_manager():
                loss = self.graphed(batch, position_ids, num_items_in_batch)
        except GraphCaptureError as e:
            logger.warning(f"{e}; training continues without CUDA graphs")
            self.graphs_on = False
            return self._eager_step(model, inputs, num_items_in_batch, "a capture failed")
        return loss.detach().clone()

    def _eager_step(self, model, inputs, num_items_in_batch, reason: str):
        self.eager_micro_steps += 1
        if reason not in self.eager_reasons:
            self.eager_reasons.add(reason)
            logger.warning(f"CUDA graphs: a micro-step runs eagerly: {reason}")
        return super().training_step(model, inputs, num_items_in_batch)

    def graph_summary(self) -> str | None:
        """One line on how the micro-steps ran, when CUDA graphs were on (None otherwise)."""
        if self.graphed is None:
            return None
        g = self.graphed.graphs
        why = f" ({'; '.join(sorted(self.eager_reasons))})" if self.eager_reasons else ""
        return (f"CUDA graphs: {len(g.graphs)} captured, {g.replays} micro-steps replayed, "
                f"{self.eager_micro_steps + g.eager_calls} eager{why}")

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        steps = getattr(self, "current_gradient_accumulation_steps", self.args.gradient_accumulation_steps)
        owner = forward_owner(model)
        if owner is not None:
            # Through the engine (DDP, FSDP2, DeepSpeed), so that its hooks (the gradient all-reduce, gathering
            # sharded parameters) are armed for this forward and backward: the objective runs as the forward of
            # the module the engine hooks, for the length of this call.
            if self.plan is not None and self.plan.strategy == "zero3" and not self._head_registered:
                zero3_external_head(owner)
                self._head_registered = True

            def forward(**batch):
                return self.objective.loss(owner, batch, num_items_in_batch, steps)

            owner.forward = forward  # an instance attribute shadows the class's forward
            try:
                loss = model(**inputs)
            finally:
                del owner.forward
        else:
            loss = self.objective.loss(model, inputs, num_items_in_batch, steps)
        if self._items_are_global(num_items_in_batch):
            # The loss is over this process's items divided by every process's: the engines (DDP, FSDP,
            # DeepSpeed) average gradients over processes, so each process's share is scaled back up by their
            # number, and the update is that of one process training on the concatenated batch.
            loss = loss * self.args.world_size
        return (loss, {}) if return_outputs else loss

    def _items_are_global(self, num_items_in_batch) -> bool:
        """Whether `num_items_in_batch` counts the items of every process (`_get_num_items_in_batch`)."""
        return (num_items_in_batch is not None and self.args.average_tokens_across_devices
                and self.args.world_size > 1)

    @property
    def _fsdp2(self) -> bool:
        return self.plan is not None and self.plan.strategy == "fsdp2"

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """FSDP2 (sharded by us, unknown to HF): the weights gathered into one adapter (or model) that eval, infer
        and export read as a one-GPU run's; every process joins the gathering, the main process writes."""
        if not self._fsdp2:
            return super().save_model(output_dir, _internal_call)
        adapter = hasattr(self.model, "peft_config")  # LoRA: the trained parameters are the adapter
        state = full_trained_state(self.model, self.plan, trainable_only=adapter)
        self._save(output_dir or self.args.output_dir, state_dict=state)

    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        if self._fsdp2:
            save_sharded(output_dir, self.model, self.optimizer)  # train/distributed_checkpoint.py
            if self.args.should_save:
                torch.save(self.lr_scheduler.state_dict(), os.path.join(output_dir, SCHEDULER_NAME))
            return
        super()._save_optimizer_and_scheduler(output_dir)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        if self._fsdp2:
            return load_sharded_model(resume_from_checkpoint, self.model)
        return super()._load_from_checkpoint(resume_from_checkpoint, model)

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        if self._fsdp2 and checkpoint is not None:
            load_sharded_optimizer(checkpoint, self.model, self.optimizer)
            self.lr_scheduler.load_state_dict(torch.load(os.path.join(checkpoint, SCHEDULER_NAME), weights_only=True))
            return
        super()._load_optimizer_and_scheduler(checkpoint)

    def _save_checkpoint(self, model, trial):
        """Write checkpoint-N in a staging dir, then rename it into place: a crash never leaves a partial one."""
        final_root = Path(self._get_output_dir(trial=trial))
        staging = final_root / ".staging"
        if self.args.should_save:
            shutil.rmtree(staging, ignore_errors=True)
        self.accelerator.wait_for_everyone()  # every process writes into staging (RNG states per rank)
        original = self._get_output_dir
        self._get_output_dir = lambda trial=None: str(staging)  # type: ignore[method-assign]
        try:
            super()._save_checkpoint(model, trial)
        finally:
            self._get_output_dir = original  # type: ignore[method-assign]
        self.accelerator.wait_for_everyone()  # ... and has finished before the main process renames it
        if self.args.should_save:
            name = f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
            target = final_root / name
            if target.exists():
                shutil.rmtree(target)
            os.replace(staging / name, target)
            shutil.rmtree(staging, ignore_errors=True)
            rotate_checkpoints(output_dir=str(final_root), save_total_limit=self.args.save_total_limit,
                               best_model_checkpoint=self.state.best_model_checkpoint, use_mtime=False)
        self.accelerator.wait_for_everyone()
