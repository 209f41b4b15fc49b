"""The GPU benchmark's code paths, dry-run on the CPU at tiny sizes so the script cannot rot between GPU runs.
No timing is asserted: CPU numbers say nothing about the GPU."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_bench_dry_run_measures_both_paths_and_writes_json(tmp_path):
    env = {**os.environ, "BENCH_DEVICE": "cpu", "BENCH_TINY": "1", "OUT": str(tmp_path / "out")}
    res = subprocess.run([sys.executable, str(ROOT / "bench" / "bench_moe_lora.py"), "--parts", "layer,model",
                          "--seqs", "64", "--layers", "2"], capture_output=True, text=True, env=env, timeout=600)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    assert "| model | omnitune (2 layers) | 64 |" in res.stdout
    assert "| model | transformers grouped_mm + PEFT (2 layers) | 64 |" in res.stdout
    results = json.loads((tmp_path / "out" / "bench_moe_lora.json").read_text())["results"]
    assert {(r["part"], r["impl"]) for r in results} == {("layer", "peft"), ("layer", "ours"), ("model", "peft"),
                                                         ("model", "ours")}
    assert all("error" not in r for r in results)


@pytest.mark.slow
def test_bench_dry_run_of_the_graphed_selective_and_qlora_variants(tmp_path):
    env = {**os.environ, "BENCH_DEVICE": "cpu", "BENCH_TINY": "1", "OUT": str(tmp_path / "out")}
    specs = ("layer:ours+graph,model:ours+graph+sac:64:2,model:ours+graph+qlora:64:2,model:ours+graph+keep1:64:2,"
             "model:ours+graph+qlora+nockpt:64:2")
    res = subprocess.run([sys.executable, str(ROOT / "bench" / "bench_moe_lora.py"), "--specs", specs],
                         capture_output=True, text=True, env=env, timeout=600)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    results = json.loads((tmp_path / "out" / "bench_moe_lora.json").read_text())["results"]
    assert [r["impl"] for r in results] == ["ours+graph", "ours+graph+sac", "ours+graph+qlora", "ours+graph+keep1",
                                            "ours+graph+qlora+nockpt"]
    assert all("error" not in r for r in results)
    assert "| model | omnitune + CUDA graph + NF4 experts (QLoRA) (2 layers) | 64 |" in res.stdout
    assert "| model | omnitune + CUDA graph + last 1 layers not checkpointed (2 layers) | 64 |" in res.stdout
    assert "| model | omnitune + CUDA graph + NF4 experts (QLoRA) + no checkpointing (2 layers) | 64 |" in res.stdout


def test_bench_speedups_compare_only_runs_of_the_same_size():
    import importlib.util

    sys.path.insert(0, str(ROOT / "bench"))  # its shared module, as running the script puts it on the path
    spec = importlib.util.spec_from_file_location("bench_moe_lora", ROOT / "bench" / "bench_moe_lora.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    row = dict(part="model", seq=4096, tok_s=1.0, mfu=0.1, peak_gib=1.0)
    out = bench.table([dict(row, impl="peft", layers=48, ms=100.0), dict(row, impl="ours", layers=48, ms=50.0),
                       dict(row, impl="ours", layers=8, ms=10.0)])
    assert "| model | omnitune | 4096 | 50.00 | 1 | 10.0% | 1.0 | 2.00x |" in out
    assert "| model | omnitune (8 layers) | 4096 | 10.00 | 1 | 10.0% | 1.0 | - |" in out  # no 8-layer baseline


@pytest.mark.slow
def test_the_gpu_training_check_dry_runs_on_the_cpu():
    """bench/check_graphed_training.py runs every configuration eagerly without a GPU (graph vs eager then agree
    to float rounding): the script cannot rot between GPU sessions."""
    res = subprocess.run([sys.executable, str(ROOT / "bench" / "check_graphed_training.py")], capture_output=True,
                         text=True, timeout=900, cwd=ROOT)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "== packing=False B=4 qlora=True" in res.stdout and ": OK" in res.stdout


@pytest.mark.slow
def test_the_trainer_bench_dry_runs_both_paths_through_omnitune_train(tmp_path):
    """bench/bench_train.py drives the real trainer: on the CPU at tiny widths its two runs must finish, report the
    plan they ran, and compare against the plain path."""
    env = {**os.environ, "BENCH_DEVICE": "cpu", "BENCH_TINY": "1", "OUT": str(tmp_path / "out"),
           "OMNITUNE_CACHE": os.environ["OMNITUNE_CACHE"]}
    cmd = [sys.executable, str(ROOT / "bench" / "bench_train.py"), "--runs", "ours,peft", "--seq", "96", "--layers",
           "2", "--steps", "3", "--warmup", "1", "--set", "train.precision=fp32"]
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    results = json.loads((tmp_path / "out" / "bench_train.json").read_text())["results"]
    assert [r["run"] for r in results] == ["ours", "peft"] and all("error" not in r for r in results), results
    ours, peft = results
    assert any("omnitune fused kernels" in line for line in ours["plan"])
    assert any("transformers + PEFT (plain)" in line for line in peft["plan"])
    assert 64 <= ours["tokens"] <= 96 and ours["ms"] > 0 and len(ours["step_intervals_ms"]) == 2
    assert "| ours | text | omnitune train (r16, 2 layers) |" in res.stdout


@pytest.mark.slow
def test_the_trainer_bench_dry_runs_media_rows_with_and_without_the_encoder_cache(tmp_path):
    """The media rows (image + audio, video with its audio track) through the real trainer on the CPU: the cached
    run, the uncached one and the plain path all finish, on the same samples, and the table compares them."""
    env = {**os.environ, "BENCH_DEVICE": "cpu", "BENCH_TINY": "1", "OUT": str(tmp_path / "out"),
           "OMNITUNE_CACHE": os.environ["OMNITUNE_CACHE"]}
    cmd = [sys.executable, str(ROOT / "bench" / "bench_train.py"), "--runs", "ours,ours-nocache,peft", "--data",
           "image_audio,video", "--seq", "256", "--layers", "1", "--steps", "2", "--warmup", "1", "--set",
           "train.precision=fp32"]
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=1200)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    results = json.loads((tmp_path / "out" / "bench_train.json").read_text())["results"]
    assert all("error" not in r for r in results), results
    assert [(r["run"], r["data"], r["encoder_cache"]) for r in results] == [
        ("ours", "image_audio", True), ("ours-nocache", "image_audio", False), ("peft", "image_audio", False),
        ("ours", "video", True), ("ours-nocache", "video", False), ("peft", "video", False)]
    by = {(r["run"], r["data"]): r for r in results}
    assert by[("ours", "video")]["tokens"] == by[("peft", "video")]["tokens"] > 64  # the same samples
    assert by[("ours", "image_audio")]["encode_s"] > 0 and by[("peft", "image_audio")]["encode_s"] == 0
    assert "| ours | video | omnitune train (r16, 1 layers) |" in res.stdout and "| cached |" in res.stdout


@pytest.mark.slow
def test_the_serving_bench_dry_runs_through_the_real_server(tmp_path):
    """bench/bench_serve.py drives `omnitune serve`'s app over HTTP with the openai client: on the CPU at tiny widths
    every measurement must come back (streamed text, streamed speech, 1 and 8 concurrent requests)."""
    env = {**os.environ, "BENCH_DEVICE": "cpu", "BENCH_TINY": "1", "OUT": str(tmp_path / "out"),
           "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT / "bench"), os.environ.get("PYTHONPATH", "")])}
    res = subprocess.run([sys.executable, str(ROOT / "bench" / "bench_serve.py"), "--speech-frames", "13"],
                         capture_output=True, text=True, env=env, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    out = json.loads((tmp_path / "out" / "bench_serve.json").read_text())
    # Exactly 13 frames: 1920 samples each less Code2Wav's 555-sample trim, in pieces of 12 frames (12 + 1).
    assert out["speech"]["audio_s"] == pytest.approx((13 * 1920 - 555) / 24000) and out["speech"]["pieces"] == 2
    assert [c["requests"] for c in out["concurrency"]] == [1, 8] and all(c["tokens"] > 0 for c in out["concurrency"])
    assert "| speech: real-time factor" in res.stdout and "| text: time to first token" in res.stdout


@pytest.mark.slow
def test_the_memory_bench_dry_runs_its_rows_through_omnitune_train(tmp_path):
    """bench/bench_memory.py: each row is the real trainer in its own process, with the plan's memory estimate
    recorded beside the peak (no cap off the GPU)."""
    env = {**os.environ, "BENCH_DEVICE": "cpu", "BENCH_TINY": "1", "OUT": str(tmp_path / "out"),
           "OMNITUNE_CACHE": os.environ["OMNITUNE_CACHE"]}
    cmd = [sys.executable, str(ROOT / "bench" / "bench_memory.py"), "--runs", "r16,instruct,qlora", "--seq", "96",
           "--layers", "2", "--steps", "3", "--warmup", "1", "--set", "train.precision=fp32", "--profile", "qlora"]
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "aten::" in (tmp_path / "out" / "profile_qlora.txt").read_text()
    results = json.loads((tmp_path / "out" / "bench_memory.json").read_text())["results"]
    assert [r["run"] for r in results] == ["r16", "instruct", "qlora"] and all("error" not in r for r in results)
    _, instruct, qlora = results
    assert instruct["rank"] == 64 and instruct["cap_gib"] == 76 and qlora["method"] == "qlora"
    assert any("optimizer: adamw8bit" in line for line in instruct["plan"])
    assert any("stepped inside the backward" in line for line in qlora["plan"])
    assert all(r["estimate_gib"] > 0 and set(r["estimate_parts"]) >= {"weights", "optimizer"} for r in results)
    assert "| instruct | lora r64 | 76 |" in res.stdout and "| r16 | lora r16 | - |" in res.stdout
