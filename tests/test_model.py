"""Tiny model, hub-layout checkpoints, loading, adapters and freezing, on the real transformers classes."""

import json
import re

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import Qwen3OmniMoeForConditionalGeneration, Qwen3OmniMoeThinkerForConditionalGeneration

from omnitune.model.adapters import (AdapterError, apply_adapters, load_adapter, lora_targets, merge,
                                     trainable_summary)
from model_helpers import randomize_lora
from omnitune.model.load import ModelLoadError, load_processor, load_thinker
from omnitune.model.tiny import TOKEN_IDS, build_tiny_model, tiny_config
from omnitune.recipe import AdapterConfig, ModelConfig

FP32 = ModelConfig(path="tiny", dtype="float32")


def _hub_name(name: str) -> str:
    """In-memory (transformers 5.23) Thinker name -> the released checkpoint's name."""
    return (name.replace("model.language_model.", "model.").replace("model.audio_tower.", "audio_tower.")
            .replace("model.visual.", "visual."))


def write_hub_layout_thinker(model, out, shards=2):
    """Write the Thinker as the release does: per-expert tensors, 'thinker.' prefix, sharded + index."""
    tensors = {}
    for name, p in model.thinker.state_dict().items():
        m = re.fullmatch(r"(.*\.mlp\.experts)\.(gate_up_proj|down_proj)", name)
        if m is None:
            tensors["thinker." + _hub_name(name)] = p.clone()
            continue
        base = "thinker." + _hub_name(m.group(1))
        for j in range(p.shape[0]):
            if m.group(2) == "gate_up_proj":
                inter = p.shape[1] // 2
                tensors[f"{base}.{j}.gate_proj.weight"] = p[j, :inter].clone()
                tensors[f"{base}.{j}.up_proj.weight"] = p[j, inter:].clone()
            else:
                tensors[f"{base}.{j}.down_proj.weight"] = p[j].clone()
    names = sorted(tensors)
    weight_map = {}
    for s in range(shards):
        fname = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        part = {n: tensors[n].contiguous() for n in names[s::shards]}
        save_file(part, str(out / fname), metadata={"format": "pt"})
        weight_map.update({n: fname for n in part})
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    model.config.save_pretrained(out)
    return tensors


def test_tiny_model_has_every_weight_initialised_including_the_talker():
    model = build_tiny_model(seed=1)
    for name, p in model.named_parameters():
        assert torch.isfinite(p).all(), name
    router = model.talker.model.layers[0].mlp.gate.weight
    assert router.abs().sum() > 0, "talker router left at zero"
    assert model.thinker.generation_config.eos_token_id == TOKEN_IDS["im_end"]


def test_tiny_config_uses_the_released_token_ids():
    cfg = tiny_config()
    th = cfg.thinker_config
    assert (th.audio_token_id, th.image_token_id, th.video_token_id) == (151675, 151655, 151656)
    assert th.text_config.vocab_size == 152064 and th.position_id_per_seconds == 13


def test_hub_layout_checkpoint_loads_through_from_pretrained(tmp_path):
    model = build_tiny_model(seed=2)
    write_hub_layout_thinker(model, tmp_path)
    loaded = Qwen3OmniMoeThinkerForConditionalGeneration.from_pretrained(tmp_path, dtype=torch.float32)
    want = model.thinker.state_dict()
    got = loaded.state_dict()
    assert set(got) == set(want)
    for name in want:
        assert torch.equal(got[name], want[name]), name


def test_save_pretrained_writes_per_expert_tensors_and_reloads_bit_identical(tmp_path):
    model = build_tiny_model(seed=3)
    model.save_pretrained(tmp_path)
    keys = []
    for f in tmp_path.glob("*.safetensors"):
        with safe_open(str(f), "pt") as s:
            keys += list(s.keys())
    assert "thinker.model.layers.0.mlp.experts.0.gate_proj.weight" in keys
    assert not [k for k in keys if k.endswith("gate_up_proj")]
    assert not list(tmp_path.glob("*.bin"))
    again = Qwen3OmniMoeForConditionalGeneration.from_pretrained(tmp_path, dtype=torch.float32)
    for (n, a), (_, b) in zip(model.state_dict().items(), again.state_dict().items()):
        assert torch.equal(a, b), n


def test_thinker_only_load_skips_the_talker(tiny_dir):
    thinker = load_thinker(FP32)
    assert isinstance(thinker, Qwen3OmniMoeThinkerForConditionalGeneration)
    assert not any("talker" in n for n, _ in thinker.named_parameters())
    full = Qwen3OmniMoeForConditionalGeneration.from_pretrained(tiny_dir, dtype=torch.float32)
    for (n, a), (_, b) in zip(full.thinker.state_dict().items(), thinker.state_dict().items()):
        assert torch.equal(a, b), n


def test_load_errors_are_actionable(tmp_path):
    with pytest.raises(ModelLoadError, match="without config.json"):
        load_thinker(ModelConfig(path=str(tmp_path)))
    with pytest.raises(ModelLoadError, match="flash-attn"):
        load_thinker(ModelConfig(path="tiny", attention="flash_attention_2"))


def test_processor_carries_the_variant_template(tiny_dir):
    proc = load_processor(ModelConfig(path="tiny", variant="thinking"))
    msgs = [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A", "reasoning_content": "R"}]
    assert proc.apply_chat_template(msgs, tokenize=False).endswith(
        "<|im_start|>assistant\n<think>\nR\n</think>\n\nA<|im_end|>\n")


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits


def test_lora_targets_are_full_thinker_paths(tiny_dir):
    thinker = load_thinker(FP32)
    modules, params = lora_targets(thinker, AdapterConfig(targets=["attention", "experts", "router"]))
    assert "model.language_model.layers.1.self_attn.o_proj" in modules
    assert not [m for m in modules if "audio_tower" in m or "visual" in m]
    assert "model.language_model.layers.0.mlp.experts.gate_up_proj" in params
    assert "model.language_model.layers.0.mlp.gate.weight" in params


def test_adapter_module_names_that_match_nothing_are_rejected(tiny_dir):
    thinker = load_thinker(FP32)
    with pytest.raises(AdapterError, match="matches no nn.Linear"):
        apply_adapters(thinker, AdapterConfig(modules=["experts.0.wi"]))


@pytest.mark.parametrize("targets", [["attention"], ["experts"], ["router"], ["attention", "experts", "router"]])
def test_lora_save_reload_and_merge_give_identical_logits(tiny_dir, tmp_path, targets):
    torch.manual_seed(0)
    model = apply_adapters(load_thinker(FP32), AdapterConfig(rank=4, alpha=8, targets=targets)).eval()
    randomize_lora(model)
    ids = torch.randint(0, 5000, (2, 16))
    tuned = _logits(model, ids)
    base = _logits(load_thinker(FP32), ids)
    assert (tuned - base).abs().max() > 1e-4, "the adapter changed nothing"
    model.save_pretrained(tmp_path)
    reloaded = load_adapter(load_thinker(FP32), str(tmp_path)).eval()
    assert torch.equal(_logits(reloaded, ids), tuned)
    merged = merge(reloaded)
    assert isinstance(merged, Qwen3OmniMoeThinkerForConditionalGeneration)
    torch.testing.assert_close(_logits(merged, ids), tuned, rtol=1e-4, atol=1e-4)


def test_freeze_switches_under_lora_and_full(tiny_dir):
    lora = apply_adapters(load_thinker(FP32), AdapterConfig(rank=2, alpha=4, targets=["attention"],
                                                            freeze_audio_projector=False))
    rows = {c: t for c, t, _ in trainable_summary(lora)}
    assert rows["audio_projector"] > 0 and rows["audio_tower"] == 0 and rows["vision_tower"] == 0
    assert rows["llm"] == 0 and rows["lora"] > 0
    full = apply_adapters(load_thinker(FP32), AdapterConfig(method="full", freeze_vision_tower=False))
    rows = {c: t for c, t, _ in trainable_summary(full)}
    assert rows["llm"] > 0 and rows["vision_tower"] > 0 and rows["audio_tower"] == 0
    assert rows["audio_projector"] == 0
    with pytest.raises(AdapterError, match="nothing to train"):
        apply_adapters(load_thinker(FP32), AdapterConfig(method="full", freeze_llm=True))
