"""The command line, run the way a user runs it: presets from any directory, overrides, clear errors."""

import json
import os
import subprocess

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
    assert "encoded the media" not in res.output  # demo trains the projector and merger: no encoder cache
    frozen = ["prepare", "demo", "--set", f"data.train={train_file}", "--set", "data.workers=1",
              "--set", "adapter.train=[]"]
    first, again = runner.invoke(app, frozen), runner.invoke(app, frozen)
    assert "encoded the media of 6 samples once" in first.output, first.output  # the towers ran here, once
    assert again.exit_code == 0 and "encoded the media" not in again.output, again.output
    rows = [json.loads(x) for x in (tmp_path / "dump.jsonl").read_text().splitlines()]
    assert len(rows) == 6 and {"line", "input_ids", "labels"} <= set(rows[0])
    assert any(t != -100 for t in rows[0]["labels"])


@pytest.fixture(scope="module")
def thinking_run(train_file, tmp_path_factory):
    cwd = tmp_path_factory.mktemp("cwd")
    res = runner.invoke(app, ["train", "demo", "--set", f"data.train={train_file}", "--set", "train.max_steps=2",
                              "--set", "data.workers=1", "--set", "model.variant=thinking",
                              "--set", f"output_dir={cwd / 'runs' / 'demo'}"])
    assert res.exit_code == 0, res.output
    return cwd / "runs" / "demo"


def test_train_a_preset_with_overrides_writes_a_run_directory(thinking_run):
    run = thinking_run
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


def test_eval_infer_and_export_read_the_run_directory(thinking_run, train_file, tmp_path):
    res = runner.invoke(app, ["eval", str(thinking_run), "--data", str(train_file), "--task", "qa",
                              "--compare", "base", "--limit", "2", "--max-new-tokens", "4",
                              "--out", str(tmp_path / "ev")])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "ev" / "report.md").exists() and (tmp_path / "ev" / "predictions.json").exists()
    res = runner.invoke(app, ["infer", str(thinking_run), "--text", "Say a colour.", "--no-speech",
                              "--max-new-tokens", "3"])
    assert res.exit_code == 0, res.output
    res = runner.invoke(app, ["export", str(thinking_run), str(tmp_path / "exported"), "--thinker-only"])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "exported" / "config.json").exists()
    assert not list((tmp_path / "exported").glob("*.bin"))


def test_infer_with_nothing_to_answer_is_a_clear_error(thinking_run):
    res = runner.invoke(app, ["infer", str(thinking_run), "--no-speech"])
    assert res.exit_code == 1
    assert "nothing to answer" in res.output


def test_a_bad_record_stops_prepare_with_its_file_and_line_and_no_traceback(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"conversations": [{"role": "user", "content": [{"type": "audio", "audio": "gone.wav"}]},'
                   ' {"role": "assistant", "content": "x"}]}\n')
    # a real process: CliRunner would also capture other tests' stale logging handlers
    res = subprocess.run(["omnitune", "prepare", "demo", "--set", f"data.train={bad}", "--set", "data.workers=1"],
                         capture_output=True, text=True, env={**os.environ, "COLUMNS": "500"}, timeout=300)
    out = res.stdout + res.stderr
    assert res.returncode == 1, out
    assert f"{bad}:1:" in out and "gone.wav" in out
    assert "Traceback" not in out
