"""Generation from a run directory, a recipe or a checkpoint: conversation in (any mix of audio, image, video,
text), text out (streamed), and for checkpoints with a Talker, speech out as a 24 kHz waveform.

    gen = Inferencer("runs/demo").generate([{"role": "user", "content": "Hi"}], speaker="ethan", stream=print)
    gen.text, gen.audio, gen.save_wav("out.wav")

What a source loads to is model/source.py's; this module only generates. Speech loads the full model
(Thinker + Talker + Code2Wav); without speech only the Thinker is loaded, so no Talker memory is spent.
"""

from __future__ import annotations

import contextlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from transformers import TextStreamer

from omnitune.data.collate import OmniCollator, to_device
from omnitune.data.render import render
from omnitune.data.schema import Record, RecordError, validate_record
from omnitune.errors import OmnituneError
from omnitune.model import parts
from omnitune.model.source import (check_adapter_runs, has_talker, load_generation_processor, load_model,
                                   load_with_adapters, resolve_source)
from omnitune.model.speech_stream import stream_speech
from omnitune.recipe import DataConfig, Recipe
from omnitune.tokens import pad_id

SPEECH_RATE = 24000
SPEECH_CHUNK = 12  # Talker frames per streamed speech piece (12.5 frames a second: ~1 s of audio)
OWN_ADAPTER = "_source"  # the served source's own LoRA, among the adapters of Inferencer(adapters=...)
THINK_END = "</think>"


class InferError(OmnituneError, ValueError):
    """A request the model cannot serve, said so a user can fix it."""


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
                  base_dir: str | Path | None = None, media_roots: list[Path] | None = None) -> Record:
    """Validate a conversation that ends with a user turn; media paths resolve against `base_dir` (default cwd)
    and must lie inside `media_roots` (default: anywhere: the person at the terminal names their own files)."""
    if not messages or messages[-1].get("role") != "user":
        raise InferError("the conversation to answer must end with a user turn")
    where = Path(base_dir or Path.cwd()) / "<conversation>"
    return validate_record({"conversations": messages}, where, 0, variant, require_answer=False,
                           media_roots=[Path("/")] if media_roots is None else media_roots)


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
    warnings: list[str] = field(default_factory=list)  # what a user should know about this answer
    prompt_tokens: int = 0

    def save_wav(self, path: str | Path) -> Path:
        if self.audio is None:
            raise InferError("this generation has no speech (speech was off or the model has no Talker)")
        import soundfile as sf

        sf.write(str(path), self.audio, self.sample_rate, subtype="PCM_16")
        return Path(path)


SILENT_RMS = 1e-3  # below this (full scale 1.0) a waveform is near-silence: nothing a listener would hear
MIN_SPEECH_SECONDS = 0.1


def speech_problem(audio: np.ndarray | None, rate: int = SPEECH_RATE) -> str | None:
    """Why a generated waveform is not speech a listener would hear (missing, too short, silent), or None."""
    if audio is None or audio.size == 0:
        return "the Talker produced no speech"
    seconds = audio.size / rate
    if seconds < MIN_SPEECH_SECONDS:
        return f"the Talker produced only {1000 * seconds:.0f} ms of audio"
    rms = float(np.sqrt(np.mean(np.square(audio, dtype=np.float64))))
    if rms < SILENT_RMS:
        return f"the generated speech is near-silent (RMS {rms:.1e} over {seconds:.1f} s)"
    return None


class WavWriter:
    """Write speech pieces to a 24 kHz 16-bit wav as they arrive (`generate(on_audio=writer.write)`): the file
    grows while the Talker speaks. Opened at the first piece, so a reply without speech leaves no file."""

    def __init__(self, path: str | Path, sample_rate: int = SPEECH_RATE):
        self.path, self.sample_rate, self.file, self.samples = Path(path), sample_rate, None, 0
        self.first_at: float | None = None  # time.perf_counter() when the first piece arrived

    def write(self, piece: np.ndarray) -> None:
        import soundfile as sf

        if self.file is None:
            self.first_at = time.perf_counter()
            self.file = sf.SoundFile(str(self.path), "w", self.sample_rate, 1, subtype="PCM_16")
        self.file.write(piece)
        self.file.flush()
        self.samples += len(piece)

    def close(self) -> None:
        if self.file is not None:
            self.file.close()


class Inferencer:
    """Load once, generate many times. `speech=False` loads only the Thinker; `speech=None` (default) loads the
    Talker when the checkpoint has one and the variant is not Thinking. `adapters` ({name: run dir}) attaches other
    runs' LoRA over the same base, unmerged, chosen per call with `generate(adapter=name)`. `model`: one already
    built (the benchmark's random real-width model); the source then lends only its processor and settings."""

    def __init__(self, source: str | Path | Recipe, *, adapter: str | Path | None = None, speech: bool | None = None,
                 dtype: str | None = None, variant: str | None = None, device: str | None = None,
                 data: DataConfig | None = None, merge: bool = True,
                 adapters: dict[str, str | Path] | None = None, model: torch.nn.Module | None = None):
        self.source = resolve_source(source, adapter=adapter, dtype=dtype, variant=variant)
        if data is not None:
            self.source.data = data
        if speech is None:
            speech = self.source.variant != "thinking" and has_talker(self.source.model.path)
        self.processor = load_generation_processor(self.source)
        self.tokenizer = self.processor.tokenizer
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        # Load straight onto the GPU: a CPU detour needs ~70 GB of host memory at full size.
        device_map = {"": self.device} if self.device.type == "cuda" else None
        self.lora = None  # the PeftModel holding every adapter, when several are served
        if model is not None:  # built by the caller (benchmarks: random weights at the real widths)
            self.model = model.eval()
        elif adapters:
            own = self.source.weights
            named = check_adapter_runs(self.source, adapters)
            if own is not None and own[0] == "adapter":
                named = {OWN_ADAPTER: own[1], **named}
            self.model, self.lora = load_with_adapters(self.source, named, speech=speech, device_map=device_map)
        else:
            self.model = load_model(self.source, speech=speech, merge=merge, device_map=device_map)
        self.model.to(self.device)
        self.has_speech = speech
        self.im_end = self.tokenizer.convert_tokens_to_ids("<|im_end|>")
        self.pad_id = pad_id(self.tokenizer)

    @property
    def thinker(self) -> torch.nn.Module:
        return parts.thinker_of(self.model)

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
                 base_dir: str | Path | None = None, on_audio: Callable[[np.ndarray], None] | None = None,
                 speech_chunk: int = SPEECH_CHUNK, adapter: str | None = None,
                 media_roots: list[Path] | None = None, max_prompt_tokens: int | None = None) -> Generation:
        """Answer one conversation (ending with a user turn). Speech defaults to on when the model was loaded
        with it; `stream` receives text pieces as they are generated, `on_audio` float32 speech pieces (every
        `speech_chunk` Talker frames) as the Talker makes them. `adapter` picks one of `adapters` (None: the
        source's own weights); `media_roots` confines media paths; a longer prompt than `max_prompt_tokens` is
        refused."""
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
            record = prompt_record(as_messages(conversation), variant=self.source.variant, base_dir=base_dir,
                                   media_roots=media_roots)
            sample = render(self.processor, record, data, generation=True)
        except RecordError as e:  # bad roles, missing or undecodable media: there is no file:line to point at
            raise InferError(e.reason) from None
        if max_prompt_tokens is not None and len(sample["input_ids"]) > max_prompt_tokens:
            raise InferError(f"the prompt is {len(sample['input_ids'])} tokens, over the limit of {max_prompt_tokens} "
                             "(shorten the conversation or its media)")
        inputs = to_device(collate_prompts([sample], self.pad_id), self.device, self.thinker.dtype)
        streamer = (_Streamer(self.tokenizer, stream, hide_thinking=not show_thinking and
                              self.source.variant == "thinking") if stream else None)
        sampling = dict(do_sample=do_sample, **({"temperature": temperature, "top_p": top_p} if do_sample else {}))
        prompt_len = inputs["input_ids"].shape[1]
        audio, warnings = None, []
        if speech:
            spk = self.check_speaker(speaker or "ethan")
            # Speech is decoded by our streaming Code2Wav (model/speech_stream.py) whether or not it is streamed.
            with self.using_adapter(adapter), stream_speech(self.model, on_audio, speech_chunk) as decoder:
                out = self.model.generate(
                    **inputs, speaker=spk, return_audio=True, thinker_max_new_tokens=max_new_tokens,
                    thinker_eos_token_id=self.im_end, thinker_pad_token_id=self.pad_id, thinker_streamer=streamer,
                    talker_max_new_tokens=max_speech_tokens, **{f"thinker_{k}": v for k, v in sampling.items()})
            sequences = out[0] if isinstance(out, tuple) else out
            audio = decoder.waveform
            problem = speech_problem(audio)
            warnings += [problem] if problem else []
        else:
            if speaker is not None:
                raise InferError("a speaker was given but speech is off")
            with self.using_adapter(adapter):
                sequences = self.thinker.generate(**inputs, max_new_tokens=max_new_tokens, eos_token_id=self.im_end,
                                                  pad_token_id=self.pad_id, streamer=streamer, **sampling)
        new = sequences[0, prompt_len:]
        text = self.tokenizer.decode(new, skip_special_tokens=True)
        thinking, answer = split_thinking(text) if self.source.variant == "thinking" else (None, text)
        return Generation(text=text if show_thinking else answer, thinking=thinking, audio=audio,
                          new_tokens=int((new != self.pad_id).sum()), prompt_tokens=prompt_len,
                          warnings=warnings)

    @property
    def adapters(self) -> list[str]:
        """The adapters `generate(adapter=...)` can pick (the source's own one is the default, not listed)."""
        return sorted(n for n in self.lora.peft_config if n != OWN_ADAPTER) if self.lora is not None else []

    def using_adapter(self, name: str | None) -> contextlib.AbstractContextManager:
        """Make `name` (None: the source's own weights) the active adapter for one generation."""
        if self.lora is None:
            if name is not None:
                raise InferError(f"adapter {name!r} was asked for, but this Inferencer was loaded without adapters")
            return contextlib.nullcontext()
        name = name or (OWN_ADAPTER if OWN_ADAPTER in self.lora.peft_config else None)
        if name is None:
            return self.lora.disable_adapter()  # the base model
        if name not in self.lora.peft_config:
            raise InferError(f"unknown adapter {name!r}; loaded: {', '.join(self.adapters)}")
        self.lora.set_adapter(name)
        return contextlib.nullcontext()
