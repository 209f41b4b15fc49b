"""Chunked linear + cross-entropy equals full-logits cross-entropy per token, forward and backward."""
import pytest
import torch

from omnitune.kernels.loss import chunked_linear_cross_entropy, reference_linear_cross_entropy


def make_inputs(n=53, hidden=24, vocab=97, dtype=torch.float64):
    h = torch.randn(n, hidden, dtype=dtype, requires_grad=True)
    w = (torch.randn(vocab, hidden, dtype=dtype) / hidden**0.5).requires_grad_(True)
    labels = torch.randint(0, vocab, (n,))
    labels[torch.rand(n) < 0.3] = -100
    return h, w, labels


@pytest.mark.parametrize("chunk_size", [1, 7, 16, 1000])
def test_per_token_loss_and_grads_match_full_logits(chunk_size):
    h, w, labels = make_inputs()
    g = torch.rand(h.shape[0], dtype=h.dtype)  # per-sample weights, as the trainer applies them
    fast = chunked_linear_cross_entropy(h, w, labels, chunk_size=chunk_size)
    ref = reference_linear_cross_entropy(h, w, labels)
    assert fast.dtype == torch.float32 and fast.shape == labels.shape
    assert torch.allclose(fast.double(), ref.double(), atol=1e-5)
    gf = torch.autograd.grad((fast * g).sum(), (h, w))
    gr = torch.autograd.grad((ref * g).sum(), (h, w))
    for a, b in zip(gf, gr):
        assert torch.allclose(a, b, atol=1e-5)


def test_ignored_tokens_have_zero_loss_and_zero_hidden_grad():
    h, w, labels = make_inputs()
    labels[:10] = -100
    loss = chunked_linear_cross_entropy(h, w, labels, chunk_size=8)
    assert torch.all(loss[:10] == 0)
    (gh,) = torch.autograd.grad(loss.sum(), h)
    assert torch.all(gh[:10] == 0)


def test_frozen_head_gets_no_weight_grad_and_bf16_is_close():
    h, w, labels = make_inputs(n=64, hidden=32, vocab=200)
    ref = reference_linear_cross_entropy(h, w, labels)
    (g_ref,) = torch.autograd.grad(ref.sum(), h)
    h16 = h.detach().bfloat16().requires_grad_(True)
    w16 = w.detach().bfloat16()  # frozen lm_head
    fast = chunked_linear_cross_entropy(h16, w16, labels, chunk_size=16)
    (g16,) = torch.autograd.grad(fast.sum(), h16)
    assert (fast.double() - ref).norm() / ref.norm() < 1e-2
    assert (g16.double() - g_ref).norm() / g_ref.norm() < 2e-2


@pytest.mark.parametrize("chunk_size", [5, 64])
def test_frozen_head_forms_hidden_grad_in_forward_and_matches_reference(chunk_size):
    h, w, labels = make_inputs()
    w = w.detach()  # frozen lm_head: the single-pass path
    g = torch.randn(h.shape[0], dtype=h.dtype)
    fast = chunked_linear_cross_entropy(h, w, labels, chunk_size=chunk_size)
    ref = reference_linear_cross_entropy(h, w, labels)
    assert torch.allclose(fast.double(), ref.double(), atol=1e-5)
    (gf,) = torch.autograd.grad((fast * g).sum(), h)
    (gr,) = torch.autograd.grad((ref * g).sum(), h)
    assert torch.allclose(gf, gr, atol=1e-5)
