"""Voice training end to end on the tiny model: target speech in the data, codes cached by prepare, the voice
preset through `omnitune train`, a new speaker saved with the run, reloaded for speech and kept by export."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from omnitune.data.cache import prepare_split
from omnitune.data.collate import OmniCollator
from omnitune.data.schema import RecordError, read_records
from omnitune.model.load import load_processor
from omnitune.recipe import load_recipe
from omnitune.train import run as train_run
from omnitune.train.objectives import TalkerCodec
from voice_helpers import write_voice_data

TINY = ["model.path=tiny", "model.dtype=float32", "train.precision=fp32", "talker.codec=tiny", "data.workers=1",
        "log.tensorboard=false"]


def voice_recipe(tmp_path, data, *extra):
    return load_recipe("voice", [*TINY, f"data.train={data}", f"output_dir={tmp_path / 'run'}", *extra])


def test_assistant_speech_and_speaker_are_read_from_records(tmp_path):
    data = write_voice_data(tmp_path, n=2, speaker="Nova")
    records = list(read_records(data))
    assert all(not isinstance(r, RecordError) for r in records)
    assert records[0].speech == (tmp_path / "reply0.wav").resolve() and records[0].speaker == "nova"
    assert records[0].messages[-1] == {"role": "assistant", "content": "The weather is sunny today."}


def test_speech_in_an_earlier_assistant_turn_is_a_record_error(tmp_path):
    write_voice_data(tmp_path, n=1)
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"conversations": [
        {"role": "user", "content": "a"},
        {"role": "assistant", "content": [{"type": "text", "text": "b"}, {"type": "audio", "audio": "reply0.wav"}]},
        {"role": "user", "content": "c"}, {"role": "assistant", "content": "d"}]}) + "\n")
    (err,) = read_records(bad)
    assert isinstance(err, RecordError) and "bad.jsonl:1: turn 2: target speech" in str(err)


def test_undecodable_target_speech_is_reported_at_its_line(tmp_path):
    data = write_voice_data(tmp_path, n=2)
    (tmp_path / "reply1.wav").write_bytes(b"RIFF....WAVEnot audio")
    recipe = voice_recipe(tmp_path, data, "data.on_error=skip")
    ds = prepare_split(recipe, load_processor(recipe.model), data)
    assert len(ds) == 1
    assert any("voice.jsonl:2: target speech" in s for s in ds.manifest["skipped"])


def test_codes_are_cached_and_a_new_codec_prepares_again(tmp_path):
    data = write_voice_data(tmp_path, n=2, seconds=0.5)
    recipe = voice_recipe(tmp_path, data)
    processor = load_processor(recipe.model)
    first = prepare_split(recipe, processor, data)
    codes = first[0]["speech_codes"]
    assert codes.shape == (7, 4)  # 0.5 s at 12.5 frames a second (the last partial), the tiny Talker's 4 books
    assert prepare_split(recipe, processor, data).dir == first.dir  # reused
    other = voice_recipe(tmp_path, data, "talker.codec_sliding_window=4")
    assert prepare_split(other, processor, data).dir != first.dir


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """The voice preset on 2 records of a new speaker, overfitted for 30 steps; the model as it was saved."""
    tmp = tmp_path_factory.mktemp("voice")
    data = write_voice_data(tmp, n=2, speaker="nova")
    recipe = voice_recipe(tmp, data, "train.max_steps=30", "train.grad_accum=1", "train.batch_size=2",
                          "train.lr=1e-2", "train.warmup_ratio=0", "train.scheduler=constant", "train.logging_steps=5",
                          "adapter.rank=16", "adapter.alpha=32")
    saved = {}
    original = train_run.save_final

    def keep(model, *args, **kwargs):
        saved["model"] = model
        return original(model, *args, **kwargs)

    train_run.save_final = keep
    try:
        result = train_run.train(recipe)
    finally:
        train_run.save_final = original
    return dict(result=result, model=saved["model"], recipe=recipe, data=data)


def test_voice_preset_overfits_a_few_samples(trained):
    rows = [json.loads(line) for line in trained["result"].run.metrics.read_text().splitlines()]
    losses = [r["loss"] for r in rows if "loss" in r]
    assert trained["result"].plan.objective == "talker_codec"
    assert losses[-1] < 0.5 * losses[0], losses


def test_new_speaker_is_a_new_codec_row_saved_with_the_run(trained):
    table = json.loads(trained["result"].run.speakers.read_text())
    assert table["nova"] not in {table["chelsie"], table["ethan"], table["aiden"]}
    assert set(table) == {"chelsie", "ethan", "aiden", "nova"}


def talker_loss(model, recipe, data, speakers):
    processor = load_processor(recipe.model)
    ds = prepare_split(recipe, processor, data)
    batch = OmniCollator(processor.tokenizer.pad_token_id)([ds[i] for i in range(len(ds))])
    model.eval()
    with torch.no_grad():
        return TalkerCodec(speakers, "ethan").loss(model, batch, None)


def test_the_talker_step_never_asks_for_cudnn_attention(trained, monkeypatch):
    """cuDNN's attention plans every new shape on the host (1.6 ms a call on an H200) and the Talker's length follows
    the speech: the step's attention calls (Thinker and Talker) run with cuDNN's kernel switched off."""
    import torch.nn.functional as F

    seen = []
    sdpa = F.scaled_dot_product_attention

    def spy(*args, **kwargs):
        seen.append(torch.backends.cuda.cudnn_sdp_enabled())
        return sdpa(*args, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    table = json.loads(trained["result"].run.speakers.read_text())
    talker_loss(trained["model"], trained["recipe"], trained["data"], table)
    assert seen and not any(seen) and torch.backends.cuda.cudnn_sdp_enabled()


def test_reloaded_voice_run_reproduces_the_trained_talker(trained):
    from omnitune.model.source import load_model, resolve_source

    run = trained["result"].run
    table = json.loads(run.speakers.read_text())
    before = talker_loss(trained["model"], trained["recipe"], trained["data"], table)
    reloaded = load_model(resolve_source(str(run.root)), speech=True)
    assert reloaded.config.talker_config.speaker_id["nova"] == table["nova"]
    after = talker_loss(reloaded, trained["recipe"], trained["data"], table)
    assert torch.allclose(before, after, atol=1e-4), (before, after)
    assert after < 2.0  # the trained Talker, not the base one (~8)


def test_infer_speaks_with_the_new_speaker_and_names_the_choices_for_an_unknown_one(trained):
    from omnitune.infer import InferError, Inferencer

    inf = Inferencer(str(trained["result"].run.root), speech=True)
    out = inf.generate("Tell me fact number 1.", speaker="Nova", max_new_tokens=4, max_speech_tokens=12)
    assert out.audio is not None and out.audio.size > 0 and out.sample_rate == 24000
    with pytest.raises(InferError, match=r"unknown speaker 'zed'; this checkpoint has: aiden, chelsie, ethan, nova"):
        inf.generate("Hi", speaker="zed", max_new_tokens=2)


def test_export_writes_the_tuned_talker_and_the_new_speaker(trained, tmp_path):
    from omnitune.export import export_run
    from omnitune.model.source import load_model, resolve_source

    run = trained["result"].run
    export_run(str(run.root), tmp_path / "export")
    config = json.loads((tmp_path / "export" / "config.json").read_text())
    table = json.loads(run.speakers.read_text())
    assert config["talker_config"]["speaker_id"]["nova"] == table["nova"]
    exported = load_model(resolve_source(str(tmp_path / "export"), dtype="float32"), speech=True)
    before = talker_loss(trained["model"], trained["recipe"], trained["data"], table)
    after = talker_loss(exported, trained["recipe"], trained["data"], table)
    assert torch.allclose(before, after, atol=1e-4), (before, after)


def test_eval_speech_reports_the_codec_ce_of_base_and_tuned(trained, tmp_path):
    from omnitune.eval.runner import evaluate

    report = evaluate(str(trained["result"].run.root), trained["data"], "speech", compare_base=True,
                      out_dir=tmp_path / "eval")
    base, tuned = report.results["base"].scores, report.results["tuned"].scores
    assert tuned["codec_ce"] < 0.5 * base["codec_ce"] and tuned["code_predictor_ce"] < base["code_predictor_ce"]
    assert base["unknown_speaker_samples"] == 2 and tuned["unknown_speaker_samples"] == 0  # nova is new
    assert (tmp_path / "eval" / "report.md").read_text().count("codec_ce") == 1


def test_codec_check_picks_the_codec_the_talker_was_trained_with(trained):
    from omnitune.eval.codec_check import codec_check

    folder = trained["data"].parent
    rows = codec_check(str(trained["result"].run.root), [folder / "reply0.wav", folder / "reply1.wav"],
                       ["tiny", "voice_helpers:FrameIndexCodec"],
                       texts=["The weather is sunny today.", "I like green apples."], speaker="nova")
    ce = {name: np.mean([r["codec_ce"] for r in rows if r["codec"] == name]) for name in ("tiny",
                                                                                           "voice_helpers:FrameIndexCodec")}
    assert ce["tiny"] < 0.5 * ce["voice_helpers:FrameIndexCodec"], ce
    assert all(np.isnan(r["si_sdr_db"]) for r in rows)  # the tiny Code2Wav makes no 24 kHz audio to compare


def test_eval_voice_speaks_transcribes_and_says_when_no_speaker_model_is_there(trained, tmp_path):
    from omnitune.eval.runner import evaluate

    report = evaluate(str(trained["result"].run.root), trained["data"], "voice", compare_base=True,
                      max_new_tokens=6, out_dir=tmp_path / "eval")
    for label in ("base", "tuned"):
        res = report.results[label]
        assert res.scores["speech_seconds"] > 0
        assert np.isnan(res.scores["speaker_similarity"])
        assert any("no speaker-verification model given" in n for n in res.notes)
        # the tiny Code2Wav upsamples a frame to 8 samples, not 1920: too short to transcribe, and said so
        assert all(("transcript" in s) != (s["problem"] is not None) for s in res.samples)
    assert report.results["tuned"].samples[0]["speaker"] == "nova"
    assert report.results["base"].samples[0]["speaker"] == "ethan"  # the base has no such voice
    assert "Note: speaker_similarity is NaN" in (tmp_path / "eval" / "report.md").read_text()
