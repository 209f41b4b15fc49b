"""What a multi-process run is decided to be, before any process starts: the strategy in the plan and its
printout, the engine's config made from the recipe, the recipe's refusals, and the launcher's torchrun line."""
import json
import sys

import pytest

from omnitune.recipe import RecipeError, load_recipe
from omnitune.train.distributed import deepspeed_config
from omnitune.train.distributed_launch import launch, torchrun_command
from omnitune.train.plan import Hardware, make_plan

GPUS = Hardware("cuda", "NVIDIA H200", 141 << 30, world_size=4)


def plan(*overrides, hardware=GPUS):
    recipe = load_recipe("instruct", list(overrides))
    return recipe, make_plan(recipe, hardware)


@pytest.mark.parametrize("strategy", ["fsdp2", "zero2", "zero3"])
def test_sharded_strategies_turn_graphs_off_and_say_so(strategy):
    _, p = plan(f"distributed.strategy={strategy}")
    assert p.strategy == strategy and p.sharded and not p.cuda_graphs and "engine gathers" in p.cuda_graphs_why
    assert p.optimizer == "hf_default"  # the engine's sharded or flattened parameters: torch's AdamW
    assert any(n.startswith(f"optimizer: AdamW under {strategy}") and "train.optimizer=adamw8bit" in n
               for n in p.notes)  # the preset's 8-bit AdamW is for one process or ddp, and the printout says so
    assert p.lines()[0] == f"device: NVIDIA H200 x 4 processes ({strategy})"


@pytest.mark.parametrize("strategy", ["fsdp2", "zero3"])
def test_parameter_sharding_checkpoints_every_layer_where_auto_would_measure_a_sharded_layer(strategy):
    """`auto` measures a whole decoder layer at train begin; under FSDP2 (DTensor weights) and ZeRO-3 (empty
    weights) that crashed on an H100 (bench_scaleout --nproc 1): these engines keep no layer unless told."""
    _, p = plan(f"distributed.strategy={strategy}")
    assert p.uncheckpointed_layers == 0 and any("uncheckpointed_layers=auto" in n for n in p.notes)
    _, p = plan(f"distributed.strategy={strategy}", "train.uncheckpointed_layers=4")
    assert p.uncheckpointed_layers == 4
    for other in ("ddp", "zero2"):
        assert plan(f"distributed.strategy={other}")[1].uncheckpointed_layers == "auto"


def test_an_engine_at_world_size_one_is_named_in_the_printout():
    _, p = plan("distributed.strategy=zero3", "distributed.offload=optimizer", hardware=Hardware("cuda", "H200", 1))
    assert p.lines()[0] == "device: H200 (zero3, offload optimizer)"


def test_zero3_config_partitions_every_parameter_and_leaves_batch_sizes_to_the_trainer():
    recipe, p = plan("distributed.strategy=zero3")
    cfg = deepspeed_config(recipe, p)
    zero = cfg["zero_optimization"]
    assert zero["stage"] == 3 and zero["stage3_param_persistence_threshold"] == 0
    assert cfg["train_micro_batch_size_per_gpu"] == cfg["gradient_accumulation_steps"] == "auto"
    assert "offload_optimizer" not in zero and "optimizer" not in cfg


def test_offload_moves_optimizer_state_and_step_to_the_host():
    recipe, p = plan("distributed.strategy=zero3", "distributed.offload=params")
    cfg = deepspeed_config(recipe, p)
    assert cfg["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    assert cfg["zero_optimization"]["offload_param"]["device"] == "cpu"
    assert cfg["optimizer"]["type"] == "AdamW"  # DeepSpeed's CPU Adam
    recipe, p = plan("distributed.strategy=zero2", "distributed.offload=optimizer")
    assert "offload_param" not in deepspeed_config(recipe, p)["zero_optimization"]


def test_a_users_deepspeed_json_is_taken_as_written(tmp_path):
    (tmp_path / "ds.json").write_text(json.dumps({"zero_optimization": {"stage": 3}, "bf16": {"enabled": True}}))
    (tmp_path / "r.yaml").write_text("distributed: {strategy: zero3, deepspeed_config: ds.json}\n")
    recipe = load_recipe(tmp_path / "r.yaml")
    assert deepspeed_config(recipe, make_plan(recipe, GPUS)) == {"zero_optimization": {"stage": 3},
                                                                 "bf16": {"enabled": True}}
    (tmp_path / "ds.json").write_text("{not json")
    with pytest.raises(RecipeError, match="deepspeed_config: .*ds.json is not a readable JSON"):
        deepspeed_config(recipe, make_plan(recipe, GPUS))
    assert deepspeed_config(*plan("distributed.strategy=fsdp2")) is None


@pytest.mark.parametrize("overrides, message", [
    (("distributed.strategy=ddp", "distributed.offload=optimizer"), "needs a sharded strategy"),
    (("distributed.strategy=zero2", "distributed.offload=params"), "needs zero3"),
    (("distributed.strategy=fsdp2", "distributed.offload=optimizer"), "use offload=params"),
    (("distributed.strategy=fsdp2", "distributed.deepspeed_config=x.json"), "needs distributed.strategy zero2"),
    (("distributed.strategy=zero4",), "is not one of"),
])
def test_recipe_refuses_what_an_engine_cannot_do(overrides, message):
    with pytest.raises(RecipeError, match=message):
        load_recipe("instruct", list(overrides))


def test_fsdp2_refuses_fp16_and_parameter_sharding_refuses_qlora():
    with pytest.raises(RecipeError, match="fsdp2 trains in bf16 or fp32"):
        plan("distributed.strategy=fsdp2", "train.precision=fp16")
    for strategy in ("fsdp2", "zero3"):
        with pytest.raises(RecipeError, match="4-bit experts cannot be sharded"):
            plan(f"distributed.strategy={strategy}", "adapter.method=qlora")


def test_launcher_writes_torchrun_lines_for_one_machine_and_many():
    one = torchrun_command("r.yaml", ["train.lr=1e-4"], resume=True, nproc=8)
    assert one == [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "8", "--standalone", "-m",
                   "omnitune", "train", "r.yaml", "--set", "train.lr=1e-4", "--resume"]
    many = torchrun_command("r.yaml", [], resume=False, nproc=8, nnodes=2, rdzv_endpoint="node0:29400")
    assert many[3:13] == ["--nproc-per-node", "8", "--nnodes", "2", "--rdzv-backend", "c10d", "--rdzv-endpoint",
                          "node0:29400", "--rdzv-id", "omnitune"]
    with pytest.raises(RecipeError, match="--rdzv-endpoint"):
        torchrun_command("r.yaml", [], resume=False, nproc=8, nnodes=2)


def test_launcher_refuses_processes_without_a_strategy(monkeypatch):
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    with pytest.raises(RecipeError, match="set distributed.strategy"):
        launch(load_recipe("instruct"), "instruct", [], False, nproc=2, nnodes=1, rdzv_endpoint=None)


def test_the_memory_estimate_divides_by_the_processes_and_leaves_offloaded_state_out(tiny_dir):
    """The per-GPU estimate printed at the start (train/memory.py) follows the plan's strategy and offload."""
    from omnitune.train.memory import estimate, thinker_config

    def parts(*overrides):
        recipe = load_recipe("demo", list(overrides))
        return estimate(recipe, make_plan(recipe, GPUS), thinker_config(recipe), budget=80 << 30).parts

    ddp, zero3 = parts("distributed.strategy=ddp"), parts("distributed.strategy=zero3")
    offload = parts("distributed.strategy=zero3", "distributed.offload=optimizer")
    assert zero3["weights"] == pytest.approx(ddp["weights"] / 4) and zero3["optimizer"] > 0  # 4 processes
    assert offload["optimizer"] == 0 and offload["weights"] == zero3["weights"]
    assert parts("distributed.strategy=zero3", "distributed.offload=params")["weights"] == 0
