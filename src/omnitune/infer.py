"""Generation from a run directory, a recipe or a checkpoint: conversation in (any mix of audio, image, video,
text), text out (streamed), and for checkpoints with a Talker, speech out as a 24 kHz waveform.

    gen = Inferencer("runs/demo").generate([{"role": "user", "content": "Hi"}], speaker="ethan", stream=print)
    gen.text, gen.audio, gen.save_wav("out.wav")

A source is resolved once (`resolve_source`): a run directory (recipe.yaml + adapter/ or model/), a recipe
file or preset (its base model, plus `adapter=` if given), or a plain checkpoint (a merged export, a hub id in
the cache, or `tiny`). Speech loads the full model (Thinker + Talker + Code2Wav); without speech only the
Thinker is loaded, so no Talker memory is spent.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from peft import PeftModel
from transformers import TextStreamer

from omnitune.data.collate import OmniCollator, to_device
from omnitune.data.render import IGNORE, decode_record, processor_kwargs
from omnitune.data.schema import Record, RecordError, validate_record
from omnitune.errors import OmnituneError
from omnitune.model.load import load_full, load_processor, load_thinker, resolve_model_path
from omnitune.recipe import PRESETS, DataConfig, ModelConfig, Recipe, load_recipe
from omnitune.run_dir import RunDir

SPEECH_RATE = 24000
THINK_END = "</think>"


class InferError(OmnituneError, ValueError):
    """A request the model cannot serve, said so a user can fix it."""


# ---------------------------------------------------------------------------------------------------------------
# What to load


@dataclass
class Source:
    """Everything needed to load a model for generation: base checkpoint, trained weights, processor, settings."""

    model: ModelConfig
    data: DataConfig = field(default_factory=DataConfig)
    weights: tuple[str, Path] | None = None  # ('adapter', dir) or ('model', dir): applied on top of model.path
    processor_dir: Path | None = None
    label: str = ""
    nf4_experts: bool = False  # a QLoRA run: generate text with its Thinker as it trained (model/qlora.py)

    @property
    def variant(self) -> str:
        return self.model.variant


def _is_recipe(source: str) -> bool:
    return source in PRESETS or (Path(source).is_file() and Path(source).suffix in (".yaml", ".yml"))


def _adapter_weights(adapter: str | Path) -> tuple[str, Path]:
    p = Path(adapter).expanduser()
    if (p / "recipe.yaml").exists():
        return RunDir(p).weights()
    if (p / "adapter_config.json").exists():
        return "adapter", p
    if (p / "config.json").exists():
        return "model", p
    raise InferError(f"adapter '{adapter}' is neither a run directory nor a PEFT adapter directory "
                     "(no recipe.yaml, adapter_config.json or config.json)")


def resolve_source(source: str | Path | Recipe, adapter: str | Path | None = None,
                   dtype: str | None = None, variant: str | None = None) -> Source:
    """A run dir, recipe (file, preset or object), or checkpoint (dir, hub id, `tiny`) -> Source."""
    processor_dir = None
    if isinstance(source, Recipe):
        recipe, weights, label = source, None, source.name
    elif (Path(str(source)) / "recipe.yaml").exists():
        run = RunDir(Path(str(source)))
        recipe, weights, label = run.recipe(), run.weights(), str(source)
        processor_dir = run.processor if (run.processor / "tokenizer_config.json").exists() else None
    elif _is_recipe(str(source)):
        recipe, weights, label = load_recipe(str(source)), None, str(source)
    else:
        guess = "thinking" if "thinking" in str(source).lower() else (
            "captioner" if "captioner" in str(source).lower() else "instruct")
        recipe = Recipe(model=ModelConfig(path=str(source), variant=variant or guess))
        weights, label = None, str(source)
        processor_dir = Path(resolve_model_path(str(source)))
    if adapter is not None:
        if weights is not None:
            raise InferError(f"{source} already carries trained weights ({weights[1]}); pass its base recipe "
                             "or checkpoint with --adapter, not a run directory")
        weights = _adapter_weights(adapter)
        run_proc = Path(adapter) / "processor"
        if (run_proc / "tokenizer_config.json").exists():
            processor_dir = run_proc
    model = recipe.model.model_copy(update={k: v for k, v in (("dtype", dtype), ("variant", variant)) if v})
    # Data paths in a recipe are relative to its file: make them absolute while the recipe still knows where.
    data = recipe.data.model_copy(update={k: str(recipe.resolve(getattr(recipe.data, k)))
                                          for k in ("train", "eval") if getattr(recipe.data, k)})
    return Source(model=model, data=data, weights=weights, processor_dir=processor_dir, label=label,
                  nf4_experts=recipe.adapter.method == "qlora")


def load_generation_processor(src: Source):
    """The run's saved processor (else the checkpoint's), always with our template for the variant: prompts
    render exactly as in training, also for a base checkpoint whose own template differs."""
    saved = src.processor_dir is not None and Path(src.processor_dir).is_dir()
    return load_processor(src.model, str(src.processor_dir) if saved else None)


def apply_weights(thinker: torch.nn.Module, src: Source, merge: bool) -> torch.nn.Module:
    """The source's LoRA on `thinker` (merged, or left as a PeftModel); a full fine-tune is loaded elsewhere."""
    kind, wdir = src.weights  # type: ignore[misc]
    if kind == "model":
        return thinker  # handled at load time
    peft = PeftModel.from_pretrained(thinker, str(wdir), is_trainable=False)
    return peft.merge_and_unload() if merge else peft


def with_trained_thinker(full: torch.nn.Module, src: Source, device_map: str | dict | None = None) -> torch.nn.Module:
    """`full` (the top-level model) with the source's trained Thinker: a full fine-tune's replaces the base one,
    a LoRA is merged into it."""
    if src.weights and src.weights[0] == "model":
        del full.thinker  # free the base Thinker before loading the fine-tuned one
        full.thinker = load_thinker(src.model, str(src.weights[1]), device_map=device_map)
    elif src.weights:
        full.thinker = apply_weights(full.thinker, src, merge=True)
    return full


def load_model(src: Source, speech: bool, merge: bool = True, device_map: str | dict | None = None) -> torch.nn.Module:
    """The Thinker (speech off) or the full model (speech on), with the source's trained weights applied.

    LoRA is merged by default (generation then runs at base speed); a full fine-tune's Thinker replaces the base
    Thinker of the full model. A QLoRA run's Thinker (text only) keeps its NF4 experts and the adapter unmerged.
    """
    weights = src.weights
    if not speech and src.nf4_experts:
        from omnitune.model.qlora import load_quantized_thinker

        device = "cuda:0" if device_map is not None and torch.cuda.is_available() else "cpu"
        return load_quantized_thinker(src.model, str(weights[1]) if weights else None, device).eval()
    if not speech:
        path = str(weights[1]) if weights and weights[0] == "model" else None
        thinker = load_thinker(src.model, path, device_map=device_map)
        return (apply_weights(thinker, src, merge) if weights else thinker).eval()
    full = load_full(src.model, device_map=device_map)
    if not getattr(full, "has_talker", False):
        raise InferError(f"{src.model.path} has no Talker (enable_audio_output is off, e.g. a Thinking or "
                         "thinker-only checkpoint): generate with speech=False (--no-speech)")
    with_trained_thinker(full, src, device_map)
    # The Talker reuses the Thinker's rope-index code, which reads audio_config.n_window: without this,
    # audio combined with an image or video crashes (QWEN3_OMNI_NOTES.md, Talker).
    full.talker.config.audio_config = full.config.thinker_config.audio_config
    return full.eval()


def has_talker(path: str) -> bool:
    """Whether a checkpoint holds the Talker + Code2Wav (config `enable_audio_output`)."""
    from transformers import AutoConfig

    return bool(getattr(AutoConfig.from_pretrained(resolve_model_path(path)), "enable_audio_output", False))


# ---------------------------------------------------------------------------------------------------------------
# Conversation -> model inputs


def as_messages(conversation: Any) -> list[dict[str, Any]]:
    """Accept a message list, a `{"conversations": [...]}` record, or a plain string (one user turn)."""
    if isinstance(conversation, str):
        return [{"role": "user", "content": conversation}]
    if isinstance(conversation, dict) and "conversations" in conversation:
        return list(conversation["conversations"])
    if isinstance(conversation, list):
        return list(conversation)
    raise InferError("a conversation is a list of {role, content} turns, a {'conversations': [...]} record, "
                     "or a string")


def build_conversation(text: str | None = None, audio: list[str] = (), image: list[str] = (),
                       video: list[str] = (), system: str | None = None) -> list[dict[str, Any]]:
    """One user turn from command-line pieces: media items first (audio, images, videos), then the text."""
    items = ([{"type": "audio", "audio": str(p)} for p in audio] + [{"type": "image", "image": str(p)} for p in image]
             + [{"type": "video", "video": str(p)} for p in video])
    if text:
        items.append({"type": "text", "text": text})
    if not items:
        raise InferError("nothing to answer: give a text and/or media files")
    turns = [{"role": "system", "content": system}] if system else []
    return turns + [{"role": "user", "content": items}]


def read_conversation(path: str | Path) -> tuple[list[dict[str, Any]], Path]:
    """A conversation from a JSON file (a message list or a {"conversations": [...]} record) and the directory its
    media paths are relative to."""
    path = Path(path)
    try:
        return as_messages(json.loads(path.read_text(encoding="utf-8"))), path.resolve().parent
    except (OSError, json.JSONDecodeError) as e:
        raise InferError(f"{path}: cannot read a conversation: {e}") from None


def prompt_record(messages: list[dict[str, Any]], variant: str = "instruct",
                  base_dir: str | Path | None = None) -> Record:
    """Validate a conversation that ends with a user turn; media paths resolve against `base_dir` (default cwd).

    """
    if not messages or messages[-1].get("role") != "user":
        raise InferError("the conversation to answer must end with a user turn")
    where = Path(base_dir or Path.cwd()) / "<conversation>"
    # The person at the terminal names their own files: any local file may be read (serve will confine).
    return validate_record({"conversations": messages}, where, 0, variant, require_answer=False,
                           media_roots=[Path("/")])


def encode_prompt(processor, record: Record, data: DataConfig) -> dict[str, Any]:
    """One record's prompt -> a sample shaped like data.render's (1-D ids, media features), to answer.

    Each record gets its own processor call, as in training (data/render.py says why).
    """
    media = decode_record(record, data)
    text = processor.apply_chat_template(record.messages, tokenize=False, add_generation_prompt=True)
    kw = processor_kwargs(data, media)
    kw["return_tensors"] = "pt"
    try:
        out = dict(processor(text=text, **kw))
    except Exception as e:  # the processor's own checks (e.g. mismatched placeholders)
        raise RecordError(record.file, record.line, f"processor failed: {e}") from None
    out["input_ids"], out["attention_mask"] = out["input_ids"][0], out["attention_mask"][0]
    out["labels"] = torch.full_like(out["input_ids"], IGNORE)
    out["use_audio_in_video"] = bool(data.use_audio_in_video and media.videos)
    return out


def collate_prompts(samples: list[dict[str, Any]], pad_id: int) -> dict[str, Any]:
    """Batch prompts for generation: the training collator's batch, with padding moved to the left."""
    batch = OmniCollator(pad_id)(samples)
    batch.pop("labels")
    ids, mask = batch["input_ids"], batch["attention_mask"]
    for i, s in enumerate(samples):
        shift = ids.shape[1] - len(s["input_ids"])
        ids[i], mask[i] = ids[i].roll(shift), mask[i].roll(shift)
    return batch


# ---------------------------------------------------------------------------------------------------------------
# Thinking output


def split_thinking(text: str) -> tuple[str | None, str]:
    """'<think>\\nR\\n</think>\\n\\nA' -> ('R', 'A'); no think block -> (None, text); a thought cut off by
    the token limit -> (thought, ''): there is no answer yet."""
    if THINK_END not in text:
        if text.lstrip().startswith("<think>"):
            return text.lstrip()[len("<think>"):].strip("\n"), ""
        return None, text
    thought, answer = text.split(THINK_END, 1)
    return thought.replace("<think>", "").strip("\n"), answer.lstrip("\n")


class _Streamer(TextStreamer):
    """Send decoded text to a callback as it is generated; with `hide_thinking`, hold everything until
    `</think>` has been seen and send only what follows."""

    def __init__(self, tokenizer, callback: Callable[[str], None], hide_thinking: bool):
        super().__init__(tokenizer, skip_prompt=True, skip_special_tokens=True)
        self.callback, self.hide, self.held = callback, hide_thinking, ""

    def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
        if self.hide:
            self.held += text
            if THINK_END not in self.held:
                # A reply without a think block at all: release it once it plainly does not start with one.
                if stream_end or (len(self.held) > 16 and not self.held.lstrip().startswith("<think>")):
                    text, self.hide = self.held, False
                else:
                    return
            else:
                text, self.hide = self.held.split(THINK_END, 1)[1].lstrip("\n"), False
        if text:
            self.callback(text)


# ---------------------------------------------------------------------------------------------------------------
# The API


@dataclass
class Generation:
    text: str  # the answer (the thought is in `thinking`, and in `text` only with show_thinking)
    thinking: str | None = None
    audio: np.ndarray | None = None  # float32 mono at `sample_rate`
    sample_rate: int = SPEECH_RATE
    new_tokens: int = 0

    def save_wav(self, path: str | Path) -> Path:
        if self.audio is None:
            raise InferError("this generation has no speech (speech was off or the model has no Talker)")
        import soundfile as sf

        sf.write(str(path), self.audio, self.sample_rate, subtype="PCM_16")
        return Path(path)


class Inferencer:
    """Load once, generate many times. `speech=False` loads only the Thinker; `speech=None` (default) loads the
    Talker when the checkpoint has one and the variant is not Thinking."""

    def __init__(self, source: str | Path | Recipe, *, adapter: str | Path | None = None, speech: bool | None = None,
                 dtype: str | None = None, variant: str | None = None, device: str | None = None,
                 data: DataConfig | None = None, merge: bool = True):
        self.source = resolve_source(source, adapter=adapter, dtype=dtype, variant=variant)
        if data is not None:
            self.source.data = data
        if speech is None:
            speech = self.source.variant != "thinking" and has_talker(self.source.model.path)
        self.processor = load_generation_processor(self.source)
        self.tokenizer = self.processor.tokenizer
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        # Load straight onto the GPU: a CPU detour needs ~70 GB of host memory at full size.
        self.model = load_model(self.source, speech=speech, merge=merge,
                                device_map={"": self.device} if self.device.type == "cuda" else None)
        self.model.to(self.device)
        self.has_speech = speech
        self.im_end = self.tokenizer.convert_tokens_to_ids("<|im_end|>")
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.im_end

    @property
    def thinker(self) -> torch.nn.Module:
        return getattr(self.model, "thinker", self.model)

    @property
    def speakers(self) -> list[str]:
        if not self.has_speech:
            return []
        return sorted(self.model.config.talker_config.speaker_id)

    def check_speaker(self, speaker: str) -> str:
        names = {s.lower(): s for s in self.speakers}
        if speaker.lower() not in names:
            raise InferError(f"unknown speaker {speaker!r}; this checkpoint has: {', '.join(self.speakers)}")
        return speaker.lower()

    @torch.no_grad()
    def generate(self, conversation: Any, *, speaker: str | None = None, speech: bool | None = None,
                 stream: Callable[[str], None] | None = None, show_thinking: bool = False,
                 max_new_tokens: int = 512, do_sample: bool = False, temperature: float = 0.7, top_p: float = 0.9,
                 use_audio_in_video: bool | None = None, max_speech_tokens: int = 4096,
                 base_dir: str | Path | None = None) -> Generation:
        """Answer one conversation (ending with a user turn). Speech defaults to on when the model was loaded
        with it; `stream` receives text pieces as they are generated."""
        speech = self.has_speech if speech is None else speech
        if speech and not self.has_speech:
            raise InferError("this Inferencer was loaded without the Talker (speech=False): create it with "
                             "speech=True to get speech")
        if speech and self.source.variant == "thinking":
            raise InferError("the Thinking variant has no Talker: generate with speech=False")
        data = self.source.data
        if use_audio_in_video is not None:
            data = data.model_copy(update={"use_audio_in_video": use_audio_in_video})
        try:
            record = prompt_record(as_messages(conversation), variant=self.source.variant, base_dir=base_dir)
            sample = encode_prompt(self.processor, record, data)
        except RecordError as e:  # bad roles, missing or undecodable media: there is no file:line to point at
            raise InferError(e.reason) from None
        inputs = to_device(collate_prompts([sample], self.pad_id), self.device, self.thinker.dtype)
        streamer = (_Streamer(self.tokenizer, stream, hide_thinking=not show_thinking and
                              self.source.variant == "thinking") if stream else None)
        sampling = dict(do_sample=do_sample, **({"temperature": temperature, "top_p": top_p} if do_sample else {}))
        prompt_len = inputs["input_ids"].shape[1]
        audio = None
        if speech:
            spk = self.check_speaker(speaker or "ethan")
            out = self.model.generate(
                **inputs, speaker=spk, return_audio=True, thinker_max_new_tokens=max_new_tokens,
                thinker_eos_token_id=self.im_end, thinker_pad_token_id=self.pad_id, thinker_streamer=streamer,
                talker_max_new_tokens=max_speech_tokens, **{f"thinker_{k}": v for k, v in sampling.items()})
            sequences, wav = out if isinstance(out, tuple) else (out, None)
            if wav is not None:
                audio = wav.reshape(-1).float().cpu().numpy()
        else:
            if speaker is not None:
                raise InferError("a speaker was given but speech is off")
            sequences = self.thinker.generate(**inputs, max_new_tokens=max_new_tokens, eos_token_id=self.im_end,
                                              pad_token_id=self.pad_id, streamer=streamer, **sampling)
        new = sequences[0, prompt_len:]
        text = self.tokenizer.decode(new, skip_special_tokens=True)
        thinking, answer = split_thinking(text) if self.source.variant == "thinking" else (None, text)
        return Generation(text=text if show_thinking else answer, thinking=thinking, audio=audio,
                          new_tokens=int((new != self.pad_id).sum()))
