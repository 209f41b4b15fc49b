"""Length-grouped batching: the plan's default, the padding share it reports, and the trainer's sampler taking the
lengths from the data cache's manifest."""

import pytest
import torch
from transformers import TrainingArguments

from data_helpers import processor, recipe_for, write_jsonl
from omnitune.data.collate import padding_ratio
from omnitune.recipe import RecipeError, load_recipe
from omnitune.train.objectives import ThinkerLM
from omnitune.train.plan import Hardware, make_plan
from omnitune.train.run import padding_report
from omnitune.train.trainer import OmniTrainer

H200 = Hardware("cuda", "NVIDIA H200", 141 << 30)


def test_padding_ratio_counts_each_batch_padded_to_its_longest_and_to_the_bucket():
    lengths = [10, 30, 20, 40]
    assert padding_ratio(lengths, [0, 1, 2, 3], 2) == pytest.approx(1 - 100 / (60 + 80))
    assert padding_ratio(lengths, [0, 2, 1, 3], 2) == pytest.approx(1 - 100 / (40 + 80))
    assert padding_ratio(lengths, [0, 2, 1, 3], 2, multiple=64) == pytest.approx(1 - 100 / 256)
    assert padding_ratio(lengths, [0, 1, 2], 4) == pytest.approx(1 - 60 / 90)  # a short last batch


def test_the_plan_groups_by_length_for_padded_batches_of_several_samples():
    def plan(*o):
        return make_plan(load_recipe("instruct", list(o)), H200)

    assert not plan().group_by_length  # batch_size 1: nothing to group
    grouped = plan("train.batch_size=4")
    assert grouped.group_by_length and any("length-grouped" in line for line in grouped.lines())
    assert not plan("train.batch_size=4", "data.packing=true").group_by_length
    assert not plan("train.batch_size=4", "data.group_by_length=false").group_by_length
    with pytest.raises(RecipeError, match="group_by_length and data.packing"):
        plan("data.group_by_length=true", "data.packing=true")


def test_the_trainer_samples_length_groups_from_the_manifest_and_pads_less(tmp_path):
    from omnitune.data.cache import prepare_split
    from omnitune.model.load import load_thinker

    torch.manual_seed(0)
    lengths = torch.randint(1, 120, (200,)).tolist()
    records = [{"conversations": [{"role": "user", "content": "Count."},
                                  {"role": "assistant", "content": " ".join(["one"] * n)}]} for n in lengths]
    train = write_jsonl(tmp_path / "train.jsonl", records)
    recipe = recipe_for(tmp_path, train)
    ds = prepare_split(recipe, processor(), train)
    args = TrainingArguments(output_dir=str(tmp_path / "out"), report_to=[], use_cpu=True,
                             per_device_train_batch_size=4, train_sampling_strategy="group_by_length")
    trainer = OmniTrainer(model=load_thinker(load_recipe("demo").model), args=args, train_dataset=ds,
                          objective=ThinkerLM())
    sampler = trainer._get_train_sampler()
    assert sampler.lengths == ds.lengths == [len(ds[i]["input_ids"]) for i in range(len(ds))]  # from the manifest
    order = list(sampler)
    assert sorted(order) == list(range(len(ds)))
    shuffled = torch.randperm(len(ds)).tolist()
    assert padding_ratio(ds.lengths, order, 4) < padding_ratio(ds.lengths, shuffled, 4) / 2
    plan = make_plan(load_recipe("instruct", ["train.batch_size=4"]), H200)
    line = padding_report(ds.lengths, 4, plan)
    assert line.startswith("padding: ") and "length-grouped" in line and "512-token graph bucket" in line
