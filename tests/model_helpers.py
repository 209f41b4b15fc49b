"""Shared test helpers: a tiny fp64 Thinker from the real classes, LoRA configs, batches and comparisons, the
run-directory readers, and what tests need that src must not carry (random LoRA factors)."""
from __future__ import annotations

import contextlib
import json
from pathlib import Path

import torch
from peft import LoraConfig
from transformers import Qwen3OmniMoeThinkerConfig, Qwen3OmniMoeThinkerForConditionalGeneration

from omnitune.kernels import register_experts_implementation

LAYERS, EXPERTS, VOCAB, HIDDEN = 2, 8, 256, 64


def tiny_thinker(experts_implementation="eager"):
    """A ~1M-parameter Thinker from the real classes (2 MoE layers, 8 experts top-2), fp64, random weights."""
    text = dict(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=128, num_hidden_layers=LAYERS,
                num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_experts=EXPERTS, num_experts_per_tok=2,
                moe_intermediate_size=32, decoder_sparse_step=1, mlp_only_layers=[], norm_topk_prob=True,
                router_aux_loss_coef=0.001, max_position_embeddings=512, pad_token_id=0,
                rope_parameters=dict(rope_type="default", rope_theta=1e6, mrope_section=[4, 2, 2], interleaved=True,
                                     mrope_interleaved=True))
    audio = dict(num_mel_bins=128, d_model=32, encoder_layers=1, encoder_attention_heads=4, encoder_ffn_dim=64,
                 output_dim=HIDDEN, downsample_hidden_size=16, n_window=50, n_window_infer=800, max_source_positions=1500)
    vision = dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=4, in_channels=3, patch_size=16,
                  temporal_patch_size=2, spatial_merge_size=2, out_hidden_size=HIDDEN, num_position_embeddings=64,
                  deepstack_visual_indexes=[0])
    cfg = Qwen3OmniMoeThinkerConfig(text_config=text, audio_config=audio, vision_config=vision, audio_token_id=250,
                                    image_token_id=251, video_token_id=252, audio_start_token_id=253,
                                    audio_end_token_id=254, vision_start_token_id=255, vision_end_token_id=249,
                                    user_token_id=5, position_id_per_seconds=13)
    model = Qwen3OmniMoeThinkerForConditionalGeneration(cfg).double()
    with torch.no_grad():
        for layer in model.model.language_model.layers:
            layer.mlp.experts.gate_up_proj.normal_(0, 0.1)
            layer.mlp.experts.down_proj.normal_(0, 0.1)
            layer.mlp.gate.weight.normal_(0, 0.5)
    register_experts_implementation("omnitune")
    model.set_experts_implementation(experts_implementation)
    return model


def expert_param_paths():
    return [f"model.language_model.layers.{i}.mlp.experts.{p}" for i in range(LAYERS) for p in ("gate_up_proj", "down_proj")]


def lora_config(router=False):
    targets = expert_param_paths() + ([f"model.language_model.layers.{i}.mlp.gate.weight" for i in range(LAYERS)] if router else [])
    attn = [f"model.language_model.layers.{i}.self_attn.{p}" for i in range(LAYERS) for p in ("q_proj", "v_proj")]
    # init_lora_weights=False: B is random too, so the LoRA terms are non-zero and actually compared
    return LoraConfig(r=4, lora_alpha=8, target_modules=attn, target_parameters=targets, init_lora_weights=False)


def batch():
    ids = torch.randint(10, 240, (2, 12))
    mask = torch.ones_like(ids)
    labels = ids.clone()
    labels[:, :3] = -100
    return dict(input_ids=ids, attention_mask=mask, labels=labels)


def loss_logits_grads(model, inputs):
    model.zero_grad(set_to_none=True)
    out = model(**inputs)
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return out.logits.detach(), grads


def assert_same(a, b, tol=1e-9):
    logits_a, grads_a = a
    logits_b, grads_b = b
    assert torch.allclose(logits_a, logits_b, atol=tol, rtol=tol), (logits_a - logits_b).abs().max()
    assert grads_a.keys() == grads_b.keys() and grads_a
    for name in grads_a:
        assert torch.allclose(grads_a[name], grads_b[name], atol=tol, rtol=tol), name


@torch.no_grad()
def randomize_lora(model: torch.nn.Module, std: float = 0.02, seed: int = 0) -> None:
    """Give lora_B non-zero values (PEFT inits it to zero) so tests can tell an adapter from none."""
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            p.copy_(torch.randn(p.shape, generator=g) * std)


@contextlib.contextmanager
def interrupted_at(step: int):
    """Within: training raises KeyboardInterrupt (a user's Ctrl-C) as optimizer step `step` + 1 begins."""
    from omnitune.train.trainer import OmniTrainer

    original = OmniTrainer.training_step

    def interrupt(self, *args, **kwargs):
        if self.state.global_step == step:
            raise KeyboardInterrupt
        return original(self, *args, **kwargs)

    OmniTrainer.training_step = interrupt
    try:
        yield
    finally:
        OmniTrainer.training_step = original


def logged_losses(run_dir: Path) -> list[tuple[int, float]]:
    """(step, loss) of every training log in RUN/metrics.jsonl."""
    rows = [json.loads(x) for x in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"]) for r in rows if "loss" in r]


def fast_expert_lora_enabled(model: torch.nn.Module) -> bool:
    """True when at least one PEFT experts wrapper of `model` runs the omnitune path."""
    from peft.tuners.lora.layer import ParamWrapper

    return any(getattr(m, "_omnitune_fast_lora", False) for m in model.modules() if isinstance(m, ParamWrapper))


def quantized_experts(model: torch.nn.Module) -> int:
    """How many experts modules of `model` run on NF4 weights."""
    from omnitune.model.qlora import nf4_expert_weight

    return sum(getattr(m, "omnitune_weight_provider", None) is nf4_expert_weight for m in model.modules())


def tensor_layout(checkpoint: str | Path) -> dict[str, tuple[tuple[int, ...], str]]:
    """name -> (shape, dtype) of every tensor in a safetensors checkpoint directory (sharded or not)."""
    from safetensors import safe_open

    out: dict[str, tuple[tuple[int, ...], str]] = {}
    for shard in sorted(Path(checkpoint).glob("*.safetensors")):
        with safe_open(str(shard), "pt") as f:
            for k in f.keys():
                sl = f.get_slice(k)
                out[k] = (tuple(sl.get_shape()), sl.get_dtype())
    return out

