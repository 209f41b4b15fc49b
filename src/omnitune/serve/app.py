"""The HTTP API (FastAPI): `POST /v1/chat/completions`, `GET /v1/models`, `GET /health`.

Every refusal is an OpenAI-style error body ({"error": {"message", "type", "param", "code"}}) with a 4xx status,
so the official clients raise their usual exceptions with our message. A streamed request is answered with
server-sent events only once its first piece exists: a request that fails before that (bad media, a prompt over
the limit) still gets its 4xx instead of a stream that breaks off.
"""

from __future__ import annotations

import hmac
import json
import logging
import shutil
import tempfile
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

from omnitune.infer import Generation, InferError
from omnitune.serve.engine import Engine, Job
from omnitune.serve.messages import MediaSink, to_conversation
from omnitune.serve.protocol import ChatRequest, Reply, RequestError, encode_audio, parse_request, usage

log = logging.getLogger("omnitune.serve")


@dataclass
class Limits:
    max_new_tokens: int = 2048  # the most a request may ask for (and the default when it asks for none)
    max_speech_tokens: int = 4096  # Talker frames (12.5 a second) a spoken reply may last
    max_request_bytes: int = 64 << 20  # inline media included
    allowed_media_dirs: list[Path] = field(default_factory=list)


def create_app(engine: Engine, models: dict[str, str | None], limits: Limits | None = None,
               api_key: str | None = None) -> FastAPI:
    """The app serving `engine`; `models` maps each served model id to its adapter name (None: the source's own
    weights)."""
    limits = limits or Limits()
    app = FastAPI(title="omnitune", docs_url=None, redoc_url=None, openapi_url=None)
    inferencer = engine.inferencer

    @app.exception_handler(RequestError)
    async def refused(_: Request, e: RequestError) -> JSONResponse:
        return JSONResponse(e.body(), status_code=e.status)

    def authorize(request: Request) -> None:
        if api_key is None:
            return
        given = request.headers.get("authorization", "")
        if not hmac.compare_digest(given.encode(), f"Bearer {api_key}".encode()):
            raise RequestError("missing or wrong API key: send 'Authorization: Bearer <key>'", status=401,
                               kind="authentication_error")

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/v1/models")
    async def list_models(request: Request) -> dict[str, Any]:
        authorize(request)
        return {"object": "list", "data": [{"id": name, "object": "model", "created": 0, "owned_by": "omnitune"}
                                           for name in models]}

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        authorize(request)
        try:
            return await answer(request)
        except RequestError:
            raise
        except Exception as e:  # a bug, or a failure inside generation: this request fails, the server goes on
            log.exception("request failed")
            return JSONResponse(_internal(e).body(), status_code=500)

    async def answer(request: Request):
        req = parse_request(await _json_body(request, limits.max_request_bytes))
        job = _job(req)
        reply = Reply(req.model)
        events = engine.run(job)
        first = await anext(events)
        if first[0] == "error":
            raise _refusal(first[1], job)
        if req.stream:
            return StreamingResponse(_sse(req, job, reply, first, events), media_type="text/event-stream")
        await events.aclose()
        return JSONResponse(_completion(req, job, reply, first[1]))

    def _job(req: ChatRequest) -> Job:
        if req.model not in models:
            raise RequestError(f"model {req.model!r} is not served here; models: {', '.join(models)}", status=404,
                               param="model", kind="not_found_error")
        new_tokens = req.new_tokens or limits.max_new_tokens
        if new_tokens > limits.max_new_tokens:
            raise RequestError(f"max_tokens={new_tokens} is over this server's limit of {limits.max_new_tokens}",
                               param="max_tokens")
        speaker = None
        if req.wants_audio:
            if not inferencer.has_speech:
                raise RequestError("this server speaks no audio (its model has no Talker, or it was started with "
                                   "--no-speech): ask for text only", param="modalities")
            try:
                speaker = inferencer.check_speaker(req.audio.voice)  # type: ignore[union-attr]
            except InferError as e:
                raise RequestError(str(e), param="audio.voice") from None
        sampling = ({"do_sample": True, "temperature": req.temperature, "top_p": req.top_p or 1.0}
                    if req.temperature else {"do_sample": False})
        sink = MediaSink(Path(tempfile.mkdtemp(prefix="omnitune-serve-")), limits.allowed_media_dirs)
        try:
            conversation = to_conversation(req.messages, sink)
        except BaseException:
            shutil.rmtree(sink.scratch, ignore_errors=True)
            raise
        return Job(conversation, sink.roots, scratch=sink.scratch, labels=sink.labels, adapter=models[req.model],
                   speech=req.wants_audio, speaker=speaker, stream=req.stream, seed=req.seed,
                   settings={"max_new_tokens": new_tokens, **sampling,
                             **({"max_speech_tokens": limits.max_speech_tokens} if req.wants_audio else {})})

    return app


def _internal(e: Exception) -> RequestError:
    return RequestError(f"internal error: {type(e).__name__}: {e}", 500, kind="server_error")


def _refusal(e: Exception, job: Job) -> Exception:
    """What the worker raised, as the HTTP error it should be: the Inferencer's refusals are the request's fault."""
    return RequestError(job.explain(str(e))) if isinstance(e, InferError) else e


async def _json_body(request: Request, limit: int) -> Any:
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise RequestError(f"the request is {int(declared)} bytes, over this server's limit of {limit} "
                           "(--max-request-mb)", status=413)
    body, size = [], 0
    async for piece in request.stream():
        size += len(piece)
        if size > limit:
            raise RequestError(f"the request is over this server's limit of {limit} bytes (--max-request-mb)",
                               status=413)
        body.append(piece)
    try:
        return json.loads(b"".join(body))
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
        raise RequestError(f"the body is not valid JSON: {e}") from None


def _finish_reason(gen: Generation, job: Job) -> str:
    return "length" if gen.new_tokens >= job.settings["max_new_tokens"] else "stop"


def _completion(req: ChatRequest, job: Job, reply: Reply, gen: Generation) -> dict[str, Any]:
    audio = None
    if req.wants_audio and gen.audio is not None:
        audio = encode_audio(gen.audio, gen.sample_rate, req.audio.format)  # type: ignore[union-attr]
    return reply.completion(gen.text, _finish_reason(gen, job), usage(gen.prompt_tokens, gen.new_tokens),
                            gen.thinking, audio)


async def _sse(req: ChatRequest, job: Job, reply: Reply, first: tuple[str, Any],
               events: AsyncIterator[tuple[str, Any]]) -> AsyncIterator[str]:
    def event(body: dict[str, Any]) -> str:
        return f"data: {json.dumps(body)}\n\n"

    try:
        yield event(reply.chunk({"role": "assistant", "content": ""}))
        kind, value = first
        while True:
            if kind == "text":
                yield event(reply.chunk({"content": value}))
            elif kind == "audio":
                yield event(reply.audio_chunk(value))
            elif kind == "error":  # after the stream began, an error can only be told inside it
                e = _refusal(value, job)
                yield event((e if isinstance(e, RequestError) else _internal(e)).body())
                break
            else:
                yield event(reply.chunk({}, _finish_reason(value, job)))
                if req.stream_options and req.stream_options.include_usage:
                    yield event(reply.usage_chunk(usage(value.prompt_tokens, value.new_tokens)))
                break
            kind, value = await anext(events)
        yield "data: [DONE]\n\n"
    finally:
        await events.aclose()
