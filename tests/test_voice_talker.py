"""The Talker's teacher-forced input and labels (model/talker_inputs.py) against the model's own generate(), on the
tiny Qwen3-Omni: same input, same codebook-0 logits, labels aligned once, the code predictor never sees the next
frame."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from omnitune.model import parts
from omnitune.model.talker_inputs import build_talker_inputs, talker_forward, talker_losses, thinker_states
from omnitune.model.tiny import TOKEN_IDS, build_tiny_model

T = TOKEN_IDS


def prompt_ids() -> torch.Tensor:
    """system turn + user turn with 13 audio placeholders and text + the assistant header (real token ids)."""
    return torch.tensor([[T["im_start"], T["system"], 198, 2610, T["im_end"], 198,
                          T["im_start"], T["user"], 198, T["audio_start"], *[T["audio"]] * 13, T["audio_end"], 3838,
                          T["im_end"], 198, T["im_start"], T["assistant"], 198]])


@pytest.fixture(scope="module")
def generated():
    """generate() with greedy Talker; the Talker's prefill input and its raw codebook-0 logits captured."""
    model = build_tiny_model()
    feats, fmask = torch.randn(1, 128, 100, generator=torch.Generator().manual_seed(0)), torch.ones(1, 100).long()
    captured = {}
    original = model.talker.generate

    def spy(*args, **kwargs):
        kwargs["output_logits"] = True
        out = original(*args, **kwargs)
        captured.update(out=out, inputs_embeds=kwargs["inputs_embeds"], talker_input_ids=kwargs["talker_input_ids"])
        return out

    model.talker.generate = spy
    prompt = prompt_ids()
    with torch.no_grad():
        seq, _ = model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), input_features=feats,
                                feature_attention_mask=fmask, speaker="Ethan", thinker_max_new_tokens=6,
                                talker_max_new_tokens=10, thinker_do_sample=False, talker_do_sample=False,
                                talker_repetition_penalty=1.0, return_audio=True)
    model.talker.generate = original
    out = captured["out"]
    codes = torch.stack([h[-1] for h in out.hidden_states if h[-1] is not None], 1)[0]  # [frames, G]
    ids = seq[:, :-1]  # the last generated token is never fed back to the Thinker
    with torch.no_grad():
        states = model.thinker(input_ids=ids, attention_mask=torch.ones_like(ids), input_features=feats,
                               feature_attention_mask=fmask, output_hidden_states=True).hidden_states
    layer = model.config.talker_config.accept_hidden_layer
    return dict(model=model, ids=ids, embeds=states[0], hidden=states[layer], codes=codes, states=states,
                feats=feats, fmask=fmask, logits=torch.stack(out.logits, 1)[0], captured=captured,
                audio_lengths=fmask.sum(1))


def teacher_forced(g, codes):
    model = g["model"]
    inputs = build_talker_inputs(model, g["ids"], torch.ones_like(g["ids"]), g["embeds"], g["hidden"], [codes],
                                 [model.config.talker_config.speaker_id["ethan"]])
    with torch.no_grad():
        out = talker_forward(model.talker, inputs, {"audio_feature_lengths": g["audio_lengths"]})
    return inputs, out


def allowed_codes(model) -> torch.Tensor:
    """generate() suppresses the top 1024 ids of the Talker's vocabulary but codec_eos."""
    v = model.config.talker_config.text_config.vocab_size
    ok = torch.zeros(v, dtype=torch.bool)
    ok[:v - 1024] = True
    ok[model.config.talker_config.codec_eos_token_id] = True
    return ok


def test_teacher_forced_input_equals_generates(generated):
    g = generated
    inputs, out = teacher_forced(g, g["codes"])
    prefill = g["captured"]["inputs_embeds"]
    p = prefill.shape[1]
    assert torch.allclose(inputs.inputs_embeds[:, :p], prefill, atol=1e-6)
    assert torch.equal(inputs.talker_input_ids[:, :p], g["captured"]["talker_input_ids"])
    frames = g["codes"].shape[0]
    # the prefill's last position and each fed frame give the logits generate() sampled from
    ours = out.logits[0, p - 1:p + frames]
    assert torch.allclose(ours, g["logits"][:frames + 1], atol=1e-4), (ours - g["logits"][:frames + 1]).abs().max()


def test_labels_are_what_generate_chose_at_each_position(generated):
    """Greedy generate() picked argmax(logits[s]) at every position: with labels aligned once, labels[s] is that
    argmax wherever a label is set. Shifting the labels once more (the Qwen3-TTS #179 bug) breaks it."""
    g = generated
    inputs, out = teacher_forced(g, g["codes"])
    set_ = inputs.labels[0] != -100
    picks = out.logits[0].masked_fill(~allowed_codes(g["model"]), float("-inf")).argmax(-1)
    frames = g["codes"].shape[0]
    assert set_.sum() == frames + 1
    assert torch.equal(picks[set_][:frames], inputs.labels[0][set_][:frames])
    double_shift = inputs.labels[0][1:]
    assert not torch.equal(picks[:-1][double_shift != -100][:frames], double_shift[double_shift != -100][:frames])


def test_code_predictor_sees_its_own_frame_not_the_next(generated):
    g = generated
    inputs, out = teacher_forced(g, g["codes"])
    assert torch.equal(out.code_logits.argmax(-1), g["codes"][:, 1:])
    # fed the next frame's codes (the Qwen3-TTS #337 bug), it no longer reproduces what generate() chose
    shifted = torch.roll(g["codes"], -1, 0)
    _, wrong = teacher_forced(g, shifted)
    assert not torch.equal(wrong.code_logits.argmax(-1)[:-1], g["codes"][:-1, 1:])


def test_losses_are_the_plain_cross_entropies(generated):
    g = generated
    inputs, out = teacher_forced(g, g["codes"])
    ce0, ce_cp = talker_losses(out, inputs)
    frames = g["codes"].shape[0]
    p = inputs.labels[0] != -100
    assert torch.allclose(ce0, F.cross_entropy(out.logits[0][p], inputs.labels[0][p], reduction="sum"))
    ref = sum(F.cross_entropy(out.code_logits[:, k], g["codes"][:, k + 1], reduction="sum")
              for k in range(g["codes"].shape[1] - 1)) / (g["codes"].shape[1] - 1)
    assert torch.allclose(ce_cp, ref) and frames > 0


def test_generate_codes_speaks_what_generate_speaks(generated):
    """The Talker driven from our prompt (self-distillation targets) gives generate()'s own codes."""
    from omnitune.model.talker_inputs import generate_codes, talker_prompt

    g = generated
    model = g["model"]
    prompt = talker_prompt(model, g["ids"][0], g["embeds"][0], g["hidden"][0],
                           model.config.talker_config.speaker_id["ethan"])
    codes = generate_codes(model, prompt, max_frames=10, audio_feature_lengths=g["audio_lengths"],
                           repetition_penalty=1.0)
    assert torch.equal(codes, g["codes"])


def test_thinker_states_stop_at_the_talkers_layer(generated):
    """thinker_states gives generate()'s embeddings and layer-k states (audio merged in) running only layers
    0..k-1; at the last layer it runs them all and gives the final norm's state, as hidden_states does."""
    g = generated
    model, layer = g["model"], g["model"].config.talker_config.accept_hidden_layer
    inputs = dict(input_ids=g["ids"], attention_mask=torch.ones_like(g["ids"]), input_features=g["feats"],
                  feature_attention_mask=g["fmask"])
    layers = parts.decoder_layers(model.thinker)
    assert 0 < layer < len(layers)
    ran = []
    hooks = [m.register_forward_hook(lambda m, a, o, i=i: ran.append(i)) for i, m in enumerate(layers)]
    embeds, hidden = thinker_states(model.thinker, inputs, layer)
    assert ran == list(range(layer))
    assert torch.equal(embeds, g["embeds"]) and torch.equal(hidden, g["hidden"])
    assert len(parts.decoder_layers(model.thinker)) == len(layers)  # the stack is whole again
    ran.clear()
    _, last = thinker_states(model.thinker, inputs, len(layers))
    for h in hooks:
        h.remove()
    assert ran == list(range(len(layers))) and torch.equal(last, g["states"][len(layers)])
