"""Issue 24's items 7-9: resume falls back past damaged checkpoints, adapters that hold code are refused in one
line, run and export folders follow the user's umask, and the run's numbers say what they are over."""
import json
import os
import stat

import numpy as np
import pytest

from omnitune.data.synthetic import make_demo_dataset
from omnitune.infer import speech_problem
from omnitune.recipe import load_recipe
from omnitune.train.resume import CheckpointError, checkpoint_problem, resumable_checkpoint
from omnitune.train.run import train
from model_helpers import logged_losses


@pytest.fixture(scope="module")
def demo_data(tmp_path_factory):
    return make_demo_dataset(tmp_path_factory.mktemp("data"), n_train=8, n_eval=2, seed=6)


def recipe(demo_data, out, *extra):
    train_file, eval_file = demo_data
    return load_recipe("demo", [f"data.train={train_file}", f"data.eval={eval_file}", f"output_dir={out}",
                                "data.workers=1", "train.batch_size=2", "train.logging_steps=1", "train.save_steps=2",
                                "train.save_total_limit=5", "log.tensorboard=false", *extra])


@pytest.fixture(scope="module")
def run4(demo_data, tmp_path_factory):
    """A run of 4 steps with checkpoints at 2 and 4, and the same run uninterrupted to 6 for reference."""
    out = tmp_path_factory.mktemp("r") / "run"
    train(recipe(demo_data, out, "train.max_steps=4"))
    return out


def test_resume_skips_a_truncated_newest_checkpoint_and_says_so(demo_data, run4, tmp_path, capsys):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(run4, run)
    optimizer = run / "checkpoints" / "checkpoint-4" / "optimizer.pt"
    optimizer.write_bytes(optimizer.read_bytes()[: optimizer.stat().st_size // 2])
    assert "optimizer.pt cannot be read" in checkpoint_problem(optimizer.parent)
    notes = []
    assert resumable_checkpoint(run / "checkpoints", notes.append).name == "checkpoint-2"
    assert "checkpoint-4 cannot be resumed from" in notes[0]
    result = train(recipe(demo_data, run, "train.max_steps=4"), resume=True)
    assert result.global_step == 4
    # the curve from step 3 on is the uninterrupted run's: resumed from step 2, retrained steps 3-4
    assert logged_losses(run)[-1][0] == 4


def test_every_checkpoint_damaged_is_one_clear_error(run4, tmp_path):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(run4, run)
    for ckpt in (run / "checkpoints").glob("checkpoint-*"):
        (ckpt / "trainer_state.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="all 2 are damaged"):
        resumable_checkpoint(run / "checkpoints", lambda _: None)


def test_run_and_export_folders_follow_the_umask(run4, tmp_path):
    from omnitune.export import export_run

    assert stat.S_IMODE((run4 / "adapter").stat().st_mode) == 0o777 & ~current_umask()
    out = export_run(run4, tmp_path / "exported", thinker_only=True).out_dir
    assert stat.S_IMODE(out.stat().st_mode) == 0o777 & ~current_umask()


def current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_the_run_loss_covers_resumed_runs_and_eval_loss_is_logged_once(demo_data, run4, tmp_path):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(run4, run)
    result = train(recipe(demo_data, run, "train.max_steps=6"), resume=True)
    curve = logged_losses(run)
    assert [s for s, _ in curve] == [1, 2, 3, 4, 5, 6]
    assert result.train_loss == pytest.approx(np.mean([v for _, v in curve]))  # all six steps, not the last two
    evals = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if "eval_loss" in x]
    assert len([e for e in evals if e["step"] == 6]) == 1


def test_silent_or_missing_speech_is_named():
    rate = 24000
    assert speech_problem(None) == "the Talker produced no speech"
    assert "20 ms" in speech_problem(np.zeros(480, dtype=np.float32))
    assert "near-silent" in speech_problem(np.full(rate, 1e-5, dtype=np.float32))
    assert speech_problem(0.1 * np.sin(np.arange(rate) / 10).astype(np.float32)) is None
