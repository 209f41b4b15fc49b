"""`omnitune eval RUN --task voice`: speak each held-out prompt and judge the speech.

Per record the model answers the prompt in text and speech (generate(), greedy Thinker, the record's speaker or
talker.speaker); then
- intelligibility: the model's own Thinker transcribes the generated speech (resampled to 16 kHz, "Transcribe the
  audio."), and WER / CER are taken against the text it said it was speaking (not the record's reference: a
  tuned model may answer differently, and intelligibility is whether the speech carries its own text);
- speaker similarity: the cosine of speaker embeddings of the generated speech and the record's target speech,
  from a SpeechBrain ECAPA speaker-verification model (`speaker_model`: a local copy of
  speechbrain/spkrec-ecapa-voxceleb). When SpeechBrain or the model is not available the score is NaN and the
  report says why: no similarity is made up from another model.
- seconds of speech, and the near-silent / empty replies counted.
"""
from __future__ import annotations

import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from omnitune.data.collate import to_device
from omnitune.data.media import load_audio
from omnitune.data.render import render
from omnitune.data.schema import Record, RecordError, validate_record
from omnitune.eval import metrics
from omnitune.eval.results import ModelResult
from omnitune.infer import SPEECH_RATE, collate_prompts, speech_problem
from omnitune.model import parts
from omnitune.recipe import DataConfig, TalkerConfig
from omnitune.tokens import IM_END, pad_id

TRANSCRIBE = "Transcribe the audio."


def speaker_embedder(speaker_model: str | None):
    """(embed(wav 16 kHz) -> vector, None) from a local ECAPA model, or (None, why not)."""
    if not speaker_model:
        return None, "no speaker-verification model given (--speaker-model: a local speechbrain ECAPA model)"
    try:
        from speechbrain.inference.speaker import EncoderClassifier
    except ImportError:
        return None, "speechbrain is not installed (pip install speechbrain) for the ECAPA speaker model"
    try:
        model = EncoderClassifier.from_hparams(source=speaker_model, savedir=speaker_model)
    except Exception as e:  # a missing or broken model folder: say so instead of scoring
        return None, f"cannot load the speaker model {speaker_model}: {str(e).splitlines()[0][:200]}"

    def embed(wav: np.ndarray) -> torch.Tensor:
        return model.encode_batch(torch.as_tensor(wav)[None]).flatten()

    return embed, None


def _resample(wav: np.ndarray, rate: int, to: int) -> np.ndarray:
    import soxr

    return soxr.resample(wav, rate, to).astype(np.float32)


@torch.no_grad()
def score_voice(label: str, model: torch.nn.Module, processor, records: list[Record], data: DataConfig,
                talker: TalkerConfig, bad: list[RecordError] | None, max_new_tokens: int = 64,
                speaker_model: str | None = None) -> ModelResult:
    """Speak every record's prompt with `model` (the full model) and score the speech (module docstring)."""
    start = time.time()
    thinker = parts.thinker_of(model)
    device = next(thinker.parameters()).device
    tok = processor.tokenizer
    im_end, pad = tok.convert_tokens_to_ids(IM_END), pad_id(tok)
    known = dict(model.config.talker_config.speaker_id)
    embed, why_not = speaker_embedder(speaker_model)
    samples, problems = [], 0
    with tempfile.TemporaryDirectory() as tmp:
        for record in tqdm(records, unit="sample", desc=label, dynamic_ncols=True):
            prompt = replace(record, messages=record.messages[:-1])
            try:
                inputs = render(processor, prompt, data, generation=True)
            except RecordError as e:
                if bad is None:
                    raise
                bad.append(e)
                continue
            speaker = record.speaker if record.speaker in known else talker.speaker
            batch = to_device(collate_prompts([inputs], pad), device, thinker.dtype)
            seqs, wav = model.generate(**batch, speaker=speaker, return_audio=True, thinker_do_sample=False,
                                       thinker_max_new_tokens=max_new_tokens, thinker_eos_token_id=im_end,
                                       thinker_pad_token_id=pad, talker_do_sample=False,
                                       talker_max_new_tokens=8 * max_new_tokens + 16)
            said = tok.decode(seqs[0, batch["input_ids"].shape[1]:], skip_special_tokens=True)
            audio = None if wav is None else wav.reshape(-1).float().cpu().numpy()
            problem = speech_problem(audio)
            problems += problem is not None
            sample = {"key": (record.file, record.line), "prediction": said, "speaker": speaker,
                      "seconds": 0.0 if audio is None else len(audio) / SPEECH_RATE, "problem": problem}
            if problem is None:  # too short or silent speech has nothing to transcribe (a tiny Code2Wav's)
                heard = transcribe(model, processor, _resample(audio, SPEECH_RATE, 16000), data, Path(tmp),
                                   max_new_tokens)
                sample.update(transcript=heard, **metrics.asr_sample(heard, said))
                if embed is not None and record.speech is not None:
                    ref = load_audio(record.speech)  # 16 kHz, as the speaker model takes
                    sim = torch.nn.functional.cosine_similarity(embed(_resample(audio, SPEECH_RATE, 16000)),
                                                                embed(ref), dim=0)
                    sample["speaker_similarity"] = float(sim)
            samples.append(sample)
    heard = [s for s in samples if "wer" in s]
    scores = metrics.asr_scores([], [], heard) if heard else {"wer": float("nan"), "cer": float("nan")}
    sims = [s["speaker_similarity"] for s in samples if "speaker_similarity" in s]
    scores = {**{k: scores[k] for k in ("wer", "cer")},
              "speaker_similarity": float(np.mean(sims)) if sims else float("nan"),
              "speech_seconds": float(np.mean([s["seconds"] for s in samples])) if samples else 0.0,
              "silent_samples": float(problems)}
    notes = [f"speaker_similarity is NaN: {why_not}"] if why_not else []
    return ModelResult(label, scores, samples, time.time() - start, notes)


def transcribe(model: torch.nn.Module, processor, wav16k: np.ndarray, data: DataConfig, folder: Path,
               max_new_tokens: int) -> str:
    """The model's own Thinker's transcript of a 16 kHz waveform."""
    import soundfile as sf

    path = folder / "speech.wav"
    sf.write(path, wav16k, 16000)
    record = validate_record({"conversations": [{"role": "user", "content": [
        {"type": "audio", "audio": str(path)}, {"type": "text", "text": TRANSCRIBE}]}]}, folder / "<voice>", 0,
        require_answer=False, media_roots=[folder])
    thinker = parts.thinker_of(model)
    tok = processor.tokenizer
    batch = to_device(collate_prompts([render(processor, record, data, generation=True)], pad_id(tok)),
                      next(thinker.parameters()).device, thinker.dtype)
    out = thinker.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False,
                           eos_token_id=tok.convert_tokens_to_ids(IM_END), pad_token_id=pad_id(tok))
    return tok.decode(out[0, batch["input_ids"].shape[1]:], skip_special_tokens=True)
