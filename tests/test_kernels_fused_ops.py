"""Fused norm / SwiGLU / rotary swaps keep the model's function; their math is transformers' own."""
import torch
from model_helpers import batch, tiny_thinker

from omnitune.kernels.fused_ops import (
    disable_fused_norms,
    disable_fused_rope,
    enable_fused_norms,
    enable_fused_rope,
    gather_sum,
    rms_norm,
    weighted_swiglu,
    weighted_swiglu_reference,
)


def test_rms_norm_matches_the_transformers_module():
    from transformers.models.qwen3_omni_moe.modeling_qwen3_omni_moe import Qwen3OmniMoeThinkerTextRMSNorm

    norm = Qwen3OmniMoeThinkerTextRMSNorm(32, eps=1e-6)
    with torch.no_grad():
        norm.weight.normal_()
    x = torch.randn(3, 5, 32, dtype=torch.bfloat16)
    assert torch.equal(rms_norm(x, norm.weight, norm.variance_epsilon), norm(x))


def test_swiglu_is_silu_gate_times_up():
    gu = torch.randn(7, 10, dtype=torch.float64)
    ones = torch.ones(7, dtype=torch.float64)  # routing weight 1: the plain SwiGLU of the [gate | up] layout
    assert torch.allclose(weighted_swiglu(gu, ones), torch.nn.functional.silu(gu[:, :5]) * gu[:, 5:])
    assert torch.equal(weighted_swiglu(gu, ones), weighted_swiglu_reference(gu, ones))


def test_enable_fused_norms_swaps_every_thinker_norm_and_keeps_logits():
    model = tiny_thinker("omnitune")
    inputs = batch()
    with torch.no_grad():
        ref = model(**inputs).logits
        n = enable_fused_norms(model)
        assert n >= 4 * 2 + 1  # per layer: input, post-attention, q_norm, k_norm; plus the final norm
        assert torch.equal(model(**inputs).logits, ref)
        assert disable_fused_norms(model) == n


def test_fused_norms_fuse_each_decoder_layers_residual_add_and_keep_gradients():
    model = tiny_thinker("omnitune")
    inputs = batch()
    params = [p for p in model.parameters() if p.requires_grad]
    ref = torch.autograd.grad(model(**inputs).logits.square().mean(), params, allow_unused=True)
    from transformers.models.qwen3_omni_moe.modeling_qwen3_omni_moe import Qwen3OmniMoeThinkerTextDecoderLayer as Layer

    enable_fused_norms(model)
    layers = model.model.language_model.layers
    # the decoder layers' forwards are swapped too
    assert all(type(layer).forward is not Layer.forward for layer in layers)
    got = torch.autograd.grad(model(**inputs).logits.square().mean(), params, allow_unused=True)
    for a, b in zip(got, ref):
        assert (a is None) == (b is None) and (a is None or torch.equal(a, b))
    disable_fused_norms(model)
    assert all(type(layer) is Layer for layer in layers)


def test_fused_rope_patch_keeps_logits_and_is_reversible():
    from transformers.models.qwen3_omni_moe import modeling_qwen3_omni_moe as modeling

    original = modeling.apply_rotary_pos_emb
    model = tiny_thinker("omnitune")
    inputs = batch()
    with torch.no_grad():
        ref = model(**inputs).logits
        enable_fused_rope()
        try:
            assert modeling.apply_rotary_pos_emb is not original
            assert torch.equal(model(**inputs).logits, ref)
        finally:
            disable_fused_rope()
    assert modeling.apply_rotary_pos_emb is original


def test_weighted_swiglu_backward_is_the_gradient_of_its_forward():
    """The hand-written backward (one Triton kernel on CUDA, the reference here) against autograd of the forward."""
    torch.manual_seed(0)
    gate_up = torch.randn(37, 12, dtype=torch.float64, requires_grad=True)
    w = torch.rand(37, dtype=torch.float64, requires_grad=True)
    grad_h = torch.randn(37, 6, dtype=torch.float64)
    ref = weighted_swiglu_reference(gate_up, w)
    expected = torch.autograd.grad((ref * grad_h).sum(), (gate_up, w))
    out = weighted_swiglu(gate_up, w)
    got = torch.autograd.grad((out * grad_h).sum(), (gate_up, w))
    torch.testing.assert_close(out, ref)
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b)
    gate, up = gate_up.chunk(2, dim=-1)
    torch.testing.assert_close(ref, torch.nn.functional.silu(gate) * up * w[:, None])


def test_gather_sum_undoes_the_permutation_and_sums_each_tokens_slots():
    torch.manual_seed(0)
    tokens, top_k = 5, 3
    perm = torch.randperm(tokens * top_k)
    inv = torch.empty_like(perm)
    inv[perm] = torch.arange(perm.numel())
    rows = torch.randn(tokens * top_k, 4, dtype=torch.float64)
    expected = torch.stack([sum(rows[inv[t * top_k + k]] for k in range(top_k)) for t in range(tokens)])
    torch.testing.assert_close(gather_sum(inv, top_k, rows), expected)


def test_fused_norms_keep_gradient_checkpointing_of_the_decoder_layers():
    """transformers 5.23 checkpoints a layer inside its class's `forward`; the fused layer forward must checkpoint
    too: under checkpointing each layer's body runs again in the backward (the recompute), and the gradients stay."""
    from transformers.models.qwen3_omni_moe.modeling_qwen3_omni_moe import Qwen3OmniMoeThinkerTextAttention

    model = tiny_thinker("omnitune")
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    inputs = batch()
    params = [p for p in model.parameters() if p.requires_grad]
    ref = torch.autograd.grad(model(**inputs).logits.square().mean(), params, allow_unused=True)
    enable_fused_norms(model)
    calls = []
    hooks = [m.register_forward_hook(lambda *_: calls.append(1)) for m in model.modules()
             if isinstance(m, Qwen3OmniMoeThinkerTextAttention)]
    loss = model(**inputs).logits.square().mean()
    forward_calls = len(calls)
    got = torch.autograd.grad(loss, params, allow_unused=True)
    for h in hooks:
        h.remove()
    assert forward_calls == len(model.model.language_model.layers)
    assert len(calls) == 2 * forward_calls  # recomputed in the backward: the layers are still checkpointed
    for a, b in zip(got, ref):
        assert (a is None) == (b is None) and (a is None or torch.equal(a, b))
    from omnitune.train.checkpointing import keep_activations

    keep_activations(model, 1)  # the trainer's `uncheckpointed_layers`: the last layer is not recomputed
    calls.clear()
    hooks = [m.register_forward_hook(lambda *_: calls.append(1)) for m in model.modules()
             if isinstance(m, Qwen3OmniMoeThinkerTextAttention)]
    model(**inputs).logits.square().mean().backward()
    assert len(calls) == 2 * forward_calls - 1
