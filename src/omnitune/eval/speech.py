"""`omnitune eval RUN --task speech`: the Talker's teacher-forced codec cross-entropy on held-out speech, for the
base model and the tuned one. It measures two things with one number: how well a voice run learnt its voice, and
how much a Thinker fine-tune moved the layer-k states the Talker reads (a Thinker LoRA the Talker was not trained
with raises it: "tuning the Thinker degrades speech", ms-swift #5071).

Per record: `codec_ce`, codebook 0's CE per frame (the end of speech included), `code_predictor_ce`, codebooks
1..15's mean CE per frame, and `loss` = codec_ce + talker.code_predictor_weight x code_predictor_ce, the training
objective. The codes come from the recipe's codec (talker.codec), as in training. A record whose speaker the
model does not know (the base model and a new voice) is scored with talker.speaker, and counted.
"""
from __future__ import annotations

import time

import torch
from tqdm.auto import tqdm

from omnitune.data.collate import OmniCollator, to_device
from omnitune.data.render import render
from omnitune.data.schema import Record, RecordError
from omnitune.data.speech import SpeechTargets
from omnitune.eval.results import ModelResult
from omnitune.model import parts
from omnitune.recipe import DataConfig, TalkerConfig
from omnitune.tokens import pad_id
from omnitune.train.objectives import TalkerCodec


@torch.no_grad()
def score_speech(label: str, model: torch.nn.Module, processor, records: list[Record], data: DataConfig,
                 targets: SpeechTargets, talker: TalkerConfig, bad: list[RecordError] | None) -> ModelResult:
    """The codec CEs of `model` (the full model) on every record with target speech, one record at a time."""
    start = time.time()
    known = dict(parts.unwrap(model).config.talker_config.speaker_id)
    objective = TalkerCodec(known, talker.speaker, talker.code_predictor_weight)
    thinker = parts.thinker_of(model)
    device = next(thinker.parameters()).device
    collate = OmniCollator(pad_id(processor.tokenizer))
    samples, totals, stand_ins = [], [0.0, 0.0, 0, 0], 0
    for record in tqdm(records, unit="sample", desc=label, dynamic_ncols=True):
        try:
            if record.speech is None:
                raise RecordError(record.file, record.line, "no target speech (an audio item in the last "
                                                            "assistant turn): --task speech scores speech")
            sample = targets(record, render(processor, record, data))
        except RecordError as e:
            if bad is None:
                raise
            bad.append(e)
            continue
        if sample.get("speaker") and sample["speaker"] not in known:
            sample = {k: v for k, v in sample.items() if k != "speaker"}  # scored with talker.speaker
            stand_ins += 1
        batch = to_device(collate([sample]), device, thinker.dtype)
        ce0, ce_cp = (float(x) for x in objective.sums(model, batch))
        frames = int(batch["speech_frames"][0])
        samples.append({"key": (record.file, record.line), "codec_ce": ce0 / (frames + 1),
                        "code_predictor_ce": ce_cp / frames, "frames": frames,
                        "loss": ce0 / (frames + 1) + talker.code_predictor_weight * ce_cp / frames})
        totals = [totals[0] + ce0, totals[1] + ce_cp, totals[2] + frames + 1, totals[3] + frames]
    ce0_mean, cp_mean = totals[0] / max(totals[2], 1), totals[1] / max(totals[3], 1)
    scores = {"codec_ce": ce0_mean, "code_predictor_ce": cp_mean,
              "loss": ce0_mean + talker.code_predictor_weight * cp_mean,
              "frames": float(totals[3]), "unknown_speaker_samples": float(stand_ins)}
    return ModelResult(label, scores, samples, time.time() - start)
