"""Shared test material for infer / eval / export: small media files and tiny run directories that look like
what `omnitune train` leaves (recipe.yaml, adapter/ or model/, processor/, metrics.jsonl).

Built once per test session (cached on disk in a temp dir), from the real tiny model: nothing is mocked.
"""

from __future__ import annotations

import atexit
import functools
import json
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch

from omnitune.model.adapters import apply_adapters
from model_helpers import randomize_lora
from omnitune.model.load import load_processor, load_thinker
from omnitune.recipe import load_recipe
from omnitune.run_dir import RunDir

_ROOT = Path(tempfile.mkdtemp(prefix="omnitune-test-"))
atexit.register(shutil.rmtree, _ROOT, ignore_errors=True)


@functools.lru_cache(maxsize=None)
def media_dir() -> Path:
    """a.wav (1.3 s tone, 16 kHz), i.png (64x80), v.mp4 (1 s, 8 fps, with an AAC audio track)."""
    import av
    import soundfile as sf
    from PIL import Image

    d = _ROOT / "media"
    d.mkdir()
    t = np.arange(int(16000 * 1.3)) / 16000
    sf.write(d / "a.wav", (0.3 * np.sin(2 * np.pi * 440 * t)).astype(np.float32), 16000)
    Image.fromarray((np.random.RandomState(0).rand(64, 80, 3) * 255).astype(np.uint8)).save(d / "i.png")
    with av.open(str(d / "v.mp4"), "w") as c:
        vs = c.add_stream("mpeg4", rate=8)
        vs.width, vs.height, vs.pix_fmt = 64, 64, "yuv420p"
        aud = c.add_stream("aac", rate=16000)
        aud.layout = "mono"
        for k in range(8):
            for p in vs.encode(av.VideoFrame.from_ndarray(np.full((64, 64, 3), k * 30, np.uint8), format="rgb24")):
                c.mux(p)
        for p in vs.encode():
            c.mux(p)
        wav = (0.2 * np.sin(2 * np.pi * 300 * np.arange(16000) / 16000)).astype(np.float32)
        for i in range(0, 16000, 1024):
            fr = av.AudioFrame.from_ndarray(wav[None, i:i + 1024], format="flt", layout="mono")
            fr.sample_rate = 16000
            for p in aud.encode(fr):
                c.mux(p)
        for p in aud.encode():
            c.mux(p)
    return d


def demo_recipe(name: str, method: str = "lora"):
    r = load_recipe("demo", [f"name={name}", f"output_dir={_ROOT / name}", f"adapter.method={method}"])
    return r


@functools.lru_cache(maxsize=None)
def lora_run(name: str = "lora-run", seed: int = 0) -> Path:
    """A run dir whose adapter (attention + experts + audio projector) has non-zero LoRA B: it changes logits."""
    recipe = demo_recipe(name)
    run = RunDir(recipe.out)
    run.save_recipe(recipe)
    model = apply_adapters(load_thinker(recipe.model), recipe.adapter)
    randomize_lora(model, std=0.05, seed=seed)
    with torch.no_grad():  # the unfrozen audio projector is saved whole (modules_to_save): change it too
        for n, p in model.named_parameters():
            if "modules_to_save" in n:
                p.add_(0.01)
    model.save_pretrained(str(run.adapter))
    load_processor(recipe.model).save_pretrained(str(run.processor))
    _write_metrics(run)
    return run.root


@functools.lru_cache(maxsize=None)
def full_run() -> Path:
    """A full fine-tune run dir: every Thinker LM weight nudged, saved with save_pretrained to RUN/model."""
    recipe = demo_recipe("full-run", method="full")
    run = RunDir(recipe.out)
    run.save_recipe(recipe)
    thinker = load_thinker(recipe.model)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for n, p in thinker.named_parameters():
            if "language_model" in n:
                p.add_(torch.randn(p.shape, generator=g) * 0.01)
    thinker.save_pretrained(str(run.model))
    load_processor(recipe.model).save_pretrained(str(run.processor))
    return run.root


def _write_metrics(run: RunDir) -> None:
    rows = [{"step": s, "epoch": s / 10, "loss": 3.0 / (1 + s / 5), "lr": 1e-3} for s in range(1, 21)]
    rows += [{"step": s, "epoch": s / 10, "eval_loss": 3.2 / (1 + s / 6)} for s in (10, 20)]
    run.metrics.write_text("".join(json.dumps(r) + "\n" for r in rows))


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    return path


@pytest.fixture(scope="session")
def media() -> Path:
    return media_dir()


@pytest.fixture(scope="session")
def lora_run_dir() -> Path:
    return lora_run()


@pytest.fixture(scope="session")
def full_run_dir() -> Path:
    return full_run()
