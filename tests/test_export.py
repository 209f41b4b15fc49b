"""export_run on the tiny model: a complete checkpoint in the Hub layout whose logits are the adapter model's."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from PIL import Image
from peft import PeftModel
from safetensors import safe_open
from transformers import AutoConfig, AutoProcessor, Qwen3OmniMoeForConditionalGeneration

from omnitune.export import ExportError, export_run
from omnitune.data.render import render
from omnitune.infer import Inferencer, collate_prompts, prompt_record
from omnitune.model.load import load_thinker
from omnitune.model.source import SourceError
from omnitune.model.tiny import tiny_checkpoint
from omnitune.run_dir import RunDir
from model_helpers import tensor_layout
from test_infer_fixtures import full_run_dir, lora_run_dir, media  # noqa: F401  (fixtures)


def _inputs(run_root, media_root):
    run = RunDir(run_root)
    recipe = run.recipe()
    proc = AutoProcessor.from_pretrained(str(run.processor))
    conv = [{"role": "user", "content": [{"type": "audio", "audio": "a.wav"}, {"type": "image", "image": "i.png"},
                                         {"type": "text", "text": "What do you hear and see?"}]}]
    rec = prompt_record(conv, base_dir=media_root)
    batch = collate_prompts([render(proc, rec, recipe.data, generation=True)], proc.tokenizer.pad_token_id)
    batch.pop("use_audio_in_video")
    return batch


@torch.no_grad()
def _adapter_logits(run_root, batch):
    run = RunDir(run_root)
    recipe = run.recipe()
    kind, wdir = run.weights()
    if kind == "adapter":
        model = PeftModel.from_pretrained(load_thinker(recipe.model), str(wdir))  # not merged
    else:
        model = load_thinker(recipe.model, str(wdir))
    return model.eval()(**batch).logits


@torch.no_grad()
def _exported_logits(out, batch, thinker_only):
    full = Qwen3OmniMoeForConditionalGeneration.from_pretrained(str(out), dtype=torch.float32)
    assert full.has_talker is (not thinker_only)
    return full.thinker.eval()(**batch).logits


@pytest.mark.parametrize("thinker_only", [False, True])
def test_export_reloads_with_the_adapter_models_logits(lora_run_dir, media, tmp_path, thinker_only):
    out = tmp_path / "export"
    res = export_run(lora_run_dir, out, thinker_only=thinker_only, shard_size="200KB")
    assert res.merged == "adapter" and res.n_shards > 1
    batch = _inputs(lora_run_dir, media)
    want = _adapter_logits(lora_run_dir, batch)
    got = _exported_logits(out, batch, thinker_only)
    base = load_thinker(RunDir(lora_run_dir).recipe().model).eval()(**batch).logits
    assert not torch.allclose(base, want, atol=1e-3), "the test adapter must change the logits"
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4)


def test_full_finetune_run_exports_its_thinker(full_run_dir, media, tmp_path):
    out = tmp_path / "export"
    assert export_run(full_run_dir, out).merged == "model"
    trained, exported = tensor_layout(RunDir(full_run_dir).model), tensor_layout(out)
    assert set(trained) == {k for k in exported if k.startswith("thinker.")}
    index = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    with safe_open(str(RunDir(full_run_dir).model / "model.safetensors"), "pt") as t:
        for k in t.keys():  # the fine-tuned Thinker goes out bit for bit
            with safe_open(str(out / index[k]), "pt") as o:
                assert torch.equal(o.get_tensor(k), t.get_tensor(k)), k
    batch = _inputs(full_run_dir, media)  # and computes what the run's model computes
    torch.testing.assert_close(_exported_logits(out, batch, False), _adapter_logits(full_run_dir, batch),
                               atol=2e-5, rtol=1e-4)


def test_tensor_names_and_shapes_match_the_hub_layout(lora_run_dir, tmp_path):
    hub = tensor_layout(tiny_checkpoint())  # written by save_pretrained: the released per-expert layout
    assert "thinker.model.layers.0.mlp.experts.0.gate_proj.weight" in hub
    full, thinker = tmp_path / "full", tmp_path / "thinker"
    export_run(lora_run_dir, full, shard_size="300KB")
    export_run(lora_run_dir, thinker, thinker_only=True, shard_size="300KB")
    assert tensor_layout(full) == hub
    assert tensor_layout(thinker) == {k: v for k, v in hub.items() if k.startswith("thinker.")}
    for out in (full, thinker):
        index = json.loads((out / "model.safetensors.index.json").read_text())
        assert set(index["weight_map"]) == set(tensor_layout(out))
        assert all((out / shard).is_file() for shard in set(index["weight_map"].values()))


def test_export_writes_config_generation_config_processor_and_no_pickles(lora_run_dir, tmp_path):
    out = tmp_path / "export"
    export_run(lora_run_dir, out, thinker_only=True)
    files = {p.name for p in out.iterdir()}
    assert not [f for f in files if f.endswith((".bin", ".pt", ".pth", ".pkl", ".ckpt"))]
    assert {"config.json", "generation_config.json", "model.safetensors.index.json", "tokenizer.json",
            "tokenizer_config.json", "processor_config.json", "chat_template.jinja"} <= files
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["Qwen3OmniMoeForConditionalGeneration"]
    assert config["enable_audio_output"] is False
    assert json.loads((out / "generation_config.json").read_text())["eos_token_id"] == 151645
    proc = AutoProcessor.from_pretrained(str(out))
    msgs = [{"role": "user", "content": "hi"}]
    assert proc.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True) == \
        "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "temp dirs left behind"
    with pytest.raises(SourceError, match="no Talker"):  # a thinker-only export serves text only
        Inferencer(out, speech=True)


def test_full_export_keeps_talker_and_code2wav_bit_identical(lora_run_dir, tmp_path):
    out = tmp_path / "export"
    export_run(lora_run_dir, out)
    base = tiny_checkpoint() / "model.safetensors"
    index = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    with safe_open(str(base), "pt") as b:
        names = [k for k in b.keys() if k.startswith(("talker.", "code2wav."))]
        assert names
        for k in names:
            with safe_open(str(out / index[k]), "pt") as o:
                assert torch.equal(o.get_tensor(k), b.get_tensor(k)), k


def test_export_refuses_to_overwrite_unless_asked(lora_run_dir, tmp_path):
    out = tmp_path / "export"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    with pytest.raises(ExportError, match="already exists"):
        export_run(lora_run_dir, out, thinker_only=True)
    assert (out / "keep.txt").exists()
    export_run(lora_run_dir, out, thinker_only=True, overwrite=True)
    assert not (out / "keep.txt").exists() and (out / "config.json").exists()


def test_inferencer_serves_an_export_like_the_run_it_came_from(lora_run_dir, media, tmp_path):
    export_run(lora_run_dir, tmp_path / "full")
    conv = [{"role": "user", "content": [{"type": "audio", "audio": "a.wav"}, {"type": "text", "text": "Hm?"}]}]
    want = Inferencer(lora_run_dir, speech=False).generate(conv, max_new_tokens=6, base_dir=media).text
    assert Inferencer(tmp_path / "full", speech=False).generate(conv, max_new_tokens=6, base_dir=media).text == want


def test_config_and_processor_also_carry_what_transformers_4_reads(lora_run_dir, tmp_path):
    out = tmp_path / "export"
    export_run(lora_run_dir, out)
    config = json.loads((out / "config.json").read_text())
    text = config["thinker_config"]["text_config"]
    assert text["rope_scaling"] == {k: v for k, v in text["rope_parameters"].items() if k != "rope_theta"}
    assert text["rope_theta"] == text["rope_parameters"]["rope_theta"] and text["torch_dtype"] == text["dtype"]
    talker = config["talker_config"]["text_config"]
    assert talker["num_experts"] == talker["num_local_experts"] and talker["rope_scaling"]["mrope_section"]
    tok = json.loads((out / "tokenizer_config.json").read_text())
    assert tok["extra_special_tokens"]["image_token"] == "<|image_pad|>"
    pre = json.loads((out / "preprocessor_config.json").read_text())
    assert pre["feature_extractor_type"] == "WhisperFeatureExtractor" and pre["patch_size"] == 16
    assert json.loads((out / "video_preprocessor_config.json").read_text())["temporal_patch_size"] == 2
    # transformers 5 reads the doubled keys back to the base checkpoint's config
    exported, base = (AutoConfig.from_pretrained(str(p)).to_dict() for p in (out, tiny_checkpoint()))
    assert _without(exported, {"_name_or_path", "dtype"}) == _without(base, {"_name_or_path", "dtype"})


def _without(d, keys):
    return {k: _without(v, keys) if isinstance(v, dict) else v for k, v in d.items() if k not in keys}


_CHECK_457 = """
import sys, torch, transformers
from transformers import AutoProcessor, Qwen3OmniMoeForConditionalGeneration
assert transformers.__version__.startswith("4.57"), transformers.__version__
ref = torch.load(sys.argv[2])
proc = AutoProcessor.from_pretrained(sys.argv[1])
from PIL import Image
image = Image.open(ref["image"]).convert("RGB")
out = proc(text=[ref["text"]], audio=[ref["wav"].numpy()], images=[image], return_tensors="pt")
for key in ("input_ids", "input_features", "pixel_values", "image_grid_thw"):
    assert torch.equal(out[key], ref["processed"][key]), key
model, info = Qwen3OmniMoeForConditionalGeneration.from_pretrained(sys.argv[1], torch_dtype=torch.float32,
                                                                   output_loading_info=True)
assert not any(info.values()), info
with torch.no_grad():
    got = model.thinker(**ref["inputs"]).logits
print((got - ref["logits"]).abs().max().item())
"""


@pytest.mark.slow
@pytest.mark.skipif(not os.environ.get("OMNITUNE_TRANSFORMERS_457"),
                    reason="set OMNITUNE_TRANSFORMERS_457 to a dir with transformers 4.57 (pip install --target)")
def test_transformers_4_57_loads_the_export_with_the_same_logits(lora_run_dir, media, tmp_path):
    """The release's transformers (and vLLM 0.11-0.12 / vLLM-Omni built on it) must read what we write."""
    out = tmp_path / "export"
    export_run(lora_run_dir, out)
    batch = _inputs(lora_run_dir, media)
    proc = AutoProcessor.from_pretrained(str(out))
    text = proc.apply_chat_template([{"role": "user", "content": [{"type": "audio"}, {"type": "image"}]}],
                                    tokenize=False, add_generation_prompt=True)
    wav, image = torch.sin(torch.arange(20800) / 9.0), Image.open(media / "i.png").convert("RGB")
    processed = dict(proc(text=[text], audio=[wav.numpy()], images=[image], return_tensors="pt"))
    torch.save({"inputs": dict(batch), "logits": _exported_logits(out, batch, False), "text": text, "wav": wav,
                "image": str(media / "i.png"), "processed": processed}, tmp_path / "ref.pt")
    env = {**os.environ, "PYTHONPATH": os.environ["OMNITUNE_TRANSFORMERS_457"]}
    res = subprocess.run([sys.executable, "-c", _CHECK_457, str(out), str(tmp_path / "ref.pt")], env=env,
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    assert float(res.stdout.strip().splitlines()[-1]) < 1e-4
