"""The omnitune experts path computes what the plain per-expert loop computes, forward and backward."""
import pytest
import torch

from omnitune.kernels.grouped_gemm import grouped_mm, grouped_mm_loop, kernel_layout
from omnitune.kernels.moe_experts import moe_experts_forward, reference_experts_forward, route


class Experts(torch.nn.Module):
    """Bare fused-experts container with the Qwen3-Omni layout (gate_up [E, 2I, H], down [E, H, I])."""

    def __init__(self, num_experts, hidden, inter, dtype):
        super().__init__()
        self.num_experts = num_experts
        self.gate_up_proj = torch.nn.Parameter(torch.randn(num_experts, 2 * inter, hidden, dtype=dtype) / hidden**0.5)
        self.down_proj = torch.nn.Parameter(torch.randn(num_experts, hidden, inter, dtype=dtype) / inter**0.5)
        self.act_fn = torch.nn.functional.silu


def make_case(num_experts=8, hidden=32, inter=16, tokens=40, top_k=2, rank=4, used_experts=5, dtype=torch.float64):
    """Random experts, inputs and LoRA factors; only the first `used_experts` experts receive tokens."""
    experts = Experts(num_experts, hidden, inter, dtype)
    x = torch.randn(tokens, hidden, dtype=dtype)
    top_k_index = torch.stack([torch.randperm(used_experts)[:top_k] for _ in range(tokens)])
    top_k_weights = torch.softmax(torch.randn(tokens, top_k, dtype=dtype), -1)

    def factors(d_in, d_out, scaling):
        return (torch.randn(num_experts, rank, d_in, dtype=dtype) * 0.3, torch.randn(num_experts, d_out, rank, dtype=dtype) * 0.3, scaling)

    lora = {"gate_up_proj": [factors(hidden, 2 * inter, 2.0)], "down_proj": [factors(inter, hidden, 0.5)]}
    return experts, x, top_k_index, top_k_weights, lora


def lora_tensors(lora):
    return [t for v in lora.values() for a, b, _ in v for t in (a, b)]


def run_both(experts, x, idx, w, lora, wrt):
    fast = moe_experts_forward(experts, x, idx, w, lora=lora)
    ref = reference_experts_forward(experts.gate_up_proj, experts.down_proj, x, idx, w, lora=lora)
    g = torch.randn_like(fast)
    return fast, ref, torch.autograd.grad((fast * g).sum(), wrt), torch.autograd.grad((ref * g).sum(), wrt)


def assert_close_all(a, b, tol=1e-9):
    for u, v in zip(a, b):
        assert torch.allclose(u, v, atol=tol, rtol=tol), (u - v).abs().max()


@pytest.mark.parametrize("dense_a_max_cols", [2048, 0], ids=["gate_up-A-dense", "gate_up-A-grouped"])
def test_frozen_base_with_lora_matches_reference_and_unused_experts_get_zero_grads(dense_a_max_cols, monkeypatch):
    monkeypatch.setattr("omnitune.kernels.moe_experts.DENSE_LORA_A_MAX_COLS", dense_a_max_cols)
    experts, x, idx, w, lora = make_case(used_experts=5)
    experts.requires_grad_(False)
    x.requires_grad_(True)
    for t in lora_tensors(lora):
        t.requires_grad_(True)
    fast, ref, gf, gr = run_both(experts, x, idx, w, lora, [x] + lora_tensors(lora))
    assert torch.allclose(fast, ref, atol=1e-10)
    assert_close_all(gf, gr)
    # experts 5..7 got no tokens: their LoRA factors get exactly zero gradient
    for grad in gf[1:]:
        assert torch.all(grad[5:] == 0)


def test_trainable_router_weights_get_the_reference_gradient():
    experts, x, idx, w, lora = make_case()
    experts.requires_grad_(False)
    w.requires_grad_(True)
    x.requires_grad_(True)
    _, _, gf, gr = run_both(experts, x, idx, w, lora, [w, x])
    assert_close_all(gf, gr)


def test_full_finetune_base_weights_get_the_reference_gradient():
    experts, x, idx, w, _ = make_case(used_experts=6)
    x.requires_grad_(True)
    w.requires_grad_(True)
    fast, ref, gf, gr = run_both(experts, x, idx, w, None, [x, w, experts.gate_up_proj, experts.down_proj])
    assert torch.allclose(fast, ref, atol=1e-10)
    assert_close_all(gf, gr)
    assert torch.all(gf[2][6:] == 0) and torch.all(gf[3][6:] == 0)


def test_bf16_matches_fp64_reference_to_bf16_tolerance():
    experts, x, idx, w, lora = make_case(hidden=64, inter=32, tokens=64, top_k=4, used_experts=8)
    ref = reference_experts_forward(experts.gate_up_proj, experts.down_proj, x, idx, w, lora=lora)
    lora16 = {k: [(a.bfloat16(), b.bfloat16(), s) for a, b, s in v] for k, v in lora.items()}
    experts16 = experts.bfloat16()
    fast = moe_experts_forward(experts16, x.bfloat16(), idx, w.bfloat16(), lora=lora16)
    rel = (fast.double() - ref).norm() / ref.norm()
    assert rel < 2e-2, rel


def test_every_token_on_one_expert_and_all_others_empty():
    experts, x, _, w, lora = make_case(top_k=1)
    idx = torch.full((x.shape[0], 1), 3)
    x.requires_grad_(True)
    _, _, gf, gr = run_both(experts, x, idx, w[:, :1], lora, [x])
    assert_close_all(gf, gr)


def test_route_sorts_once_and_offsets_count_tokens_per_expert():
    idx = torch.randint(0, 6, (50, 3))
    perm, offs = route(idx, 8)
    flat = idx.reshape(-1)
    assert torch.all(flat[perm][1:] >= flat[perm][:-1])
    assert offs.tolist() == torch.bincount(flat, minlength=8).cumsum(0).tolist()
    assert offs.dtype == torch.int32


@pytest.mark.parametrize("num_experts", [256, 300], ids=["uint8-keys", "int32-keys"])
def test_route_permutation_is_the_stable_sort_of_the_int64_indices(num_experts):
    """route sorts narrowed keys (fewer radix passes); the permutation must be exactly the stable int64 one."""
    torch.manual_seed(0)
    idx = torch.randint(0, num_experts, (500, 8))
    idx[0, 0] = num_experts - 1  # the largest expert id survives the narrowing
    perm, _ = route(idx, num_experts)
    assert torch.equal(perm, torch.sort(idx.reshape(-1), stable=True).indices)


def test_lora_factor_gradients_come_back_in_the_parameters_layout():
    """PEFT stores an expert B as [out, r*E] and the path reads it through a permuted view; the gradient for that
    view must have the view's strides, so that undoing the permute and the reshape is free (no strided copy)."""
    from omnitune.kernels.moe_experts import _CastFactors

    E, r, d_in, d_out = 4, 3, 10, 6
    a_param = torch.randn(E * r, d_in, requires_grad=True)
    b_param = torch.randn(d_out, r * E, requires_grad=True)
    a = a_param.reshape(E, r, d_in)
    b = b_param.reshape(d_out, r, E).permute(2, 0, 1)
    grads = []
    a_c, b_rows = _CastFactors.apply(torch.float64, a, b)
    assert b_rows.shape == (E, r, d_out) and b_rows.is_contiguous()
    b.register_hook(lambda g: grads.append(g))
    ga, gb = torch.randn_like(a_c), torch.randn_like(b_rows)
    (a_c * ga).sum().add((b_rows * gb).sum()).backward()
    assert grads[0].stride() == b.stride()
    torch.testing.assert_close(b_param.grad, gb.double().transpose(-2, -1).permute(1, 2, 0).reshape(d_out, r * E).float())
    torch.testing.assert_close(a_param.grad, ga.reshape(E * r, d_in).float())


@pytest.mark.parametrize("counts", [[0, 5, 0, 3], [0, 0, 0, 0], [7, 0, 0, 1]])
def test_grouped_mm_loop_handles_empty_groups(counts):
    x = torch.randn(sum(counts), 8, dtype=torch.float64)
    w = torch.randn(4, 8, 5, dtype=torch.float64)
    offs = torch.tensor(counts).cumsum(0).to(torch.int32)
    out = grouped_mm(x, w, offs)
    assert torch.equal(out, grouped_mm_loop(x, w, offs))
    start = 0
    for e, c in enumerate(counts):
        assert torch.allclose(out[start : start + c], x[start : start + c] @ w[e])
        start += c


def test_weight_provider_supplies_the_expert_weights():
    experts, x, idx, w, _ = make_case()
    stored = {n: getattr(experts, n).detach().clone() for n in ("gate_up_proj", "down_proj")}
    expected = moe_experts_forward(experts, x, idx, w)
    with torch.no_grad():  # the provider, not the parameters, must be what the path reads
        experts.gate_up_proj.zero_()
        experts.down_proj.zero_()
    calls = []

    def provider(module, name):
        calls.append(name)
        return stored[name]

    experts.omnitune_weight_provider = provider
    assert torch.allclose(moe_experts_forward(experts, x, idx, w), expected)
    assert calls == ["gate_up_proj", "down_proj"]


def test_provided_weights_are_rebuilt_for_the_backward_not_saved():
    experts, x, idx, w, _ = make_case()
    experts.requires_grad_(False)
    x.requires_grad_(True)
    expected = torch.autograd.grad(moe_experts_forward(experts, x, idx, w).sum(), x)[0]
    stored = {n: getattr(experts, n).detach().clone() for n in ("gate_up_proj", "down_proj")}
    calls = []

    def provider(module, name):
        calls.append(name)
        return stored[name]

    experts.omnitune_weight_provider = provider
    out = moe_experts_forward(experts, x, idx, w)
    assert calls == ["gate_up_proj", "down_proj"]
    (grad,) = torch.autograd.grad(out.sum(), x)
    assert sorted(calls) == ["down_proj", "down_proj", "gate_up_proj", "gate_up_proj"]  # once more each for dX
    torch.testing.assert_close(grad, expected)


def _expert_innermost(e: int, k: int, n: int, dtype=torch.float32, device="cpu") -> torch.Tensor:
    """[E, K, N] whose expert dimension is the innermost (strides [1, N*E, E]): the layout bf16 expert-LoRA weights
    reached the CUDA grouped GEMM in (an H100 refused it: "Invalid strides/sizes, got [1, 8192, 128]")."""
    return torch.randn(k, n, e, dtype=dtype, device=device).permute(2, 0, 1)


def test_kernel_layout_gives_the_cuda_kernel_a_unit_stride_and_the_same_values():
    w = _expert_innermost(8, 32, 16)
    assert 1 not in (w.stride(-1), w.stride(-2))
    fixed = kernel_layout(w)
    assert 1 in (fixed.stride(-1), fixed.stride(-2)) and torch.equal(fixed, w)
    row_major, col_major = torch.randn(8, 32, 16), torch.randn(8, 16, 32).transpose(-2, -1)
    assert kernel_layout(row_major) is row_major and kernel_layout(col_major) is col_major  # no copy needed


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the fused grouped GEMM runs on CUDA")
def test_cuda_grouped_mm_takes_expert_innermost_weights():
    counts = torch.tensor([5, 0, 40, 19, 0, 8, 0, 56])
    offs = torch.cumsum(counts, 0).to(torch.int32).cuda()
    x = torch.randn(int(counts.sum()), 64, dtype=torch.bfloat16, device="cuda")
    w = _expert_innermost(8, 64, 32, torch.bfloat16, "cuda")
    torch.testing.assert_close(grouped_mm(x, w, offs), grouped_mm_loop(x, w, offs), rtol=2e-2, atol=2e-2)
