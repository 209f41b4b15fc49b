"""Multi-process training through `omnitune train --nproc 2` on the CPU (gloo): every strategy trains the same
updates as one process on the concatenated batch, and sharded strategies really shard."""
from __future__ import annotations

import pytest
from distributed_helpers import failed, losses, omnitune_train, text_dataset

STEPS = ("train.max_steps=3", "train.lr=5e-3", "train.scheduler=constant", "train.warmup_ratio=0",
         "train.save_steps=100")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return text_dataset(tmp_path_factory.mktemp("text"), n=12)


@pytest.fixture(scope="module")
def single(data, tmp_path_factory):
    """One process with batch 4: the reference every 2-process run (batch 2 each) must reproduce."""
    out = tmp_path_factory.mktemp("single") / "run"
    res = omnitune_train(out, data, 1, *STEPS, "train.batch_size=4")
    assert res.returncode == 0, failed(res)
    return out


@pytest.mark.slow
def test_ddp_updates_equal_one_process_on_the_concatenated_batch(data, single, tmp_path):
    """DDP averages gradients over processes while each process's loss is divided by every process's tokens: the
    loss must be scaled by the world size, else every update is world_size times too small (and the logged loss
    halved)."""
    out = tmp_path / "ddp"
    res = omnitune_train(out, data, 2, *STEPS, "train.batch_size=2", "distributed.strategy=ddp")
    assert res.returncode == 0, failed(res)
    assert losses(out) == pytest.approx(losses(single), rel=0, abs=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["fsdp2", "zero2", "zero3"])
def test_sharded_strategies_train_as_one_process_does(strategy, data, single, tmp_path):
    out = tmp_path / strategy
    res = omnitune_train(out, data, 2, *STEPS, "train.batch_size=2", f"distributed.strategy={strategy}")
    assert res.returncode == 0, failed(res)
    assert losses(out) == pytest.approx(losses(single), rel=0, abs=1e-5)
