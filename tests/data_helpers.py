"""Helpers for the data tests: one offline processor per variant, records and real media files in tmp dirs."""

from __future__ import annotations

import io
import json
import struct
import zlib
from functools import lru_cache
from pathlib import Path

import numpy as np

from omnitune.data.synthetic import tinted_frame, tone, write_mp4, write_png, write_wav
from omnitune.recipe import DataConfig, Recipe, validate_recipe

__all__ = ["processor", "data_cfg", "recipe_for", "write_jsonl", "media_files", "user", "console",
           "tone", "tinted_frame", "write_mp4", "write_png", "write_wav", "png_header"]


@lru_cache(maxsize=None)
def processor(variant: str = "instruct"):
    """The offline Qwen3-Omni processor on the real tokenizer (built once per variant per session)."""
    from omnitune.model.tiny import build_offline_processor

    return build_offline_processor(variant)


def data_cfg(**kw) -> DataConfig:
    base = dict(video_max_pixels=64 * 64, image_max_pixels=64 * 64, image_min_pixels=32 * 32)
    return DataConfig(**{**base, **kw})


def recipe_for(tmp_path: Path, train: Path, variant: str = "instruct", **data) -> Recipe:
    base = dict(train=str(train), video_max_pixels=64 * 64, image_max_pixels=64 * 64, image_min_pixels=32 * 32,
                workers=1)
    return validate_recipe({"output_dir": str(tmp_path / "run"), "model": {"variant": variant},
                            "data": {**base, **data}})


def write_jsonl(path: Path, records: list) -> Path:
    """Write records, one per line; a str record is written verbatim (for bad JSON)."""
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


def media_files(d: Path, seed: int = 0) -> dict[str, Path]:
    """A 1 s tone (wav), a 64x64 png, and a 1 s 4-frame mp4 with an AAC track, all under d."""
    rng = np.random.default_rng(seed)
    d.mkdir(parents=True, exist_ok=True)
    frames = np.stack([tinted_frame("red", rng) for _ in range(4)])
    return {"audio": write_wav(d / "a.wav", tone(440.0, 1.0, rng)),
            "image": write_png(d / "i.png", tinted_frame("blue", rng)),
            "video": write_mp4(d / "v.mp4", frames, fps=4, audio=tone(880.0, 1.0, rng))}


def png_header(width: int, height: int) -> bytes:
    """A PNG that declares width x height RGB pixels and holds none: big dimensions in a few dozen bytes."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IEND", b""))


def user(*items, text: str = "What is it?") -> dict:
    """A user turn with media items given as (kind, path) pairs, then the question."""
    content = [{"type": k, k: str(p)} for k, p in items] + [{"type": "text", "text": text}]
    return {"role": "user", "content": content}


def console():
    """A rich console writing into a buffer (read it with .file.getvalue())."""
    from rich.console import Console

    return Console(file=io.StringIO(), width=400, color_system=None)
