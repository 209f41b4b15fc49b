"""OpenAI chat messages -> an omnitune conversation, with every media item turned into a file the server may read.

Media arrive three ways: inline as base64 (`data:` URIs, `input_audio`), written to the request's own scratch
folder; as local paths (`file://` URLs or absolute paths), accepted only inside the folders the server was started
with (`--allow-media-dir`), checked with data/schema.py's `confine()` before anything is opened; and as remote URLs,
which are refused (the server fetches nothing). Decoding happens later, in the Inferencer: a file that does not
decode is a 400 from there.

Content parts: `text`; `image_url` {url}; `input_audio` {data, format}; `audio_url` {url} and `video_url` {url}
(vLLM's names; OpenAI has no video part). Roles: system (also `developer`), user, assistant (text only).
"""

from __future__ import annotations

import base64
import binascii
import re
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

from omnitune.data.schema import UnsafePathError, confine
from omnitune.serve.protocol import RequestError

# part type -> (our media kind, the key holding its URL)
URL_PARTS = {"image_url": "image", "audio_url": "audio", "video_url": "video"}
AUDIO_INPUT_FORMATS = ("wav", "mp3", "flac", "ogg", "m4a")
# The suffix tells the audio decoder which library reads the file; images and videos are sniffed by content.
SUFFIX = {"image/png": ".png", "image/jpeg": ".jpg", "image/jpg": ".jpg", "image/webp": ".webp",
          "image/gif": ".gif", "image/bmp": ".bmp", "audio/wav": ".wav", "audio/x-wav": ".wav", "audio/wave": ".wav",
          "audio/mpeg": ".mp3", "audio/mp3": ".mp3", "audio/flac": ".flac", "audio/x-flac": ".flac",
          "audio/ogg": ".ogg", "audio/mp4": ".m4a", "video/mp4": ".mp4", "video/webm": ".webm",
          "video/quicktime": ".mov", "video/x-matroska": ".mkv"}
_DATA_URI = re.compile(r"data:(?P<mime>[\w.+-]+/[\w.+-]+)?(?P<params>(;[\w.+-]+=[^;,]*)*)(?P<b64>;base64)?,",
                       re.ASCII)


class MediaSink:
    """Where one request's inline media are written, and which local folders it may read."""

    def __init__(self, scratch: Path, allowed: list[Path]):
        self.scratch, self.allowed = scratch, allowed
        self.labels: dict[str, str] = {}  # scratch file -> the part it came from, for error messages

    def write(self, data: bytes, suffix: str, at: str) -> Path:
        path = self.scratch / f"media{len(self.labels) + 1}{suffix}"
        path.write_bytes(data)
        self.labels[str(path)] = f"{at} (inline data)"
        return path

    @property
    def roots(self) -> list[Path]:
        """Every folder the conversation's media may be read from."""
        return [self.scratch, *self.allowed]


def to_conversation(messages: list[dict[str, Any]], sink: MediaSink) -> list[dict[str, Any]]:
    """OpenAI messages -> omnitune turns ({role, content}); RequestError names the message and part at fault."""
    turns = []
    for i, msg in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(msg, dict):
            raise RequestError(f"{where}: a message is an object with 'role' and 'content'", param=where)
        role = msg.get("role")
        if role in ("system", "developer", "assistant"):
            turns.append({"role": "system" if role == "developer" else role,
                          "content": _text_only(msg.get("content"), role, where)})
        elif role == "user":
            turns.append({"role": "user", "content": _user_content(msg.get("content"), where, sink)})
        else:
            raise RequestError(f"{where}: role {role!r} is not supported (system, developer, user, assistant)",
                               param=f"{where}.role")
    return turns


def _text_only(content: Any, role: str, where: str) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for j, part in enumerate(content):
            if not isinstance(part, dict) or part.get("type") not in ("text", "refusal"):
                raise RequestError(f"{where}.content[{j}]: {role} messages hold text only", param=f"{where}.content")
            value = part.get(part["type"])
            if not isinstance(value, str):
                raise RequestError(f"{where}.content[{j}]: a {part['type']} part needs a string "
                                   f"'{part['type']}'", param=f"{where}.content")
            texts.append(value)
        return "".join(texts)
    hint = " (send an earlier spoken reply back as its transcript text)" if role == "assistant" else ""
    raise RequestError(f"{where}: content must be a string or a list of text parts{hint}", param=f"{where}.content")


def _user_content(content: Any, where: str, sink: MediaSink) -> str | list[dict[str, Any]]:
    if isinstance(content, str):
        return content
    if not isinstance(content, list) or not content:
        raise RequestError(f"{where}: content must be a string or a non-empty list of parts",
                           param=f"{where}.content")
    items = []
    for j, part in enumerate(content):
        at = f"{where}.content[{j}]"
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text":
            if not isinstance(part.get("text"), str):
                raise RequestError(f"{at}: a text part needs a string 'text'", param=at)
            items.append({"type": "text", "text": part["text"]})
        elif kind == "input_audio":
            items.append({"type": "audio", "audio": str(_input_audio(part.get("input_audio"), at, sink))})
        elif kind in URL_PARTS:
            media = URL_PARTS[kind]
            ref = part.get(kind)
            url = ref.get("url") if isinstance(ref, dict) else ref
            if not isinstance(url, str) or not url:
                raise RequestError(f"{at}: a {kind} part needs {{\"url\": ...}}", param=at)
            items.append({"type": media, media: str(_media_file(url, media, at, sink))})
        else:
            raise RequestError(f"{at}: unsupported content part type {str(kind)[:40]!r} (supported: text, "
                               f"image_url, input_audio, audio_url, video_url)", param=at)
    return items


def _input_audio(spec: Any, at: str, sink: MediaSink) -> Path:
    if not isinstance(spec, dict) or not isinstance(spec.get("data"), str):
        raise RequestError(f"{at}: input_audio needs {{\"data\": base64, \"format\": \"wav\"|\"mp3\"}}", param=at)
    fmt = spec.get("format", "wav")
    if fmt not in AUDIO_INPUT_FORMATS:
        raise RequestError(f"{at}: input_audio format {str(fmt)[:20]!r} is not supported "
                           f"({', '.join(AUDIO_INPUT_FORMATS)})", param=at)
    return sink.write(_b64(spec["data"], at), "." + fmt, at)


def _media_file(url: str, media: str, at: str, sink: MediaSink) -> Path:
    """A data URI written to the scratch folder, or a local file confined to the allowed folders."""
    if url.startswith("data:"):
        m = _DATA_URI.match(url)
        if m is None or not m.group("b64"):
            raise RequestError(f"{at}: a data URI must be data:<type>;base64,<data>", param=at)
        mime = (m.group("mime") or "").lower()
        if mime and not mime.startswith(media + "/") and mime != "application/octet-stream":
            raise RequestError(f"{at}: a {media} part holds {mime} data", param=at)
        return sink.write(_b64(url[m.end():], at), SUFFIX.get(mime, ".bin"), at)
    parsed = urlparse(url)
    if parsed.scheme == "file":
        if parsed.netloc not in ("", "localhost"):
            raise RequestError(f"{at}: file URLs name a file on this server: file:///path", param=at)
        path = Path(unquote(parsed.path))
    elif not parsed.scheme and url.startswith("/"):
        path = Path(url)
    elif parsed.scheme in ("http", "https", "ftp", "s3", "gs"):
        raise RequestError(f"{at}: remote URLs are not fetched by this server: send the {media} inline as a "
                           "data: URI (base64)", param=at)
    else:
        raise RequestError(f"{at}: a {media} url is a data: URI, a file:// URL or an absolute path on the "
                           "server", param=at)
    if not sink.allowed:
        raise RequestError(f"{at}: this server reads no local files (it was started without --allow-media-dir); "
                           f"send the {media} inline as a data: URI", status=403, param=at)
    try:
        real = confine(path, sink.allowed)
    except UnsafePathError as e:
        raise RequestError(f"{at}: {e}", status=403, param=at) from None
    if not real.is_file():
        raise RequestError(f"{at}: {media} file not found: {path}", param=at)
    return real


def _b64(data: str, at: str) -> bytes:
    try:
        raw = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise RequestError(f"{at}: the media data is not valid base64", param=at) from None
    if not raw:
        raise RequestError(f"{at}: the media data is empty", param=at)
    return raw
