"""GraphedGrads: without a GPU, the eager path accumulates like backward and a failed capture is reported; on a GPU
(skipped elsewhere), replayed graphs give backward's gradients through accumulation windows and shape changes."""
import pytest
import torch

from omnitune.train.cuda_graph import GraphCaptureError, GraphedGrads


def test_eager_path_accumulates_grads_like_backward_and_returns_extras():
    w = torch.nn.Parameter(torch.tensor([1.0, 2.0]))
    step = GraphedGrads(lambda x: ((w * x).sum(), x * 2), [w])
    loss, (extra,) = step(torch.tensor([3.0, 4.0]))
    assert loss.item() == 11.0 and torch.equal(extra, torch.tensor([6.0, 8.0]))
    step(torch.tensor([1.0, 1.0]))
    assert torch.equal(w.grad, torch.tensor([4.0, 5.0])) and step.eager_calls == 2 and step.replays == 0


def test_a_failed_capture_is_reported_for_an_eager_rerun(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda: None)
    step = GraphedGrads(lambda x: x.sum(), [])

    def capture(inputs, accumulates):
        raise RuntimeError("cudaErrorStreamCaptureImplicit")

    monkeypatch.setattr(step, "_capture", capture)
    on_gpu = type("OnGpu", (torch.Tensor,), {"is_cuda": property(lambda self: True)})
    x = torch.zeros(2).as_subclass(on_gpu)
    with pytest.raises(GraphCaptureError, match="capture failed.*StreamCaptureImplicit"):
        step(x)
    assert step.graphs == {} and step.eager_calls == 0


def test_the_warm_up_finds_the_reached_params_and_leaves_held_gradients_alone():
    """Before a capture the step runs once eagerly to learn which params it reaches; it drops each gradient as it
    lands (no second set beside a window's held ones) and leaves .grad as it found it."""
    used, unused = torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.ones(2))
    held = torch.full((3,), 7.0)
    used.grad = held
    step = GraphedGrads(lambda x: (used * x).sum(), [unused, used])
    assert step._reached([torch.tensor([1.0, 2.0, 3.0])]) == [1]
    assert used.grad is held and torch.equal(held, torch.full((3,), 7.0)) and unused.grad is None


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("accumulating", [False, True])
def test_replayed_gradients_equal_backward_across_windows_shapes_and_zero_grad_modes(accumulating):
    """A window's first micro-step hands out the graph's own gradient outputs; the next ones accumulate into shared
    buffers in place (copying those outputs in first). `accumulating`: every micro-step adds into the buffers, so
    the gradients are held once. Against plain backward, with two input shapes interleaved (their graphs share one
    memory pool), both zero_grad modes, and an eager micro-step in between."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.GELU(), torch.nn.Linear(256, 8)).cuda()
    ref = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.GELU(), torch.nn.Linear(256, 8)).cuda()
    ref.load_state_dict(net.state_dict())
    step = GraphedGrads(lambda x: net(x).square().mean(), list(net.parameters()), accumulating=accumulating)
    batches = [torch.randn(n, 64, device="cuda") for n in (32, 48, 32, 48, 32, 32, 48)]
    windows = [[0], [1, 2], [3, 4], [5, 6]]  # micro-steps per optimizer step
    for w, window in enumerate(windows):
        for i in window:
            if w == 2 and i == window[0]:  # an eager micro-step opens this window (e.g. a batch with images)
                net(batches[i]).square().mean().backward()
            else:
                step(batches[i])
            ref(batches[i]).square().mean().backward()
        for p, q in zip(net.parameters(), ref.parameters()):
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-6)
        net.zero_grad(set_to_none=w % 2 == 0)
        ref.zero_grad(set_to_none=True)
    assert step.replays == 6
    assert {accumulates for _, accumulates in step.graphs} == ({True} if accumulating else {False, True})
    if accumulating:
        assert all(g is b for c in step.graphs.values() for g, b in zip(c.grads, step.grad_buffers))

