"""What the GPU benchmarks share: the real-width Thinker config with random weights built on the device, the MFU
definition, and the wheels-carried environment check. Real widths: hidden 2048, 32/4 heads of 128, 128 experts
top-8, moe_intermediate 768, vocab 152064 (../shared/QWEN3_OMNI_NOTES.md); towers tiny unless asked for (text steps
never run them). BENCH_TINY=1 shrinks every width so the scripts dry-run on a CPU.
"""
from __future__ import annotations

import os

import torch

PEAK_FLOPS = 770e12  # issue 3's constant: an H100's bf16 dense matmul rate as measured (an H200 gives ~790e12)
REAL = dict(hidden=2048, heads=32, kv_heads=4, head_dim=128, experts=128, top_k=8, moe_inter=768, vocab=152064,
            mrope=[24, 20, 20])
if os.environ.get("BENCH_TINY"):
    REAL.update(hidden=128, heads=4, kv_heads=2, head_dim=32, experts=16, top_k=4, moe_inter=64, mrope=[6, 5, 5])
# real-width audio and vision towers (QWEN3_OMNI_NOTES.md), for steps whose batches carry media
REAL_AUDIO = dict(num_mel_bins=128, d_model=1280, encoder_layers=32, encoder_attention_heads=20, encoder_ffn_dim=5120,
                  downsample_hidden_size=480, n_window=50, n_window_infer=800, max_source_positions=1500)
REAL_VISION = dict(depth=27, hidden_size=1152, intermediate_size=4304, num_heads=16, in_channels=3, patch_size=16,
                   temporal_patch_size=2, spatial_merge_size=2, num_position_embeddings=2304,
                   deepstack_visual_indexes=[8, 16, 24])


def thinker_config(layers: int, real_towers: bool = False, **over):
    """The Thinker's config at the real text widths; the towers tiny (or real with `real_towers`)."""
    from transformers import Qwen3OmniMoeThinkerConfig

    r = dict(REAL, **over)
    text = dict(vocab_size=r["vocab"], hidden_size=r["hidden"], intermediate_size=6144, num_hidden_layers=layers,
                num_attention_heads=r["heads"], num_key_value_heads=r["kv_heads"], head_dim=r["head_dim"],
                num_experts=r["experts"], num_experts_per_tok=r["top_k"], moe_intermediate_size=r["moe_inter"],
                decoder_sparse_step=1, mlp_only_layers=[], norm_topk_prob=True, router_aux_loss_coef=0.001,
                max_position_embeddings=65536, rms_norm_eps=1e-6, pad_token_id=151645,
                rope_parameters=dict(rope_type="default", rope_theta=1e6, mrope_section=r["mrope"],
                                     interleaved=True, mrope_interleaved=True))
    audio = dict(REAL_AUDIO) if real_towers else dict(
        num_mel_bins=128, d_model=32, encoder_layers=1, encoder_attention_heads=4, encoder_ffn_dim=64,
        downsample_hidden_size=16, n_window=50, n_window_infer=800, max_source_positions=1500)
    vision = dict(REAL_VISION) if real_towers else dict(
        depth=1, hidden_size=32, intermediate_size=64, num_heads=4, in_channels=3, patch_size=16,
        temporal_patch_size=2, spatial_merge_size=2, num_position_embeddings=64, deepstack_visual_indexes=[0])
    audio["output_dim"] = vision["out_hidden_size"] = r["hidden"]
    return Qwen3OmniMoeThinkerConfig(text_config=text, audio_config=audio, vision_config=vision,
                                     audio_token_id=151675, image_token_id=151655, video_token_id=151656,
                                     audio_start_token_id=151669, audio_end_token_id=151670,
                                     vision_start_token_id=151652, vision_end_token_id=151653, user_token_id=872,
                                     position_id_per_seconds=13)


@torch.no_grad()
def fill_random_(module: torch.nn.Module, std: float = 0.02) -> None:
    """In-place random init on the device: norms to 1, everything else N(0, std); nothing touches the CPU."""
    for name, p in module.named_parameters():
        if p.dim() == 1 and "norm" in name:
            p.fill_(1.0)
        else:
            p.normal_(0.0, std)


def build_on_device(cls, cfg, device: str, dtype: torch.dtype = torch.bfloat16):
    """`cls(cfg)` created directly on `device` in `dtype`, with random weights (no host copy of 30B values)."""
    from transformers.initialization import no_init_weights

    prev = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device), no_init_weights():
            model = cls(cfg)
    finally:
        torch.set_default_dtype(prev)
    fill_random_(model)
    return model


def active_params(text_config) -> float:
    """Parameters one token uses in the Thinker's decoder and head (embeddings excluded): attention, router, the
    top-k of the routed experts, and the vocabulary projection. 3.042e9 at the real 48-layer size (issue 3)."""
    c = text_config
    attn = c.hidden_size * c.head_dim * (2 * c.num_attention_heads + 2 * c.num_key_value_heads)
    experts = c.num_experts_per_tok * 3 * c.hidden_size * c.moe_intermediate_size
    router = c.hidden_size * c.num_experts
    return c.num_hidden_layers * (attn + experts + router) + c.hidden_size * c.vocab_size


def mfu(tok_s: float, active: float) -> float:
    """Model FLOPs utilisation of LoRA training: forward + backward counted as 4 x active params per token."""
    return tok_s * 4 * active / PEAK_FLOPS
