"""Speech-preserving Thinker tuning (`talker.preserve_speech`): after a Thinker fine-tune, teach the Talker to
speak with the tuned Thinker as the base model spoke with the base Thinker.

Why: the Talker reads the Thinker's layer-k states; a Thinker LoRA moves them, and the untouched Talker then
speaks worse ("you also need to finetune the talker", ms-swift #5071). The remedy is self-distillation and needs
no recorded speech: for each training answer the BASE model (base Thinker + Talker) speaks it (greedy codes,
`generate_codes`, exactly as generate() would); then, with the TUNED Thinker frozen in its place, a Talker LoRA
learns those codes by the Talker objective (`TalkerCodec`). It runs right after the Thinker training, from the
run directory (the Thinker adapter on disk), so only one full model is in memory.

Measured and written to RUN/speech_preserve.json: the Talker's teacher-forced codec CE on the base model's own
speech for (1) base Thinker + base Talker, (2) tuned Thinker + base Talker (the drift), (3) tuned Thinker + the
distilled Talker (the remedy); on held-out answers too when the run has an eval split. The Talker adapter is
RUN/talker_adapter, merged after the Thinker's wherever the run is loaded for speech (model/source.py).
"""
from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from typing import Any

import torch
from transformers import TrainingArguments

from omnitune.data.collate import OmniCollator, to_device
from omnitune.model import parts
from omnitune.model.build import build_for_training
from omnitune.model.load import load_full
from omnitune.model.source import resolve_source, with_trained_weights
from omnitune.model.talker_inputs import generate_codes, talker_prompt, thinker_states
from omnitune.recipe import AdapterConfig, Recipe
from omnitune.run_dir import RunDir
from omnitune.tokens import pad_id
from omnitune.train.objectives import TalkerCodec
from omnitune.train.plan import TrainingPlan
from omnitune.train.trainer import OmniTrainer

# LoRA on the Talker as the voice preset puts it (recipes/voice.yaml)
TALKER_TARGETS = ["talker_attention", "talker_experts", "talker_shared_expert", "talker_projection",
                  "code_predictor_attention"]
FRAMES_PER_TOKEN = 8  # a generous bound on speech frames per text token (~0.6 s): the base rarely speaks longer


@torch.no_grad()
def base_speech(full: torch.nn.Module, samples: list[dict[str, Any]], speaker_id: int, pad: int,
                device: torch.device) -> list[dict[str, Any]]:
    """Each sample with `speech_codes`: what `full` speaks for its last assistant turn (greedy); a sample the
    Talker says nothing for is left out."""
    collate = OmniCollator(pad)
    thinker = parts.thinker_of(full)
    layer = full.config.talker_config.accept_hidden_layer
    out = []
    for sample in samples:
        batch = to_device(collate([sample]), device, thinker.dtype)
        inputs = {k: v for k, v in batch.items() if k in _THINKER_INPUTS}
        embeds, hidden = thinker_states(thinker, inputs, layer)
        prompt = talker_prompt(full, batch["input_ids"][0], embeds[0], hidden[0], speaker_id)
        fmask = batch.get("feature_attention_mask")
        codes = generate_codes(full, prompt, FRAMES_PER_TOKEN * len(prompt.trailing) + 16,
                               None if fmask is None else fmask.sum(-1))
        if len(codes):
            out.append({**sample, "speech_codes": codes.cpu()})
    return out


_THINKER_INPUTS = ("input_ids", "attention_mask", "input_features", "feature_attention_mask", "pixel_values",
                   "image_grid_thw", "pixel_values_videos", "video_grid_thw", "video_second_per_grid",
                   "use_audio_in_video")


@torch.no_grad()
def codec_ce(model: torch.nn.Module, samples: list[dict[str, Any]], objective: TalkerCodec, pad: int,
             device: torch.device) -> float:
    """The Talker's codebook-0 CE per frame (end of speech included) over `samples`, teacher-forced."""
    model.eval()
    collate, total, count = OmniCollator(pad), 0.0, 0
    dtype = parts.thinker_of(model).dtype
    for sample in samples:
        batch = to_device(collate([sample]), device, dtype)
        total += float(objective.sums(model, batch)[0])
        count += objective.count(batch)
    return total / max(count, 1)


def preserve_speech(recipe: Recipe, plan: TrainingPlan, train_ds, eval_ds, processor,
                    report: Callable[[str], object] = print) -> dict[str, Any]:
    """The remedy for a finished Thinker run (module docstring); returns what RUN/speech_preserve.json holds."""
    t = recipe.talker
    run = RunDir(recipe.out)
    shutil.rmtree(run.talker_adapter, ignore_errors=True)  # a remedy of an earlier run of this directory
    device = torch.device(plan.hardware.device_str)
    pad = pad_id(processor.tokenizer)
    full = load_full(recipe.model, device_map={"": plan.hardware.device_str} if device.type == "cuda" else None)
    full.talker.config.audio_config = full.config.thinker_config.audio_config  # QWEN3_OMNI_NOTES.md, Talker
    speaker = full.config.talker_config.speaker_id[t.speaker]
    split = {"train": [train_ds[i] for i in range(min(len(train_ds), t.preserve_samples))]}
    if eval_ds is not None:
        split["held_out"] = [eval_ds[i] for i in range(min(len(eval_ds), t.preserve_samples))]
    report(f"speech preservation: the base model speaks {sum(map(len, split.values()))} answers")
    targets = {k: base_speech(full, v, speaker, pad, device) for k, v in split.items()}
    objective = TalkerCodec({t.speaker: speaker}, t.speaker, t.code_predictor_weight)
    ce = {k: {"base": codec_ce(full, v, objective, pad, device)} for k, v in targets.items()}
    full = with_trained_weights(full, resolve_source(str(run.root)))  # the tuned Thinker, merged
    for k, v in targets.items():
        ce[k]["tuned_thinker"] = codec_ce(full, v, objective, pad, device)
    adapter = AdapterConfig(method="lora", rank=t.preserve_rank, alpha=2 * t.preserve_rank, targets=TALKER_TARGETS,
                            freeze=[])
    model = build_for_training(full, adapter, fast_paths=plan.fast_paths, device=plan.hardware.device_str,
                               report=report, stack="talker")
    args = TrainingArguments(
        output_dir=str(run.root / "checkpoints" / "preserve_speech"), per_device_train_batch_size=1,
        learning_rate=t.preserve_lr, max_steps=t.preserve_steps, lr_scheduler_type="cosine", save_strategy="no",
        logging_steps=max(1, t.preserve_steps // 5), report_to=[], remove_unused_columns=False,
        bf16=plan.precision == "bf16", fp16=plan.precision == "fp16", seed=recipe.train.seed,
        use_cpu=device.type == "cpu", disable_tqdm=True, dataloader_num_workers=0)
    OmniTrainer(model=model, args=args, train_dataset=targets["train"], objective=objective,
                data_collator=OmniCollator(pad, host_counts=True)).train()
    for k, v in targets.items():
        ce[k]["remedied"] = codec_ce(model, v, objective, pad, device)
    model.save_pretrained(str(run.talker_adapter))
    result = {"what": "the Talker's teacher-forced codebook-0 CE per frame on the base model's own speech of the "
                      "answers: base Thinker + base Talker, tuned Thinker + base Talker, tuned Thinker + the "
                      "distilled Talker", "samples": {k: len(v) for k, v in targets.items()},
              "steps": t.preserve_steps, "codec_ce": ce}
    (run.root / "speech_preserve.json").write_text(json.dumps(result, indent=1) + "\n")
    for k, v in ce.items():
        report(f"speech preservation ({k}): codec CE base {v['base']:.4f}, tuned Thinker {v['tuned_thinker']:.4f}, "
               f"after the remedy {v['remedied']:.4f}")
    return result
