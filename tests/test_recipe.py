import pytest

from omnitune.recipe import PRESETS, RecipeError, load_recipe


@pytest.mark.parametrize("name", PRESETS)
def test_every_preset_loads_from_any_directory(name, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    r = load_recipe(name)
    assert r.name == name
    assert r.out == tmp_path / "runs" / name


def test_real_presets_carry_the_seed_values():
    for name in ("instruct", "thinking", "captioner"):
        r = load_recipe(name)
        assert (r.adapter.rank, r.adapter.alpha, r.train.lr, r.train.warmup_ratio) == (64, 128, 2e-5, 0.03)
        assert (r.train.epochs, r.train.batch_size, r.train.grad_accum) == (3, 1, 16)
        assert r.train.loss_weights.model_dump() == {"text": 1.0, "audio": 0.8, "vision": 0.9}
        assert r.model.variant == name


def test_set_overrides_nested_keys_and_parses_yaml_values():
    r = load_recipe("demo", ["model.variant=thinking", "train.lr=1e-4", "adapter.targets=[router]",
                             "data.on_error=skip"])
    assert r.model.variant == "thinking" and r.train.lr == 1e-4
    assert r.adapter.targets == ["router"] and r.data.on_error == "skip"


def test_unknown_key_names_the_key_and_the_closest_valid_one():
    with pytest.raises(RecipeError, match=r"adapter\.rnak: unknown key; did you mean 'rank'"):
        load_recipe("demo", ["adapter.rnak=8"])


def test_bad_choice_lists_the_valid_ones():
    with pytest.raises(RecipeError, match=r"model\.variant: 'base' is not one of 'instruct', 'thinking'"):
        load_recipe("demo", ["model.variant=base"])


def test_seed_expert_names_are_rejected_with_the_real_ones():
    from omnitune.model.adapters import AdapterError, check_adapter_config

    with pytest.raises(AdapterError, match="gate_up_proj"):  # checked against the parts map before any loading
        check_adapter_config(load_recipe("demo", ["adapter.targets=[experts.*.wi]"]).adapter,
                             "Qwen3OmniMoeThinkerForConditionalGeneration")
    with pytest.raises(RecipeError, match="unknown key"):
        load_recipe("demo", ["model.num_experts=8"])


def test_lora_dropout_with_expert_targets_is_an_error():
    with pytest.raises(RecipeError, match="dropout must be 0"):
        load_recipe("demo", ["adapter.dropout=0.1"])


def test_unknown_recipe_suggests_a_preset():
    with pytest.raises(RecipeError, match="did you mean 'instruct'"):
        load_recipe("instuct")


def test_recipe_file_paths_resolve_against_the_file(tmp_path):
    (tmp_path / "r.yaml").write_text("data:\n  train: data/train.jsonl\noutput_dir: out\n")
    r = load_recipe(tmp_path / "r.yaml")
    assert r.resolve(r.data.train) == tmp_path / "data" / "train.jsonl"
    assert r.out == tmp_path / "out"


def test_malformed_override_and_yaml_are_clear_errors(tmp_path):
    with pytest.raises(RecipeError, match="KEY=VALUE"):
        load_recipe("demo", ["train.lr"])
    (tmp_path / "bad.yaml").write_text("model: [unclosed\n")
    with pytest.raises(RecipeError, match="not valid YAML"):
        load_recipe(tmp_path / "bad.yaml")


def test_experts_implementation_is_validated_with_its_choices():
    with pytest.raises(RecipeError, match="model.experts: 'grouped-mm' is not one of 'omnitune', 'grouped_mm'"):
        load_recipe("demo", ["model.experts=grouped-mm"])


def test_an_eval_file_and_an_eval_fraction_together_are_an_error():
    with pytest.raises(RecipeError, match="eval_fraction"):
        load_recipe("demo", ["data.eval=e.jsonl", "data.eval_fraction=0.1"])


def test_a_local_model_path_resolves_against_the_recipe_file_like_data_paths(tmp_path, monkeypatch):
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "r.yaml").write_text("model:\n  path: ckpt\n")
    monkeypatch.chdir("/")
    assert load_recipe(tmp_path / "r.yaml").model.path == str(tmp_path / "ckpt")
    assert load_recipe(tmp_path / "r.yaml", ["model.path=Qwen/Qwen3-Omni-30B-A3B-Instruct"]).model.path == \
        "Qwen/Qwen3-Omni-30B-A3B-Instruct"


def test_uncheckpointed_layers_without_checkpointing_is_a_clear_error():
    with pytest.raises(RecipeError, match="uncheckpointed_layers needs train.gradient_checkpointing=true"):
        load_recipe("demo", ["train.gradient_checkpointing=false", "train.uncheckpointed_layers=4"])
    ok = load_recipe("demo", ["train.gradient_checkpointing=true", "train.uncheckpointed_layers=4"])
    assert ok.train.uncheckpointed_layers == 4
    with pytest.raises(RecipeError, match="uncheckpointed_layers"):
        load_recipe("demo", ["train.uncheckpointed_layers=-1"])
    with pytest.raises(RecipeError, match="uncheckpointed_layers"):
        load_recipe("demo", ["train.uncheckpointed_layers=most"])
    # the default, auto (as many as the GPU holds), is no error without checkpointing: there is nothing to keep
    assert load_recipe("demo", ["train.gradient_checkpointing=false"]).train.uncheckpointed_layers == "auto"
