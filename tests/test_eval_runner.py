"""evaluate() on the tiny model: batching, outputs (JSON, markdown, PNG), bad records, free-task loss."""

from __future__ import annotations

import json
import math
import re
import shutil
from dataclasses import replace

import pytest
from rich.console import Console

from omnitune.eval.report import scores_table
from omnitune.eval.runner import (EvalError, evaluate, generate_predictions,
                                  read_eval_records, record_losses)
from omnitune.model.source import load_generation_processor, load_model, resolve_source
from test_infer_fixtures import lora_run_dir, media, write_jsonl  # noqa: F401  (fixtures)


def _records(m):
    user = lambda *items: {"role": "user", "content": list(items)}  # noqa: E731
    text = lambda t: {"type": "text", "text": t}  # noqa: E731
    return [
        {"conversations": [user({"type": "audio", "audio": str(m / "a.wav")}, text("Transcribe.")),
                           {"role": "assistant", "content": "a quiet tone"}]},
        {"conversations": [{"role": "system", "content": "Be brief."}, user(text("Say hi")),
                           {"role": "assistant", "content": "hi"}]},
        {"conversations": [user({"type": "image", "image": str(m / "i.png")}, text("Which?\nA. red\nB. blue")),
                           {"role": "assistant", "content": "B"}]},
        {"conversations": [user({"type": "video", "video": str(m / "v.mp4")}, text("Describe.")),
                           {"role": "assistant", "content": "a square that gets brighter"}]},
        {"conversations": [user({"type": "audio", "audio": "missing.wav"}), {"role": "assistant", "content": "x"}]},
        {"conversations": [user({"type": "audio", "audio": str(m / "corrupt.wav")}),
                           {"role": "assistant", "content": "x"}]},
    ]


@pytest.fixture(scope="module")
def eval_file(media, tmp_path_factory):
    folder = tmp_path_factory.mktemp("eval")
    shutil.copytree(media, folder / "media")  # media are read only from inside the eval file's folder
    (folder / "media" / "corrupt.wav").write_bytes(b"RIFF not really a wave file")  # exists, so only decoding fails
    return write_jsonl(folder / "eval.jsonl", _records(folder / "media"))


@pytest.fixture(scope="module")
def tuned(lora_run_dir):
    src = resolve_source(lora_run_dir)
    return src, load_generation_processor(src), load_model(src, speech=False)


def test_batched_generation_equals_one_record_at_a_time(tuned, eval_file):
    src, proc, model = tuned
    records, bad = read_eval_records(eval_file, "instruct")
    assert len(records) == 5 and [e.line for e in bad] == [5]
    records = records[:4]
    one = generate_predictions(model, proc, records, src.data, batch_size=1, max_new_tokens=5)
    many = generate_predictions(model, proc, records, src.data, batch_size=4, max_new_tokens=5)
    assert [p for _, p in one] == [p for _, p in many]
    assert all(p for _, p in one)


def test_free_task_loss_does_not_depend_on_batching(tuned, eval_file):
    src, proc, model = tuned
    records = read_eval_records(eval_file, "instruct")[0][:4]
    one = record_losses(model, proc, records, src.data, batch_size=1)
    many = record_losses(model, proc, records, src.data, batch_size=4)
    assert [n for _, _, n in one] == [n for _, _, n in many] and all(n > 0 for _, _, n in one)
    for (_, a, _), (_, b, _) in zip(one, many):
        assert a == pytest.approx(b, rel=1e-4)


def test_qa_exact_match_against_the_models_own_answers(lora_run_dir, tuned, eval_file):
    src, proc, model = tuned
    records = read_eval_records(eval_file, "instruct")[0][:2]
    preds = generate_predictions(model, proc, records, src.data, max_new_tokens=4)
    assert evaluate(lora_run_dir, eval_file, "qa", max_new_tokens=4, limit=2, write=False,
                    on_error="skip").results["tuned"].scores["exact_match"] == 0.0
    raw = [json.loads(line) for line in eval_file.read_text().splitlines()[:2]]
    for rec, (_, pred) in zip(raw, preds):
        rec["conversations"][-1]["content"] = pred  # the model's own greedy answer becomes the reference
    own = write_jsonl(eval_file.parent / "own_answers.jsonl", raw)
    scores = evaluate(lora_run_dir, own, "qa", max_new_tokens=4, write=False).results["tuned"].scores
    assert scores["exact_match"] == 1.0


def test_evaluate_compares_base_and_writes_predictions_report_and_plots(lora_run_dir, eval_file, tmp_path):
    out = tmp_path / "out"
    report = evaluate(lora_run_dir, eval_file, "asr", compare_base=True, batch_size=4, max_new_tokens=4,
                      on_error="skip", out_dir=out)
    assert list(report.results) == ["base", "tuned"]
    assert [f"{e.file}:{e.line}" for e in report.bad] == [f"{eval_file}:5", f"{eval_file}:6"]
    data = json.loads((out / "predictions.json").read_text())
    assert data["bad_records"][0]["line"] == 5 and "missing.wav" in data["bad_records"][0]["reason"]
    assert "corrupt.wav" in data["bad_records"][1]["reason"]
    assert len(data["samples"]) == 4
    for s in data["samples"]:
        assert {"base", "tuned"} <= set(s) and "wer" in s["tuned"] and s["reference"]
    assert data["scores"]["tuned"]["wer"] == report.results["tuned"].scores["wer"] > 0
    md = (out / "report.md").read_text()
    assert "| wer |" in md and f"{eval_file}:5" in md and f"{eval_file}:6" in md and "samples/s" in md
    for png in ("scores.png", "training_curves.png"):  # training curves come from RUN/metrics.jsonl
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    console = Console(record=True, width=100)
    console.print(scores_table(report))
    text = console.export_text()
    assert "wer" in text and "samples/s" in text and "2 left out" in text


def test_compare_base_loads_the_base_once_and_predicts_like_separately_loaded_models(lora_run_dir, eval_file,
                                                                                      monkeypatch):
    import omnitune.model.source as source

    src = resolve_source(lora_run_dir)
    proc = load_generation_processor(src)
    records = read_eval_records(eval_file, "instruct")[0][:4]
    expected = {label: [p for _, p in generate_predictions(load_model(s, speech=False), proc, records, src.data,
                                                           batch_size=4, max_new_tokens=4)]
                for label, s in (("base", replace(src, weights=None)), ("tuned", src))}
    assert expected["base"] != expected["tuned"]
    loads = []
    real = source.load_thinker
    monkeypatch.setattr(source, "load_thinker", lambda *a, **k: loads.append(1) or real(*a, **k))
    report = evaluate(lora_run_dir, eval_file, "qa", compare_base=True, on_error="skip", write=False,
                      max_new_tokens=4, batch_size=4, limit=4)
    assert len(loads) == 1  # the base, once: the adapter is merged into it for the tuned run
    for label in ("base", "tuned"):
        assert [s["prediction"] for s in report.results[label].samples] == expected[label]


def test_free_task_reports_loss_and_perplexity(lora_run_dir, eval_file, tmp_path):
    report = evaluate(lora_run_dir, eval_file, "free", on_error="skip", out_dir=tmp_path / "out", limit=2)
    scores = report.results["tuned"].scores
    assert scores["perplexity"] == pytest.approx(math.exp(scores["loss"])) and scores["tokens"] > 0
    assert len(report.results["tuned"].samples) == 2


def test_bad_records_stop_the_run_unless_skipped(lora_run_dir, eval_file, tmp_path):
    with pytest.raises(EvalError, match=rf"(?s){re.escape(str(eval_file))}:5: .*missing.wav.*on_error"):
        evaluate(lora_run_dir, eval_file, "qa", write=False)
    # a file that exists but does not decode is found while rendering, and stops the run as well
    lines = eval_file.read_text().splitlines()
    only_corrupt = eval_file.parent / "corrupt.jsonl"
    only_corrupt.write_text(lines[1] + "\n" + lines[5] + "\n")
    with pytest.raises(EvalError, match=rf"(?s){re.escape(str(only_corrupt))}:2: .*corrupt.wav.*on_error"):
        evaluate(lora_run_dir, only_corrupt, "qa", write=False)


def test_unknown_task_and_compare_without_weights_are_errors(lora_run_dir, eval_file):
    with pytest.raises(EvalError, match="unknown task 'bleu'"):
        evaluate(lora_run_dir, eval_file, "bleu")
    with pytest.raises(EvalError, match="no trained weights"):
        evaluate("demo", eval_file, "qa", compare_base=True)


def test_the_recipes_eval_file_is_used_relative_to_the_recipe(lora_run_dir, eval_file, tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text((lora_run_dir / "recipe.yaml").read_text().replace("eval: null", "eval: data/eval.jsonl"))
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "eval.jsonl").write_text(eval_file.read_text().splitlines()[1] + "\n")
    report = evaluate(recipe, None, "qa", adapter=lora_run_dir, max_new_tokens=2, write=False)
    assert report.eval_file == tmp_path / "data" / "eval.jsonl" and len(report.records) == 1
