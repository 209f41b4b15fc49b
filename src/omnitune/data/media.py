"""Media decoding: audio to 16 kHz mono float32, images to RGB, videos to sampled uint8 frames (+ their audio).

Audio is never cut (the released model takes minutes; the 30 s cut of older pipelines loses data). Video frames
are taken at exact times k / fps; a video whose duration * fps exceeds `max_frames` is sampled at the lower rate
max_frames / duration instead, and that rate is returned because the model's time positions depend on it.
Any failure raises `MediaError` with a reason a person can act on; the caller adds file:line.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from omnitune.errors import OmnituneError

SAMPLE_RATE = 16000
_SOUNDFILE_SUFFIXES = {".wav", ".flac", ".ogg", ".oga", ".aiff", ".aif", ".au", ".w64", ".caf"}


class MediaError(OmnituneError):
    """Media that could not be decoded."""


@dataclass
class Video:
    frames: np.ndarray  # uint8 [T, H, W, 3], T even and >= 2
    fps: float  # the rate the frames were actually sampled at
    audio: np.ndarray | None = None  # 16 kHz mono float32 of the audio track, when asked for and present


def load_audio(path: str | Path) -> np.ndarray:
    """Decode an audio file (or a video's audio track) to 16 kHz mono float32, whole."""
    path = Path(path)
    if not path.is_file():
        raise MediaError(f"audio file not found: {path}")
    if path.suffix.lower() in _SOUNDFILE_SUFFIXES:
        import soundfile as sf

        try:
            data, sr = sf.read(str(path), dtype="float32", always_2d=True)
            wav = data.mean(axis=1)
        except Exception:  # soundfile lacks some codecs of these containers: let PyAV try
            wav, sr = _pyav_audio(path)
    else:
        wav, sr = _pyav_audio(path)
    if wav is None:
        raise MediaError(f"no audio stream in {path}")
    return _finish_audio(wav, sr, path)


def _finish_audio(wav: np.ndarray, sr: int, path: Path) -> np.ndarray:
    if wav.size < sr // 100:
        raise MediaError(f"audio in {path} is shorter than 10 ms ({wav.size} samples at {sr} Hz)")
    if sr != SAMPLE_RATE:
        import soxr

        wav = soxr.resample(wav, sr, SAMPLE_RATE)
    wav = np.ascontiguousarray(wav, dtype=np.float32)
    if not np.isfinite(wav).all():
        raise MediaError(f"audio in {path} has non-finite samples")
    return wav


def _pyav_audio(path: Path) -> tuple[np.ndarray | None, int]:
    """Mono float32 at the stream's own rate (soxr resamples), or (None, 0) when there is no audio stream."""
    import av

    try:
        with av.open(str(path)) as container:
            if not container.streams.audio:
                return None, 0
            stream = container.streams.audio[0]
            rate = stream.rate or stream.codec_context.sample_rate
            resampler = av.AudioResampler(format="flt", layout="mono", rate=rate)
            chunks = []
            for frame in container.decode(stream):
                for out in resampler.resample(frame):
                    chunks.append(out.to_ndarray().reshape(-1))
            for out in resampler.resample(None):
                chunks.append(out.to_ndarray().reshape(-1))
    except MediaError:
        raise
    except Exception as e:  # PyAV raises many types (InvalidDataError, ValueError, ...)
        raise MediaError(f"cannot decode audio in {path}: {e}") from None
    if not chunks:
        raise MediaError(f"audio stream in {path} has no samples")
    return np.concatenate(chunks).astype(np.float32), int(rate)


def load_image(path: str | Path):
    """Open an image as an RGB PIL image (fully decoded, so a truncated file fails here)."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            im.load()
            return im.convert("RGB")
    except FileNotFoundError:
        raise MediaError(f"image file not found: {path}") from None
    except Exception as e:
        raise MediaError(f"cannot decode image {path}: {e}") from None


def video_duration(path: str | Path) -> float:
    """The duration in seconds of a video's first video stream (decoding it when the container does not say)."""
    import av

    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise MediaError(f"no video stream in {path}")
            stream = container.streams.video[0]
            if stream.duration and stream.time_base:
                return float(stream.duration * stream.time_base)
            if container.duration:
                return container.duration / 1e6
            times = [f.time for f in container.decode(stream) if f.time is not None]
    except MediaError:
        raise
    except Exception as e:
        raise MediaError(f"cannot decode video {path}: {e}") from None
    rate = 1.0 / 25
    return (max(times) - min(times) + rate) if times else 0.0


def frame_count(duration: float, fps: float, max_frames: int) -> tuple[int, float]:
    """How many frames to take and at what rate: an even count in [2, max_frames], at fps or below."""
    max_frames = max(2, max_frames - max_frames % 2)
    n = int(math.floor(duration * fps + 1e-6))
    if n > max_frames:
        return max_frames, max_frames / duration
    return max(2, n - n % 2), fps


def load_video(path: str | Path, fps: float, max_frames: int, max_pixels: int | None = None,
               with_audio: bool = False) -> Video:
    """Sample frames at times k / rate (rate = fps, or lower to respect max_frames); optionally decode the audio.

    Frames larger than `max_pixels` are downscaled while decoding (keeping the aspect ratio) so a long HD clip
    never sits in memory at full size; the processor then resizes to its patch grid within the same budget.
    """
    import av

    path = Path(path)
    if not path.is_file():
        raise MediaError(f"video file not found: {path}")
    duration = video_duration(path)
    if duration <= 0:
        raise MediaError(f"video {path} has no frames")
    n, rate = frame_count(duration, fps, max_frames)
    targets = [k / rate for k in range(n)]
    frames: list[np.ndarray] = []
    try:
        with av.open(str(path)) as container:
            stream = container.streams.video[0]
            stream.thread_type = "AUTO"
            start, last, k = None, None, 0
            for frame in container.decode(stream):
                t = frame.time if frame.time is not None else 0.0
                start = t if start is None else start
                t -= start
                # A target time takes the last frame shown at or before it; only taken frames are converted.
                while k < n and targets[k] < t - 1e-6 and last is not None:
                    frames.append(last if isinstance(last, np.ndarray) else _to_rgb(last, max_pixels))
                    last = frames[-1]
                    k += 1
                if k >= n:
                    break
                last = frame
            while k < n and last is not None:  # targets past the last frame repeat it
                frames.append(last if isinstance(last, np.ndarray) else _to_rgb(last, max_pixels))
                last = frames[-1]
                k += 1
    except Exception as e:
        raise MediaError(f"cannot decode video {path}: {e}") from None
    if not frames:
        raise MediaError(f"video {path} has no decodable frames")
    audio = None
    if with_audio:
        wav, sr = _pyav_audio(path)
        if wav is None:
            raise MediaError(f"video {path} has no audio track, but data.use_audio_in_video is on "
                             "(set data.use_audio_in_video=false, or give the video a sound track)")
        audio = _finish_audio(wav, sr, path)
    return Video(np.stack(frames), rate, audio)


def _to_rgb(frame, max_pixels: int | None) -> np.ndarray:
    w, h = frame.width, frame.height
    if max_pixels and w * h > max_pixels:
        scale = math.sqrt(max_pixels / (w * h))
        w, h = max(2, int(w * scale) // 2 * 2), max(2, int(h * scale) // 2 * 2)
        return frame.reformat(width=w, height=h, format="rgb24").to_ndarray()
    return frame.to_ndarray(format="rgb24")
