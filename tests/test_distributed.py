"""Multi-process training through `omnitune train --nproc 2` on the CPU (gloo): every strategy makes the same
updates as one process on the concatenated batch, the sharded ones really shard, save and resume, and leave an
adapter that equals a single process's."""
from __future__ import annotations

import re
import shutil

import pytest
from distributed_helpers import failed, losses, omnitune_train, text_dataset
from safetensors.torch import load_file

STEPS = ("train.max_steps=4", "train.lr=5e-3", "train.scheduler=constant", "train.warmup_ratio=0",
         "train.save_steps=2")
TOL = 1e-5


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return text_dataset(tmp_path_factory.mktemp("text"), n=16)


@pytest.fixture(scope="module")
def single(data, tmp_path_factory):
    """One process with batch 4: the reference every 2-process run (batch 2 each) must reproduce."""
    out = tmp_path_factory.mktemp("single") / "run"
    res = omnitune_train(out, data, 1, *STEPS, "train.batch_size=4")
    assert res.returncode == 0, failed(res)
    return out


@pytest.fixture(scope="module")
def runs(data, tmp_path_factory):
    """strategy -> (run dir, stdout) of its 2-process run, made once for the tests that read it."""
    made = {}

    def get(strategy: str):
        if strategy not in made:
            out = tmp_path_factory.mktemp(strategy) / "run"
            res = omnitune_train(out, data, 2, *STEPS, "train.batch_size=2", f"distributed.strategy={strategy}")
            assert res.returncode == 0, failed(res)
            made[strategy] = out, res.stdout
        return made[strategy]
    return get


def adapter(run) -> dict:
    return load_file(str(run / "adapter" / "adapter_model.safetensors"))


def assert_same_weights(ours: dict, reference: dict) -> None:
    """Equal up to what AdamW makes of float summation order: each element's step is ~lr x sign(gradient), so an
    element whose gradient is ~0 may step either way (lr 5e-3: up to ~1e-3 after 4 steps); everywhere else equal."""
    assert ours.keys() == reference.keys()
    for name, expected in reference.items():
        diff = (ours[name].float() - expected.float()).abs()
        assert diff.mean() < 1e-6 and diff.max() < 2e-3, (name, diff.mean(), diff.max())


def held(stdout: str) -> tuple[float, float | None]:
    """The shard report's share of the parameters (and of the optimizer state) that process 0 holds, in %."""
    m = re.search(r"holds ([\d.]+)% of the [\d,]+ parameter values(?: and optimizer state for ([\d.]+)%)?",
                  " ".join(stdout.split()))
    assert m, stdout[-3000:]
    return float(m[1]), (float(m[2]) if m[2] else None)


@pytest.mark.slow
def test_ddp_updates_equal_one_process_on_the_concatenated_batch(runs, single):
    """DDP averages gradients over processes while each process's loss is divided by every process's tokens: the
    loss must be scaled by the world size, else every update is world_size times too small (and the logged loss
    halved)."""
    out, _ = runs("ddp")
    assert losses(out) == pytest.approx(losses(single), rel=0, abs=TOL)


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["fsdp2", "zero2", "zero3"])
def test_sharded_strategies_train_as_one_process_does(strategy, runs, single):
    if strategy.startswith("zero"):
        pytest.importorskip("deepspeed")
    out, stdout = runs(strategy)
    assert losses(out) == pytest.approx(losses(single), rel=0, abs=TOL)
    params, optimizer = held(stdout)
    if strategy == "zero2":  # parameters whole, optimizer state split
        assert params == 100.0 and optimizer is not None and 45 < optimizer < 55
    else:  # parameters split (so their gradients and optimizer state too)
        assert 45 < params < 55
    # the adapter gathered from the shards is the one process's, as eval / infer / export read it
    assert_same_weights(adapter(out), adapter(single))


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["fsdp2", "zero3"])
def test_sharded_checkpoint_resumes_the_same_losses(strategy, runs, data, tmp_path):
    """Stopped after the step-2 checkpoint (the later one and its log removed), resumed in fresh processes: steps
    3-4 reproduce the uninterrupted run."""
    if strategy.startswith("zero"):
        pytest.importorskip("deepspeed")
    full, _ = runs(strategy)
    out = tmp_path / "run"
    shutil.copytree(full, out, ignore=shutil.ignore_patterns("checkpoint-4", "adapter"))
    res = omnitune_train(out, data, 2, *STEPS, "train.batch_size=2", f"distributed.strategy={strategy}",
                         resume=True)
    assert res.returncode == 0, failed(res)
    assert res.stdout.count("'loss'") == 2  # it trained steps 3 and 4 only: it did resume
    assert losses(out) == pytest.approx(losses(full), rel=0, abs=TOL)


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["fsdp2", "zero3"])
def test_full_fine_tune_sharded_trains_as_one_process_does(strategy, data, tmp_path):
    if strategy.startswith("zero"):
        pytest.importorskip("deepspeed")
    # router_aux_coef=0: the balance loss is per micro-batch (of 2 samples here, of 4 in one process), not a sum
    full = ("adapter.method=full", "adapter.freeze=[audio_tower,vision_tower]", "train.max_steps=2",
            "train.save_steps=100", "train.lr=1e-4", "train.router_aux_coef=0")
    one = omnitune_train(tmp_path / "one", data, 1, *STEPS, *full, "train.batch_size=4")
    assert one.returncode == 0, failed(one)
    two = omnitune_train(tmp_path / "two", data, 2, *STEPS, *full, "train.batch_size=2",
                         f"distributed.strategy={strategy}")
    assert two.returncode == 0, failed(two)
    assert losses(tmp_path / "two") == pytest.approx(losses(tmp_path / "one"), rel=0, abs=TOL)
    assert 45 < held(two.stdout)[0] < 55
    # the consolidated full model, as a one-process run writes it
    assert_same_weights(load_file(str(tmp_path / "two" / "model" / "model.safetensors")),
                        load_file(str(tmp_path / "one" / "model" / "model.safetensors")))


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["fsdp2", "zero3"])
def test_processes_routing_to_disjoint_experts_train_without_waiting(strategy, data, tmp_path):
    """Process 0 routes every token to experts 0-1, process 1 to experts 2-3 (tests/scripts/routing_apart): the
    engines gather and reduce every expert's weights each step (the fused 3-D expert tensors; ZeRO-3's MoE leaf
    modules), so neither waits for an expert the other never used."""
    if strategy.startswith("zero"):
        pytest.importorskip("deepspeed")
    out = tmp_path / "run"
    res = omnitune_train(out, data, 2, *STEPS, "train.max_steps=2", "train.batch_size=2",
                         f"distributed.strategy={strategy}", routing_apart=True, timeout=240)
    assert res.returncode == 0, failed(res)
    said = " ".join(res.stderr.split())
    assert "process 0 uses experts [0, 1]" in said and "process 1 uses experts [2, 3]" in said
    assert len(losses(out)) == 2 and 45 < held(res.stdout)[0] < 55
