"""How much GPU memory a run needs, per part, from the recipe, the plan and the model's config: before any weight
loads, so a run that cannot fit says so (with the levers to pull) instead of failing at step one.

Why our own: the numbers depend on our levers (NF4 experts, bf16 LoRA, torchao's low-bit or host-offloaded AdamW,
the optimizer in the backward, towers off the GPU, checkpointing, the chunked loss), which no library models.
Counting is exact for weights and trained values (the model is built on the meta device: shapes, no memory);
activations are a model of what a decoder layer keeps per token (attention projections, the top-k experts'
intermediates), within ~20% above what the real-width layer keeps (0.33 GiB at 4096 tokens measured, 0.40
modelled); at run time `auto` checkpointing measures the real layer instead (train/checkpointing.py).

Sharding (the plan's strategy over its world size): ddp shards nothing; zero2 shards gradients and optimizer
state; zero3 and fsdp2 shard the weights as well; distributed.offload keeps the optimizer state (optimizer) or
also the weights (params) in host memory. What is printed is per GPU.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from omnitune.model import parts
from omnitune.model.qlora import attention_linears
from omnitune.recipe import Recipe, RecipeError

GiB = 2**30
NF4_BYTES = 0.5 + 2 / 64  # 4-bit indices + one fp16 absmax per 64 weights (kernels/nf4.py)
OPTIMIZER_BYTES = {  # per trained value: AdamW's two moments
    "adamw": 8.0,
    "adamw8bit": 2 + 2 * 4 / 256,  # torchao: int8 codes + an fp32 scale per 256-block, two moments
    "adamw4bit": 1 + 2 * 4 / 128,
    "adamw_cpu": 0.0,  # in host memory
}
SHARDED_PARTS = {"single": (), "ddp": (), "zero2": ("grads", "optimizer"),
           "zero3": ("weights", "trainable", "grads", "optimizer"),
           "fsdp2": ("weights", "trainable", "grads", "optimizer")}
LOSS_RESERVE_BYTES = 1 << 30  # the chunked loss's logits chunk and a step's workspace (as checkpointing.py)
MARGIN = 0.05  # of the card: fragmentation and what the model misses
DTYPE_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4}


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes per GPU, per part. `parts`: weights (frozen base on the GPU), trainable (LoRA / trained copies),
    grads, optimizer (state), activations (checkpoint boundaries, one layer's recompute, the loss); `per_layer`:
    what each decoder layer kept uncheckpointed adds; `kept`: how many are (`auto`: as many as fit)."""
    parts: dict[str, float]
    per_layer: float
    layers: int
    kept: int
    budget: float | None  # the card (capped by the process's memory fraction), None on CPU
    levers: tuple[str, ...] = field(default=())
    accumulates: bool = False  # gradients held across micro-steps (grad_accum > 1): they meet the activations


    @property
    def total(self) -> float:
        """The peak: what lives through the step, plus the larger of the gradients (complete at the end of the
        backward) and the activations (largest at its start, freed as it goes); with gradient accumulation, both
        (the window's gradients are held through the next micro-step's forward). Against H200 peaks of the
        48-layer Thinker, every layer checkpointed, grad_accum 1 (issue 21): 66.6 / 69.1 for bf16 LoRA r16
        (measured / this), 95.4 / 95.2 at r64, 27.9 / 27.8 for QLoRA r16, 56.6 / 56.4 at r64."""
        p = self.parts
        activations = p["activations"] + self.kept * self.per_layer
        return (p["weights"] + p["trainable"] + p["optimizer"]
                + (p["grads"] + activations if self.accumulates else max(p["grads"], activations)))

    @property
    def fits(self) -> bool:
        return self.budget is None or self.total <= self.budget

    def lines(self) -> list[str]:
        parts_ = ", ".join(f"{k} {v / GiB:.1f}" for k, v in self.parts.items())
        card = f" of {self.budget / GiB:.1f} GiB" if self.budget else ""
        return [(f"memory estimate per GPU: {self.total / GiB:.1f} GiB{card} ({parts_}; {self.kept} of "
                 f"{self.layers} layers uncheckpointed at {self.per_layer / GiB:.2f} GiB each)")]

    def refusal(self) -> str:
        return (f"this recipe needs ~{self.total / GiB:.1f} GiB per GPU and the GPU has {self.budget / GiB:.1f} GiB "
                f"({', '.join(f'{k} {v / GiB:.1f} GiB' for k, v in self.parts.items())}). Levers, largest first: "
                + "; ".join(self.levers) + ". Or set train.check_memory=false to try anyway")


def device_budget(device: str = "cuda", index: int = 0) -> float | None:
    """The memory this process may use on its GPU: the card's, capped by `set_per_process_memory_fraction`."""
    if device != "cuda" or not torch.cuda.is_available():
        return None
    total = torch.cuda.get_device_properties(index).total_memory
    fraction = getattr(torch.cuda, "get_per_process_memory_fraction", lambda i: 1.0)(index)
    return total * min(fraction, 1.0)


def meta_thinker(config) -> nn.Module:
    """The Thinker with `config`'s shapes on the meta device (no memory, no init), for counting."""
    from transformers import Qwen3OmniMoeThinkerForConditionalGeneration
    from transformers.initialization import no_init_weights

    with torch.device("meta"), no_init_weights():
        return Qwen3OmniMoeThinkerForConditionalGeneration._from_config(config)


def thinker_config(recipe: Recipe):
    """The Thinker's config of `recipe.model.path` (config.json only: no weights are read)."""
    from transformers import AutoConfig

    from omnitune.model.load import resolve_model_path

    config = AutoConfig.from_pretrained(resolve_model_path(recipe.model.path))
    return getattr(config, "thinker_config", config)


def lora_values(model: nn.Module, recipe: Recipe) -> tuple[int, int]:
    """(trained values, the largest trained tensor) of the recipe's adapter on `model` (PEFT's shapes: a linear
    gets A [r, in] and B [out, r]; a fused [E, out, in] parameter A [r E, in] and B [out, r E])."""
    from omnitune.model.adapters import full_modules, lora_targets

    a = recipe.adapter
    if a.method == "full":
        sizes = [p.numel() for n, p in model.named_parameters()
                 if parts.owners(model, [*a.freeze, *a.train])(n) in ("other", *a.train)]
        return sum(sizes), max(sizes, default=0)
    modules, params = lora_targets(model, a)
    sizes = []
    for path in modules:
        w = model.get_submodule(path).weight
        sizes += [a.rank * w.shape[1], w.shape[0] * a.rank]
    for path in params:
        w = model.get_parameter(path)
        experts = w.shape[0] if w.dim() == 3 else 1
        sizes += [a.rank * experts * w.shape[-1], w.shape[-2] * a.rank * experts]
    for path in full_modules(model, a.train):  # modules_to_save: a trained copy beside the frozen one
        sizes += [p.numel() for p in model.get_submodule(path).parameters()]
    return sum(sizes), max(sizes, default=0)


def layer_bytes_per_token(text_config, act_bytes: int) -> float:
    """What one uncheckpointed decoder layer keeps per token for its backward (module docstring)."""
    c = text_config
    q, kv = c.num_attention_heads * c.head_dim, c.num_key_value_heads * c.head_dim
    experts = c.num_experts_per_tok * (c.hidden_size + 3 * c.moe_intermediate_size)
    return act_bytes * (4 * c.hidden_size + q + 2 * kv + q + experts) + 4 * c.num_experts


def estimate(recipe: Recipe, plan, config, model: nn.Module | None = None,
             budget: float | None = None) -> MemoryEstimate:
    """Per-part bytes per GPU of `recipe` as `plan` runs it, for the Thinker of `config` (module docstring).
    `model`: the Thinker already built (skips building one on the meta device); `budget`: the GPU's memory
    (default: this process's, `device_budget`)."""
    model = model if model is not None else meta_thinker(config)
    text = config.text_config
    a, t = recipe.adapter, recipe.train
    dtype = DTYPE_BYTES[recipe.model.dtype]
    owner = parts.owners(model, ["audio_tower", "vision_tower"])
    experts = set(parts.target_parameters(model, "experts"))
    attention = {f"{name}.weight" for name, _ in attention_linears(model)}  # NF4 under QLoRA too
    weights = 0.0
    streamed = 0.0
    for name, p in model.named_parameters():
        if owner(name) != "other" and plan.towers_on_host:
            continue
        if name in experts and plan.offload_experts:
            streamed += p.numel() * NF4_BYTES
            continue
        weights += p.numel() * (NF4_BYTES if name in experts | attention and a.method == "qlora" else dtype)
    weights += 2 * streamed / config.text_config.num_hidden_layers  # two layers' experts resident
    trained, largest = lora_values(model, recipe)
    if a.method == "full":  # the trained weights are the model's own
        weights -= trained * dtype
    value = 2 if plan.lora_dtype == "bfloat16" and a.method != "full" else dtype if a.method == "full" else 4
    kind = recipe.train.optimizer if plan.optimizer in OPTIMIZER_BYTES else "adamw"
    grads = trained * value
    if plan.optimizer_in_backward or (kind == "adamw_cpu" and t.grad_accum == 1):
        grads = largest * value  # freed (or copied out) as they are produced: about one tensor at a time
    act = 2 if plan.precision in ("bf16", "fp16") else 4
    tokens = plan.micro_batch_tokens
    per_layer = tokens * layer_bytes_per_token(text, act)
    layers = text.num_hidden_layers
    logits = tokens * text.vocab_size * (act + 8)  # bf16 logits, their fp32 upcast and its gradient
    loss = min(LOSS_RESERVE_BYTES, logits) if plan.loss == "chunked" else logits
    activations = loss + (layers * tokens * text.hidden_size * act + 2 * per_layer
                          if plan.gradient_checkpointing else 0)
    found = {"weights": weights, "trainable": trained * value, "grads": grads,
             "optimizer": trained * OPTIMIZER_BYTES[kind], "activations": activations}
    world = max(plan.world_size, 1)
    for key in SHARDED_PARTS.get(plan.strategy, ()):
        found[key] /= world
    # distributed.offload: the engine keeps AdamW's state (and with `params` the weights, gathered a layer at a
    # time) in host memory
    for key in {"none": (), "optimizer": ("optimizer",),
                "params": ("optimizer", "weights", "trainable")}[plan.offload]:
        found[key] = 0.0
    budget = budget if budget is not None else device_budget(plan.hardware.device, plan.hardware.local_rank)
    accumulates = t.grad_accum > 1 and not plan.optimizer_in_backward
    if not plan.gradient_checkpointing:
        kept = layers
    elif plan.uncheckpointed_layers == "auto":
        room = (budget * (1 - MARGIN) - sum(v for k, v in found.items() if accumulates or k != "grads")
                if budget else 0)
        kept = int(min(layers, max(0, room // per_layer)))
    else:
        kept = int(plan.uncheckpointed_layers)
    return MemoryEstimate(found, per_layer, layers, kept, budget, levers(recipe, plan, found), accumulates)


def levers(recipe: Recipe, plan, found: dict[str, float]) -> tuple[str, ...]:
    """The recipe keys that would shrink this run, in the order of what they save (those not already pulled)."""
    a, t = recipe.adapter, recipe.train
    out: list[tuple[float, str]] = []
    if a.method == "lora":
        out.append((found["weights"] * 0.6, "adapter.method=qlora (the experts and attention in 4-bit NF4)"))
    if a.method in ("lora", "qlora") and not t.offload_experts:
        out.append((found["weights"] * 0.5,
                    "adapter.method=qlora with train.offload_experts=true (NF4 experts streamed from host memory)"))
    if t.optimizer == "adamw":
        out.append((found["optimizer"] * 0.75, "train.optimizer=adamw8bit or adamw4bit (low-bit AdamW states)"))
        out.append((found["optimizer"], "train.optimizer=adamw_cpu (AdamW states in host memory)"))
    if t.optimizer == "adamw8bit":
        out.append((found["optimizer"] / 2, "train.optimizer=adamw4bit (4-bit AdamW states, half of adamw8bit's)"))
    if a.lora_dtype == "float32" and a.method != "full":
        out.append(((found["trainable"] + found["grads"]) / 2,
                    "adapter.lora_dtype=bfloat16 with train.optimizer=adamw8bit|adamw4bit (half the LoRA bytes)"))
    if not t.optimizer_in_backward and t.optimizer != "adamw_cpu":
        out.append((found["grads"], "train.optimizer_in_backward=true with train.grad_accum=1 (no gradients kept)"))
    if not plan.towers_on_host:
        out.append((0.0, "train.offload_towers=true (text-only data: the frozen towers stay in host memory)"))
    if not plan.gradient_checkpointing:
        out.append((found["activations"], "train.gradient_checkpointing=true"))
    out.append((0.0, f"a lower adapter.rank (now {a.rank}) or data.max_length (now {recipe.data.max_length})"))
    if plan.world_size > 1 and plan.strategy in ("ddp", "single"):
        out.append((found["weights"], "a sharded distributed.strategy (zero3 / fsdp2 divide the weights too)"))
    return tuple(text for _, text in sorted(out, key=lambda x: -x[0]))


def check_fits(recipe: Recipe, plan, config=None, model: nn.Module | None = None,
               report=print) -> MemoryEstimate | None:
    """Print the estimate; refuse (RecipeError) a recipe that does not fit the GPU, unless train.check_memory is
    off. None where no config can be read (a hub id not in the cache: loading will say so)."""
    if config is None:
        try:
            config = thinker_config(recipe)
        except (OSError, ValueError) as e:
            report(f"memory estimate: skipped (no config: {str(e).splitlines()[0][:120]})")
            return None
    est = estimate(recipe, plan, config, model)
    for line in est.lines():
        report(line)
    if not est.fits and recipe.train.check_memory:
        raise RecipeError(est.refusal())
    return est
