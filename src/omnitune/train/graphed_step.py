"""The trainer's micro-step as a CUDA graph (train/cuda_graph.py) for the batches that allow one.

Split: everything with host syncs or data-dependent shapes runs eagerly first, the "positions stage" (token
embeddings, the audio and vision towers or their stored outputs (data/encoder_cache.py) merged in, the M-RoPE
positions, the attention mask, padding up to a bucket length); the decoder stack, the chunked head + cross-entropy,
the weighted loss and the backward into the adapters run as one replayed graph, captured once per padded batch
shape. A media batch's stage writes stored tower outputs at the token positions the collator found on the host
(train/host_layout.py: nothing read back); otherwise a batch with images or video takes its stage from the Thinker's
own forward, stopped where it calls the language model (`decoder_inputs`). Either way its deepstack features enter
the graph as one dense [layers, B, L, H] input added where the forward would scatter them (`dense_deepstack`): the
same graphed decoder as a text batch, with no shape that depends on the number of visual tokens. The batch is padded
at the end to a multiple of `bucket` tokens (labels -100) so a run sees a handful of shapes, not one per batch;
causal attention hides that padding from the real tokens, so right-padded batches need no attention mask at all (and
get SDPA's fastest causal kernels).

Used when all of these hold, else the step runs eagerly (same results, up to bf16 rounding): CUDA; bf16/fp32 (no
fp16 grad scaler); the router's balance loss off; a plain linear head; nothing before the decoder trains (frozen
embeddings and towers: LoRA). The vocab projection and cross-entropy run on the trained positions only (the prompt
of an SFT sample is not projected onto the 152k vocabulary), their count padded up to a multiple of `bucket` so
that the graph's shapes stay static. A padded batch shape keeps the first such size it meets, and a later batch with
more trained positions than that projects every position: at most two graphs per shape (`head_rows`). Memory: the
graphs' pool keeps one step's activation working set reserved, so a run that mixes graphed batches with eager ones
holds both working sets.
"""
from __future__ import annotations

import logging

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from transformers.masking_utils import create_causal_mask

from omnitune.kernels.loss import chunked_linear_cross_entropy
from omnitune.model import parts
from omnitune.model.encoded_inputs import forward_inputs, has_encoded
from omnitune.tokens import IGNORE_INDEX
from omnitune.train.cuda_graph import GraphCaptureError, GraphedGrads
from omnitune.train.loss import weighted_loss
from omnitune.transfer import scalar

VISION_KEYS = ("pixel_values", "pixel_values_videos", "image_embeds", "video_embeds")
# what the backbone's forward takes from a batch (the rest: labels, weights, host counts, packing counts)
FORWARD_KEYS = ("input_ids", "attention_mask", "input_features", "feature_attention_mask", "pixel_values",
                "pixel_values_videos", "image_grid_thw", "video_grid_thw", "video_second_per_grid",
                "use_audio_in_video", "audio_embeds", "image_embeds", "image_deepstack", "video_embeds",
                "video_deepstack")
ALL_SDPA_BACKENDS = [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION,
                     SDPBackend.MATH]
MASKED_SDPA_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]

MASK_ARG = 8  # the graph's inputs (`prepare`): an attention mask comes last, when there is one

log = logging.getLogger("omnitune.graphed_step")


def trained_rows(labels: torch.Tensor, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows, their labels): the flat positions of labels[:, 1:] that train, in order, then untrained ones up to
    `size` rows (at least the trained count). Padding rows keep their IGNORE_INDEX label, so they add nothing."""
    y = labels[:, 1:].reshape(-1)
    rows = torch.sort((y == IGNORE_INDEX).to(torch.uint8), stable=True).indices[:size]  # trained positions first
    return rows, y[rows]


def static_token_losses(hidden: torch.Tensor, head_weight: torch.Tensor, labels: torch.Tensor,
                        rows: torch.Tensor, row_labels: torch.Tensor) -> torch.Tensor:
    """train/loss.token_losses with static shapes: the head and cross-entropy on `rows` (`trained_rows`) only,
    scattered back to [B, L-1] with zeros elsewhere (rows are distinct)."""
    h = hidden[:, :-1].reshape(-1, hidden.shape[-1])
    losses = chunked_linear_cross_entropy(h.index_select(0, rows), head_weight, row_labels)
    return losses.new_zeros(h.shape[0]).index_add_(0, rows, losses).view(labels.shape[0], -1)


class _LanguageModelCalled(Exception):
    def __init__(self, kwargs: dict):
        self.kwargs = kwargs


@torch.no_grad()
def decoder_inputs(backbone: torch.nn.Module, language_model: torch.nn.Module, batch: dict,
                   position_ids: torch.Tensor | None) -> dict:
    """The language model's keyword inputs (inputs_embeds, position_ids, visual_pos_masks, deepstack_visual_embeds,
    attention_mask) exactly as the Thinker's forward builds them for `batch`: that forward runs, towers (or their
    stored outputs) and M-RoPE positions included, and is stopped where it calls the language model. One definition
    of the merge and the positions: transformers'."""
    def stop(module, args, kwargs):
        raise _LanguageModelCalled(kwargs)

    handle = language_model.register_forward_pre_hook(stop, with_kwargs=True)
    try:
        backbone(**forward_inputs(backbone, {k: batch[k] for k in FORWARD_KEYS if k in batch}),
                 position_ids=position_ids, use_cache=False)
    except _LanguageModelCalled as called:
        return called.kwargs
    finally:
        handle.remove()
    raise RuntimeError("the Thinker's forward never called its language model")


def dense_deepstack(visual_pos_masks: torch.Tensor, features: list[torch.Tensor] | tuple) -> torch.Tensor:
    """[layers, B, L, H]: each deepstack layer's features at their visual positions, zeros elsewhere; adding it to
    the hidden states is the language model's scatter-add without a data-dependent shape."""
    dense = features[0].new_zeros(len(features), *visual_pos_masks.shape, features[0].shape[-1])
    dense[:, visual_pos_masks] = torch.stack(list(features))
    return dense


def _dense_or_scatter(scatter):
    """The language model's `_deepstack_process`, taking a dense `dense_deepstack` layer as a plain add."""
    def process(hidden_states, visual_pos_masks, visual_embeds):
        if visual_embeds.shape == hidden_states.shape:
            return hidden_states + visual_embeds.to(hidden_states.dtype)
        return scatter(hidden_states, visual_pos_masks, visual_embeds)
    return process


def pad_to_bucket(t: torch.Tensor, length: int, value: float, dim: int = -1) -> torch.Tensor:
    """Right-pad `t` along `dim` to `length` with `value`."""
    extra = length - t.shape[dim]
    if extra <= 0:
        return t
    shape = list(t.shape)
    shape[dim] = extra
    return torch.cat([t, t.new_full(shape, value)], dim=dim)


class GraphedTrainStep:
    """Decoder + loss + backward of a Thinker micro-batch as a CUDA graph per padded shape (module docstring)."""

    def __init__(self, thinker: torch.nn.Module, params: list[torch.nn.Parameter], bucket: int = 512,
                 max_graphs: int = 16, accumulating: bool = False):
        self.thinker = thinker
        # resolved once: the parts map's lookups walk the module tree, too slow for every micro-step
        self.backbone = parts.module(thinker, "backbone")
        self.language_model = parts.stack_model(thinker, "text")
        self.head = parts.module(thinker, "lm_head")
        self.trains_before_decoder = any(p.requires_grad for name in ("embed_tokens", "audio_tower", "vision_tower")
                                         for p in parts.module(thinker, name).parameters())
        if not hasattr(self.language_model._deepstack_process, "__wrapped_scatter__"):
            process = _dense_or_scatter(self.language_model._deepstack_process)
            process.__wrapped_scatter__ = True
            self.language_model._deepstack_process = process
        self.bucket = bucket
        self.graphs = GraphedGrads(self._loss, params, max_graphs=max_graphs, accumulating=accumulating)
        self.row_counts: dict[tuple[int, ...], int] = {}  # per padded batch shape: its one reduced head size
        self.sdpa_backends = ALL_SDPA_BACKENDS  # the attention kernels the last call allowed

    def eager_reason(self, inputs: dict) -> str | None:
        """Why this batch cannot replay the graph (None: it can). The plan rules out what the recipe decides
        (train/plan.py); what remains depends on the batch, or on weights a recipe's extra modules adapted."""
        head = self.head
        if not (torch.cuda.is_available() and inputs["input_ids"].is_cuda):
            return "the batch is not on a CUDA device"
        if not (type(head) is torch.nn.Linear and head.bias is None and not head.weight.requires_grad):
            return "the head is adapted or trains"
        if self.trains_before_decoder:
            return "weights before the decoder train (embeddings or a tower)"
        return None

    def _loss(self, embeds, position_ids, labels, weights, num_items, rows, row_labels, deepstack, mask=None):
        hidden = self.language_model(inputs_embeds=embeds, attention_mask=mask, position_ids=position_ids,
                                     deepstack_visual_embeds=list(deepstack) if deepstack.numel() else None,
                                     use_cache=False).last_hidden_state
        losses = static_token_losses(hidden, self.head.weight, labels, rows, row_labels)
        return weighted_loss(losses, labels, weights if weights.numel() else None, num_items)

    def head_rows(self, shape: tuple[int, ...], count: int) -> int:
        """How many rows the head projects for a padded batch `shape` with `count` trained positions: the count
        rounded up to the bucket, where it fits the one reduced size this shape has (set by its first batch), else
        every position. Each size is a graph of its own, so a shape has at most two, not one per count."""
        total = shape[0] * (shape[1] - 1)
        need = min(total, max(1, -(-count // self.bucket)) * self.bucket)
        reduced = self.row_counts.setdefault(shape, need)
        return reduced if need <= reduced else total

    @staticmethod
    def _index_keys(inputs: dict) -> list[str]:
        """The collator's media positions (train/host_layout.py) a batch of stored tower outputs needs; a batch
        without stored outputs gets a key no batch has (the towers run)."""
        if not has_encoded(inputs):
            return ["-"]
        return [f"{kind}_index" for kind in ("audio", "image", "video") if inputs.get(f"{kind}_embeds") is not None]

    @torch.no_grad()
    def _merge_at(self, inputs: dict) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Token embeddings with the stored tower outputs written at the collator's flat positions, and the dense
        deepstack [layers, B, L, H]: the forward's masked scatters, as `index_copy_` with host-known positions."""
        ids = inputs["input_ids"]
        embeds = self.backbone.get_input_embeddings()(ids)
        flat = embeds.view(-1, embeds.shape[-1])
        deep = None
        for kind in ("audio", "image", "video"):
            values = inputs.get(f"{kind}_embeds")
            if values is None:
                continue
            index = inputs[f"{kind}_index"]
            flat.index_copy_(0, index, values.to(flat.dtype))
            if kind != "audio":
                features = inputs[f"{kind}_deepstack"].to(flat.dtype).transpose(0, 1)  # [layers, tokens, H]
                if deep is None:
                    deep = flat.new_zeros(features.shape[0], flat.shape[0], flat.shape[1])
                deep.index_copy_(1, index, features)
        return embeds, None if deep is None else deep.view(deep.shape[0], *embeds.shape)

    @torch.no_grad()
    def _embed(self, inputs: dict) -> torch.Tensor:
        """Token embeddings with the audio tower's features (or their stored outputs) merged in, as the Thinker's
        own forward does, for a batch without images or video."""
        model = self.backbone
        ids = inputs["input_ids"]
        if inputs.get("audio_embeds") is not None:
            return forward_inputs(model, {"input_ids": ids, "audio_embeds": inputs["audio_embeds"]})["inputs_embeds"]
        embeds = model.get_input_embeddings()(ids)
        if inputs.get("input_features") is not None:
            audio = model.get_audio_features(inputs["input_features"], inputs.get("feature_attention_mask"),
                                             return_dict=True).last_hidden_state
            _, _, audio_mask = model.get_placeholder_mask(ids, inputs_embeds=embeds)
            embeds = embeds.masked_scatter(audio_mask, audio.to(embeds.device, embeds.dtype))
        return embeds

    def __call__(self, inputs: dict, position_ids: torch.Tensor | None,
                 num_items: torch.Tensor | int | None) -> torch.Tensor:
        """One micro-step; `position_ids` as the eager path would pass them (packed rows), else None.
        Gradients are accumulated into the adapters' .grad; returns the loss (a graph output: read it now)."""
        args = self.prepare(inputs, position_ids, num_items)
        # SDPA's cuDNN kernels are the fastest where they capture (the bench's causal batch of one), but some of
        # their backward calls broke a capture (cudaErrorStreamCaptureImplicit: a masked batch of one on H100, a
        # tiny-head causal one on H200). With a mask tensor they stay off; without one, a failed capture is tried
        # once more without them (a failed capture accumulates nothing). The context spans the whole call: the
        # checkpoint recompute in the backward must pick the same kernel as the forward.
        self.sdpa_backends = MASKED_SDPA_BACKENDS if len(args) > MASK_ARG else ALL_SDPA_BACKENDS
        try:
            with sdpa_kernel(self.sdpa_backends):
                loss, _ = self.graphs(*args)
        except GraphCaptureError as e:
            if self.sdpa_backends is MASKED_SDPA_BACKENDS:
                raise
            log.warning("CUDA graph capture failed with cuDNN attention allowed (%s); capturing without it", e)
            self.sdpa_backends = MASKED_SDPA_BACKENDS
            with sdpa_kernel(self.sdpa_backends):
                loss, _ = self.graphs(*args)
        return loss

    def prepare(self, inputs: dict, position_ids: torch.Tensor | None,
                num_items: torch.Tensor | int | None) -> list[torch.Tensor]:
        """The eager prefix: the graph's tensor inputs for this batch, padded to the bucket length. With the
        collator's host counts (`trained_tokens`, `right_padded`) nothing here waits for the GPU."""
        ids, labels = inputs["input_ids"], inputs["labels"]
        attention_mask = inputs.get("attention_mask")
        deepstack = None
        if position_ids is not None and all(inputs.get(k) is not None for k in self._index_keys(inputs)):
            embeds, deepstack = self._merge_at(inputs)  # the collator's layout: nothing read back
        elif any(inputs.get(k) is not None for k in VISION_KEYS):
            staged = decoder_inputs(self.backbone, self.language_model, inputs, position_ids)
            embeds, position_ids = staged["inputs_embeds"], staged["position_ids"]
            if staged.get("deepstack_visual_embeds") is not None:
                deepstack = dense_deepstack(staged["visual_pos_masks"], staged["deepstack_visual_embeds"])
        else:
            embeds = self._embed(inputs)
        if position_ids is None:
            # no images or video reach the graph: text and audio tokens take the text positions on all three M-RoPE
            # axes (get_rope_index's rule), from the mask's running count (padding: 1, as transformers sets it)
            if attention_mask is None:
                position_ids = torch.arange(ids.shape[1], device=ids.device).expand(3, *ids.shape)
            else:
                mask = attention_mask.long()
                position_ids = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1).expand(3, *ids.shape)
        length = -(-ids.shape[1] // self.bucket) * self.bucket
        embeds = pad_to_bucket(embeds, length, 0.0, dim=1)
        deepstack = (pad_to_bucket(deepstack, length, 0.0, dim=2) if deepstack is not None
                     else embeds.new_zeros(0))
        labels = pad_to_bucket(labels, length, IGNORE_INDEX)
        # Padding at the end of a row is invisible to that row's real tokens under causal attention, so it needs
        # no mask of its own: a right-padded batch (our collator's) runs as plain causal attention, the path the
        # bench measures, and a packed row's tail continues its last sample's positions (no extra sample).
        # The trained positions' count sizes the head's input (`trained_rows`): from the collator's host count, or
        # read back here with the right-padding test when there is a mask (one read-back for both).
        trained = (labels[:, 1:] != IGNORE_INDEX).sum()
        count, right_padded = inputs.get("trained_tokens"), inputs.get("right_padded")
        if attention_mask is None:
            step = torch.arange(1, length - ids.shape[1] + 1, device=ids.device, dtype=position_ids.dtype)
            position_ids = torch.cat([position_ids, position_ids[..., -1:] + step], dim=-1)
            count = int(trained) if count is None else count
        else:
            position_ids = pad_to_bucket(position_ids, length, 1)
            if count is None or right_padded is None:
                right_padded, count = torch.stack([(attention_mask[:, 1:] <= attention_mask[:, :-1]).all().long(),
                                                   trained]).tolist()
            attention_mask = None if right_padded else pad_to_bucket(attention_mask, length, 0)
        text_pos = position_ids[0] if position_ids.shape[0] == 4 else None
        # the mask the language model would build, built here: its checks read values back to the host
        mask = create_causal_mask(config=self.language_model.config, inputs_embeds=embeds,
                                  attention_mask=attention_mask, past_key_values=None, position_ids=text_pos)
        if mask is None and position_ids.shape[0] == 4:
            position_ids = position_ids[1:]  # plain causal: the text row would only make it look for packing again
        weights = inputs.get("sample_weight")
        weights = pad_to_bucket(weights, length, 0.0) if weights is not None and weights.dim() == 2 else weights
        weights = weights.float() if weights is not None else embeds.new_zeros(0, dtype=torch.float32)
        if num_items is None:
            num_items = trained
        elif not torch.is_tensor(num_items):
            num_items = scalar(num_items, embeds.device)
        num_items = num_items.to(embeds.device, torch.float32)
        rows, row_labels = trained_rows(labels, self.head_rows(tuple(labels.shape), count))
        args = [embeds, position_ids, labels, weights, num_items, rows, row_labels, deepstack]
        return args + ([mask] if mask is not None else [])
