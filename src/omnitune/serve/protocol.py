"""The OpenAI chat-completions wire format, the part of it omnitune serves: the request schema (what is accepted,
what is refused with a reason) and the response and stream-chunk bodies.

Field names follow OpenAI's API so the official clients work unchanged. Media content parts follow OpenAI where
it has one (`image_url`, `input_audio`) and vLLM's convention where it has none (`video_url`, `audio_url`).
"""

from __future__ import annotations

import base64
import time
import uuid
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from omnitune.errors import OmnituneError

AUDIO_FORMATS = ("wav", "mp3", "flac", "pcm16")
STREAM_AUDIO_FORMAT = "pcm16"  # as OpenAI: a streamed reply's audio comes as raw 16-bit little-endian PCM pieces


class RequestError(OmnituneError):
    """A request the server refuses: HTTP `status`, a message that says what to change, the offending `param`."""

    def __init__(self, message: str, status: int = 400, param: str | None = None,
                 kind: str = "invalid_request_error"):
        super().__init__(message)
        self.message, self.status, self.param, self.kind = message, status, param, kind

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": None}}


class AudioRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    voice: str
    format: str = "wav"


class StreamOptions(BaseModel):
    include_usage: bool = False


class ChatRequest(BaseModel):
    """A chat completion request. Fields OpenAI defines that would change the answer but are not supported here
    (tools, several choices, log-probabilities) are refused rather than silently ignored."""

    model_config = ConfigDict(extra="ignore")

    model: str
    messages: list[dict[str, Any]] = Field(min_length=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    seed: int | None = None
    modalities: list[Literal["text", "audio"]] | None = None
    audio: AudioRequest | None = None
    n: int = Field(1, ge=1, le=1)
    tools: list[Any] | None = None
    functions: list[Any] | None = None
    logprobs: bool | None = None

    def check(self) -> None:
        """The refusals that depend on several fields, said so a user can fix them."""
        if self.tools or self.functions:
            raise RequestError("tools and function calling are not supported by this server", param="tools")
        if self.logprobs:
            raise RequestError("logprobs are not supported by this server", param="logprobs")
        if self.wants_audio and self.audio is None:
            raise RequestError('modalities includes "audio": give audio: {"voice": ..., "format": ...}',
                               param="audio")
        if self.audio is not None and not self.wants_audio:
            raise RequestError('audio output was configured but modalities lacks "audio": send modalities: '
                               '["text", "audio"]', param="modalities")
        if self.audio is not None:
            if self.audio.format not in AUDIO_FORMATS:
                raise RequestError(f"unknown audio format {self.audio.format!r}; supported: "
                                   f"{', '.join(AUDIO_FORMATS)}", param="audio.format")
            if self.stream and self.audio.format != STREAM_AUDIO_FORMAT:
                raise RequestError(f"streamed audio comes as {STREAM_AUDIO_FORMAT} pieces: with stream: true "
                                   f"set audio.format to {STREAM_AUDIO_FORMAT!r}", param="audio.format")

    @property
    def wants_audio(self) -> bool:
        return "audio" in (self.modalities or [])

    @property
    def new_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


def parse_request(raw: Any) -> ChatRequest:
    """JSON body -> ChatRequest, or RequestError naming each wrong field."""
    try:
        req = ChatRequest.model_validate(raw)
    except ValidationError as e:
        problems = "; ".join(f"{'.'.join(map(str, err['loc'])) or 'body'}: {err['msg']}" for err in e.errors()[:5])
        first = e.errors()[0]["loc"] if e.errors() else ()
        raise RequestError(f"invalid request: {problems}", param=".".join(map(str, first)) or None) from None
    req.check()
    return req


# ---------------------------------------------------------------------------------------------------------------
# Responses


def pcm16(audio: np.ndarray) -> bytes:
    """float32 [-1, 1] -> 16-bit little-endian PCM."""
    return (np.clip(audio, -1.0, 1.0) * 32767).round().astype("<i2").tobytes()


def encode_audio(audio: np.ndarray, rate: int, fmt: str) -> bytes:
    """The whole reply's speech as a file of `fmt` (wav / mp3 / flac: 16-bit; pcm16: raw samples)."""
    if fmt == "pcm16":
        return pcm16(audio)
    import io

    import soundfile as sf

    buf = io.BytesIO()
    sf.write(buf, audio, rate, format=fmt.upper(), **({"subtype": "PCM_16"} if fmt in ("wav", "flac") else {}))
    return buf.getvalue()


class Reply:
    """The ids and times one reply shares across its body or its stream chunks."""

    def __init__(self, model: str):
        self.id = f"chatcmpl-{uuid.uuid4().hex}"
        self.audio_id = f"audio_{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.model = model

    def _base(self, obj: str) -> dict[str, Any]:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model}

    def completion(self, text: str, finish: str, usage: dict[str, int], thinking: str | None = None,
                   audio: bytes | None = None) -> dict[str, Any]:
        message: dict[str, Any] = {"role": "assistant", "content": text}
        if thinking is not None:
            message["reasoning_content"] = thinking
        if audio is not None:
            message["audio"] = {"id": self.audio_id, "data": base64.b64encode(audio).decode(),
                                "expires_at": self.created + 3600, "transcript": text}
        return {**self._base("chat.completion"), "usage": usage,
                "choices": [{"index": 0, "message": message, "finish_reason": finish}]}

    def chunk(self, delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
        return {**self._base("chat.completion.chunk"),
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}

    def audio_chunk(self, piece: np.ndarray) -> dict[str, Any]:
        return self.chunk({"audio": {"id": self.audio_id, "data": base64.b64encode(pcm16(piece)).decode(),
                                     "expires_at": self.created + 3600}})

    def usage_chunk(self, usage: dict[str, int]) -> dict[str, Any]:
        return {**self._base("chat.completion.chunk"), "choices": [], "usage": usage}


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}
