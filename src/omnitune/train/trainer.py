"""HF Trainer glue: our loss (train/loss.py) and checkpoints that are never seen half-written."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import torch
from peft import PeftModel
from torch.nn.parallel import DistributedDataParallel
from transformers import Trainer, TrainerCallback
from transformers.models.qwen3_omni_moe.modeling_qwen3_omni_moe import load_balancing_loss_func
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, rotate_checkpoints
from transformers.utils import logging

from omnitune.kernels.checkpointing import auto_uncheckpointed_layers, decoder_layers, keep_activations
from omnitune.kernels.cuda_graph import GraphCaptureError
from omnitune.train.graphed_step import GraphedTrainStep
from omnitune.train.loss import token_losses, weighted_loss
from omnitune.train.optimizer import MultiTensorAdamW, kernel_applies

logger = logging.get_logger(__name__)


def thinker_of(model: torch.nn.Module) -> torch.nn.Module:
    """The Qwen3OmniMoeThinkerForConditionalGeneration inside a PeftModel (LoRA layers stay injected)."""
    return model.get_base_model() if isinstance(model, PeftModel) else model


PACKED_KEYS = ("seq_lengths", "image_counts", "video_counts", "audio_counts")


def packed_position_ids(thinker_model: torch.nn.Module, batch: dict, seq_lengths: torch.Tensor,
                        image_counts: torch.Tensor, video_counts: torch.Tensor,
                        audio_counts: torch.Tensor) -> torch.Tensor:
    """(4, 1, N) positions of a packed row (data/collate.py): per sample, row 0 its text positions 0..L-1 (where
    attention finds the sample boundaries) and rows 1-3 the M-RoPE t/h/w that `get_rope_index` gives it alone, from
    its own grids and audio lengths, exactly as in a padded batch. Float, as get_rope_index's: video times can be
    fractional (13 * seconds per grid), which kernels/packing.py's integer positions would truncate."""
    fmask = batch.get("feature_attention_mask")
    images = _per_sample(batch.get("image_grid_thw"), image_counts)
    videos = _per_sample(batch.get("video_grid_thw"), video_counts)
    seconds = _per_sample(batch.get("video_second_per_grid"), video_counts)
    audios = _per_sample(None if fmask is None else fmask.sum(-1), audio_counts)
    rows = []
    for i, ids in enumerate(batch["input_ids"][0].cpu().split(seq_lengths.tolist())):
        text = torch.arange(len(ids), dtype=torch.float32)
        if image_counts[i] or video_counts[i]:
            mrope = thinker_model.get_rope_index(ids[None], images[i], videos[i], torch.ones_like(ids[None]),
                                                 bool(batch.get("use_audio_in_video")), audios[i], seconds[i])[0][:, 0]
        else:  # text and audio alone: get_rope_index gives them the text positions on all three axes
            mrope = text.expand(3, -1)
        rows.append(torch.cat([text[None], mrope.float()]))
    return torch.cat(rows, dim=1)[:, None].to(batch["input_ids"].device)


def _per_sample(values: torch.Tensor | None, counts: torch.Tensor) -> list[torch.Tensor | None]:
    """Split media rows concatenated in sample order (grids, clip lengths) back into each sample's own."""
    return [None] * len(counts) if values is None else list(values.cpu().split(counts.tolist()))


class OmniTrainer(Trainer):
    """Trainer whose loss is modality-weighted token CE (+ router balance loss when the router trains)."""

    def __init__(self, *args: Any, router_aux_coef: float = 0.0, graph_bucket: int | None = None, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.router_aux_coef = router_aux_coef
        self.graph_bucket = graph_bucket
        self.graphed: GraphedTrainStep | None = None  # built at the first step: the optimizer's params are known
        self.eager_micro_steps = 0  # with graphs on: micro-steps that ran eagerly (images/video, router, ...)
        # Our loss is already normalised by the trained tokens of the whole optimizer step.
        self.model_accepts_loss_kwargs = True
        self.loss_is_scaled_for_ga = True

    @staticmethod
    def get_optimizer_cls_and_kwargs(args, model=None) -> tuple[Any, Any]:
        """HF's choice, except that torch's AdamW over CUDA fp32 adapters becomes MultiTensorAdamW: the same
        update and state in one Triton launch (train/optimizer.py)."""
        cls, kwargs = Trainer.get_optimizer_cls_and_kwargs(args, model)
        if cls is torch.optim.AdamW and model is not None and kernel_applies(
                p for p in model.parameters() if p.requires_grad):
            return MultiTensorAdamW, kwargs
        return cls, kwargs

    def training_step(self, model, inputs, num_items_in_batch=None):
        """A CUDA-graph replay of the micro-step where the batch allows one (train/graphed_step.py), else HF's."""
        if self.graph_bucket is None:
            return super().training_step(model, inputs, num_items_in_batch)
        thinker = thinker_of(self.accelerator.unwrap_model(model))
        inputs = self._prepare_inputs(inputs)
        if self.graphed is None:
            params = [p for p in model.parameters() if p.requires_grad]
            self.graphed = GraphedTrainStep(thinker, params, bucket=self.graph_bucket)
        if not self.graphed.applies(inputs, want_router=self.router_aux_coef > 0):
            self.eager_micro_steps += 1
            return super().training_step(model, inputs, num_items_in_batch)
        model.train()
        inputs_before, inputs = inputs, dict(inputs)
        position_ids = None
        if "seq_lengths" in inputs:
            position_ids = packed_position_ids(thinker.model, inputs, *[inputs.pop(k) for k in PACKED_KEYS])
        try:
            with self.compute_loss_context_manager():
                loss = self.graphed(inputs, position_ids, num_items_in_batch)
        except GraphCaptureError as e:
            logger.warning(f"{e}; training continues without CUDA graphs")
            self.graph_bucket = None
            self.eager_micro_steps += 1
            return super().training_step(model, inputs_before, num_items_in_batch)
        return loss.detach().clone()

    def graph_summary(self) -> str | None:
        """One line on how the micro-steps ran, when CUDA graphs were on (None otherwise)."""
        if self.graphed is None:
            return None
        g = self.graphed.graphs
        return (f"CUDA graphs: {len(g.graphs)} captured, {g.replays} micro-steps replayed, "
                f"{self.eager_micro_steps + g.eager_calls} eager")

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if isinstance(model, DistributedDataParallel):
            # Through the DDP wrapper, so that its gradient all-reduce is armed for this backward: our loss runs
            # as the wrapped module's forward for the length of this call.
            outputs: dict[str, Any] = {}

            def forward(**batch):
                loss, outputs["out"] = self._loss(model.module, batch, num_items_in_batch)
                return loss

            model.module.forward = forward  # an instance attribute shadows the class's forward
            try:
                loss = model(**inputs)
            finally:
                del model.module.forward
            return (loss, outputs["out"]) if return_outputs else loss
        loss, out = self._loss(model, inputs, num_items_in_batch)
        return (loss, out) if return_outputs else loss

    def _loss(self, model, inputs, num_items_in_batch):
        """(loss, Thinker outputs) of one batch: weighted token CE (+ router balance loss when it trains)."""
        inputs = dict(inputs)
        labels = inputs.pop("labels")
        sample_weight = inputs.pop("sample_weight", None)
        thinker = thinker_of(self.accelerator.unwrap_model(model))
        if "seq_lengths" in inputs:  # a packed row (data.packing): no attention_mask, positions per sample
            packed = [inputs.pop(k) for k in PACKED_KEYS]
            inputs["position_ids"] = packed_position_ids(thinker.model, inputs, *packed)
        want_router = self.router_aux_coef > 0 and model.training
        out = thinker.model(**inputs, output_router_logits=want_router, use_cache=False)
        loss = weighted_loss(token_losses(out.last_hidden_state, thinker.lm_head, labels), labels,
                             sample_weight, num_items_in_batch if model.training else None)
        if want_router:
            aux = load_balancing_loss_func(out.router_logits, thinker.num_experts, thinker.num_experts_per_tok,
                                           inputs.get("attention_mask"))
            # The aux term is per micro-batch: scale it so gradient accumulation sums to one coefficient.
            steps = getattr(self, "current_gradient_accumulation_steps", self.args.gradient_accumulation_steps)
            loss = loss + self.router_aux_coef * aux.to(loss.device) / steps
        return loss, out

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


class MetricsLog(TrainerCallback):
    """Appends every log (loss, lr, eval_loss, ...) to RUN/metrics.jsonl, the run's curve for eval plots."""

    def __init__(self, path: Path):
        self.path = path

    def on_train_begin(self, args, state, control, **kwargs):
        # On resume, drop entries past the checkpoint so the file is one clean curve.
        if self.path.exists():
            kept = [ln for ln in self.path.read_text().splitlines()
                    if ln.strip() and json.loads(ln).get("step", 0) <= state.global_step]
            self.path.write_text("".join(ln + "\n" for ln in kept))

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_world_process_zero and logs:
            entry = {"step": state.global_step, "epoch": state.epoch, **logs}
            with self.path.open("a") as f:
                f.write(json.dumps(entry) + "\n")


class KeepActivations(TrainerCallback):
    """Takes checkpointing off the last `layers` decoder layers once the Trainer has switched it on for all of them
    (it does so inside train(), before on_train_begin). "auto": as many as the GPU's memory holds at `tokens`
    tokens per micro-batch (kernels/checkpointing.auto_uncheckpointed_layers); none on CPU."""

    def __init__(self, layers: int | Literal["auto"], tokens: int, report: Callable[[str], object] = print):
        self.layers, self.tokens, self.report = layers, tokens, report

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        stack = decoder_layers(model)
        if not any(getattr(layer, "gradient_checkpointing", False) for layer in stack):
            return
        layers = self.layers
        if layers == "auto":
            if next(model.parameters()).device.type != "cuda":
                return
            plan = auto_uncheckpointed_layers(model, self.tokens, replicas=args.world_size)
            layers = plan.layers
            self.report(f"activations: the last {layers} of {len(stack)} layers skip checkpointing "
                        f"({plan.per_layer_bytes / 2**30:.2f} GiB each at {self.tokens} tokens, "
                        f"{plan.headroom_bytes / 2**30:.1f} GiB free for them)")
        keep_activations(model, layers)
