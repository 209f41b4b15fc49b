"""Divergence (train/guard.py): a step with a non-finite loss or gradient changes nothing, a run that keeps producing
them stops with a message and its good checkpoints, and eval / infer / export refuse weights with NaN in them."""
import json
import math
import shutil

import pytest
import torch

from omnitune.data.synthetic import make_demo_dataset
from omnitune.model.source import SourceError
from omnitune.recipe import load_recipe
from omnitune.train.guard import DivergenceError, NonFiniteGuard
from omnitune.train.run import train
from test_infer_fixtures import lora_run_dir  # noqa: F401  (fixture)


@pytest.fixture(scope="module")
def demo_data(tmp_path_factory):
    return make_demo_dataset(tmp_path_factory.mktemp("data"), n_train=12, n_eval=2, seed=4)


def recipe(demo_data, out, *extra):
    train_file, _ = demo_data
    return load_recipe("demo", [f"data.train={train_file}", f"output_dir={out}", "data.workers=1",
                                "train.batch_size=2", "train.logging_steps=1", "log.tensorboard=false", *extra])


def test_a_non_finite_step_leaves_weights_and_moments_as_they_were():
    p = torch.nn.Parameter(torch.ones(4))
    opt = torch.optim.AdamW([p], lr=0.1)
    guard = NonFiniteGuard(patience=3, device="cpu", lr=0.1, report=lambda _: None)
    guard.attach(opt)
    p.grad = torch.ones(4)
    guard.observe(torch.tensor(2.0), torch.tensor(1.0))
    opt.step()
    after_good = p.detach().clone()
    state = {k: v.clone() for k, v in opt.state[p].items()}
    p.grad = torch.full((4,), float("nan"))
    guard.observe(torch.tensor(float("nan")), torch.tensor(1.0))
    opt.step()
    assert torch.equal(p.detach(), after_good)
    assert all(torch.equal(opt.state[p][k], v) for k, v in state.items())
    guard.observe(torch.tensor(1.0), torch.tensor(float("inf")))  # an infinite loss with finite gradients too
    assert bool(guard.flag)
    guard.check(3)  # two bad in a row: reported, not yet fatal
    guard.observe(torch.tensor(float("inf")), None)
    with pytest.raises(DivergenceError, match=r"3 optimizer steps in a row \(steps 2-4.*train.lr=0.1"):
        guard.check(4)


def test_a_diverged_run_stops_naming_the_steps_and_keeps_its_finite_checkpoints(demo_data, tmp_path):
    out = tmp_path / "run"
    with pytest.raises(DivergenceError, match="train.lr=1e\\+36"):
        train(recipe(demo_data, out, "train.lr=1e36", "train.max_steps=12", "train.save_steps=1"))
    assert not (out / "adapter").exists()  # no final adapter from a diverged run
    for ckpt in (out / "checkpoints").glob("checkpoint-*"):
        from safetensors.torch import load_file

        weights = load_file(str(ckpt / "adapter_model.safetensors"))
        assert all(torch.isfinite(t).all() for t in weights.values()), ckpt.name
    logs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in logs if "loss" in r]
    assert 0.0 not in losses  # a skipped step is never logged as a zero loss
    assert any(r.get("skipped_steps") for r in logs) and any(math.isnan(x) for x in losses)


def test_the_cli_says_diverged_in_one_line(demo_data, tmp_path):
    from typer.testing import CliRunner

    from omnitune.cli import app

    train_file, _ = demo_data
    res = CliRunner().invoke(app, ["train", "demo", "--set", f"data.train={train_file}", "--set",
                                   f"output_dir={tmp_path / 'run'}", "--set", "train.lr=1e36", "--set",
                                   "train.max_steps=8", "--set", "log.tensorboard=false", "--set", "data.workers=1"])
    assert res.exit_code == 1 and "error: training diverged" in res.output and "Traceback" not in res.output


@pytest.fixture
def nan_run(lora_run_dir, tmp_path):  # noqa: F811
    from safetensors.torch import load_file, save_file

    run = tmp_path / "nan_run"
    shutil.copytree(lora_run_dir, run)
    file = run / "adapter" / "adapter_model.safetensors"
    weights = load_file(str(file))
    name = next(iter(weights))
    weights[name] = torch.full_like(weights[name], float("nan"))
    save_file(weights, str(file))
    return run


def test_infer_and_export_refuse_weights_with_nan(nan_run, tmp_path):
    from omnitune.export import export_run
    from omnitune.infer import Inferencer

    with pytest.raises(SourceError, match="non-finite values.*the run diverged"):
        Inferencer(str(nan_run), speech=False)
    with pytest.raises(SourceError, match="non-finite values"):
        export_run(nan_run, tmp_path / "exported")
    assert not (tmp_path / "exported").exists()
