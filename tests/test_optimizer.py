"""MultiTensorAdamW (train/optimizer.py): chosen for CUDA fp32 adapters only; elsewhere it is torch's AdamW step.
The kernel itself runs under triton's interpreter in tests/test_triton_kernels.py; on a GPU (skipped elsewhere)
the whole optimizer against torch's fused AdamW."""
import pytest
import torch
from transformers import TrainingArguments

from omnitune.kernels.adamw import BLOCK, _Tables
from omnitune.model.adapters import apply_adapters
from omnitune.model.tiny import build_tiny_model
from omnitune.recipe import AdapterConfig
from omnitune.train.optimizer import MultiTensorAdamW, kernel_applies
from omnitune.train.trainer import OmniTrainer


def lora_thinker(device: str):
    thinker = build_tiny_model(seed=0).thinker.to(device)
    return apply_adapters(thinker, AdapterConfig(rank=4, alpha=8, targets=["attention", "experts"]))


def test_the_trainer_keeps_hf_adamw_where_the_kernel_does_not_apply(tmp_path):
    model = lora_thinker("cpu")
    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[])
    cls, kwargs = OmniTrainer.get_optimizer_cls_and_kwargs(args, model)
    assert cls is torch.optim.AdamW and not kernel_applies(p for p in model.parameters() if p.requires_grad)
    assert not kernel_applies([torch.zeros(3, device="meta")]) and not kernel_applies([])


def test_off_cuda_it_is_torch_adamw_step_for_step():
    """CPU tensors never reach the kernel: torch's own step runs, with HF's fused=True request dropped."""
    torch.manual_seed(0)
    init = [torch.randn(5, 3), torch.randn(7)]
    mine, theirs = ([torch.nn.Parameter(t.clone()) for t in init] for _ in range(2))
    a = MultiTensorAdamW(mine, lr=1e-2, weight_decay=0.1, fused=True)
    b = torch.optim.AdamW(theirs, lr=1e-2, weight_decay=0.1)
    for _ in range(3):
        for x, y in zip(mine, theirs):
            x.grad = torch.randn_like(x)
            y.grad = x.grad.clone()
        a.step()
        b.step()
    for x, y in zip(mine, theirs):
        assert torch.equal(x, y)
    assert a.state_dict()["state"][0]["step"].item() == 3


def test_the_kernel_tables_list_every_block_once_and_are_rebuilt_only_for_new_addresses():
    """Eager gradients are new tensors every step: only the small address table may be rebuilt then, not the block
    table (~0.6M blocks for the Thinker's LoRA, which took ~0.3 s of host time per step built in Python)."""
    sizes = [(3, BLOCK + 5), (7,), (2 * BLOCK,)]
    tables = _Tables()
    states = [[torch.zeros(s) for s in sizes] for _ in range(3)]
    grads = [[torch.zeros(s) for s in sizes] for _ in range(2)]  # both alive: two sets of addresses
    first = tables.get([grads[0], *states])
    second = tables.get([grads[1], *states])
    addresses, block_tensor, block_start, numels = first
    assert block_tensor.tolist() == [0, 0, 0, 0, 1, 2, 2]
    assert block_start.tolist() == [0, BLOCK, 2 * BLOCK, 3 * BLOCK, 0, 0, BLOCK]
    assert numels.tolist() == [3 * BLOCK + 15, 7, 2 * BLOCK] and addresses.shape == (12,)
    assert all(a is b for a, b in zip(first[1:], second[1:])) and not torch.equal(first[0], second[0])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the kernel runs on CUDA")
def test_on_cuda_the_trainer_picks_it_and_it_matches_torch_adamw(tmp_path):
    """Against torch's foreach AdamW to fp32 rounding, and its fused AdamW (HF's default) in the parameters: the fused
    kernel rounds 1 - beta2 in fp32 (1 - 0.999f), so its exp_avg_sq sits 1.3e-5 relative below the other two."""
    model = lora_thinker("cuda")
    args = TrainingArguments(output_dir=str(tmp_path), report_to=[])
    cls, kwargs = OmniTrainer.get_optimizer_cls_and_kwargs(args, model)
    assert cls is MultiTensorAdamW
    params = [p for p in model.parameters() if p.requires_grad]
    foreach, fused = ([torch.nn.Parameter(p.detach().clone()) for p in params] for _ in range(2))

    def groups(ps):
        return [dict(params=ps[::2]), dict(params=ps[1::2], weight_decay=0.0)]

    optimizers = [cls(groups(params), **{**kwargs, "lr": 1e-3}, weight_decay=0.05),
                  torch.optim.AdamW(groups(foreach), lr=1e-3, weight_decay=0.05, foreach=True),
                  torch.optim.AdamW(groups(fused), lr=1e-3, weight_decay=0.05, fused=True)]
    held = [torch.randn_like(p) for p in params]  # a graph's gradient outputs: the same tensors every step
    for step in range(4):
        for p, f, u, h in zip(params, foreach, fused, held):
            g = h.normal_() if step % 2 else torch.randn_like(p)  # eager steps: new tensors
            p.grad, f.grad, u.grad = g, g.clone(), g.clone()
        for opt in optimizers:
            opt.step()
    mine, theirs, _ = optimizers
    for p, f, u in zip(params, foreach, fused):
        torch.testing.assert_close(p.detach(), f.detach(), rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(p.detach(), u.detach(), rtol=1e-6, atol=1e-7)
        for key in ("exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(mine.state[p][key], theirs.state[f][key], rtol=1e-6, atol=1e-9)
    resumed = cls(groups(params), lr=1e-3, weight_decay=0.05)  # from the fused AdamW's checkpoint
    resumed.load_state_dict(optimizers[2].state_dict())
    assert all(s["step"].device.type == "cpu" and s["step"].item() == 4 for s in resumed.state.values())
    assert all(resumed._kernel_params(i, group) for i, group in enumerate(resumed.param_groups))
