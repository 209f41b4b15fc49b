"""The speech codec (model/codec.py): the pluggable choices, the code shape the Talker needs, the tiny codec the
same in every process (cached codes and freshly encoded ones must agree)."""
import subprocess
import sys

import numpy as np
import pytest
import torch

from omnitune.model.codec import CodecError, load_codec, tiny_mimi
from omnitune.model.tiny import tiny_config
from omnitune.recipe import RecipeError, TalkerConfig, load_recipe

WAV = (0.3 * np.sin(2 * np.pi * 220 * np.arange(24000) / 24000)).astype(np.float32)


def test_tiny_codec_gives_the_talkers_code_shape_at_12_5_hz():
    codec = load_codec(tiny_config().talker_config, TalkerConfig(codec="tiny"))
    codes = codec.encode(WAV)
    assert codes.shape == (13, 4) and codes.dtype == torch.long  # 1 s: 12.5 frames, the last one partial
    assert 0 <= int(codes.min()) and int(codes.max()) < 64 and len(codes.unique()) > 1


def test_tiny_codec_is_the_same_in_another_process():
    here = load_codec(tiny_config().talker_config, TalkerConfig(codec="tiny")).encode(WAV)
    torch.manual_seed(123)  # the global RNG state must not matter
    again = load_codec(tiny_config().talker_config, TalkerConfig(codec="tiny")).encode(WAV)
    code = ("import numpy as np, torch; from omnitune.model.codec import load_codec; "
            "from omnitune.model.tiny import tiny_config; from omnitune.recipe import TalkerConfig; "
            "w = (0.3 * np.sin(2 * np.pi * 220 * np.arange(24000) / 24000)).astype(np.float32); "
            "print(load_codec(tiny_config().talker_config, TalkerConfig(codec='tiny')).encode(w).flatten().tolist())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert torch.equal(here, again) and here.flatten().tolist() == eval(out.strip().splitlines()[-1])


def test_mimi_checkpoint_loads_encoder_only_with_the_window_asked_for(tmp_path):
    tiny_mimi(4, 64).save_pretrained(tmp_path / "mimi")
    codec = load_codec(tiny_config().talker_config, TalkerConfig(codec="mimi", codec_path=str(tmp_path / "mimi"),
                                                                 codec_sliding_window=8))
    assert codec.model.decoder is None and codec.model.config.sliding_window == 8
    assert codec.encode(WAV).shape == (13, 4)


def test_a_codec_class_plugs_in_by_its_import_path():
    codec = load_codec(tiny_config().talker_config, TalkerConfig(codec="voice_helpers:FrameIndexCodec"))
    assert codec.encode(WAV)[:, 0].tolist() == list(range(13))


def test_a_codec_of_the_wrong_shape_is_refused(tmp_path):
    tiny_mimi(4, 32).save_pretrained(tmp_path / "mimi")
    with pytest.raises(CodecError, match="gives 4 codebooks of 32 codes; this Talker reads 4 of 64"):
        load_codec(tiny_config().talker_config, TalkerConfig(codec="mimi", codec_path=str(tmp_path / "mimi")))


def test_missing_codec_weights_say_how_to_fix_it(tmp_path):
    with pytest.raises(CodecError, match="set talker.codec_path to a local copy"):
        load_codec(tiny_config().talker_config, TalkerConfig(codec="mimi", codec_path=str(tmp_path / "none")))


def test_unknown_codec_name_lists_the_choices():
    with pytest.raises(RecipeError, match="talker.codec 'mim' is not one of mimi, qwen3-tts-12hz, tiny"):
        load_recipe("voice", ["talker.codec=mim"])


def test_round_trip_scores_rank_a_cleaner_copy_higher():
    from omnitune.eval.codec_check import mel_distance, si_sdr

    rng = np.random.default_rng(0)
    slight = WAV + 0.01 * rng.standard_normal(WAV.size).astype(np.float32)
    heavy = WAV + 0.3 * rng.standard_normal(WAV.size).astype(np.float32)
    assert mel_distance(WAV, WAV) == 0.0 and mel_distance(WAV, slight) < mel_distance(WAV, heavy)
    assert si_sdr(WAV, 0.5 * WAV) > 100 and si_sdr(WAV, slight) > si_sdr(WAV, heavy)
