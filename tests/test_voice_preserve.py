"""Speech-preserving Thinker tuning (talker.preserve_speech) on the tiny model: a Thinker LoRA moves the layer-k
states the Talker reads at audio positions (its codec CE on the base model's own speech rises), and the distilled
Talker LoRA brings it back down, on held-out answers too; the run then speaks with both adapters merged."""
from __future__ import annotations

import json

import numpy as np
import pytest
import soundfile as sf

from omnitune.recipe import RecipeError, load_recipe
from omnitune.train.run import train

ANSWERS = ["The weather is sunny today and warm.", "I like green apples with honey.",
           "Seven plus two is nine, always.", "The train leaves at noon from platform four.",
           "Cats sleep a lot during the day.", "Rivers run to the sea in spring."]


def spoken_questions(folder):
    """Six records whose user turn is a (synthetic) spoken question: the Talker reads the Thinker's states there."""
    rng = np.random.default_rng(0)
    lines = []
    for i, answer in enumerate(ANSWERS):
        t = np.arange(16000) / 16000
        wav = 0.3 * np.sin(2 * np.pi * (200 + 50 * i) * t) + 0.05 * rng.standard_normal(t.size)
        sf.write(folder / f"q{i}.wav", wav.astype(np.float32), 16000)
        lines.append(json.dumps({"conversations": [
            {"role": "user", "content": [{"type": "audio", "audio": f"q{i}.wav"}, {"type": "text", "text": "Answer."}]},
            {"role": "assistant", "content": answer}]}))
    (folder / "train.jsonl").write_text("\n".join(lines) + "\n")
    return folder / "train.jsonl"


@pytest.mark.slow
def test_preserve_speech_undoes_the_drift_a_thinker_lora_causes(tmp_path):
    data = spoken_questions(tmp_path)
    recipe = load_recipe("demo", [f"data.train={data}", f"output_dir={tmp_path / 'run'}", "train.max_steps=30",
                                  "train.lr=1e-2", "train.batch_size=2", "log.tensorboard=false", "data.workers=1",
                                  "data.eval_fraction=0.34", "train.save_steps=1000", "talker.preserve_speech=true",
                                  "talker.preserve_steps=40", "talker.preserve_lr=3e-3", "talker.codec=tiny"])
    result = train(recipe)
    ce = json.loads((result.run.root / "speech_preserve.json").read_text())["codec_ce"]
    for split in ("train", "held_out"):
        assert ce[split]["tuned_thinker"] > ce[split]["base"], ce  # the drift
        assert ce[split]["remedied"] < ce[split]["tuned_thinker"], ce  # the remedy
    assert (result.run.talker_adapter / "adapter_config.json").is_file()

    from omnitune.infer import Inferencer

    out = Inferencer(str(result.run.root), speech=True).generate(
        [{"role": "user", "content": [{"type": "audio", "audio": str(tmp_path / "q0.wav")}]}],
        max_new_tokens=4, max_speech_tokens=8)
    assert out.audio is not None and out.audio.size > 0


def test_preserve_speech_is_for_thinker_lora_runs():
    with pytest.raises(RecipeError, match="talker.preserve_speech needs train.objective=thinker_lm"):
        load_recipe("voice", ["talker.preserve_speech=true"])
