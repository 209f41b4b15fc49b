"""The Talker's teacher-forced input, laid out exactly as `Qwen3OmniMoeForConditionalGeneration.generate()` builds
it, and its two losses. Checked against generate() on the tiny model (tests/test_voice_talker.py): same input
embeddings, codebook-0 logits within float error, same greedy codes.

generate()'s layout (transformers 5.23, `_get_talker_user_parts` / `_get_talker_assistant_parts`):
- every position of a USER turn: `text_projection(token embedding)`, or `hidden_projection(Thinker layer-k state)`
  at audio/image/video positions (k = `accept_hidden_layer`); system and earlier assistant turns are left out;
- the last assistant turn's prefix, 9 positions: text channel [<|im_start|>, assistant, \\n, tts_pad x4, tts_bos,
  first text token] + codec channel [0, 0, 0, nothink, think_bos, think_eos, SPEAKER, codec_pad, codec_bos];
- then one position per codec frame fed back: sum of its 16 codebook embeddings + the next text token (then
  tts_eos, then tts_pad for as long as speech goes on).

Labels are aligned ONCE, here: `labels[s]` is what the logits AT position s predict, so the loss is a plain
cross-entropy with no shift (Qwen3-TTS's fine-tuning script shifted twice: "speech gets faster", Qwen3-TTS #179).
The position holding (first text token, codec_bos) predicts frame 1's codebook 0; the position fed frame j
predicts frame j+1's; the one fed the last frame predicts codec_eos. The code predictor of frame j reads the
Talker's final state at the position that predicted frame j's codebook 0, then codebooks 0..14 of frame j (never
frame j+1's), and predicts codebooks 1..15.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from omnitune.model import parts
from omnitune.tokens import IGNORE_INDEX

PREFIX = 9  # the assistant prefix's positions (module docstring)


@dataclass
class TalkerInputs:
    """A right-padded batch of teacher-forced Talker inputs."""
    inputs_embeds: torch.Tensor  # [B, S, H]
    talker_input_ids: torch.Tensor  # [B, S]: the Thinker ids of user positions (M-RoPE), tts_pad elsewhere
    attention_mask: torch.Tensor  # [B, S]
    labels: torch.Tensor  # [B, S] codebook-0 targets, aligned (module docstring), -100 elsewhere
    frame_rows: torch.Tensor  # [N]: batch row of each frame of every sample (N = frames in the batch)
    frame_pos: torch.Tensor  # [N]: the position whose final state conditions that frame's code predictor
    codes: torch.Tensor  # [N, G]: every frame's codes, in sample order


def user_mask(ids: torch.Tensor, im_start: int, user: int) -> torch.Tensor:
    """[L] bool: the positions inside user turns (from each <|im_start|> to the next), as generate() keeps them."""
    pos = torch.arange(len(ids), device=ids.device)
    starts = torch.where(ids == im_start, pos, torch.full_like(pos, -1))
    start = torch.cummax(starts, 0).values
    role = ids[(start + 1).clamp(0, len(ids) - 1)]
    return (start >= 0) & (role == user)


def last_assistant(ids: torch.Tensor, im_start: int, assistant: int, im_end: int) -> tuple[int, int]:
    """(a, e): the last assistant turn's <|im_start|> position and its <|im_end|> (or the end): the text the Talker
    speaks is ids[a + 3 : e]."""
    heads = ((ids[:-1] == im_start) & (ids[1:] == assistant)).nonzero().flatten()
    if len(heads) == 0:
        raise ValueError("no assistant turn to speak")
    a = int(heads[-1])
    ends = (ids[a:] == im_end).nonzero().flatten()
    return a, a + int(ends[0]) if len(ends) else len(ids)


def codec_frame_embeds(talker: nn.Module, codes: torch.Tensor) -> torch.Tensor:
    """[..., G] codes -> [..., H]: the Talker's codebook-0 embedding + the code predictor's embeddings of 1..G-1,
    the sum generate() feeds back for a frame."""
    out = talker.get_input_embeddings()(codes[..., 0])
    embeds = talker.code_predictor.get_input_embeddings()
    for i in range(1, codes.shape[-1]):
        out = out + embeds[i - 1](codes[..., i])
    return out


@dataclass
class TalkerPrompt:
    """One sample's Talker input up to the first frame, and the text it reads while speaking."""
    embeds: torch.Tensor  # [U + 9, H]: user positions + the assistant prefix
    talker_ids: torch.Tensor  # [U + 9]
    trailing: torch.Tensor  # [K, H]: text tokens 2..K then tts_eos, one per frame (then tts_pad)
    tts_pad: torch.Tensor  # [H]


@torch.no_grad()
def thinker_states(thinker: nn.Module, inputs: dict, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The Thinker's token embeddings (media merged in: the input of its first decoder layer) and its layer-`layer`
    states for `inputs`, exactly as generate() reads them from `hidden_states` (the raw output of decoder layer
    `layer` - 1). Our own because generate() runs the whole Thinker and the Talker reads layer 24 of 48: here the
    forward stops at `layer` (the layers above it and the final norm never run), half the frozen Thinker's time
    in each Talker step. Where `layer` is the last, the whole Thinker runs and the state is its final norm's, as in
    generate()."""
    backbone = parts.module(thinker, "backbone")
    stack, name = parts.stack_model(thinker), parts.decoder_stack(thinker, "text").layers
    layers = stack.get_submodule(name)
    if not 0 < layer < len(layers):
        states = backbone(**inputs, output_hidden_states=True, use_cache=False).hidden_states
        return states[0], states[layer]
    got: dict[str, torch.Tensor] = {}

    def first(module, args, kwargs):
        got["embeds"] = args[0] if args else kwargs["hidden_states"]

    def last(module, args, out):
        got["hidden"] = out[0] if isinstance(out, tuple) else out

    hooks = [layers[0].register_forward_pre_hook(first, with_kwargs=True), layers[layer - 1].register_forward_hook(last)]
    setattr(stack, name, layers[:layer])
    try:
        backbone(**inputs, use_cache=False)
    finally:
        setattr(stack, name, layers)
        for hook in hooks:
            hook.remove()
    return got["embeds"], got["hidden"]


def talker_prompt(model: nn.Module, ids: torch.Tensor, embeds: torch.Tensor, hidden: torch.Tensor,
                  speaker_id: int) -> TalkerPrompt:
    """The Talker prompt of one unpadded Thinker row `ids` (ending in the spoken assistant turn, its <|im_end|>
    optional) from the Thinker's token embeddings and layer-k states of that row. `model`: the full model."""
    cfg, talker = model.config, model.talker
    tc = cfg.talker_config
    media = torch.isin(ids, torch.tensor([cfg.thinker_config.audio_token_id, cfg.thinker_config.image_token_id,
                                          cfg.thinker_config.video_token_id], device=ids.device))
    special = torch.tensor([cfg.tts_bos_token_id, cfg.tts_eos_token_id, cfg.tts_pad_token_id], device=ids.device)
    tts_bos, tts_eos, tts_pad = talker.text_projection(
        model.thinker.get_input_embeddings()(special).to(embeds.dtype)).unbind(0)
    a, e = last_assistant(ids, cfg.im_start_token_id, cfg.assistant_token_id, cfg.im_end_token_id)
    if e - a < 4:
        raise ValueError("the spoken assistant turn has no text")
    keep = user_mask(ids[:a], cfg.im_start_token_id, cfg.user_token_id)
    user = torch.where(media[:a, None], talker.hidden_projection(hidden[:a]), talker.text_projection(embeds[:a]))
    text = talker.text_projection(embeds[a:e])  # <|im_start|>, assistant, \n, t1, t2, ...
    codec = torch.tensor([tc.codec_nothink_id, tc.codec_think_bos_id, tc.codec_think_eos_id, speaker_id,
                          tc.codec_pad_id, tc.codec_bos_id], device=ids.device)
    prefix = torch.cat([text[:3], tts_pad.expand(4, -1), tts_bos[None], text[3:4]])
    prefix = prefix + torch.cat([torch.zeros_like(text[:3]), talker.get_input_embeddings()(codec)])
    return TalkerPrompt(torch.cat([user[keep], prefix]),
                        torch.cat([ids[:a][keep], ids.new_full((PREFIX,), cfg.tts_pad_token_id)]),
                        torch.cat([text[4:], tts_eos[None]]), tts_pad)


def build_talker_inputs(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                        thinker_embeds: torch.Tensor, thinker_hidden: torch.Tensor, codes: list[torch.Tensor],
                        speaker_ids: list[int]) -> TalkerInputs:
    """The teacher-forced Talker batch for Thinker rows `input_ids` (right-padded) with their token embeddings and
    layer-k states, each row's target `codes` [T, G] and speaker row id. `model`: the full Qwen3-Omni model."""
    eos = model.config.talker_config.codec_eos_token_id
    rows, ids_rows, labels_rows, frame_rows, frame_pos = [], [], [], [], []
    for b in range(input_ids.shape[0]):
        n = int(attention_mask[b].sum())
        prompt = talker_prompt(model, input_ids[b, :n], thinker_embeds[b, :n], thinker_hidden[b, :n], speaker_ids[b])
        frames = codes[b].to(input_ids.device)
        t = frames.shape[0]
        trailing = torch.cat([prompt.trailing, prompt.tts_pad.expand(max(0, t - len(prompt.trailing)), -1)])[:t]
        rows.append(torch.cat([prompt.embeds, codec_frame_embeds(model.talker, frames) + trailing]))
        ids_rows.append(torch.cat([prompt.talker_ids, input_ids.new_full((t,), model.config.tts_pad_token_id)]))
        labels = input_ids.new_full((len(rows[-1]),), IGNORE_INDEX)
        first = len(prompt.embeds) - 1  # (first text token, codec_bos): predicts frame 1's codebook 0
        labels[first:first + t] = frames[:, 0]
        labels[first + t] = eos
        labels_rows.append(labels)
        frame_rows.append(torch.full((t,), b, device=input_ids.device))
        frame_pos.append(torch.arange(first, first + t, device=input_ids.device))
    s = max(len(r) for r in rows)
    embeds = rows[0].new_zeros((len(rows), s, rows[0].shape[-1]))
    talker_ids = input_ids.new_full((len(rows), s), model.config.tts_pad_token_id)
    mask = attention_mask.new_zeros((len(rows), s))
    labels = input_ids.new_full((len(rows), s), IGNORE_INDEX)
    for b, (r, i, y) in enumerate(zip(rows, ids_rows, labels_rows, strict=True)):
        embeds[b, :len(r)], talker_ids[b, :len(i)], mask[b, :len(r)], labels[b, :len(y)] = r, i, 1, y
    return TalkerInputs(embeds, talker_ids, mask, labels, torch.cat(frame_rows), torch.cat(frame_pos),
                        torch.cat([c.to(input_ids.device) for c in codes]))


@torch.no_grad()
def generate_codes(model: nn.Module, prompt: TalkerPrompt, max_frames: int, audio_feature_lengths=None,
                   repetition_penalty: float = 1.05) -> torch.Tensor:
    """[T, G] codes the model's Talker speaks for `prompt`, greedy, as generate() runs it (the special codec ids
    suppressed, stop at codec_eos)."""
    tc = model.config.talker_config
    v = tc.text_config.vocab_size
    out = model.talker.generate(
        inputs_embeds=prompt.embeds[None], trailing_text_hidden=prompt.trailing[None],
        tts_pad_embed=prompt.tts_pad[None, None], talker_input_ids=prompt.talker_ids[None],
        attention_mask=torch.ones_like(prompt.talker_ids)[None], audio_feature_lengths=audio_feature_lengths,
        max_new_tokens=max_frames, do_sample=False, eos_token_id=tc.codec_eos_token_id,
        repetition_penalty=repetition_penalty, output_hidden_states=True, return_dict_in_generate=True,
        suppress_tokens=[i for i in range(v - 1024, v) if i != tc.codec_eos_token_id])
    frames = [h[-1] for h in out.hidden_states if h[-1] is not None]
    return torch.cat(frames) if frames else torch.zeros((0, tc.num_code_groups), dtype=torch.long)


@dataclass
class TalkerOutputs:
    logits: torch.Tensor  # [B, S, V] codebook-0 logits
    code_logits: torch.Tensor  # [N, G-1, codebook size]: the code predictor's, codebooks 1..G-1 of every frame
    hidden: torch.Tensor  # [B, S, H] the Talker's final (normed) states


def talker_forward(talker: nn.Module, inputs: TalkerInputs, media: dict | None = None) -> TalkerOutputs:
    """The Talker and its code predictor, teacher-forced, in one pass each. `media`: the batch's
    audio_feature_lengths / image_grid_thw / video_grid_thw / video_second_per_grid / use_audio_in_video, which
    the Talker's M-RoPE positions of user media need (as the Thinker's do)."""
    media = media or {}
    position_ids, _ = talker.get_rope_index(
        inputs.talker_input_ids, media.get("image_grid_thw"), media.get("video_grid_thw"), inputs.attention_mask,
        bool(media.get("use_audio_in_video", False)), media.get("audio_feature_lengths"),
        media.get("video_second_per_grid"))
    out = talker.model(inputs_embeds=inputs.inputs_embeds, attention_mask=inputs.attention_mask,
                       position_ids=position_ids, use_cache=False)
    hidden = out.last_hidden_state
    logits = talker.codec_head(hidden)
    return TalkerOutputs(logits, code_predictor_logits(talker, hidden[inputs.frame_rows, inputs.frame_pos],
                                                       inputs.codes), hidden)


def code_predictor_logits(talker: nn.Module, conditioning: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
    """[N, G-1, V]: for each frame the code predictor's logits of codebooks 1..G-1, teacher-forced on its
    sequence [Talker state, E(c0), E_1(c1), ..., E_{G-2}(c_{G-2})] (position p predicts codebook p with head p-1)."""
    cp = talker.code_predictor
    g = codes.shape[-1]
    embeds = cp.get_input_embeddings()
    seq = [conditioning, talker.get_input_embeddings()(codes[:, 0])]
    seq += [embeds[i - 1](codes[:, i]) for i in range(1, g - 1)]
    states = cp.model(inputs_embeds=torch.stack(seq, 1), use_cache=False).last_hidden_state
    return torch.stack([cp.lm_head[p - 1](states[:, p]) for p in range(1, g)], 1)


def talker_losses(outputs: TalkerOutputs, inputs: TalkerInputs) -> tuple[torch.Tensor, torch.Tensor]:
    """(codebook-0 CE summed over every frame and each sample's end of speech, code-predictor CE summed over every
    frame and averaged over its G-1 codebooks), both fp32; divide by the frames to get means."""
    ce0 = F.cross_entropy(outputs.logits.flatten(0, 1).float(), inputs.labels.flatten(), ignore_index=IGNORE_INDEX,
                          reduction="sum")
    g1 = inputs.codes.shape[-1] - 1
    ce_cp = F.cross_entropy(outputs.code_logits.flatten(0, 1).float(), inputs.codes[:, 1:].flatten(),
                            reduction="sum") / g1
    return ce0, ce_cp
