"""Where each part of a Qwen3-Omni model lives, written once as data (in the spirit of ms-swift's `ModelArch`).

A **part** is a named group of modules (or, for LoRA on fused experts and routers, of parameters) of one model
class: `attention`, `experts`, `router`, `audio_tower`, ..., and on the full model `talker_experts`,
`code_predictor`, `code2wav`, .... LoRA targets (`adapter.targets`), what trains in full (`adapter.train`) or
stays frozen (`adapter.freeze`), the trainable-parameter table, checkpointing, fast-path swaps, sharding and export
ask this map; no other module spells a module path. Paths are patterns over `named_modules()` /
`named_parameters()` names in which `*` stands for one layer index.

A **decoder stack** says where a stack of decoder layers lives and where each layer keeps its attention, MoE
router, experts and shared expert: the Thinker's text model (48 layers, 128 experts top-8) and the Talker (20 layers,
128 experts top-6 + a shared expert) are described by the same fields.

Adding a part is one `Part(...)` entry in `THINKER` or `TALKER` (or `register_part` at run time); tests/test_parts.py
shows a made-up part targeted by LoRA and trained in full without touching the adapter or checkpointing code.
"""
from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cache

from torch import nn

from omnitune.errors import OmnituneError


class PartsError(OmnituneError, ValueError):
    """A part name or model class the map does not know."""


@dataclass(frozen=True)
class Part:
    """A named group of modules (`modules`) or parameters (`parameters`, for PEFT `target_parameters`)."""
    name: str
    modules: tuple[str, ...] = ()
    parameters: tuple[str, ...] = ()
    about: str = ""
    component: bool = False  # a row of the trainable-parameter table printed at the start of training

    def prefixed(self, prefix: str) -> Part:
        """This part of a model nested under `prefix` ("thinker."); "" (the whole model) becomes the prefix."""
        def under(path: str) -> str:
            return prefix + path if path else prefix.rstrip(".")
        return Part(self.name, tuple(map(under, self.modules)), tuple(map(under, self.parameters)), self.about,
                    self.component)


@dataclass(frozen=True)
class DecoderStack:
    """A stack of decoder layers: `model` runs them (it owns embed_tokens, rotary_emb and the final norm), `layers`
    is the ModuleList under it; the other fields are paths inside one layer."""
    model: str
    layers: str = "layers"
    attention: tuple[str, ...] = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj")
    experts: str = "mlp.experts"  # fused experts: gate_up_proj [E, 2I, H], down_proj [E, H, I]
    expert_params: tuple[str, ...] = ("gate_up_proj", "down_proj")
    router: str = "mlp.gate"  # a TopKRouter with one `weight` [E, H]
    shared_expert: tuple[str, ...] = ()  # Linear layers of an always-active expert beside the routed ones

    def layer_path(self, inner: str = "") -> str:
        base = f"{self.model}.{self.layers}.*" if self.model else f"{self.layers}.*"
        return f"{base}.{inner}" if inner else base

    def parts(self, prefix: str, about: str) -> list[Part]:
        """The stack's LoRA-able parts, named `{prefix}attention`, `{prefix}experts`, `{prefix}router`, ..."""
        out = [Part(f"{prefix}attention", tuple(self.layer_path(a) for a in self.attention),
                    about=f"LoRA on q/k/v/o of every {about} decoder layer"),
               Part(f"{prefix}experts", parameters=tuple(self.layer_path(f"{self.experts}.{p}")
                                                         for p in self.expert_params),
                    about=f"LoRA on the fused routed experts of every {about} MoE layer"),
               Part(f"{prefix}router", parameters=(self.layer_path(f"{self.router}.weight"),),
                    about=f"LoRA on the {about} MoE router")]
        if self.shared_expert:
            out.append(Part(f"{prefix}shared_expert", tuple(self.layer_path(s) for s in self.shared_expert),
                            about=f"the {about} MoE's always-active shared expert"))
        return out


@dataclass
class PartsMap:
    """The parts and decoder stacks of one model class, paths relative to an instance of that class."""
    parts: dict[str, Part] = field(default_factory=dict)
    stacks: dict[str, DecoderStack] = field(default_factory=dict)

    def prefixed(self, prefix: str) -> PartsMap:
        """This map for the same model nested under `prefix` (the Thinker as `thinker.` of the full model)."""
        stacks = {k: DecoderStack(**{**vars(s), "model": prefix + s.model}) for k, s in self.stacks.items()}
        return PartsMap({k: p.prefixed(prefix) for k, p in self.parts.items()}, stacks)

    def merged(self, other: PartsMap) -> PartsMap:
        return PartsMap({**self.parts, **other.parts}, {**self.stacks, **other.stacks})

    def add(self, part: Part) -> None:
        self.parts[part.name] = part


_TEXT = DecoderStack("model.language_model")
THINKER = PartsMap(
    {p.name: p for p in [
        *_TEXT.parts("", "Thinker text"),
        Part("llm", ("model.language_model", "lm_head"), about="the Thinker's language model and its head",
             component=True),
        Part("embed_tokens", ("model.language_model.embed_tokens",), about="token embeddings"),
        Part("lm_head", ("lm_head",), about="the vocabulary projection"),
        Part("backbone", ("model",), about="the multimodal model whose forward gives hidden states"),
        Part("audio_tower", ("model.audio_tower",), about="the audio encoder", component=True),
        Part("audio_projector", ("model.audio_tower.proj1", "model.audio_tower.proj2"),
             about="the audio encoder's output projection", component=True),
        Part("vision_tower", ("model.visual",), about="the vision encoder", component=True),
        Part("vision_merger", ("model.visual.merger", "model.visual.merger_list.*"),
             about="the vision encoder's patch mergers (main and deepstack)", component=True),
    ]},
    {"text": _TEXT})

_TALKER_TEXT = DecoderStack("model", shared_expert=("mlp.shared_expert.gate_proj", "mlp.shared_expert.up_proj",
                                                    "mlp.shared_expert.down_proj", "mlp.shared_expert_gate"))
_CODE_PREDICTOR = DecoderStack("code_predictor.model", attention=_TEXT.attention)
TALKER = PartsMap(
    {p.name: p for p in [
        *_TALKER_TEXT.parts("talker_", "Talker"),
        Part("talker", ("",), about="the whole Talker (with its code predictor)", component=True),
        Part("talker_projection", ("text_projection", "hidden_projection"),
             about="the MLPs that map Thinker embeddings / hidden states into the Talker"),
        Part("codec_embedding", ("model.codec_embedding",), about="codec-0 and speaker embeddings"),
        Part("codec_head", ("codec_head",), about="the codebook-0 head"),
        Part("code_predictor", ("code_predictor",), about="the model that predicts codebooks 1..15", component=True),
        Part("code_predictor_heads", ("code_predictor.lm_head",), about="the code predictor's heads, one per "
             "codebook 1..15"),
        Part("code_predictor_embedding", ("code_predictor.model.codec_embedding",),
             about="the code predictor's embeddings of codebooks 1..15"),
        Part("code_predictor_attention", tuple(_CODE_PREDICTOR.layer_path(a) for a in _CODE_PREDICTOR.attention),
             about="LoRA on q/k/v/o of the code predictor's layers"),
    ]},
    {"talker": _TALKER_TEXT, "code_predictor": _CODE_PREDICTOR})

FULL = THINKER.prefixed("thinker.").merged(TALKER.prefixed("talker.")).merged(PartsMap(
    {"code2wav": Part("code2wav", ("code2wav",), about="the codec decoder to 24 kHz audio", component=True)}))

# model class name -> its map (names, not classes: the map is read before transformers' models are imported)
MAPS: dict[str, PartsMap] = {
    "Qwen3OmniMoeThinkerForConditionalGeneration": THINKER,
    "Qwen3OmniMoeTalkerForConditionalGeneration": TALKER,
    "Qwen3OmniMoeForConditionalGeneration": FULL,
}


def register_part(part: Part, model_class: str = "Qwen3OmniMoeThinkerForConditionalGeneration") -> None:
    """Add (or replace) a part of `model_class`; on the Thinker it is added to the full model's map as well."""
    MAPS[model_class].add(part)
    if model_class == "Qwen3OmniMoeThinkerForConditionalGeneration":
        MAPS["Qwen3OmniMoeForConditionalGeneration"].add(part.prefixed("thinker."))


# ------------------------------------------------------------------------------------------------- unwrapping
def unwrap(model: nn.Module) -> nn.Module:
    """The transformers model inside DDP / DeepSpeed (`.module`) and PEFT (`get_base_model()`) wrappers."""
    while True:
        if hasattr(model, "get_base_model"):
            model = model.get_base_model()
        elif isinstance(getattr(model, "module", None), nn.Module):
            model = model.module
        else:
            return model


def thinker_of(model: nn.Module) -> nn.Module:
    """The Thinker (Qwen3OmniMoeThinkerForConditionalGeneration) of a Thinker or full model, wrapped or not."""
    base = unwrap(model)
    return getattr(base, "thinker", base)


def parts_map(model: nn.Module | str) -> PartsMap:
    """The map of a model (wrappers looked through) or of a model class name."""
    # FSDP2 makes a sharded module's class a subclass of its own (FSDPQwen3...): the model's class is in the MRO
    name = model if isinstance(model, str) else next(
        (c.__name__ for c in type(unwrap(model)).__mro__ if c.__name__ in MAPS), type(unwrap(model)).__name__)
    if name not in MAPS:
        raise PartsError(f"omnitune has no parts map for {name} (known: {', '.join(MAPS)})")
    return MAPS[name]


def part(model: nn.Module | str, name: str) -> Part:
    parts = parts_map(model).parts
    if name not in parts:
        raise PartsError(f"unknown part {name!r}; parts of this model: {', '.join(sorted(parts))}")
    return parts[name]


# ------------------------------------------------------------------------------------------------- resolving
# Names below are relative to the transformers model (`unwrap(model)`), as PEFT's target_modules,
# target_parameters and modules_to_save take them; `prefix_of` gives what a wrapper adds in front.
@cache
def _pattern(patterns: tuple[str, ...]) -> re.Pattern:
    return re.compile("|".join(f"(?:{re.escape(p).replace(re.escape('*'), r'[0-9]+')})" for p in patterns))


def _under(name: str, root: str) -> bool:
    return root == "" or name == root or name.startswith(root + ".")


def module_names(model: nn.Module, name: str) -> list[str]:
    """The modules of part `name` (outermost only, a module inside another of the part is left out)."""
    base = unwrap(model)
    paths = part(base, name).modules
    if not paths:
        return []
    pattern = _pattern(paths)
    hits = [n for n, _ in base.named_modules() if pattern.fullmatch(n)]
    return [n for n in hits if not any(h != n and _under(n, h) for h in hits)]


def modules(model: nn.Module, name: str) -> list[nn.Module]:
    base = unwrap(model)
    return [base.get_submodule(n) for n in module_names(base, name)]


def module(model: nn.Module, name: str) -> nn.Module:
    """The one module of a single-module part (`lm_head`, `backbone`, `audio_tower`, ...)."""
    found = modules(model, name)
    if len(found) != 1:
        raise PartsError(f"part {name!r} is {len(found)} modules in this model, not one")
    return found[0]


def target_parameters(model: nn.Module, name: str) -> list[str]:
    """The parameters a parameter part (`experts`, `router`, ...) names: PEFT's `target_parameters`."""
    base = unwrap(model)
    paths = part(base, name).parameters
    if not paths:
        return []
    pattern = _pattern(paths)
    return [n for n, _ in base.named_parameters() if pattern.fullmatch(n)]


def target_linears(model: nn.Module, name: str) -> list[str]:
    """The nn.Linear modules of a module part, or inside its modules: PEFT's `target_modules`."""
    base = unwrap(model)
    roots = module_names(base, name)
    return [n for n, m in base.named_modules()
            if isinstance(m, nn.Linear) and any(_under(n, r) for r in roots)]


def prefix_of(model: nn.Module) -> str:
    """What `model.named_parameters()` puts in front of the transformers model's own names ("base_model.model."
    under PEFT), so the names above can be matched against a wrapped model's."""
    base = unwrap(model)
    for name, found in model.named_modules():
        if found is base:
            return f"{name}." if name else ""
    raise PartsError("the transformers model is not a submodule of its wrapper")


def owners(model: nn.Module, names: list[str] | None = None) -> Callable[[str], str]:
    """A function from a parameter name (relative to the transformers model; wrapper modules such as PEFT's
    `base_layer` may sit in it) to the most specific part among `names` (default: all the map's module parts)
    whose modules hold it, or "other". The parts' modules are resolved once, here."""
    base = unwrap(model)
    names = [n for n in (names if names is not None else parts_map(base).parts) if part(base, n).modules]
    roots = sorted(((root, n) for n in names for root in module_names(base, n)), key=lambda r: -r[0].count("."))

    def owner(parameter: str) -> str:
        return next((n for root, n in roots if _under(parameter, root)), "other")

    return owner


def decoder_stack(model: nn.Module | str, stack: str = "text") -> DecoderStack:
    stacks = parts_map(model).stacks
    if stack not in stacks:
        raise PartsError(f"this model has no {stack!r} decoder stack (it has: {', '.join(stacks)})")
    return stacks[stack]


def stack_model(model: nn.Module, stack: str = "text") -> nn.Module:
    """The module that runs a decoder stack (it owns embed_tokens, rotary_emb, the layers and the final norm)."""
    return unwrap(model).get_submodule(decoder_stack(model, stack).model)


def decoder_layers(model: nn.Module, stack: str = "text") -> nn.ModuleList:
    """The decoder layers of `stack` ("text": the Thinker's language model; "talker"; "code_predictor")."""
    return stack_model(model, stack).get_submodule(decoder_stack(model, stack).layers)


def moe_block_classes(model: nn.Module) -> list[type]:
    """The classes of every sparse MoE block in the model's decoder stacks (DeepSpeed ZeRO-3 leaf modules)."""
    out: list[type] = []
    for key, stack in parts_map(model).stacks.items():
        block_path = stack.experts.rsplit(".", 1)[0] if "." in stack.experts else ""
        for layer in decoder_layers(model, key):
            block = layer.get_submodule(block_path)
            if hasattr(block, "experts") and type(block) not in out:
                out.append(type(block))
    return out
