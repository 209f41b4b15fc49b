"""The collator: padded shapes, concatenated media, per-sample modality weights, and a batch the Thinker runs."""

from __future__ import annotations

import pytest
import torch

from data_helpers import data_cfg, media_files, processor, user
from omnitune.data.collate import OmniCollator, sample_weight
from omnitune.data.render import render
from omnitune.tokens import IGNORE_INDEX
from omnitune.data.schema import validate_record
from omnitune.model.tiny import TOKEN_IDS

WEIGHTS = {"text": 1.0, "audio": 0.8, "vision": 0.9}


def _samples(tmp_path, aiv=False):
    files = media_files(tmp_path)
    a = {"role": "assistant", "content": "red"}
    convs = [[{"role": "user", "content": "just text, a bit longer than the others"}, a],
             [user(("audio", files["audio"])), a],
             [user(("image", files["image"]), ("audio", files["audio"])), a],
             [user(("video", files["video"])), a]]
    return [render(processor(), validate_record({"conversations": c}, tmp_path / "d.jsonl", i + 1),
                   data_cfg(use_audio_in_video=aiv)) for i, c in enumerate(convs)]


def test_sample_weight_is_the_mean_of_the_non_text_modalities():
    assert sample_weight(["text"], WEIGHTS) == 1.0
    assert sample_weight(["text", "audio"], WEIGHTS) == 0.8
    assert sample_weight(["text", "vision"], WEIGHTS) == 0.9
    assert sample_weight(["text", "audio", "vision"], WEIGHTS) == pytest.approx(0.85)


def test_collator_pads_right_and_concatenates_media(tmp_path):
    samples = _samples(tmp_path)
    batch = OmniCollator(TOKEN_IDS["im_end"], WEIGHTS)(samples)
    lengths = [len(s["input_ids"]) for s in samples]
    B, L = batch["input_ids"].shape
    assert (B, L) == (4, max(lengths))
    for b, n in enumerate(lengths):
        assert torch.equal(batch["input_ids"][b, :n], samples[b]["input_ids"])
        assert batch["attention_mask"][b].sum() == n and (batch["labels"][b, n:] == IGNORE_INDEX).all()
        assert (batch["input_ids"][b, n:] == TOKEN_IDS["im_end"]).all()
    # Two audio clips (samples 1 and 2), padded to the longer one, with their frame masks.
    assert batch["input_features"].shape[:2] == (2, 128)
    assert batch["feature_attention_mask"].sum(-1).tolist() == [
        int(samples[1]["feature_attention_mask"].sum()), int(samples[2]["feature_attention_mask"].sum())]
    assert torch.equal(batch["pixel_values"], samples[2]["pixel_values"])
    assert torch.equal(batch["video_grid_thw"], samples[3]["video_grid_thw"])
    assert batch["sample_weight"].tolist() == pytest.approx([1.0, 0.8, 0.85, 0.9])
    assert batch["use_audio_in_video"] is False


@pytest.mark.parametrize("aiv", [False, True])
def test_collated_batch_gives_each_sample_the_logits_it_gets_alone(tmp_path, aiv):
    from omnitune.model.tiny import build_tiny_model

    thinker = build_tiny_model().thinker
    collate = OmniCollator(TOKEN_IDS["im_end"], WEIGHTS)
    samples = _samples(tmp_path, aiv)
    batch = collate(samples)
    assert batch["use_audio_in_video"] is aiv
    batch.pop("sample_weight")
    with torch.no_grad():
        out = thinker(**batch)
        assert torch.isfinite(out.loss)
        for b, s in enumerate(samples):
            alone = collate([s])
            alone.pop("sample_weight")
            n = len(s["input_ids"])
            torch.testing.assert_close(out.logits[b, :n], thinker(**alone).logits[0], atol=1e-4, rtol=1e-4)
