"""Media decoding: audio to 16 kHz mono from any container, video frames at exact times, errors with reasons."""

from __future__ import annotations

import numpy as np
import pytest
import soundfile as sf
import soxr

from data_helpers import png_header, tinted_frame, tone, write_mp4
from omnitune.data.media import AudioTooLong, MediaError, frame_count, load_audio, load_image, load_video


def _av_audio(path, codec, wav, rate):
    import av

    with av.open(str(path), "w") as out:
        s = out.add_stream(codec, rate=rate)
        s.layout = "mono"
        for i in range(0, len(wav), 1152):
            f = av.AudioFrame.from_ndarray(np.ascontiguousarray(wav[i:i + 1152].reshape(1, -1)), format="flt",
                                           layout="mono")
            f.sample_rate, f.pts = rate, i
            for p in s.encode(f):
                out.mux(p)
        for p in s.encode():
            out.mux(p)


def test_wav_stereo_44k_becomes_16k_mono_via_soxr(tmp_path):
    rng = np.random.default_rng(0)
    stereo = np.stack([tone(440, 2.0, rng, 44100), tone(660, 2.0, rng, 44100)], axis=1)
    sf.write(tmp_path / "a.wav", stereo, 44100, subtype="FLOAT")
    got = load_audio(tmp_path / "a.wav")
    assert got.dtype == np.float32 and got.ndim == 1
    np.testing.assert_allclose(got, soxr.resample(stereo.mean(axis=1), 44100, 16000), atol=1e-6)


@pytest.mark.parametrize("fmt", ["flac", "ogg", "mp3", "m4a"])
def test_compressed_audio_decodes_to_16k(tmp_path, fmt):
    wav = tone(440, 1.5, np.random.default_rng(1), 22050)
    path = tmp_path / f"a.{fmt}"
    if fmt in ("flac", "ogg"):
        sf.write(path, wav, 22050)
    else:
        _av_audio(path, "mp3" if fmt == "mp3" else "aac", wav, 22050)
    got = load_audio(path)
    assert abs(len(got) - 1.5 * 16000) < 0.1 * 16000  # codecs pad a little
    # Same pitch: the spectrum peaks at 440 Hz.
    spec = np.abs(np.fft.rfft(got[:16000]))
    assert abs(np.argmax(spec) - 440) <= 2


def test_long_audio_is_not_cut(tmp_path):
    sf.write(tmp_path / "a.flac", np.zeros(16000 * 40, dtype=np.float32), 16000)
    assert len(load_audio(tmp_path / "a.flac")) == 16000 * 40


def _counting_video(path, n, fps, size=32, audio=None):
    # Frame k has brightness 8 * k, so a sampled frame says which one it was.
    frames = np.stack([np.full((size, size, 3), 8 * k, np.uint8) for k in range(n)])
    return write_mp4(path, frames, fps, audio)


def _which(frames):
    return [int(round(f.mean() / 8)) for f in frames]


def test_video_frames_sampled_at_the_recipe_fps(tmp_path):
    v = load_video(_counting_video(tmp_path / "v.mp4", 20, 10), fps=2.0, max_frames=64)
    assert v.fps == 2.0 and v.frames.shape == (4, 32, 32, 3) and v.frames.dtype == np.uint8
    assert _which(v.frames) == [0, 5, 10, 15]  # t = 0, 0.5, 1.0, 1.5 s


def test_video_max_frames_lowers_the_rate_and_keeps_an_even_count(tmp_path):
    v = load_video(_counting_video(tmp_path / "v.mp4", 30, 10), fps=5.0, max_frames=5)
    assert len(v.frames) == 4 and v.fps == pytest.approx(4 / 3.0)
    assert _which(v.frames) == [0, 7, 15, 22]
    assert frame_count(3.0, 5.0, 5) == (4, 4 / 3.0)
    assert frame_count(0.3, 2.0, 64) == (2, 2.0)  # at least two frames (temporal patch 2)
    assert frame_count(1.6, 2.0, 64) == (2, 2.0)  # 3 would be odd


def test_video_audio_track_and_downscaling(tmp_path):
    rng = np.random.default_rng(0)
    path = _counting_video(tmp_path / "v.mp4", 8, 4, size=128, audio=tone(880, 2.0, rng))
    v = load_video(path, fps=2.0, max_frames=64, max_pixels=64 * 64, with_audio=True)
    assert v.frames.shape[1] * v.frames.shape[2] <= 64 * 64
    assert abs(len(v.audio) - 32000) < 2048 and v.audio.dtype == np.float32
    with pytest.raises(MediaError, match="no audio track"):
        load_video(_counting_video(tmp_path / "silent.mp4", 8, 4), 2.0, 64, with_audio=True)


@pytest.mark.parametrize("name,loader", [("x.wav", load_audio), ("x.mp3", load_audio), ("x.png", load_image),
                                         ("x.mp4", lambda p: load_video(p, 2.0, 8))])
def test_undecodable_media_raises_with_the_path(tmp_path, name, loader):
    (tmp_path / name).write_bytes(b"this is not media" * 10)
    with pytest.raises(MediaError, match=name):
        loader(tmp_path / name)


def _refuse_decoding(monkeypatch):
    """Decoding any audio fails the test: what follows must be decided from headers alone."""
    import av

    def no(*a, **k):
        raise AssertionError("audio was decoded")

    monkeypatch.setattr(sf.SoundFile, "read", no)
    monkeypatch.setattr(av, "AudioResampler", no)


@pytest.mark.parametrize("fmt", ["flac", "mp3"])
def test_audio_over_the_limit_is_refused_from_its_header_before_decoding(tmp_path, monkeypatch, fmt):
    path = tmp_path / f"long.{fmt}"
    silence = np.zeros(8000 * 90, dtype=np.float32)
    sf.write(path, silence, 8000) if fmt == "flac" else _av_audio(path, "mp3", silence, 8000)
    _refuse_decoding(monkeypatch)
    with pytest.raises(AudioTooLong) as e:
        load_audio(path, max_seconds=60.0)
    assert e.value.seconds == pytest.approx(90.0, abs=0.1) and not e.value.at_least


def test_decoding_stops_past_the_limit_when_the_header_says_nothing(tmp_path, monkeypatch):
    import omnitune.data.media as media

    path = tmp_path / "a.m4a"
    _av_audio(path, "aac", np.zeros(8000 * 10, dtype=np.float32), 8000)
    monkeypatch.setattr(media, "audio_duration", lambda p: None)  # a header that says nothing
    with pytest.raises(AudioTooLong) as e:
        load_audio(path, max_seconds=3.0)
    assert e.value.at_least and e.value.seconds == 3.0
    assert len(load_audio(path, max_seconds=20.0)) == pytest.approx(16000 * 10, abs=4096)


def test_video_whose_audio_cannot_fit_is_refused_before_decoding(tmp_path, monkeypatch):
    path = _counting_video(tmp_path / "v.mp4", 24, 4, size=16, audio=np.zeros(16000 * 6, dtype=np.float32))
    _refuse_decoding(monkeypatch)
    with pytest.raises(AudioTooLong):
        load_video(path, 2.0, 8, with_audio=True, max_audio_seconds=4.0)


@pytest.mark.parametrize("fmt", ["wav", "flac"])
def test_truncated_audio_is_an_error_not_a_shorter_clip(tmp_path, fmt):
    path = tmp_path / f"a.{fmt}"
    sf.write(path, tone(440, 2.0, np.random.default_rng(0)), 16000)
    path.write_bytes(path.read_bytes()[:len(path.read_bytes()) // 2])
    with pytest.raises(MediaError, match="truncated|cannot decode"):
        load_audio(path)


@pytest.mark.parametrize("side", [13000, 100000])  # PIL only warns below twice its limit
def test_images_over_the_decompression_limit_are_refused_from_the_header(tmp_path, side):
    (tmp_path / "huge.png").write_bytes(png_header(side, side))  # pixels never written: decoding would fail
    with pytest.raises(MediaError, match=f"huge.png is too large to decode safely .*{side * side} pixels"):
        load_image(tmp_path / "huge.png", max_pixels=64 * 64)


@pytest.mark.parametrize("fmt", ["jpg", "png"])
def test_big_images_are_decoded_small_toward_max_pixels(tmp_path, fmt):
    from PIL import Image

    big = np.kron(tinted_frame("red", np.random.default_rng(0), 64), np.ones((32, 24, 1), np.uint8))
    Image.fromarray(big).save(tmp_path / f"big.{fmt}")  # 1536 x 2048
    im = load_image(tmp_path / f"big.{fmt}", max_pixels=64 * 64)
    assert im.mode == "RGB" and 64 * 64 <= im.width * im.height < 4 * 64 * 64
    assert abs(im.width / im.height - 1536 / 2048) < 0.05
    assert load_image(tmp_path / f"big.{fmt}").size == (1536, 2048)
