"""The training plan (train/plan.py): every switch decided once, with the reason, from the recipe and hardware."""

import pytest

from omnitune.recipe import RecipeError, load_recipe
from omnitune.train.plan import Hardware, make_plan

H200 = Hardware("cuda", "NVIDIA H200", 141 << 30)


def plan(*overrides, hardware=H200):
    return make_plan(load_recipe("instruct", list(overrides)), hardware)


def test_the_presets_on_a_gpu_take_the_fast_path_with_graphs():
    p = plan()
    assert p.cuda_graphs and p.fast_paths and p.loss == "chunked" and p.optimizer == "adamw8bit"
    assert p.lora_dtype == "bfloat16" and p.towers_on_host and not p.optimizer_in_backward  # memory (issue 21)
    # the towers stay on the host one way: never needed (stored outputs), else streamed in for media batches
    assert p.encoder_cache and not p.offload_towers
    assert plan("data.encoder_cache=false").offload_towers
    fp32 = plan("adapter.lora_dtype=float32", "train.optimizer=adamw")
    assert fp32.optimizer == "multi_tensor_adamw" and fp32.cuda_graphs
    assert not p.preserve_rng_state and p.micro_batch_tokens == 4096 and p.strategy == "single"
    assert "text and media batches alike" in p.cuda_graphs_why


@pytest.mark.parametrize("overrides, why", [
    (("train.cuda_graphs=false",), "train.cuda_graphs=false"),
    (("adapter.targets=[attention,router]",), "the router trains"),
    (("adapter.train=[audio_projector]",), "adapter.train has audio_projector"),
    (("adapter.method=full",), "full fine-tune"),
    (("train.precision=fp16",), "fp16"),
    (("adapter.dropout=0.1", "adapter.targets=[attention]"), "dropout"),
])
def test_cuda_graphs_off_says_why(overrides, why):
    p = plan(*overrides)
    assert not p.cuda_graphs and why in p.cuda_graphs_why and p.preserve_rng_state
    assert any(line.startswith("CUDA graphs: off") and why in line for line in p.lines())


def test_grouped_mm_is_the_plain_transformers_peft_path():
    p = plan("model.experts=grouped_mm", "adapter.lora_dtype=float32", "train.optimizer=adamw")
    assert (p.fast_paths, p.loss, p.optimizer, p.cuda_graphs) == (False, "plain", "hf_default", False)
    assert "plain transformers + PEFT path" in p.cuda_graphs_why


def test_cpu_and_multi_process_launches():
    cpu = plan("adapter.lora_dtype=float32", "train.optimizer=adamw", hardware=Hardware("cpu", "cpu", None))
    assert not cpu.cuda_graphs and cpu.optimizer == "hf_default" and cpu.cuda_graphs_why == "no CUDA device"
    with pytest.raises(RecipeError, match="distributed.strategy=ddp"):
        plan(hardware=Hardware("cuda", "H200", 1, world_size=2))
    ddp = plan("distributed.strategy=ddp", hardware=Hardware("cuda", "H200", 1, world_size=2))
    assert ddp.strategy == "ddp" and not ddp.cuda_graphs and "all-reduce" in ddp.cuda_graphs_why


def test_micro_batch_tokens_round_up_to_the_graph_bucket_and_tower_training_is_known():
    assert plan("data.max_length=4000").micro_batch_tokens == 4096
    assert plan("data.max_length=4000", "train.cuda_graphs=false").micro_batch_tokens == 4000
    assert not plan().unused_parameters and plan("adapter.train=[vision_merger]").unused_parameters
    assert plan("adapter.method=full", "adapter.freeze=[audio_tower]").unused_parameters
