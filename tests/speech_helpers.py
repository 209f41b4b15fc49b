"""Test material for speech: a Code2Wav loud enough to compare waveforms, one with the release's 1920x upsampling,
and a tiny Talker that keeps speaking until its frame limit (random weights stop at random)."""

from __future__ import annotations

import contextlib

import torch


@torch.no_grad()
def loud(code2wav: torch.nn.Module, gain: float = 0.6, seed: int = 0) -> torch.nn.Module:
    """Redraw a random Code2Wav's matrices at std gain/sqrt(fan_in) and its scales at 1: the config's init makes
    |wav| ~ 1e-6, too quiet for comparing decodes (gain 1 saturates the clamp)."""
    g = torch.Generator().manual_seed(seed)
    for name, p in code2wav.named_parameters():
        if p.dim() >= 2 and "code_embedding" not in name:
            p.copy_(torch.randn(p.shape, generator=g) * gain * p[0].numel() ** -0.5)
        elif name.endswith("gamma") or "scale" in name:
            p.fill_(1.0)
    return code2wav


def code2wav_24k(seed: int = 0) -> torch.nn.Module:
    """A small random Code2Wav with the release's upsampling (2*2 * 8*5*4*3 = 1920 samples a frame) and sliding
    window structure; the tiny model's own upsamples by 8 only."""
    from transformers.models.qwen3_omni_moe.configuration_qwen3_omni_moe import Qwen3OmniMoeCode2WavConfig
    from transformers.models.qwen3_omni_moe.modeling_qwen3_omni_moe import Qwen3OmniMoeCode2Wav

    cfg = Qwen3OmniMoeCode2WavConfig(codebook_size=64, num_quantizers=4, hidden_size=32, num_attention_heads=4,
                                     num_key_value_heads=4, intermediate_size=64, num_hidden_layers=2,
                                     sliding_window=8, upsample_rates=[8, 5, 4, 3], upsampling_ratios=[2, 2],
                                     decoder_dim=64, max_position_embeddings=512,
                                     rope_parameters=dict(rope_type="default", rope_theta=10000.0))
    torch.manual_seed(seed)
    return loud(Qwen3OmniMoeCode2Wav(cfg).eval(), seed=seed)


@contextlib.contextmanager
def talker_never_stops(model: torch.nn.Module):
    """The Talker's end-of-speech logit at -inf: it speaks until talker_max_new_tokens, a known length."""
    talker = model.talker
    eos = talker.config.codec_eos_token_id

    def no_eos(module, args, out):
        out[..., eos] = float("-inf")
        return out

    hook = talker.codec_head.register_forward_hook(no_eos)
    try:
        yield
    finally:
        hook.remove()


@contextlib.contextmanager
def captured_frames(model: torch.nn.Module):
    """Every codec frame the Talker completes during the block ([num_code_groups] each), in order."""
    frames: list[torch.Tensor] = []

    def grab(module, args, kwargs):
        if kwargs.get("residual_codes") is not None:
            frames.append(kwargs["residual_codes"][0].clone())

    hook = model.talker.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        yield frames
    finally:
        hook.remove()
