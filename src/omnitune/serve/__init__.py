"""`omnitune serve`: an OpenAI-compatible HTTP server for a run directory, a recipe or a checkpoint.

    omnitune serve runs/instruct --adapter asr=runs/asr --adapter captions=runs/cap --allow-media-dir /data

Models load through model/source.py and answer through infer.py's Inferencer (one model, requests queued on one
worker); protocol.py is the wire format, messages.py turns OpenAI messages into our conversations (media confined),
engine.py runs the queue, app.py the routes. docs/serving.md says what it can and cannot do.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from omnitune.errors import OmnituneError

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}")


class ServeError(OmnituneError, ValueError):
    """A server that cannot start as asked, said so a user can fix it."""


@dataclass
class ServeOptions:
    source: str
    adapters: tuple[str, ...] = ()  # "name=RUN_DIR" each
    name: str | None = None  # the id the source is served under (default: its folder's or preset's name)
    speech: bool | None = None
    api_key: str | None = None
    allowed_media_dirs: tuple[Path, ...] = ()
    max_new_tokens: int = 2048
    max_speech_tokens: int = 4096  # Talker frames (12.5 a second) a spoken reply may last
    max_prompt_tokens: int = 32768
    max_request_mb: int = 64
    max_queue: int = 64
    device: str | None = None


def parse_adapters(specs: tuple[str, ...] | list[str]) -> dict[str, str]:
    """["asr=runs/asr", ...] -> {"asr": "runs/asr"}; names are model ids: letters, digits, _ . : -"""
    out: dict[str, str] = {}
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep or not path:
            raise ServeError(f"--adapter {spec!r}: give it as NAME=RUN_DIR")
        if not _NAME.fullmatch(name):
            raise ServeError(f"--adapter {spec!r}: a name is 1-64 letters, digits, '_', '.', ':' or '-', starting "
                             "with a letter or digit")
        if name in out:
            raise ServeError(f"--adapter: the name {name!r} is given twice")
        out[name] = path
    return out


def build_app(opts: ServeOptions):
    """Load the model(s) and build the app: (app, engine, model ids)."""
    from omnitune.infer import Inferencer
    from omnitune.serve.app import Limits, create_app
    from omnitune.serve.engine import Engine

    adapters = parse_adapters(opts.adapters)
    main = opts.name or Path(str(opts.source).rstrip("/")).name or str(opts.source)
    if main in adapters:
        raise ServeError(f"--adapter {main}=...: {main!r} is already the name of the served source; choose another "
                         "(or rename the source with --name)")
    missing = [str(d) for d in opts.allowed_media_dirs if not Path(d).is_dir()]
    if missing:
        raise ServeError(f"--allow-media-dir: not a folder: {', '.join(missing)}")
    inferencer = Inferencer(opts.source, speech=opts.speech, device=opts.device, adapters=adapters or None)
    models: dict[str, str | None] = {main: None, **{name: name for name in adapters}}
    engine = Engine(inferencer, max_queue=opts.max_queue, max_prompt_tokens=opts.max_prompt_tokens)
    limits = Limits(max_new_tokens=opts.max_new_tokens, max_speech_tokens=opts.max_speech_tokens,
                    max_request_bytes=opts.max_request_mb << 20,
                    allowed_media_dirs=[Path(d).resolve() for d in opts.allowed_media_dirs])
    return create_app(engine, models, limits, api_key=opts.api_key), engine, list(models)


def serve(opts: ServeOptions, host: str = "127.0.0.1", port: int = 8000, log_level: str = "info",
          announce=print) -> None:
    """Load, then serve until interrupted."""
    import uvicorn

    app, engine, models = build_app(opts)
    inf = engine.inferencer
    speech = f"speech on (voices: {', '.join(inf.speakers)})" if inf.has_speech else "text only"
    announce(f"serving {', '.join(models)} on http://{host}:{port}/v1 ({speech}; "
             f"{'API key required' if opts.api_key else 'no API key'})")
    try:
        uvicorn.run(app, host=host, port=port, log_level=log_level)
    finally:
        engine.close()
