"""Media decoding: audio to 16 kHz mono float32, images to RGB, videos to sampled uint8 frames (+ their audio).

Audio is never cut (the released model takes minutes; the 30 s cut of older pipelines loses data), but a caller
may refuse clips longer than `max_seconds`: the header's duration is checked before decoding, and decoding stops
past the limit when the header says nothing or lies (`AudioTooLong`). Images are checked from their header first:
over PIL's decompression-bomb limit (Image.MAX_IMAGE_PIXELS, 89.5M pixels) they are refused, and over
`max_pixels` they are decoded at a reduced scale where the format allows (JPEG) and reduced by an integer factor,
so a huge image never reaches the processor at full size. Video frames are taken at exact times k / fps; a video
whose duration * fps exceeds `max_frames` is sampled at the lower rate max_frames / duration instead, and that
rate is returned because the model's time positions depend on it.
Any failure raises `MediaError` with a reason a person can act on; the caller adds file:line.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from omnitune.errors import OmnituneError

SAMPLE_RATE = 16000
_SOUNDFILE_SUFFIXES = {".wav", ".flac", ".ogg", ".oga", ".aiff", ".aif", ".au", ".w64", ".caf"}


class MediaError(OmnituneError):
    """Media that could not be decoded."""


class AudioTooLong(MediaError):
    """Audio longer than the caller's limit: `seconds` long by its header, or more than that (`at_least`)."""

    def __init__(self, path: Path, seconds: float, at_least: bool = False):
        super().__init__(f"audio in {path} is {'over ' if at_least else ''}{seconds:.1f} s long")
        self.path, self.seconds, self.at_least = path, seconds, at_least


@dataclass
class Video:
    frames: np.ndarray  # uint8 [T, H, W, 3], T even and >= 2
    fps: float  # the rate the frames were actually sampled at
    audio: np.ndarray | None = None  # 16 kHz mono float32 of the audio track, when asked for and present


def load_audio(path: str | Path, max_seconds: float | None = None, rate: int = SAMPLE_RATE) -> np.ndarray:
    """Decode an audio file (or a video's audio track) to mono float32 at `rate` (16 kHz, the audio tower's; the
    Talker's codec takes 24 kHz), whole; longer than max_seconds is AudioTooLong, from the header before decoding
    where it says."""
    path = Path(path)
    if not path.is_file():
        raise MediaError(f"audio file not found: {path}")
    seconds = audio_duration(path)
    if max_seconds is not None and seconds is not None and seconds > max_seconds:
        raise AudioTooLong(path, seconds)
    wav, sr = (_soundfile_audio(path, max_seconds, seconds) if path.suffix.lower() in _SOUNDFILE_SUFFIXES
               else (None, 0))
    if wav is None:
        wav, sr = _pyav_audio(path, max_seconds)
    if wav is None:
        raise MediaError(f"no audio stream in {path}")
    return _finish_audio(wav, sr, path, rate)


def audio_duration(path: Path) -> float | None:
    """Seconds of audio the file's header declares, None when unknown: a WAV's own data chunk size (libsndfile
    trims it to what the file holds, which would hide truncation), else soundfile's, else the container's."""
    suffix = path.suffix.lower()
    if suffix == ".wav" and (seconds := _wav_seconds(path)) is not None:
        return seconds
    if suffix in _SOUNDFILE_SUFFIXES:
        import soundfile as sf

        try:
            info = sf.info(str(path))
            return info.frames / info.samplerate
        except Exception:  # soundfile lacks some codecs of these containers: ask PyAV
            pass
    import av

    try:
        with av.open(str(path)) as container:
            if not container.streams.audio:
                return None
            stream = container.streams.audio[0]
            if stream.duration and stream.time_base:
                return float(stream.duration * stream.time_base)
            return container.duration / 1e6 if container.duration else None
    except Exception:  # unreadable: decoding says why
        return None


def _wav_seconds(path: Path) -> float | None:
    """A RIFF/WAVE header's data bytes / byte rate; None when not RIFF or the size is a streaming 0 / 0xFFFFFFFF."""
    with open(path, "rb") as f:
        if f.read(4) != b"RIFF" or f.read(8)[4:] != b"WAVE":
            return None
        byte_rate = None
        while len(head := f.read(8)) == 8:
            kind, size = head[:4], int.from_bytes(head[4:], "little")
            if kind == b"fmt " and size >= 16:
                byte_rate = int.from_bytes(f.read(16)[8:12], "little")
                size -= 16
            elif kind == b"data":
                return size / byte_rate if byte_rate and size not in (0, 0xFFFFFFFF) else None
            f.seek(size + size % 2, 1)
    return None


def _soundfile_audio(path: Path, max_seconds: float | None,
                     header_seconds: float | None) -> tuple[np.ndarray | None, int]:
    """Mono float32 at the file's rate, at most max_seconds (+1 sample to notice more); (None, 0) when soundfile
    cannot open the file (PyAV tries then). Fewer samples than the header declares is a truncated file."""
    import soundfile as sf

    try:
        f = sf.SoundFile(str(path))
    except Exception:  # soundfile lacks some codecs of these containers: let PyAV try
        return None, 0
    try:
        with f:
            limit = -1 if max_seconds is None else int(max_seconds * f.samplerate) + 1
            data, sr = f.read(limit, dtype="float32", always_2d=True), f.samplerate
    except Exception as e:  # a damaged stream: decoding it elsewhere would give part of it, silently
        raise MediaError(f"cannot decode audio in {path}: {e}") from None
    _check_decoded(path, len(data), sr, max_seconds)
    if header_seconds is not None and len(data) + 1 < header_seconds * sr:  # one sample of rounding
        raise MediaError(f"audio in {path} is truncated: its header declares {header_seconds:.2f} s, the file "
                         f"holds {len(data) / sr:.2f} s")
    return data.mean(axis=1), sr


def _check_decoded(path: Path, n_samples: int, rate: int, max_seconds: float | None) -> None:
    """AudioTooLong once more samples were decoded than max_seconds holds (a header that lied or said nothing)."""
    if max_seconds is not None and n_samples > max_seconds * rate:
        raise AudioTooLong(path, max_seconds, at_least=True)


def _finish_audio(wav: np.ndarray, sr: int, path: Path, rate: int = SAMPLE_RATE) -> np.ndarray:
    if wav.size < sr // 100:
        raise MediaError(f"audio in {path} is shorter than 10 ms ({wav.size} samples at {sr} Hz)")
    if sr != rate:
        import soxr

        wav = soxr.resample(wav, sr, rate)
    wav = np.ascontiguousarray(wav, dtype=np.float32)
    if not np.isfinite(wav).all():
        raise MediaError(f"audio in {path} has non-finite samples")
    return wav


def _pyav_audio(path: Path, max_seconds: float | None = None) -> tuple[np.ndarray | None, int]:
    """Mono float32 at the stream's own rate (soxr resamples), or (None, 0) when there is no audio stream;
    decoding stops with AudioTooLong past max_seconds."""
    import av

    try:
        with av.open(str(path)) as container:
            if not container.streams.audio:
                return None, 0
            stream = container.streams.audio[0]
            rate = stream.rate or stream.codec_context.sample_rate
            resampler = av.AudioResampler(format="flt", layout="mono", rate=rate)
            chunks, n = [], 0
            for frame in container.decode(stream):
                for out in resampler.resample(frame):
                    chunks.append(out.to_ndarray().reshape(-1))
                    n += chunks[-1].size
                _check_decoded(path, n, rate, max_seconds)
            for out in resampler.resample(None):
                chunks.append(out.to_ndarray().reshape(-1))
    except MediaError:
        raise
    except Exception as e:  # PyAV raises many types (InvalidDataError, ValueError, ...)
        raise MediaError(f"cannot decode audio in {path}: {e}") from None
    if not chunks:
        raise MediaError(f"audio stream in {path} has no samples")
    return np.concatenate(chunks).astype(np.float32), int(rate)


def load_image(path: str | Path, max_pixels: int | None = None):
    """Open an image as an RGB PIL image, fully decoded (so a truncated file fails here): refused over PIL's
    decompression-bomb limit by its header, and over max_pixels decoded small where the format allows."""
    from PIL import Image

    try:
        with warnings.catch_warnings():  # PIL only warns between its limit and twice it: refuse both
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            im = Image.open(path)
        with im:
            if max_pixels and im.width * im.height > max_pixels:
                im.draft("RGB", _scaled(im.width, im.height, max_pixels))  # JPEG: decode at 1/2, 1/4 or 1/8
            im.load()
            rgb = im.convert("RGB")
    except FileNotFoundError:
        raise MediaError(f"image file not found: {path}") from None
    except (Image.DecompressionBombWarning, Image.DecompressionBombError) as e:
        raise MediaError(f"image {path} is too large to decode safely ({e}); downscale it to at most "
                         f"{Image.MAX_IMAGE_PIXELS:,} pixels") from None
    except Exception as e:
        raise MediaError(f"cannot decode image {path}: {e}") from None
    # A whole-pixel box reduction that stays above max_pixels: the processor resizes the rest of the way.
    factor = int(math.sqrt(rgb.width * rgb.height / max_pixels)) if max_pixels else 1
    return rgb.reduce(factor) if factor >= 2 else rgb


def _scaled(width: int, height: int, max_pixels: int) -> tuple[int, int]:
    """width x height scaled to about max_pixels, aspect ratio kept."""
    scale = math.sqrt(max_pixels / (width * height))
    return max(1, math.ceil(width * scale)), max(1, math.ceil(height * scale))


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
               with_audio: bool = False, max_audio_seconds: float | None = None) -> Video:
    """Sample frames at times k / rate (rate = fps, or lower to respect max_frames); optionally decode the audio.

    Frames larger than `max_pixels` are downscaled while decoding (keeping the aspect ratio) so a long HD clip
    never sits in memory at full size; the processor then resizes to its patch grid within the same budget.
    With audio, a video longer than max_audio_seconds is AudioTooLong before anything is decoded.
    """
    import av

    path = Path(path)
    if not path.is_file():
        raise MediaError(f"video file not found: {path}")
    duration = video_duration(path)
    if duration <= 0:
        raise MediaError(f"video {path} has no frames")
    if with_audio and max_audio_seconds is not None and duration > max_audio_seconds:
        raise AudioTooLong(path, duration)
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
        wav, sr = _pyav_audio(path, max_audio_seconds)
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
