"""Training: weighted loss, router balance loss, atomic checkpoints, and resume after an interruption."""

import pytest
import torch
import torch.nn.functional as F
from transformers import Trainer

from omnitune.data.synthetic import make_demo_dataset
from omnitune.recipe import load_recipe
from omnitune.train.loss import token_losses, weighted_loss
from omnitune.train.objectives import ThinkerLM
from omnitune.train.run import router_aux_coef, train
from omnitune.train.trainer import OmniTrainer
from model_helpers import interrupted_at, logged_losses


@pytest.fixture(scope="module")
def demo_data(tmp_path_factory):
    return make_demo_dataset(tmp_path_factory.mktemp("data"), n_train=12, n_eval=4, seed=1)


def small_recipe(demo_data, out, *extra):
    train_file, eval_file = demo_data
    return load_recipe("demo", [f"data.train={train_file}", f"data.eval={eval_file}", f"output_dir={out}",
                                "data.workers=1", "train.max_steps=6", "train.save_steps=3", "train.logging_steps=1",
                                "train.batch_size=2", "train.grad_accum=2", "log.tensorboard=false", *extra])


@pytest.mark.parametrize("bias", [False, True], ids=["fused-kernel", "module-chunks"])
def test_token_losses_match_full_cross_entropy_and_skip_masked_positions(bias):
    torch.manual_seed(0)
    head = torch.nn.Linear(8, 50, bias=bias)
    hidden = torch.randn(2, 7, 8, requires_grad=True)
    labels = torch.randint(0, 50, (2, 7))
    labels[0, :3] = -100
    got = token_losses(hidden, head, labels, chunk=3)
    ref = F.cross_entropy(head(hidden[:, :-1]).transpose(1, 2), labels[:, 1:], ignore_index=-100, reduction="none")
    torch.testing.assert_close(got, ref)
    got.sum().backward()
    g1 = hidden.grad.clone()
    hidden.grad = None
    ref.sum().backward()
    torch.testing.assert_close(g1, hidden.grad)


def test_sample_weights_scale_each_samples_tokens_over_the_step_token_count():
    per_token = torch.tensor([[1.0, 2.0, 0.0], [3.0, 0.0, 0.0]])
    labels = torch.tensor([[0, 5, 5, -100], [0, 5, -100, -100]])
    w = torch.tensor([0.5, 2.0])
    assert weighted_loss(per_token, labels, w, num_items=10).item() == pytest.approx((0.5 * 3 + 2.0 * 3) / 10)
    assert weighted_loss(per_token, labels, None, None).item() == pytest.approx(6 / 3)


def test_router_balance_loss_only_when_the_router_trains(demo_data, tmp_path):
    from omnitune.model.load import load_thinker

    thinker = load_thinker(load_recipe("demo").model)
    assert router_aux_coef(small_recipe(demo_data, tmp_path), thinker) == 0.0
    assert router_aux_coef(small_recipe(demo_data, tmp_path, "adapter.targets=[router]"), thinker) == 0.001
    assert router_aux_coef(small_recipe(demo_data, tmp_path, "adapter.targets=[router]",
                                        "train.router_aux_coef=0.05"), thinker) == 0.05
    assert router_aux_coef(small_recipe(demo_data, tmp_path, "adapter.method=full"), thinker) == 0.001


def test_router_balance_loss_is_added_to_the_training_loss(tiny_dir, tmp_path):
    from transformers import TrainingArguments

    from omnitune.model.load import load_thinker

    thinker = load_thinker(load_recipe("demo").model).train()
    ids = torch.randint(0, 5000, (2, 12))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    args = TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True)
    plain = OmniTrainer(model=thinker, args=args, objective=ThinkerLM(0.0)).compute_loss(thinker, batch)
    with_aux = OmniTrainer(model=thinker, args=args, objective=ThinkerLM(0.5)).compute_loss(thinker, batch)
    out = thinker(**batch, output_router_logits=True)
    torch.testing.assert_close(with_aux - plain, 0.5 * out.aux_loss, rtol=1e-4, atol=1e-6)


def test_resume_after_interruption_reproduces_the_uninterrupted_loss_curve(demo_data, tmp_path):
    full = train(small_recipe(demo_data, tmp_path / "full"))
    assert full.global_step == 6
    reference = logged_losses(tmp_path / "full")
    assert [s for s, _ in reference] == [1, 2, 3, 4, 5, 6]

    with interrupted_at(4), pytest.raises(KeyboardInterrupt):
        train(small_recipe(demo_data, tmp_path / "cut"))
    assert sorted(p.name for p in (tmp_path / "cut" / "checkpoints").iterdir()) == ["checkpoint-3"]

    with pytest.raises(FileExistsError, match="--resume"):
        train(small_recipe(demo_data, tmp_path / "cut"))
    resumed = train(small_recipe(demo_data, tmp_path / "cut"), resume=True)
    assert resumed.global_step == 6
    assert logged_losses(tmp_path / "cut") == reference
    assert (tmp_path / "cut" / "adapter" / "adapter_config.json").exists()


def test_a_crash_while_saving_leaves_no_checkpoint_that_resume_would_trust(demo_data, tmp_path, monkeypatch):
    def crash(self, output_dir):
        raise OSError("disk full")

    monkeypatch.setattr(Trainer, "_save_rng_state", crash)
    with pytest.raises(OSError, match="disk full"):
        train(small_recipe(demo_data, tmp_path / "run"))
    names = [p.name for p in (tmp_path / "run" / "checkpoints").iterdir() if not p.name.startswith(".")]
    assert names == []
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        train(small_recipe(demo_data, tmp_path / "run"), resume=True)


def test_sharded_strategies_and_unsynchronised_launches_are_refused(demo_data, tmp_path, monkeypatch):
    from omnitune.recipe import RecipeError

    with pytest.raises(RecipeError, match="distributed.strategy"):
        small_recipe(demo_data, tmp_path, "distributed.strategy=fsdp")
    monkeypatch.setenv("WORLD_SIZE", "2")  # torchrun without distributed.strategy=ddp: copies that never sync
    with pytest.raises(RecipeError, match="set distributed.strategy=ddp"):
        train(small_recipe(demo_data, tmp_path))


def test_selective_and_partial_checkpointing_train_the_same_curve_as_full(demo_data, tmp_path):
    extra = ("train.gradient_checkpointing=true", "train.max_steps=3", "train.save_steps=3")
    train(small_recipe(demo_data, tmp_path / "full", *extra))
    full = logged_losses(tmp_path / "full")
    for name, option in (("sel", "train.checkpoint_policy=selective"), ("keep", "train.uncheckpointed_layers=1")):
        train(small_recipe(demo_data, tmp_path / name, *extra, option))
        other = logged_losses(tmp_path / name)
        assert [s for s, _ in other] == [1, 2, 3]
        for (_, a), (_, b) in zip(full, other):
            assert b == pytest.approx(a, rel=1e-5), name


def test_wandb_without_the_package_is_a_clear_error(demo_data, tmp_path):
    import importlib.util

    from omnitune.recipe import RecipeError
    from omnitune.run_dir import RunDir
    from omnitune.train.run import training_arguments

    recipe = small_recipe(demo_data, tmp_path, "log.wandb=true")
    if importlib.util.find_spec("wandb") is not None:
        pytest.skip("wandb is installed")
    with pytest.raises(RecipeError, match="omnitune\\[wandb\\]"):
        training_arguments(recipe, RunDir(tmp_path), has_eval=False)


def test_resume_with_a_different_adapter_is_refused_but_longer_training_is_allowed(demo_data, tmp_path):
    from omnitune.recipe import RecipeError

    train(small_recipe(demo_data, tmp_path, "train.max_steps=3", "train.save_steps=3"))
    with pytest.raises(RecipeError, match="adapter.rank"):
        train(small_recipe(demo_data, tmp_path, "train.max_steps=6", "adapter.rank=8"), resume=True)
    assert train(small_recipe(demo_data, tmp_path, "train.max_steps=6"), resume=True).global_step == 6
