"""Selective activation checkpointing for the Thinker: keep the few activations that are costly to recompute.

Full per-layer checkpointing reruns every op of a decoder layer in the backward. With
`gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False,
"context_fn": selective_checkpoint_context()})` the recompute reuses the saved outputs of the ops named by the
policy instead. Default policy: the attention kernel's outputs (its [tokens, heads*128] output + log-sum-exp,
~33 MB per layer at 4096 tokens, ~1.6 GB for 48 layers) are kept; everything else (norms, rope, projections,
the MoE block, whose activations are ~0.4 GB per layer at 4096 tokens) is recomputed. `save_matmuls=True` also keeps
the dense GEMM outputs (attention projections, router, ~70 MB per layer): more memory, less recompute.
Measured (H100, 4096 tokens, CUDA graph): the attention-output policy 2.7% faster for +0.9 GiB; opt-in.

`keep_activations(model, n)`: the last n decoder layers skip checkpointing altogether (no recompute), for the
memory left over. Measured on an H100 at 4096 tokens (bench/: `+keepN`, `+nockpt`): 0.375 GiB per layer kept;
bf16 LoRA with 16 layers kept 8.3% faster at 73.4 GiB (24 ran out of memory); QLoRA without any checkpointing
48.0 GiB. `auto_uncheckpointed_layers(model, tokens)` picks n from the GPU's memory: it measures what one layer
keeps (`layer_activation_bytes`) and leaves room for gradients, AdamW states and the step's own peak.
"""
from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts

from omnitune.model import parts

_aten = torch.ops.aten
ATTENTION_OPS = tuple(
    getattr(_aten, name)
    for name in (
        "_scaled_dot_product_flash_attention",
        "_scaled_dot_product_cudnn_attention",
        "_scaled_dot_product_efficient_attention",
        "_scaled_dot_product_flash_attention_for_cpu",
    )
    if hasattr(_aten, name)
)
MATMUL_OPS = (_aten.mm, _aten.addmm, _aten.bmm)


def thinker_policy(save_matmuls: bool = False):
    """The policy function: MUST_SAVE for attention (and optionally dense GEMM) outputs, recompute the rest."""
    saved = {op.default if hasattr(op, "default") else op for op in ATTENTION_OPS}
    if save_matmuls:
        saved |= {op.default for op in MATMUL_OPS}

    def policy(ctx, op, *args, **kwargs):
        return CheckpointPolicy.MUST_SAVE if op in saved else CheckpointPolicy.PREFER_RECOMPUTE

    return policy


def selective_checkpoint_context(save_matmuls: bool = False):
    """A `context_fn` for torch.utils.checkpoint (non-reentrant) applying `thinker_policy`."""
    return functools.partial(create_selective_checkpoint_contexts, thinker_policy(save_matmuls))


def keep_activations(model: torch.nn.Module, layers: int, stack: str = "text") -> int:
    """Run the last `layers` decoder layers without checkpointing (call after checkpointing was enabled, which sets
    it on every layer): they keep their activations for the backward instead of recomputing them. The last ones:
    the backward reaches them first, so their memory is freed before the others' recomputes run. Returns how
    many layers stay checkpointed."""
    layer_list = parts.decoder_layers(model, stack)
    if layers < 0:
        raise ValueError(f"layers to keep must be >= 0, got {layers}")
    for i, layer in enumerate(layer_list):
        if i >= len(layer_list) - layers:
            layer.gradient_checkpointing = False
    return sum(bool(layer.gradient_checkpointing) for layer in layer_list)


def saved_tensor_bytes(fn: Callable[[], object], exclude: set[int] = frozenset()) -> int:
    """Bytes of the storages autograd saves for the backward while `fn` runs, storages whose data_ptr is in `exclude`
    left out. The hook keeps a detached alias of each saved tensor until `fn`'s graph is dropped (so no storage is
    freed and reused under another tensor mid-count), never the tensor itself: handing a saved output back would
    tie it to its own grad_fn, a reference cycle that outlives the call and keeps every AccumulateGrad node alive
    (it broke the next CUDA-graph capture). Ops that save differently under checkpointing's hooks see this hook as
    none (`omnitune_transparent`), so the count is what an unhooked forward keeps."""
    kept: dict[int, int] = {}

    def tally(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in exclude:
            kept[storage.data_ptr()] = storage.nbytes()
        return t.detach()

    def no_backward(_: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("saved_tensor_bytes measures a forward: its graph has no backward")

    tally.omnitune_transparent = True
    with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(tally, no_backward):
        fn()
    return sum(kept.values())


def layer_activation_bytes(model: torch.nn.Module, tokens: int, stack: str = "text") -> int:
    """Bytes the last decoder layer keeps for its backward at `tokens` tokens when it is not checkpointed.

    Measured, not modelled: the real layer (adapters, fast paths, attention kernel of this device) runs once on
    random input under `saved_tensor_bytes`. Parameters, the layer's input and the shared rotary tables are left
    out: they are held whether the layer is checkpointed or not."""
    text_model = parts.stack_model(model, stack)
    layer = parts.decoder_layers(model, stack)[-1]
    weight = text_model.embed_tokens.weight
    hidden = torch.randn(1, tokens, weight.shape[-1], device=weight.device, dtype=weight.dtype, requires_grad=True)
    position_ids = torch.arange(tokens, device=weight.device).view(1, 1, -1).expand(3, 1, -1)
    position_embeddings = text_model.rotary_emb(hidden, position_ids)
    held = {t.untyped_storage().data_ptr() for t in (*model.parameters(), hidden, *position_embeddings)}
    checkpointed, training = layer.gradient_checkpointing, layer.training
    layer.gradient_checkpointing = False
    layer.train()
    try:
        return saved_tensor_bytes(
            lambda: layer(hidden, attention_mask=None, position_embeddings=position_embeddings), held)
    finally:
        layer.gradient_checkpointing = checkpointed
        layer.train(training)


@dataclass
class KeepPlan:
    """What `auto_uncheckpointed_layers` decided, and from which numbers (for the log line)."""
    layers: int
    per_layer_bytes: int
    headroom_bytes: int


STEP_RESERVE_BYTES = 1 << 30  # the loss chunk's logits and other workspace of one step, beyond the model
MEMORY_MARGIN = 0.05  # of the card, left free against fragmentation and what the estimate misses


def training_headroom_bytes(model: torch.nn.Module, tokens: int, per_layer_bytes: int, replicas: int = 1,
                            stack: str = "text", state_bytes: float | None = None) -> int:
    """Free GPU memory a fully checkpointed step leaves over: the card (capped by the process's memory fraction)
    less what is allocated now, the gradients and optimizer state still to come (`state_bytes`, from the plan's
    memory estimate, train/memory.py; default: fp32 AdamW, 3 copies of the trainable parameters), one more
    gradient copy for DDP's buckets (`replicas` > 1), the checkpoint boundaries (one [tokens, hidden] per layer),
    one layer's recompute (x2 for its backward) and a reserve."""
    from omnitune.train.memory import device_budget

    device = next(parts.decoder_layers(model, stack)[0].parameters()).device  # the towers may be on the host
    total = device_budget("cuda", device.index or 0)
    trainable = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    state = trainable * 3 if state_bytes is None else state_bytes
    layers = parts.decoder_layers(model, stack)
    hidden = parts.stack_model(model, stack).get_input_embeddings().weight
    boundaries = len(layers) * tokens * hidden.shape[-1] * hidden.element_size()
    needed = (torch.cuda.memory_allocated(device) + state + trainable * (replicas > 1) + boundaries
              + 2 * per_layer_bytes + STEP_RESERVE_BYTES)
    return int(total * (1 - MEMORY_MARGIN)) - needed


def auto_uncheckpointed_layers(model: torch.nn.Module, tokens: int, headroom_bytes: int | None = None,
                               replicas: int = 1, stack: str = "text", state_bytes: float | None = None) -> KeepPlan:
    """How many of the last decoder layers can keep their activations at `tokens` tokens per micro-batch: as many
    as the headroom holds (`training_headroom_bytes` on CUDA; pass `headroom_bytes` to decide for other memory)."""
    per_layer = layer_activation_bytes(model, tokens, stack)
    if headroom_bytes is None:
        headroom_bytes = training_headroom_bytes(model, tokens, per_layer, replicas, stack, state_bytes)
    fit = max(0, headroom_bytes) // max(per_layer, 1)
    return KeepPlan(min(len(parts.decoder_layers(model, stack)), int(fit)), per_layer, headroom_bytes)
