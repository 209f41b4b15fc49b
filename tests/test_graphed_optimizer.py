"""train/graphed_optimizer.py: torchao's low-bit AdamW stepped as before, a flagged step skipped on the device, and
on a GPU the step replayed as a CUDA graph with the eager step's results."""
import pytest
import torch
from torchao.optim import AdamW4bit, AdamW8bit

from omnitune.train.graphed_optimizer import device_stepped
from omnitune.train.guard import NonFiniteGuard

GPU = torch.cuda.is_available()


@pytest.fixture
def eager_torchao(monkeypatch):
    """torchao compiles its per-tensor step; on a CPU that is minutes of C++ for nothing these tests look at."""
    if not GPU:
        monkeypatch.setattr(torch, "compile", lambda fn=None, **kwargs: fn)


def params(device: str, dtype: torch.dtype = torch.float32) -> list[torch.nn.Parameter]:
    g = torch.Generator().manual_seed(0)
    return [torch.nn.Parameter(torch.randn(*shape, generator=g).to(device, dtype)) for shape in ((256, 32), (64, 128))]


def fixed_grads(ps: list[torch.Tensor], step: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(100 + step)
    return [torch.randn(p.shape, generator=g).to(p.device, p.dtype) for p in ps]


def run(cls, device: str, steps: int, bad: set[int] = frozenset(), static: bool = True):
    """`steps` steps of `cls` over `params`, the gradients written into the same tensors each step (as the graphed
    micro-step leaves them) or new ones at new addresses (all kept alive, so no address comes back); a guard flags
    the steps in `bad` (their gradients NaN)."""
    ps = params(device)
    opt = cls([{"params": ps, "weight_decay": 0.01}], lr=1e-2)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + s))
    guard = NonFiniteGuard(patience=5, device=device, lr=1e-2, report=lambda _: None)
    guard.attach(opt)
    holders = [torch.zeros_like(p) for p in ps]
    kept = []
    for step in range(steps):
        grads = fixed_grads(ps, step)
        kept.append(grads)
        if step in bad:
            grads[0][0, 0] = float("nan")
        for p, h, g in zip(ps, holders, grads):
            if static:
                h.copy_(g)
                p.grad = h
            else:
                p.grad = g
        norm = torch.nn.utils.clip_grad_norm_(ps, 1e9)
        guard.observe(norm, torch.tensor(1.0, device=device))
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
    return ps, opt


@pytest.mark.parametrize("cls", [AdamW8bit, AdamW4bit], ids=["8bit", "4bit"])
def test_good_steps_are_torchaos_own(eager_torchao, cls):
    device = "cuda" if GPU else "cpu"
    plain, plain_opt = run(cls, device, 5)
    ours, opt = run(device_stepped(cls), device, 5)
    assert type(opt).__name__ == cls.__name__ and isinstance(opt, cls)
    for a, b in zip(plain, ours):
        torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-7)
    assert [float(s["step"]) for s in opt.state.values()] == [5.0, 5.0]
    if GPU:
        assert opt.replays == 3  # steps 3-5: captured at the third (its addresses seen at the second), replayed


def test_a_flagged_step_leaves_weights_and_step_counts_as_they_were(eager_torchao):
    """The guard's flag is read on the device (the guard does not wrap the step); the weights after a bad step
    are bitwise those before it, in fp32 as in bf16 with stochastic rounding."""
    device = "cuda" if GPU else "cpu"
    cls = device_stepped(AdamW8bit)
    for dtype in (torch.float32, torch.bfloat16):
        ps = params(device, dtype)
        opt = cls(ps, lr=1e-2, bf16_stochastic_round=True)
        guard = NonFiniteGuard(patience=5, device=device, lr=1e-2, report=lambda _: None)
        guard.attach(opt)
        assert guard.on_device
        holders = [torch.zeros_like(p) for p in ps]
        for step in range(6):
            for p, h, g in zip(ps, holders, fixed_grads(ps, step)):
                h.copy_(g)
                p.grad = h
            if step == 4:
                ps[1].grad[3, 3] = float("inf")
            before = [p.detach().clone() for p in ps]
            guard.observe(torch.nn.utils.clip_grad_norm_(ps, 1e9), None)
            opt.step()
            moved = [not torch.equal(p, b) for p, b in zip(ps, before)]
            assert moved == ([False, False] if step == 4 else [True, True]), (dtype, step)
            assert all(torch.isfinite(p).all() for p in ps)
        assert [float(s["step"]) for s in opt.state.values()] == [5.0, 5.0]
        if GPU:
            assert opt.replays == 4  # steps 3-6, the flagged one included


def test_new_gradient_tensors_each_step_run_eagerly_with_the_same_result(eager_torchao):
    device = "cuda" if GPU else "cpu"
    cls = device_stepped(AdamW8bit)
    static, opt = run(cls, device, 5, bad={3})
    fresh, fresh_opt = run(cls, device, 5, bad={3}, static=False)
    for a, b in zip(static, fresh):
        torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-7)
    assert fresh_opt.replays == 0 and not fresh_opt._graphs
    if GPU:
        assert opt.replays == 3


def test_two_gradient_buffers_in_turn_step_as_torchao_does(eager_torchao):
    """Two sets of gradient tensors used in turn (two graph buckets without accumulation): on a GPU each set gets
    its graph, the two sharing one memory pool, and the weights are torchao's own after every step."""
    device = "cuda" if GPU else "cpu"
    ps, plain = params(device), params(device)
    opt, ref = device_stepped(AdamW8bit)(ps, lr=1e-2), AdamW8bit(plain, lr=1e-2)
    holders = [[torch.zeros_like(p) for p in ps] for _ in range(2)]
    for step in range(8):
        grads = fixed_grads(ps, step)
        for p, h, g in zip(ps, holders[step % 2], grads):
            h.copy_(g)
            p.grad = h
        for p, g in zip(plain, grads):
            p.grad = g
        opt.step()
        ref.step()
        for a, b in zip(plain, ps):
            torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-7)
    if GPU:
        assert len(opt._graphs) == 2 and opt.replays == 6  # steps 3-8: each set captured on its second sighting


def test_a_loaded_state_dict_resumes_the_same_curve(eager_torchao):
    """A checkpoint of the plain torchao class loads into ours (and the graphs are recaptured)."""
    device = "cuda" if GPU else "cpu"
    ps, opt = run(AdamW8bit, device, 3)
    reference, _ = run(AdamW8bit, device, 5)
    ours = device_stepped(AdamW8bit)(ps, lr=1e-2)
    ours.load_state_dict(opt.state_dict())
    sched = torch.optim.lr_scheduler.LambdaLR(ours, lambda s: 1.0 / (1 + s))
    for _ in range(3):
        sched.step()
    for step in (3, 4):
        for p, g in zip(ps, fixed_grads(ps, step)):
            p.grad = g
        torch.nn.utils.clip_grad_norm_(ps, 1e9)
        ours.step()
        sched.step()
    for a, b in zip(reference, ps):
        torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-7)
