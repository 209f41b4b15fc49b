"""The conversation format: read JSONL or a JSON list and validate every record before any media is touched.

A record is `{"conversations": [{"role": ..., "content": ...}, ...]}` (../shared/DESIGN.md). Content is a string
or a list of items `{"type": "text", "text": ...}` / `{"type": "audio"|"image"|"video", "<type>": "path"}`;
media paths are relative to the data file and must resolve (symlinks followed) inside the allowed media roots
(the data file's folder unless the caller says otherwise), checked before any media file is opened. Every problem,
bad bytes and absurd nesting included, becomes a `RecordError` that says `file:line: reason`.
"""

from __future__ import annotations

import json
import re
import reprlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

from omnitune.errors import OmnituneError

MEDIA_TYPES = ("audio", "image", "video")
CONTENT_TYPES = ("text",) + MEDIA_TYPES
ROLES = ("system", "user", "assistant")
# Placeholders the processor expands; a literal one in user text would desynchronise token and feature counts.
RESERVED = ("<|audio_pad|>", "<|image_pad|>", "<|video_pad|>", "<|im_start|>", "<|im_end|>", "<|audio_start|>",
            "<|audio_end|>", "<|vision_start|>", "<|vision_end|>")


class UnsafePathError(OmnituneError):
    """A path that may not be read: it resolves outside every allowed folder, or cannot be resolved at all."""


class RecordError(OmnituneError):
    """A record that cannot be used, located by file and line."""

    def __init__(self, file: str | Path, line: int, reason: str):
        super().__init__(f"{file}:{line}: {reason}")
        self.file, self.line, self.reason = str(file), line, reason

    def __reduce__(self):  # survives the trip back from a worker process
        return (RecordError, (self.file, self.line, self.reason))


@dataclass
class Media:
    kind: str  # audio | image | video
    path: Path


@dataclass
class Record:
    """A validated conversation: messages ready for the chat template, media in the order they are rendered."""

    file: str
    line: int
    messages: list[dict[str, Any]]
    media: list[Media] = field(default_factory=list)
    speech: Path | None = None  # the last assistant turn's target speech (voice training), resampled to 24 kHz
    speaker: str | None = None  # its voice: an existing speaker or a new one (lower case)

    @property
    def n_assistant(self) -> int:
        return sum(m["role"] == "assistant" for m in self.messages)


def read_records(path: str | Path, variant: str = "instruct",
                 media_roots: Sequence[str | Path] | None = None) -> Iterator[Record | RecordError]:
    """Yield each record of a JSONL file or JSON list, validated; a bad one is yielded as its RecordError.

    media_roots: the folders media may resolve inside (default: the data file's folder)."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise RecordError(path, 0, "data file not found") from None
    for line, raw in _json_values(path, data):
        if isinstance(raw, RecordError):
            yield raw
            continue
        try:
            yield validate_record(raw, path, line, variant, media_roots=media_roots)
        except RecordError as e:
            yield e


_TOO_DEEP = "nested too deeply to read (over ~1000 levels of lists/objects)"


def _json_values(path: Path, data: bytes) -> Iterator[tuple[int, Any]]:
    if data.lstrip()[:1] == b"[":
        yield from _json_list(path, _utf8(path, data))  # a list is decoded whole: bad bytes fail the file
        return
    # JSONL is decoded line by line, so one bad line is one bad record.
    for i, raw in enumerate(data.splitlines(), 1):
        if not raw.strip():
            continue
        try:
            yield i, json.loads(_utf8(path, raw, i))
        except RecordError as e:
            yield i, e
        except json.JSONDecodeError as e:
            yield i, RecordError(path, i, f"bad JSON: {e.msg} (column {e.colno})")
        except RecursionError:
            yield i, RecordError(path, i, _TOO_DEEP)


def _utf8(path: Path, data: bytes, first_line: int = 1) -> str:
    """`data` decoded as UTF-8, or a RecordError at the line and column of the first bad byte."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = first_line + data.count(b"\n", 0, e.start)
        column = e.start - data.rfind(b"\n", 0, e.start)
        raise RecordError(path, line, f"not UTF-8 text: byte {data[e.start]:#04x} at column {column} "
                                      "(save the file as UTF-8)") from None


def _json_list(path: Path, text: str) -> Iterator[tuple[int, Any]]:
    # Decode element by element so each record keeps the line it starts on.
    dec = json.JSONDecoder()
    pos = text.index("[") + 1
    while True:
        pos = _skip_ws(text, pos)
        if pos < len(text) and text[pos] == "]":
            return
        line = text.count("\n", 0, pos) + 1
        # The rest of a JSON list cannot be located after a bad value: report it and stop.
        try:
            value, pos = dec.raw_decode(text, pos)
        except json.JSONDecodeError as e:
            yield e.lineno, RecordError(path, e.lineno, f"bad JSON: {e.msg} (column {e.colno}); "
                                                        "the rest of this JSON list cannot be read")
            return
        except RecursionError:
            yield line, RecordError(path, line, f"{_TOO_DEEP}; the rest of this JSON list cannot be read")
            return
        yield line, value
        pos = _skip_ws(text, pos)
        if pos < len(text) and text[pos] == ",":
            pos += 1
        elif pos >= len(text) or text[pos] != "]":
            line = text.count("\n", 0, pos) + 1
            yield line, RecordError(path, line, "bad JSON: expected ',' or ']' after a record")
            return


def _skip_ws(text: str, pos: int) -> int:
    while pos < len(text) and text[pos] in " \t\r\n":
        pos += 1
    return pos


def validate_record(raw: Any, file: str | Path, line: int, variant: str = "instruct",
                    require_answer: bool = True, media_roots: Sequence[str | Path] | None = None) -> Record:
    """Check one decoded JSON value; return it as a Record or raise RecordError.

    require_answer=False accepts a conversation ending in a user turn (a prompt for generation).
    media_roots: the folders media may resolve inside (default: the folder of `file`)."""
    def fail(reason: str) -> RecordError:
        return RecordError(file, line, reason)

    if not isinstance(raw, dict) or not isinstance(raw.get("conversations"), list):
        raise fail("a record is an object with a 'conversations' list")
    turns = raw["conversations"]
    if not turns:
        raise fail("'conversations' is empty")
    base = Path(file).resolve().parent
    roots = [base] if media_roots is None else list(media_roots)
    messages: list[dict[str, Any]] = []
    media: list[Media] = []
    speech: list[tuple[int, Path]] = []
    prev = None
    for i, turn in enumerate(turns):
        where = f"turn {i + 1}"
        if not isinstance(turn, dict) or "role" not in turn or "content" not in turn:
            raise fail(f"{where}: a turn is an object with 'role' and 'content'")
        role = turn["role"]
        if role not in ROLES:
            raise fail(f"{where}: unknown role {reprlib.repr(role)} (roles: {', '.join(ROLES)})")
        if role == "system" and i != 0:
            raise fail(f"{where}: a system turn may only come first")
        if role == "assistant" and prev != "user":
            raise fail(f"{where}: wrong role order: an assistant turn must follow a user turn, not "
                       f"{prev or 'the start'}")
        # Several user turns in a row (a clip, then a question) render fine and are allowed.
        if role == "assistant":
            messages.append(_assistant(turn, where, variant, fail, lambda ref, where=where: _media_path(
                "audio", ref, where, base, roots, fail)))
            if "speech" in messages[-1]:
                speech.append((i, messages[-1].pop("speech")))
        else:
            content = _content(turn["content"], role, where, base, roots, media, fail)
            messages.append({"role": role, "content": content})
        prev = role
    if prev != "assistant" and (require_answer or prev != "user"):
        raise fail("the last turn must be an assistant turn: only assistant turns are trained")
    early = [i for i, _ in speech if i != len(turns) - 1]
    if early:
        raise fail(f"turn {early[0] + 1}: target speech (an audio item in an assistant turn) belongs in the "
                   "last assistant turn, the one the Talker speaks")
    speaker = raw.get("speaker")
    if speaker is not None and (not isinstance(speaker, str) or not _SPEAKER.fullmatch(speaker)):
        raise fail(f"'speaker' must be a name of letters, digits, '_' or '-' (got {reprlib.repr(speaker)})")
    return Record(str(file), line, messages, media, speech[-1][1] if speech else None,
                  speaker.lower() if speaker else None)


_SPEAKER = re.compile(r"[A-Za-z0-9_-]{1,64}")


def _content(content: Any, role: str, where: str, base: Path, roots: list, media: list[Media],
             fail) -> str | list[dict]:
    if isinstance(content, str):
        _check_reserved(content, where, fail)
        return content
    if not isinstance(content, list):
        raise fail(f"{where}: content must be a string or a list of items")
    items = []
    for item in content:
        kind = item.get("type") if isinstance(item, dict) else None
        if kind not in CONTENT_TYPES:
            raise fail(f"{where}: unsupported content type {reprlib.repr(kind)} "
                       f"(supported: {', '.join(CONTENT_TYPES)})")
        if kind == "text":
            if not isinstance(item.get("text"), str):
                raise fail(f"{where}: a text item needs a string 'text'")
            _check_reserved(item["text"], where, fail)
            items.append({"type": "text", "text": item["text"]})
            continue
        p = _media_path(kind, item.get(kind, item.get("path")), where, base, roots, fail)
        media.append(Media(kind, p))
        items.append({"type": kind, kind: str(p)})
    return items


def _media_path(kind: str, ref: Any, where: str, base: Path, roots: list, fail) -> Path:
    """The file a media item names, resolved inside the allowed roots, or a RecordError saying why not."""
    if not isinstance(ref, str) or not ref:
        raise fail(f"{where}: a {kind} item needs a file path in '{kind}'")
    if "://" in ref:
        raise fail(f"{where}: {kind} {ref!r} is a URL; download it and give a local path")
    try:
        p = confine(base / Path(ref).expanduser(), roots)
        found = p.is_file()
    except UnsafePathError as e:
        raise fail(f"{where}: {kind} {e}; media must be files inside the data file's folder or a folder "
                   "listed in data.media_roots") from None
    except (OSError, RuntimeError) as e:  # a name too long for the file system, an unknown ~user
        raise fail(f"{where}: {kind} {ref[:200]!r} cannot be used: {str(e)[:200]}") from None
    if not found:
        raise fail(f"{where}: {kind} file not found: {p}")
    return p


def confine(path: str | Path, roots: Sequence[str | Path]) -> Path:
    """`path` resolved (symlinks followed) if it lies inside one of `roots`, else UnsafePathError.

    Data and requests name files; only the folders their owner chose may be read (no `../`, absolute path or
    symlink out of them). Check before opening: the resolved path is the one to open."""
    try:
        real = Path(path).resolve()
    except (OSError, ValueError, RuntimeError) as e:  # a NUL byte, a symlink loop
        raise UnsafePathError(f"{str(path)[:200]!r} cannot be resolved: {e}") from None
    allowed = [Path(r).resolve() for r in roots]
    if any(real.is_relative_to(r) for r in allowed):
        return real
    raise UnsafePathError(f"{str(path)[:200]!r} resolves to {real}, outside the allowed folders "
                          f"({', '.join(map(str, allowed))})")


def _check_reserved(text: str, where: str, fail) -> None:
    for tok in RESERVED:
        if tok in text:
            raise fail(f"{where}: text contains the reserved token {tok}; use a media item instead")


def _assistant(turn: dict, where: str, variant: str, fail, speech_path) -> dict[str, Any]:
    """The assistant message for the chat template; an audio item (its target speech, `speech_path` resolves it)
    comes back under "speech"."""
    content = turn["content"]
    speech = None
    if isinstance(content, list):
        parts = []
        for item in content:
            kind = item.get("type") if isinstance(item, dict) else None
            if kind == "audio":
                if speech is not None:
                    raise fail(f"{where}: an assistant turn holds one target speech file, not several")
                speech = speech_path(item.get("audio", item.get("path")))
                continue
            if kind != "text":
                raise fail(f"{where}: unsupported content type {reprlib.repr(kind)} in an assistant turn "
                           "(assistant turns hold text and, for voice training, one audio item: the speech)")
            if not isinstance(item.get("text"), str):
                raise fail(f"{where}: a text item needs a string 'text'")
            parts.append(item["text"])
        text = "".join(parts)
    elif isinstance(content, str):
        text = content
    else:
        raise fail(f"{where}: content must be a string or a list of text items")
    _check_reserved(text, where, fail)
    reasoning = turn.get("reasoning_content")
    if reasoning is not None and not isinstance(reasoning, str):
        raise fail(f"{where}: 'reasoning_content' must be a string")
    has_think = "<think>" in text or "</think>" in text
    if variant != "thinking" and (reasoning or has_think):
        what = "'reasoning_content'" if reasoning else "a <think> block"
        raise fail(f"{where}: {what} needs the thinking variant (model.variant is {variant!r}); "
                   "use --set model.variant=thinking, or drop the reasoning")
    answer = text.split("</think>")[-1] if "</think>" in text else text
    if not text.strip() and not (reasoning or "").strip():
        raise fail(f"{where}: empty assistant turn")
    if not answer.strip():
        raise fail(f"{where}: assistant turn has reasoning but an empty answer")
    if text.startswith("\n") and "</think>" not in text:
        raise fail(f"{where}: assistant text starts with a newline, which would merge with the turn header's "
                   "newline into one token; remove it")
    if "<think>" in text and "</think>" not in text:
        raise fail(f"{where}: <think> without </think>")
    msg: dict[str, Any] = {"role": "assistant", "content": text}
    if reasoning:
        msg["reasoning_content"] = reasoning
    if speech is not None:
        msg["speech"] = speech
    return msg
