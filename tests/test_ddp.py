"""Data-parallel training (distributed.strategy=ddp) under torchrun, on the CPU (gloo): the loss runs through the
DDP wrapper so LoRA gradients are all-reduced, and `omnitune train` writes one run directory from two processes."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from omnitune.data.synthetic import make_demo_dataset

ROOT = Path(__file__).resolve().parents[1]
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port"]


def torchrun(port: int, *args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK")}
    env["OMP_NUM_THREADS"] = "1"
    return subprocess.run([*TORCHRUN, str(port), *args], capture_output=True, text=True, env=env, cwd=cwd,
                          timeout=600)


def grad_checksums(out: Path, *flags: str, port: int) -> list[dict]:
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    res = torchrun(port, str(ROOT / "tests" / "scripts" / "ddp_grads.py"), str(out), *flags)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    return [json.loads((out / f"grads-{r}.json").read_text()) for r in (0, 1)]


@pytest.mark.slow
def test_lora_gradients_are_all_reduced_across_processes(tmp_path):
    synced = grad_checksums(tmp_path / "ddp", port=29511)
    assert synced[0].keys() == synced[1].keys() and any("experts" in k for k in synced[0])
    assert synced[0] == synced[1]  # each process saw other samples, and all hold the same averaged gradient
    # the check notices the old behaviour: a loss computed beside the DDP wrapper leaves each process its own
    apart = grad_checksums(tmp_path / "bypass", "--bypass-ddp", port=29512)
    assert apart[0] != apart[1]


@pytest.mark.slow
def test_omnitune_train_under_torchrun_writes_one_run(tmp_path):
    train_file, eval_file = make_demo_dataset(tmp_path / "data", n_train=8, n_eval=2, seed=2)
    out = tmp_path / "run"
    res = torchrun(29513, "-m", "omnitune", "train", "demo", "--set", f"data.train={train_file}",
                   "--set", f"data.eval={eval_file}", "--set", f"output_dir={out}", "--set", "data.workers=1",
                   "--set", "distributed.strategy=ddp", "--set", "train.max_steps=2", "--set", "train.batch_size=2",
                   "--set", "train.logging_steps=1", "--set", "train.save_steps=1", "--set", "log.tensorboard=false")
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    assert (out / "adapter" / "adapter_model.safetensors").exists() and (out / "recipe.yaml").exists()
    steps = [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines()
             if "loss" in json.loads(x)]
    assert steps == [1, 2]  # logged once, by the main process
    assert res.stdout.count("done") == 1
    # checkpoints go through the staging dir that every process writes into and the main process renames
    ckpts = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert ckpts == ["checkpoint-1", "checkpoint-2"]
    assert {"rng_state_0.pth", "rng_state_1.pth", "adapter_model.safetensors"} <= {
        p.name for p in (out / "checkpoints" / "checkpoint-2").iterdir()}


@pytest.mark.slow
def test_two_processes_on_a_fresh_cache_build_the_tiny_model_on_the_main_process(tmp_path, monkeypatch):
    """With no tiny checkpoint cached yet, the memory estimate's config read would build it on every process; a
    non-main process writes no weights, so it failed there (a race: it passed when the main process won)."""
    monkeypatch.setenv("OMNITUNE_CACHE", str(tmp_path / "fresh-cache"))
    train_file, _ = make_demo_dataset(tmp_path / "data", n_train=4, n_eval=1, seed=3)
    res = torchrun(29514, "-m", "omnitune", "train", "demo", "--set", f"data.train={train_file}",
                   "--set", f"output_dir={tmp_path / 'run'}", "--set", "data.workers=1",
                   "--set", "distributed.strategy=ddp", "--set", "train.max_steps=1", "--set", "train.batch_size=2",
                   "--set", "log.tensorboard=false")
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    assert (tmp_path / "fresh-cache" / "tiny-qwen3-omni-v2" / "DONE").exists()


def test_a_torchrun_launch_without_the_ddp_strategy_is_refused(tmp_path):
    res = subprocess.run([sys.executable, "-m", "omnitune", "train", "demo", "--set", f"output_dir={tmp_path}"],
                         capture_output=True, text=True, env={**os.environ, "WORLD_SIZE": "2"}, timeout=300)
    assert res.returncode == 1 and "set distributed.strategy=ddp" in " ".join((res.stdout + res.stderr).split())
