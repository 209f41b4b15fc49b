"""The command line, run the way a user runs it: presets from any directory, overrides, clear errors."""

import json

import pytest
from typer.testing import CliRunner

from omnitune.cli import app
from omnitune.data.synthetic import make_demo_dataset

runner = CliRunner()


@pytest.fixture(scope="module")
def train_file(tmp_path_factory):
    return make_demo_dataset(tmp_path_factory.mktemp("data"), n_train=6, n_eval=2, seed=3)[0]


def test_prepare_a_preset_from_any_directory_with_show_and_dump(train_file, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    res = runner.invoke(app, ["prepare", "demo", "--set", f"data.train={train_file}", "--set", "data.workers=1",
                              "--show", "1", "--dump", "dump.jsonl"])
    assert res.exit_code == 0, res.output
    assert "6 kept, 0 skipped" in res.output
    rows = [json.loads(x) for x in (tmp_path / "dump.jsonl").read_text().splitlines()]
    assert len(rows) == 6 and {"line", "input_ids", "labels"} <= set(rows[0])
    assert any(t != -100 for t in rows[0]["labels"])


def test_train_a_preset_with_overrides_writes_a_run_directory(train_file, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    res = runner.invoke(app, ["train", "demo", "--set", f"data.train={train_file}", "--set", "train.max_steps=2",
                              "--set", "data.workers=1", "--set", "model.variant=thinking"])
    assert res.exit_code == 0, res.output
    run = tmp_path / "runs" / "demo"
    assert (run / "adapter" / "adapter_config.json").exists()
    assert "<think>" in (run / "processor" / "chat_template.jinja").read_text()
    assert "variant: thinking" in (run / "recipe.yaml").read_text()


def test_bad_recipe_key_exits_2_with_the_key_named(train_file):
    res = runner.invoke(app, ["train", "demo", "--set", "train.lrr=1"])
    assert res.exit_code == 2
    assert "train.lrr: unknown key; did you mean 'lr'" in res.output


def test_missing_training_data_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    res = runner.invoke(app, ["prepare", "demo"])
    assert res.exit_code == 1
    assert "data.train is not set" in res.output
