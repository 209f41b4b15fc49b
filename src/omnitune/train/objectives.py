"""Training objectives: what a micro-batch's loss is. The trainer's loop, logging and checkpointing never know which.

An objective has three duties:
- `count(batch)`: how many items this micro-batch's loss sums over (trained tokens, speech frames, ...). The
  trainer adds the counts of an optimizer step's micro-batches (and across processes) into `num_items`, so that
  gradient accumulation gives the same update as one big batch.
- `loss(model, batch, num_items, micro_steps)`: the scalar to backpropagate, normalised by `num_items` (or by the
  batch's own count when None, as in evaluation).
- `graphed_step(model, params, bucket, accumulating)`: the micro-step as a replayable CUDA graph, or None where the
  objective has none (the trainer then runs it eagerly); `accumulating`: the trainer steps every several
  micro-steps, so every replay adds into the held gradients (train/cuda_graph.py).

`ThinkerLM` (the Thinker's next-token loss) and `TalkerCodec` (the Talker learns target speech, teacher-forced on
the frozen Thinker) are the objectives; the recipe's `train.objective` picks one (train/plan.py).
"""
from __future__ import annotations

from typing import Any, Protocol

import torch
from torch import nn
from torch.nn.attention import sdpa_kernel
from transformers.models.qwen3_omni_moe.modeling_qwen3_omni_moe import load_balancing_loss_func

from omnitune.data.collate import HOST_KEYS
from omnitune.errors import OmnituneError
from omnitune.model import parts
from omnitune.model.encoded_inputs import forward_inputs
from omnitune.tokens import IGNORE_INDEX
from omnitune.train.loss import token_losses, weighted_loss

PACKED_KEYS = ("seq_lengths", "image_counts", "video_counts", "audio_counts")


class Objective(Protocol):
    name: str

    def count(self, batch: dict[str, Any]) -> torch.Tensor | int: ...

    def loss(self, model: nn.Module, batch: dict[str, Any], num_items: torch.Tensor | int | None,
             micro_steps: int = 1) -> torch.Tensor: ...

    def graphed_step(self, model: nn.Module, params: list[nn.Parameter], bucket: int,
                     accumulating: bool = False) -> Any | None: ...


class ThinkerLM:
    """The Thinker's next-token loss (train/loss.py): each sample's token cross-entropy over its assistant tokens,
    weighted by its input modalities, summed and divided by the trained tokens of the whole optimizer step; plus the
    MoE router's balance loss x `router_aux_coef` when the router trains. `chunked`: the vocabulary projection and
    cross-entropy in chunks through the fused kernel (kernels/loss.py); else over full logits, as transformers does."""

    name = "thinker_lm"

    def __init__(self, router_aux_coef: float = 0.0, chunked: bool = True):
        self.router_aux_coef = router_aux_coef
        self.chunked = chunked
        self._parts: dict[int, tuple[nn.Module, nn.Module, nn.Module]] = {}

    def _resolve(self, model: nn.Module) -> tuple[nn.Module, nn.Module, nn.Module]:
        """(thinker, backbone, head) of `model`, looked up in the parts map once per model."""
        if id(model) not in self._parts:
            thinker = parts.thinker_of(model)
            self._parts[id(model)] = thinker, parts.module(thinker, "backbone"), parts.module(thinker, "lm_head")
        return self._parts[id(model)]

    def count(self, batch: dict[str, Any]) -> torch.Tensor | int:
        if "trained_tokens" in batch:  # the collator's host count: no read of the GPU
            return batch["trained_tokens"]
        return (batch["labels"][..., 1:] != IGNORE_INDEX).sum()

    def loss(self, model: nn.Module, batch: dict[str, Any], num_items: torch.Tensor | int | None,
             micro_steps: int = 1) -> torch.Tensor:
        return self.loss_and_outputs(model, batch, num_items, micro_steps)[0]

    def loss_and_outputs(self, model: nn.Module, batch: dict[str, Any], num_items: torch.Tensor | int | None,
                         micro_steps: int = 1) -> tuple[torch.Tensor, Any]:
        """The loss and the Thinker backbone's outputs (hidden states, router logits) it was computed from."""
        inputs = {k: v for k, v in batch.items() if k not in HOST_KEYS and k not in TALKER_KEYS}
        labels = inputs.pop("labels")
        sample_weight = inputs.pop("sample_weight", None)
        thinker, backbone, head = self._resolve(model)
        if "seq_lengths" in inputs:  # a packed row (data.packing): no attention_mask, positions per sample
            packed = [inputs.pop(k) for k in PACKED_KEYS]
            if "position_ids" not in inputs:  # else the collator computed them (train/host_layout.py)
                inputs["position_ids"] = packed_position_ids(backbone, inputs, *packed)
        inputs = forward_inputs(backbone, inputs)  # stored tower outputs, when the batch has them
        want_router = self.router_aux_coef > 0 and model.training
        out = backbone(**inputs, output_router_logits=want_router, use_cache=False)
        losses = token_losses(out.last_hidden_state, head, labels, fused=self.chunked)
        loss = weighted_loss(losses, labels, sample_weight, num_items if model.training else None)
        if want_router:
            aux = load_balancing_loss_func(out.router_logits, thinker.num_experts, thinker.num_experts_per_tok,
                                           inputs.get("attention_mask"))
            # The aux term is per micro-batch: scale it so gradient accumulation sums to one coefficient.
            loss = loss + self.router_aux_coef * aux.to(loss.device) / micro_steps
        return loss, out

    def graphed_step(self, model: nn.Module, params: list[nn.Parameter], bucket: int, accumulating: bool = False):
        from omnitune.train.graphed_step import GraphedTrainStep

        return GraphedTrainStep(parts.thinker_of(model), params, bucket=bucket, accumulating=accumulating)


class TalkerCodec:
    """The Talker's speech loss, teacher-forced exactly as generate() runs it (model/talker_inputs.py): the frozen
    Thinker's token embeddings and layer-k states for the same conversation (no gradient), then the Talker and its
    code predictor in one pass each. Per frame: CE(codebook 0, the end of speech included) + `code_predictor_weight`
    x the mean CE of the code predictor's codebooks 1..15; summed and divided by the frames (+1 end of speech per
    sample) of the whole optimizer step. `speaker_ids`: name -> codec-embedding row (model/speakers.py)."""

    name = "talker_codec"

    def __init__(self, speaker_ids: dict[str, int], default_speaker: str, code_predictor_weight: float = 0.3):
        self.speaker_ids = speaker_ids
        self.default_speaker = default_speaker
        self.code_predictor_weight = code_predictor_weight

    def count(self, batch: dict[str, Any]) -> torch.Tensor | int:
        """Codebook-0 targets: every frame and each sample's end of speech (`speech_frames` is a host tensor)."""
        if "speech_frames" not in batch:
            return 0  # `sums` says what is wrong
        return int(batch["speech_frames"].sum()) + len(batch["speech_frames"])

    def loss(self, model: nn.Module, batch: dict[str, Any], num_items: torch.Tensor | int | None,
             micro_steps: int = 1) -> torch.Tensor:
        ce0, ce_cp = self.sums(model, batch)
        items = num_items if model.training and num_items is not None else self.count(batch)
        return (ce0 + self.code_predictor_weight * ce_cp) / items

    def sums(self, model: nn.Module, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        """(codebook-0 CE summed over the batch's frames and ends of speech, code-predictor CE summed over its
        frames, each frame's averaged over the codebooks), fp32 (model/talker_inputs.py `talker_losses`)."""
        from omnitune.train.graphed_step import MASKED_SDPA_BACKENDS

        if "speech_frames" not in batch:
            raise OmnituneError("train.objective=talker_codec: a batch without target speech; give each record's "
                             "last assistant turn its speech as an audio item")
        # Not cuDNN's attention: it builds an execution plan on the host for every new shape, and the Talker's
        # length follows the speech (H200, bench_talker: 1.6 ms of host time per call, 49 calls a step, ~120 ms
        # of a 493 ms step whose GPU work is ~46 ms). The backward uses the kernel the forward chose.
        with sdpa_kernel(MASKED_SDPA_BACKENDS):
            return self._sums(model, batch)

    def _sums(self, model: nn.Module, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        from omnitune.model.talker_inputs import build_talker_inputs, talker_forward, talker_losses, thinker_states

        base = parts.unwrap(model)
        inputs = {k: v for k, v in batch.items() if k not in HOST_KEYS and k not in TALKER_KEYS}
        inputs.pop("labels", None)
        inputs.pop("sample_weight", None)
        ids, mask = inputs["input_ids"], inputs["attention_mask"]
        embeds, hidden = thinker_states(base.thinker, inputs, base.config.talker_config.accept_hidden_layer)
        frames = batch["speech_frames"].tolist()
        codes = [c[:t] for c, t in zip(batch["speech_codes"], frames)]
        talker_inputs = build_talker_inputs(base, ids, mask, embeds, hidden, codes,
                                            [self.speaker_ids[s or self.default_speaker] for s in batch["speakers"]])
        fmask = inputs.get("feature_attention_mask")
        media = {k: inputs[k] for k in ("image_grid_thw", "video_grid_thw", "video_second_per_grid",
                                        "use_audio_in_video") if k in inputs}
        if fmask is not None:
            media["audio_feature_lengths"] = fmask.sum(-1)
        return talker_losses(talker_forward(base.talker, talker_inputs, media), talker_inputs)

    def graphed_step(self, model: nn.Module, params: list[nn.Parameter], bucket: int, accumulating: bool = False):
        return None  # the Talker's sequence length follows the speech: no fixed shapes to capture


# What a speech batch carries for TalkerCodec beside the Thinker's inputs (data/collate.py).
TALKER_KEYS = ("speech_codes", "speech_frames", "speakers")


def packed_position_ids(backbone: nn.Module, batch: dict, seq_lengths: torch.Tensor, image_counts: torch.Tensor,
                        video_counts: torch.Tensor, audio_counts: torch.Tensor) -> torch.Tensor:
    """(4, 1, N) positions of a packed row (data/collate.py): per sample, row 0 its text positions 0..L-1 (where
    attention finds the sample boundaries) and rows 1-3 the M-RoPE t/h/w that `get_rope_index` gives it alone, from
    its own grids and audio lengths, exactly as in a padded batch. Float, as get_rope_index's: video times can be
    fractional (13 * seconds per grid), which data/packing.py's integer positions would truncate. `backbone`: the
    Thinker's multimodal model (parts map: "backbone"), whose `get_rope_index` gives the M-RoPE positions."""
    fmask = batch.get("feature_attention_mask")
    images = _per_sample(batch.get("image_grid_thw"), image_counts)
    videos = _per_sample(batch.get("video_grid_thw"), video_counts)
    seconds = _per_sample(batch.get("video_second_per_grid"), video_counts)
    audios = _per_sample(None if fmask is None else fmask.sum(-1), audio_counts)
    rows = []
    for i, ids in enumerate(batch["input_ids"][0].cpu().split(seq_lengths.tolist())):
        text = torch.arange(len(ids), dtype=torch.float32)
        if image_counts[i] or video_counts[i]:
            mrope = backbone.get_rope_index(ids[None], images[i], videos[i], torch.ones_like(ids[None]),
                                            bool(batch.get("use_audio_in_video")), audios[i], seconds[i])[0][:, 0]
        else:  # text and audio alone: get_rope_index gives them the text positions on all three axes
            mrope = text.expand(3, -1)
        rows.append(torch.cat([text[None], mrope.float()]))
    return torch.cat(rows, dim=1)[:, None].to(batch["input_ids"].device)


def _per_sample(values: torch.Tensor | None, counts: torch.Tensor) -> list[torch.Tensor | None]:
    """Split media rows concatenated in sample order (grids, clip lengths) back into each sample's own."""
    return [None] * len(counts) if values is None else list(values.cpu().split(counts.tolist()))
