"""The parts map (model/parts.py): every part resolves on the real classes, and a new part is one map entry that
LoRA targets and the train / freeze switches reach without any change to the adapter or checkpointing code."""

import pytest

from omnitune.model import parts
from omnitune.model.adapters import AdapterError, apply_adapters, check_adapter_config, trainable_summary
from omnitune.model.load import load_thinker
from omnitune.model.tiny import build_tiny_model
from omnitune.recipe import AdapterConfig, ModelConfig

FP32 = ModelConfig(path="tiny", dtype="float32")
THINKER = "Qwen3OmniMoeThinkerForConditionalGeneration"


@pytest.fixture(scope="module")
def full():
    return build_tiny_model()


def test_every_part_of_every_map_resolves_on_the_tiny_models(full):
    for model in (full, full.thinker, full.talker):
        for name, part in parts.parts_map(model).parts.items():
            found = parts.module_names(model, name) + parts.target_parameters(model, name)
            assert found, f"{type(model).__name__}: part {name} matches nothing"
            assert bool(part.parameters) == bool(parts.target_parameters(model, name))


def test_the_talker_moe_is_described_like_the_thinker_moe(full):
    thinker_stack, talker_stack = parts.decoder_stack(full, "text"), parts.decoder_stack(full, "talker")
    assert thinker_stack.experts == talker_stack.experts and thinker_stack.router == talker_stack.router
    assert talker_stack.shared_expert and not thinker_stack.shared_expert
    assert len(parts.decoder_layers(full, "talker")) == full.config.talker_config.text_config.num_hidden_layers
    assert parts.target_parameters(full, "talker_experts")[0] == "talker.model.layers.0.mlp.experts.gate_up_proj"
    assert "talker.model.layers.1.mlp.shared_expert_gate" in parts.target_linears(full, "talker_shared_expert")
    assert [c.__name__ for c in parts.moe_block_classes(full)] == ["Qwen3OmniMoeThinkerTextSparseMoeBlock",
                                                                   "Qwen3OmniMoeTalkerTextSparseMoeBlock"]
    # the Thinker's parts keep their names inside the full model, under its prefix
    assert parts.target_linears(full, "attention") == ["thinker." + n for n in
                                                       parts.target_linears(full.thinker, "attention")]


def test_unwrapping_finds_the_thinker_under_peft_and_inside_the_full_model(full, tiny_dir):
    lora = apply_adapters(load_thinker(FP32), AdapterConfig(rank=2, alpha=4, targets=["attention"]))
    assert type(parts.thinker_of(lora)).__name__ == THINKER
    assert parts.thinker_of(full) is full.thinker
    assert parts.prefix_of(lora) == "base_model.model." and parts.prefix_of(full) == ""


def test_a_made_up_part_is_targeted_by_lora_and_trained_in_full_with_one_map_entry(tiny_dir, monkeypatch):
    parts_of_thinker = parts.MAPS[THINKER].parts
    monkeypatch.setitem(parts_of_thinker, "audio_fc1", parts.Part("audio_fc1", ("model.audio_tower.layers.*.fc1",)))
    monkeypatch.setitem(parts_of_thinker, "audio_norms", parts.Part(
        "audio_norms", ("model.audio_tower.layers.*.final_layer_norm",)))
    cfg = AdapterConfig(rank=2, alpha=4, targets=["attention", "audio_fc1"], train=["audio_norms"])
    model = apply_adapters(load_thinker(FP32), cfg)
    lora = {n.removeprefix("base_model.model.").split(".lora_")[0] for n, p in model.named_parameters()
            if "lora_A" in n}
    fc1 = {f"model.audio_tower.layers.{i}.fc1" for i in range(2)}
    assert fc1 <= lora and not {n for n in lora if "audio_tower" in n} - fc1
    trained = {n for n, p in model.named_parameters() if p.requires_grad and "lora_" not in n}
    assert trained and all("final_layer_norm" in n and "modules_to_save" in n for n in trained)
    # full fine-tune: the same part frozen by name, everything else of the audio tower trains
    full_ft = apply_adapters(load_thinker(FP32), AdapterConfig(method="full", freeze=["audio_fc1", "vision_tower"]))
    frozen = {n for n, p in full_ft.named_parameters() if not p.requires_grad}
    assert frozen == {n for n, _ in full_ft.named_parameters() if ".fc1." in n or n.startswith("model.visual.")}


def test_unknown_part_names_are_errors_that_list_the_parts_before_loading():
    with pytest.raises(AdapterError, match="'atention' is not a part.*did you mean 'attention'"):
        check_adapter_config(AdapterConfig(targets=["atention"]), THINKER)
    with pytest.raises(AdapterError, match="adapter.train: 'talker' is not a part"):
        check_adapter_config(AdapterConfig(train=["talker"]), THINKER)
    check_adapter_config(AdapterConfig(targets=["talker_attention"], train=["codec_embedding"]),
                         "Qwen3OmniMoeForConditionalGeneration")
    with pytest.raises(AdapterError, match="method=full"):
        check_adapter_config(AdapterConfig(train=["llm"]), THINKER)


def test_the_parameter_table_has_a_row_per_component_and_one_for_lora(tiny_dir):
    model = apply_adapters(load_thinker(FP32), AdapterConfig(rank=2, alpha=4, targets=["attention"],
                                                             train=["audio_projector"]))
    rows = {c: (t, n) for c, t, n in trainable_summary(model)}
    assert set(rows) == {"llm", "audio_tower", "audio_projector", "vision_tower", "vision_merger", "lora"}
    assert rows["audio_projector"][0] > 0 and rows["audio_tower"][0] == 0 and rows["lora"][0] == rows["lora"][1]
    assert sum(n for _, n in rows.values()) == sum(p.numel() for p in model.parameters())


def test_legacy_freeze_switches_read_as_train_and_freeze_lists():
    lora = AdapterConfig(freeze_audio_projector=False, freeze_vision_merger=False)
    assert lora.train == ["audio_projector", "vision_merger"] and lora.freeze == ["audio_tower", "vision_tower"]
    full = AdapterConfig(method="full", freeze_vision_tower=False, freeze_llm=True)
    assert "vision_tower" not in full.freeze and "llm" in full.freeze
