"""Rendering: our processor call equals transformers' processor called directly; labels; audio token counts."""

from __future__ import annotations

import numpy as np
import pytest

from data_helpers import data_cfg, media_files, processor, tinted_frame, tone, user, write_mp4, write_wav
from omnitune.data.render import audio_seconds_that_fit, audio_token_count, decode_record, render, render_segments
from omnitune.data.schema import RecordError, validate_record
from omnitune.tokens import IGNORE_INDEX
from omnitune.model.tiny import TOKEN_IDS


def _record(tmp_path, turns, variant="instruct"):
    return validate_record({"conversations": turns}, tmp_path / "d.jsonl", 1, variant)


def _trained(sample, variant="instruct"):
    return [s for s, t in render_segments(sample["input_ids"], sample["labels"], processor(variant).tokenizer) if t]


@pytest.mark.parametrize("kind", ["audio", "image", "video", "video+audio"])
def test_renderer_equals_processor_called_directly(tmp_path, kind):
    files = media_files(tmp_path)
    aiv = kind == "video+audio"
    media_kind = kind.split("+")[0]
    rec = _record(tmp_path, [{"role": "system", "content": "Be brief."}, user((media_kind, files[media_kind])),
                             {"role": "assistant", "content": "red"}])
    data = data_cfg(use_audio_in_video=aiv, video_fps=2.0)
    media = decode_record(rec, data)
    got = render(processor(), rec, data, media)

    proc = processor()
    text = proc.apply_chat_template(rec.messages, tokenize=False)
    assert "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n" in text and "<think>" not in text
    kw = {}
    if kind == "audio":
        kw = dict(audio=media.audios)
    elif kind == "image":
        kw = dict(images=media.images, images_kwargs={"size": {"shortest_edge": 32 * 32, "longest_edge": 64 * 64}})
    else:
        kw = dict(videos=media.videos, videos_kwargs={"size": {"shortest_edge": 32 * 32, "longest_edge": 64 * 64},
                                                      "fps": 2.0, "cap_pixels_per_frame": False})
        if aiv:
            kw.update(audio=media.audios, load_audio_from_video=True, audio_from_video_indices=[0])
    want = proc(text=text, return_tensors="np", **kw)
    for key, value in want.items():
        np.testing.assert_array_equal(got[key].numpy(), np.asarray(value)[0] if key in ("input_ids", "attention_mask")
                                      else np.asarray(value), err_msg=key)
    assert set(want) <= set(got)
    ids = got["input_ids"].tolist()
    if kind != "image":
        assert media.fps is None if kind == "audio" else media.fps == 2.0
    if aiv:  # the track is interleaved with the frames inside one vision block, and the model must be told
        i = ids.index(TOKEN_IDS["vision_start"])
        assert ids[i + 1] == TOKEN_IDS["audio_start"]
        assert got["use_audio_in_video"] and got["modalities"] == ["audio", "text", "vision"]
        assert ids.count(TOKEN_IDS["audio"]) == audio_token_count(len(media.audios[0]))
    elif kind == "video":
        assert not got["use_audio_in_video"] and got["modalities"] == ["text", "vision"]
        assert TOKEN_IDS["audio"] not in ids


@pytest.mark.parametrize("n", [160 * 7, 16000, 16000 + 1234, 16000 * 31 + 77, 16000 * 45 + 5])
def test_audio_token_count_follows_the_formula_with_no_30s_cut(tmp_path, n):
    rng = np.random.default_rng(n)
    wav = write_wav(tmp_path / "a.wav", tone(500.0, n / 16000, rng)[:n])
    rec = _record(tmp_path, [user(("audio", wav)), {"role": "assistant", "content": "ok"}])
    s = render(processor(), rec, data_cfg(max_length=100000))
    mel = n // 160
    assert int((s["input_ids"] == TOKEN_IDS["audio"]).sum()) == 13 * (mel // 100) + -(-(mel % 100) // 8)
    assert int(s["feature_attention_mask"].sum()) == mel  # nothing cut at 30 s


@pytest.mark.parametrize("max_length", [17, 64, 1024, 4096, 32768])
def test_audio_seconds_that_fit_is_the_inverse_of_the_token_count(max_length):
    n = round(audio_seconds_that_fit(max_length) * 16000)
    assert audio_token_count(n) <= max_length < audio_token_count(n + 1)


def test_a_clip_whose_tokens_alone_exceed_max_length_is_refused_before_decoding(tmp_path):
    import soundfile as sf

    sf.write(tmp_path / "long.flac", np.zeros(8000 * 20, dtype=np.float32), 8000)
    rec = _record(tmp_path, [user(("audio", tmp_path / "long.flac")), {"role": "assistant", "content": "ok"}])
    with pytest.raises(RecordError) as e:
        decode_record(rec, data_cfg(max_length=64))
    assert str(e.value) == (f"{tmp_path / 'd.jsonl'}:1: {tmp_path / 'long.flac'}: 20.0 s of audio is ~260 tokens, "
                            "over data.max_length=64 (shorten or split the clip, or raise data.max_length)")
    assert len(decode_record(rec, data_cfg(max_length=300)).audios[0]) == 16000 * 20


def test_labels_mask_everything_but_assistant_turns(tmp_path):
    files = media_files(tmp_path)
    rec = _record(tmp_path, [{"role": "system", "content": "sys"}, user(("image", files["image"])),
                             {"role": "assistant", "content": "blue"}, {"role": "user", "content": "And?"},
                             {"role": "assistant", "content": [{"type": "text", "text": "Still blue."}]}])
    s = render(processor(), rec, data_cfg())
    ids, labels = s["input_ids"], s["labels"]
    trained = labels != IGNORE_INDEX
    assert (labels[trained] == ids[trained]).all()
    assert _trained(s) == ["blue<|im_end|>", "Still blue.<|im_end|>"]
    # The header and the newline after <|im_end|> stay masked.
    ends = (ids == TOKEN_IDS["im_end"]).nonzero().flatten().tolist()
    assert [bool(trained[e]) for e in ends] == [False, False, True, False, True]
    assert not trained[ends[2] + 1] and not trained[ends[2] - 2]
    text = "".join(f"[[{s}]]" if t else s for s, t in render_segments(ids, labels, processor().tokenizer))
    assert "<|im_start|>assistant\n[[blue<|im_end|>]]\n" in text and "<|image_pad|>x4" in text


def test_thinking_trains_final_think_block_and_strips_earlier_reasoning(tmp_path):
    files = media_files(tmp_path)
    rec = _record(tmp_path, [
        user(("audio", files["audio"])),
        {"role": "assistant", "content": "A tone.", "reasoning_content": "It hums."},
        user(("image", files["image"]), text="And this?"),  # media in the final user turn keeps the think block
        {"role": "assistant", "content": "<think>\nBlue pixels.\n</think>\n\nBlue."}], variant="thinking")
    s = render(processor("thinking"), rec, data_cfg())
    assert _trained(s, "thinking") == ["A tone.<|im_end|>", "<think>\nBlue pixels.\n</think>\n\nBlue.<|im_end|>"]
    assert "It hums" not in processor("thinking").tokenizer.decode(s["input_ids"])


def test_thinking_without_reasoning_trains_an_empty_think_block(tmp_path):
    files = media_files(tmp_path)
    rec = _record(tmp_path, [user(("video", files["video"])), {"role": "assistant", "content": "Red."}],
                  variant="thinking")
    s = render(processor("thinking"), rec, data_cfg())
    assert _trained(s, "thinking") == ["<think>\n\n</think>\n\nRed.<|im_end|>"]


def test_instruct_renders_no_think_block(tmp_path):
    rec = _record(tmp_path, [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}])
    s = render(processor(), rec, data_cfg())
    assert processor().tokenizer.decode(s["input_ids"]) == (
        "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\nhello<|im_end|>\n")
    assert s["modalities"] == ["text"]


def test_mixed_record_with_audio_in_video_equals_processor_called_directly(tmp_path):
    files = media_files(tmp_path)
    rec = _record(tmp_path, [user(("audio", files["audio"]), ("image", files["image"]), ("video", files["video"])),
                             {"role": "assistant", "content": "red"}])
    data = data_cfg(use_audio_in_video=True)
    media = decode_record(rec, data)
    got = render(processor(), rec, data, media)
    proc = processor()
    want = proc(text=proc.apply_chat_template(rec.messages, tokenize=False), audio=media.audios, images=media.images,
                videos=media.videos, load_audio_from_video=True, audio_from_video_indices=[None, 0],
                images_kwargs={"size": {"shortest_edge": 32 * 32, "longest_edge": 64 * 64}},
                videos_kwargs={"size": {"shortest_edge": 32 * 32, "longest_edge": 64 * 64}, "fps": 2.0,
                               "cap_pixels_per_frame": False}, return_tensors="np")
    np.testing.assert_array_equal(got["input_ids"].numpy(), want["input_ids"][0])
    for key in ("input_features", "feature_attention_mask", "pixel_values", "pixel_values_videos"):
        np.testing.assert_array_equal(got[key].numpy(), want[key], err_msg=key)
    ids = got["input_ids"].tolist()
    standalone = audio_token_count(len(media.audios[0]))
    first = ids.index(TOKEN_IDS["audio_start"])
    assert ids[first + 1:first + 1 + standalone] == [TOKEN_IDS["audio"]] * standalone
    assert ids[first + 1 + standalone] == TOKEN_IDS["audio_end"]


def test_videos_of_one_record_share_the_lowest_sampling_rate(tmp_path):
    rng = np.random.default_rng(0)
    short = write_mp4(tmp_path / "s.mp4", np.stack([tinted_frame("red", rng) for _ in range(8)]), fps=4)  # 2 s
    long = write_mp4(tmp_path / "l.mp4", np.stack([tinted_frame("blue", rng) for _ in range(32)]), fps=4)  # 8 s
    rec = _record(tmp_path, [user(("video", short), ("video", long)), {"role": "assistant", "content": "two"}])
    media = decode_record(rec, data_cfg(video_fps=2.0, video_max_frames=8))
    # The long clip needs 8 frames / 8 s = 1 fps to stay under the cap, so both are sampled at 1 fps.
    assert media.fps == 1.0 and [len(v) for v in media.videos] == [2, 8]
    s = render(processor(), rec, data_cfg(video_fps=2.0, video_max_frames=8), media)
    assert s["video_second_per_grid"].tolist() == [2.0, 2.0]
