"""The fused router swap keeps the Thinker's function: same math as transformers' top-k router."""
import torch
from model_helpers import batch, tiny_thinker

from omnitune.kernels.router import disable_fused_router, enable_fused_router, top_k_softmax


def test_enable_fused_router_swaps_every_router_and_keeps_logits_and_gradients():
    model = tiny_thinker("omnitune")
    inputs = batch()
    ref = model(**inputs).logits
    ref_grads = torch.autograd.grad(ref.square().mean(), [m.weight for m in model.modules()
                                                          if type(m).__name__.endswith("TopKRouter")])
    n = enable_fused_router(model)
    assert n == model.config.text_config.num_hidden_layers
    out = model(**inputs).logits
    grads = torch.autograd.grad(out.square().mean(), [m.weight for m in model.modules()
                                                      if type(m).__name__.endswith("TopKRouter")])
    assert torch.equal(out, ref)
    for a, b in zip(grads, ref_grads):
        assert torch.equal(a, b)
    assert disable_fused_router(model) == n
    assert disable_fused_router(model) == 0


def test_top_k_softmax_is_the_transformers_router_math():
    from transformers.models.qwen3_omni_moe.modeling_qwen3_omni_moe import Qwen3OmniMoeThinkerTextTopKRouter

    model = tiny_thinker("omnitune")
    router = next(m for m in model.modules() if isinstance(m, Qwen3OmniMoeThinkerTextTopKRouter))
    x = torch.randn(9, router.hidden_dim, dtype=router.weight.dtype)
    logits, scores, indices = router(x)
    got_scores, got_indices = top_k_softmax(logits, router.top_k, router.norm_topk_prob)
    assert torch.equal(got_indices, indices) and torch.equal(got_scores, scores)
