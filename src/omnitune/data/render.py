"""One record -> model inputs: chat template text, one processor call, checked placeholder counts, labels.

Each record gets its own processor call: in a batched call shorter audio clips get a different frame count, so
token counts would depend on the batch. Labels are -100 everywhere but each assistant turn's content and its
`<|im_end|>` (the `<|im_start|>assistant\\n` header and the `\\n` after `<|im_end|>` are masked).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from omnitune.data.media import (SAMPLE_RATE, AudioTooLong, MediaError, frame_count, load_audio, load_image,
                                 load_video, video_duration)
from omnitune.data.schema import Record, RecordError
from omnitune.recipe import DataConfig
from omnitune.tokens import IGNORE_INDEX

PAD_TOKENS = ("<|audio_pad|>", "<|image_pad|>", "<|video_pad|>")


@dataclass
class Decoded:
    """A record's media, decoded, in the order the processor wants them."""

    audios: list[np.ndarray] = field(default_factory=list)  # standalone clips and video tracks, in text order
    images: list[Any] = field(default_factory=list)
    videos: list[np.ndarray] = field(default_factory=list)
    fps: float | None = None  # shared by all videos of the record (one processor call takes one fps)
    audio_from_video: list[int | None] = field(default_factory=list)  # per audio: None or the video it came from


def audio_token_count(n_samples: int) -> int:
    """Audio tokens the model produces for a 16 kHz clip of n_samples (mel frames L = n // 160)."""
    return _mel_tokens(n_samples // 160)


def _mel_tokens(mel: int) -> int:
    return 13 * (mel // 100) + math.ceil((mel % 100) / 8)


def audio_seconds_that_fit(max_length: int) -> float:
    """The longest clip whose audio tokens alone fit in max_length (audio_token_count's inverse): a longer one
    can never fit, so it is refused from its header's duration before it is decoded."""
    seconds, rest = divmod(max_length, 13)  # 13 tokens per 100 mel frames; the rest ceil(frames / 8)
    return ((100 * seconds + 8 * rest + 1) * 160 - 1) / SAMPLE_RATE


def decode_record(record: Record, data: DataConfig) -> Decoded:
    """Decode every media item of a record; MediaError is turned into a RecordError with file:line."""
    out = Decoded()
    max_seconds = audio_seconds_that_fit(data.max_length)
    try:
        video_paths = [m.path for m in record.media if m.kind == "video"]
        if video_paths:
            # One processor call takes one fps: sample every video at the lowest rate any of them needs.
            out.fps = min(frame_count(video_duration(p), data.video_fps, data.video_max_frames)[1]
                          for p in video_paths)
        for m in record.media:
            if m.kind == "audio":
                out.audios.append(load_audio(m.path, max_seconds))
                out.audio_from_video.append(None)
            elif m.kind == "image":
                out.images.append(load_image(m.path, data.image_max_pixels))
            else:
                v = load_video(m.path, out.fps, data.video_max_frames, data.video_max_pixels,
                               with_audio=data.use_audio_in_video, max_audio_seconds=max_seconds)
                if v.audio is not None:
                    out.audios.append(v.audio)
                    out.audio_from_video.append(len(out.videos))
                out.videos.append(v.frames)
    except AudioTooLong as e:
        if e.at_least:
            what = f"over {e.seconds:.1f} s of audio, more tokens than data.max_length={data.max_length}"
        else:
            what = (f"{e.seconds:.1f} s of audio is ~{audio_token_count(round(e.seconds * SAMPLE_RATE))} tokens, "
                    f"over data.max_length={data.max_length}")
        raise RecordError(record.file, record.line, f"{e.path}: {what} (shorten or split the clip, or raise "
                          "data.max_length)") from None
    except MediaError as e:
        raise RecordError(record.file, record.line, str(e)) from None
    return out


def processor_kwargs(data: DataConfig, media: Decoded) -> dict[str, Any]:
    """The keyword arguments of our processor call (besides text): media, sizes, fps, audio-in-video."""
    kw: dict[str, Any] = {"return_tensors": "np"}
    if media.audios:
        kw["audio"] = media.audios
    if media.images:
        kw["images"] = media.images
        kw["images_kwargs"] = {"size": {"shortest_edge": data.image_min_pixels,
                                        "longest_edge": data.image_max_pixels}}
    if media.videos:
        kw["videos"] = media.videos
        # The processor's own default size replaces the video processor's: pass it (and fps) every call.
        kw["videos_kwargs"] = {"size": {"shortest_edge": min(data.image_min_pixels, data.video_max_pixels),
                                        "longest_edge": data.video_max_pixels},
                               "fps": media.fps, "do_sample_frames": False, "cap_pixels_per_frame": False}
        if data.use_audio_in_video:
            kw["load_audio_from_video"] = True
            kw["audio_from_video_indices"] = media.audio_from_video
    return kw


def render(processor, record: Record, data: DataConfig, media: Decoded | None = None,
           generation: bool = False) -> dict[str, Any]:
    """Render one validated record: decode its media (unless given), call the processor, check the placeholder
    counts, add labels. `generation`: the record is a prompt (it ends with a user turn) to be answered: the
    assistant header is appended, nothing is labelled and data.max_length does not apply."""
    media = decode_record(record, data) if media is None else media
    text = processor.apply_chat_template(record.messages, tokenize=False, add_generation_prompt=generation)
    try:
        out = processor(text=text, **processor_kwargs(data, media))
    except Exception as e:  # the processor's own checks (e.g. mismatched placeholders) end up here
        raise RecordError(record.file, record.line, f"processor failed: {e}") from None
    sample = {k: torch.from_numpy(np.asarray(v)) for k, v in out.items()}
    ids = sample["input_ids"][0]
    sample["input_ids"] = ids
    sample["attention_mask"] = sample["attention_mask"][0]
    fail = lambda reason: RecordError(record.file, record.line, reason)  # noqa: E731
    _check_counts(processor, ids, sample, fail)
    if generation:
        sample["labels"] = torch.full_like(ids, IGNORE_INDEX)
    else:
        if len(ids) > data.max_length:
            raise fail(f"{len(ids)} tokens is over data.max_length={data.max_length} "
                       "(raise data.max_length, shorten the record, or lower the media resolution/fps)")
        sample["labels"] = assistant_labels(ids, processor.tokenizer, record.n_assistant, fail)
    mods = {"text"}
    if media.images or media.videos:
        mods.add("vision")
    if media.audios:  # includes a video's own track when use_audio_in_video
        mods.add("audio")
    sample["modalities"] = sorted(mods)
    sample["use_audio_in_video"] = bool(data.use_audio_in_video and media.videos)
    return sample


def _check_counts(processor, ids: torch.Tensor, sample: dict, fail) -> None:
    """Placeholder tokens must match the features: the model checks images and videos, not audio."""
    tok = processor.tokenizer
    n = lambda t: int((ids == tok.convert_tokens_to_ids(t)).sum())  # noqa: E731
    want_audio = 0
    if "feature_attention_mask" in sample:
        want_audio = sum(_mel_tokens(int(m)) for m in sample["feature_attention_mask"].sum(-1))
    if n("<|audio_pad|>") != want_audio:
        raise fail(f"{n('<|audio_pad|>')} audio placeholder tokens but the features need {want_audio}")
    for key, pad in (("image_grid_thw", "<|image_pad|>"), ("video_grid_thw", "<|video_pad|>")):
        want = int(sample[key].prod(-1).sum()) // 4 if key in sample else 0
        if n(pad) != want:
            raise fail(f"{n(pad)} {pad} tokens but the features need {want}")


def assistant_labels(ids: torch.Tensor, tokenizer, n_assistant: int, fail) -> torch.Tensor:
    """-100 everywhere but each assistant turn's content and its <|im_end|>; checks every turn was found."""
    header = tokenizer.encode("<|im_start|>assistant\n", add_special_tokens=False)
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    labels = torch.full_like(ids, IGNORE_INDEX)
    seq = ids.tolist()
    h, found, i = len(header), 0, 0
    while i <= len(seq) - h:
        if seq[i:i + h] != header:
            i += 1
            continue
        start = i + h
        try:
            end = seq.index(im_end, start)
        except ValueError:
            raise fail("an assistant turn has no <|im_end|>") from None
        labels[start:end + 1] = ids[start:end + 1]
        found += 1
        i = end + 1
    if found != n_assistant:
        raise fail(f"found {found} assistant spans in the tokens but the record has {n_assistant} assistant "
                   "turns (an assistant text starting with a newline merges with the turn header)")
    return labels


def render_segments(input_ids, labels, tokenizer) -> list[tuple[str, bool]]:
    """The rendered sample as (text, trained) pieces; runs of pad tokens collapse to `<|audio_pad|>x52`."""
    ids = [int(x) for x in input_ids]
    trained = [int(x) != IGNORE_INDEX for x in labels]
    pads = {tokenizer.convert_tokens_to_ids(t): t for t in PAD_TOKENS}
    out: list[tuple[str, bool]] = []
    i = 0
    while i < len(ids):
        j = i + 1
        if ids[i] in pads:
            while j < len(ids) and ids[j] == ids[i] and trained[j] == trained[i]:
                j += 1
            piece = pads[ids[i]] + (f"x{j - i}" if j - i > 1 else "")
        else:
            while j < len(ids) and ids[j] not in pads and trained[j] == trained[i]:
                j += 1
            piece = tokenizer.decode(ids[i:j], skip_special_tokens=False)
        if out and out[-1][1] == trained[i]:
            out[-1] = (out[-1][0] + piece, trained[i])
        else:
            out.append((piece, trained[i]))
        i = j
    return out
