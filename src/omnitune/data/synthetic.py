"""A small multimodal demo dataset written as real files: tones, coloured images, short videos with sound.

Every record asks which colour its media stands for; the answer is one of COLOURS. The colour is visible (image
and video frames are tinted with it) and audible (a tone whose pitch encodes it), so a tiny model learns the task
in a few hundred steps. Files are tiny (64x64, about a second) so decoding is fast on two cores.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

COLOURS = {"red": (220, 40, 40), "green": (40, 200, 60), "blue": (40, 70, 230)}
PITCH_HZ = {"red": 330.0, "green": 660.0, "blue": 1320.0}
SYSTEM = "You are a helpful assistant that names colours."
RATE = 16000


def tone(pitch: float, seconds: float, rng: np.random.Generator, rate: int = RATE) -> np.ndarray:
    """A sine at `pitch` with a random phase, level and a little noise (float32 mono)."""
    t = np.arange(int(seconds * rate)) / rate
    wav = rng.uniform(0.3, 0.6) * np.sin(2 * np.pi * pitch * t + rng.uniform(0, 2 * np.pi))
    return (wav + rng.normal(0, 0.01, t.shape)).astype(np.float32)


def tinted_frame(colour: str, rng: np.random.Generator, size: int = 64) -> np.ndarray:
    """A size x size RGB frame of the colour with per-pixel noise and a darker random square."""
    base = np.array(COLOURS[colour], dtype=np.float32)
    img = base + rng.normal(0, 12, (size, size, 3))
    x, y, s = *rng.integers(0, size // 2, 2), size // 3
    img[y:y + s, x:x + s] *= 0.6
    return np.clip(img, 0, 255).astype(np.uint8)


def write_wav(path: str | Path, wav: np.ndarray, rate: int = RATE) -> Path:
    import soundfile as sf

    sf.write(str(path), wav, rate)
    return Path(path)


def write_png(path: str | Path, frame: np.ndarray) -> Path:
    from PIL import Image

    Image.fromarray(frame).save(path)
    return Path(path)


def write_mp4(path: str | Path, frames: np.ndarray, fps: int, audio: np.ndarray | None = None,
              rate: int = RATE) -> Path:
    """Encode uint8 frames [T,H,W,3] as MPEG-4 video, with an AAC track when `audio` (float32 mono) is given."""
    import av

    with av.open(str(path), "w") as out:
        vs = out.add_stream("mpeg4", rate=fps)
        vs.width, vs.height, vs.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
        vs.bit_rate = 400_000
        as_ = None
        if audio is not None:
            as_ = out.add_stream("aac", rate=rate)
            as_.layout = "mono"
        for f in frames:
            for packet in vs.encode(av.VideoFrame.from_ndarray(f, format="rgb24")):
                out.mux(packet)
        for packet in vs.encode():
            out.mux(packet)
        if as_ is not None:
            block = 1024  # AAC frame size
            for i in range(0, len(audio), block):
                chunk = audio[i:i + block].reshape(1, -1)
                frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(chunk), format="flt", layout="mono")
                frame.sample_rate = rate
                frame.pts = i
                for packet in as_.encode(frame):
                    out.mux(packet)
            for packet in as_.encode():
                out.mux(packet)
    return Path(path)


def _media_item(kind: str, colour: str, stem: str, media_dir: Path, rng: np.random.Generator) -> dict:
    if kind == "audio":
        path = write_wav(media_dir / f"{stem}.wav", tone(PITCH_HZ[colour], rng.uniform(0.6, 1.2), rng))
    elif kind == "image":
        path = write_png(media_dir / f"{stem}.png", tinted_frame(colour, rng))
    else:
        frames = np.stack([tinted_frame(colour, rng) for _ in range(4)])
        path = write_mp4(media_dir / f"{stem}.mp4", frames, fps=4, audio=tone(PITCH_HZ[colour], 1.0, rng))
    return {"type": kind, kind: f"{media_dir.name}/{path.name}"}


QUESTIONS = {"audio": "Which colour does this tone stand for?", "image": "What colour is this picture?",
             "video": "What colour is this clip?"}


def make_record(idx: int, rng: np.random.Generator, media_dir: Path) -> dict:
    """One conversation: a media question with an optional system prompt; every fourth one has two rounds."""
    names = list(COLOURS)
    turns: list[dict] = []
    if rng.random() < 0.5:
        turns.append({"role": "system", "content": SYSTEM})
    rounds = 2 if idx % 4 == 3 else 1
    for r in range(rounds):
        kind = ("audio", "image", "video")[(idx + r) % 3]
        colour = names[int(rng.integers(len(names)))]
        item = _media_item(kind, colour, f"{idx:05d}-{r}", media_dir, rng)
        turns.append({"role": "user", "content": [item, {"type": "text", "text": QUESTIONS[kind]}]})
        turns.append({"role": "assistant", "content": colour})
    return {"conversations": turns}


def make_demo_dataset(out_dir: str | Path, n_train: int = 96, n_eval: int = 24, seed: int = 0) -> tuple[Path, Path]:
    """Write train.jsonl and eval.jsonl (and their media) under out_dir; return the two paths."""
    out = Path(out_dir)
    media_dir = out / "media"
    media_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for name, n, offset in (("train", n_train, 0), ("eval", n_eval, n_train)):
        path = out / f"{name}.jsonl"
        with open(path, "w") as f:
            for i in range(n):
                f.write(json.dumps(make_record(offset + i, rng, media_dir)) + "\n")
        paths.append(path)
    return paths[0], paths[1]


VOICE = "demo_voice"  # the new speaker the demo's voice step teaches the Talker


def make_voice_dataset(out_dir: str | Path, n_train: int = 8, n_eval: int = 4,
                       seed: int = 0) -> tuple[Path, Path]:
    """Voice-training data for the demo: a colour question answered in text and in 'speech' by a new speaker (a
    24 kHz tone at the colour's pitch, the same voice in every reply); returns train.jsonl and eval.jsonl."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    names = list(COLOURS)
    paths = []
    for name, n, offset in (("train", n_train, 0), ("eval", n_eval, n_train)):
        lines = []
        for i in range(offset, offset + n):
            colour = names[i % len(names)]
            write_wav(out / f"reply{i:03d}.wav", tone(PITCH_HZ[colour] / 2, 0.8, rng, rate=24000), rate=24000)
            lines.append(json.dumps({"speaker": VOICE, "conversations": [
                {"role": "user", "content": "Which colour do you like?"},
                {"role": "assistant", "content": [{"type": "text", "text": f"I like {colour}."},
                                                  {"type": "audio", "audio": f"reply{i:03d}.wav"}]}]}))
        path = out / f"{name}.jsonl"
        path.write_text("\n".join(lines) + "\n")
        paths.append(path)
    return paths[0], paths[1]
