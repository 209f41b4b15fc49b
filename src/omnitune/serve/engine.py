"""One model, many requests: generation runs on a single worker thread, requests wait their turn in its queue.

The Inferencer holds one model (and, with several adapters, switches the active one per request), so requests are
served one at a time, in arrival order; a full queue answers 429 instead of piling up. Text and speech pieces are
handed from the worker thread to the request's asyncio queue as they are generated. A client that goes away
cancels its request: the next piece the worker produces for it raises, which ends that generation early.
"""

from __future__ import annotations

import asyncio
import logging
import shutil
import threading
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from omnitune.infer import InferError, Inferencer
from omnitune.serve.protocol import RequestError

log = logging.getLogger("omnitune.serve")


class _Cancelled(Exception):
    """Raised inside generation when its client has gone."""


@dataclass
class Job:
    """One request, ready for the Inferencer: the conversation (media already files), and how to answer it."""

    conversation: list[dict[str, Any]]
    media_roots: list[Path]
    scratch: Path | None = None  # the request's own folder of inline media, removed when it is done
    labels: dict[str, str] = field(default_factory=dict)  # scratch file -> the message part it came from
    adapter: str | None = None
    speech: bool = False
    speaker: str | None = None
    stream: bool = False
    settings: dict[str, Any] = field(default_factory=dict)  # max_new_tokens, do_sample, temperature, top_p
    seed: int | None = None

    def explain(self, message: str) -> str:
        """A message about the request's scratch files, naming the message parts they came from instead."""
        for path, label in self.labels.items():
            message = message.replace(path, label)
        return message

    def cleanup(self) -> None:
        if self.scratch is not None:
            shutil.rmtree(self.scratch, ignore_errors=True)


class Engine:
    def __init__(self, inferencer: Inferencer, max_queue: int = 64, max_prompt_tokens: int | None = None):
        self.inferencer, self.max_queue, self.max_prompt_tokens = inferencer, max_queue, max_prompt_tokens
        self.worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="omnitune-generate")
        self.waiting = 0  # requests queued or running; only touched on the event loop's thread

    async def run(self, job: Job) -> AsyncIterator[tuple[str, Any]]:
        """Events of one request, in order: ("text", str)* ("audio", float32 array)* then ("done", Generation)
        or ("error", exception). Closing the iterator early cancels the request."""
        if self.waiting >= self.max_queue:
            job.cleanup()
            raise RequestError(f"the server is busy ({self.waiting} requests waiting); retry later", status=429,
                               kind="rate_limit_error")
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        gone = threading.Event()

        def put(kind: str, value: Any) -> None:
            if gone.is_set():
                raise _Cancelled
            loop.call_soon_threadsafe(events.put_nowait, (kind, value))

        def work() -> None:
            try:
                if gone.is_set():
                    return
                put("done", self._generate(job, put))
            except _Cancelled:
                log.info("a client went away: its request was cancelled")
            except (InferError, RequestError) as e:
                loop.call_soon_threadsafe(events.put_nowait, ("error", e))
            except Exception as e:  # a bug or out of memory: this request fails, the server goes on
                log.exception("generation failed")
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
                loop.call_soon_threadsafe(events.put_nowait, ("error", e))
            finally:
                job.cleanup()

        self.waiting += 1
        future = loop.run_in_executor(self.worker, work)
        future.add_done_callback(lambda _: self._finished())
        try:
            while True:
                kind, value = await events.get()
                yield kind, value
                if kind in ("done", "error"):
                    return
        finally:
            gone.set()

    def _finished(self) -> None:
        self.waiting -= 1

    def _generate(self, job: Job, put) -> Any:
        if job.seed is not None:
            torch.manual_seed(job.seed)
        streaming = dict(stream=lambda piece: put("text", piece),
                         on_audio=(lambda piece: put("audio", piece)) if job.speech else None) if job.stream else {}
        return self.inferencer.generate(
            job.conversation, speech=job.speech, speaker=job.speaker if job.speech else None, adapter=job.adapter,
            media_roots=job.media_roots, max_prompt_tokens=self.max_prompt_tokens, **streaming, **job.settings)

    def close(self) -> None:
        self.worker.shutdown(wait=False, cancel_futures=True)
