"""GraphedGrads without a GPU: the eager path accumulates like backward; a failed capture is reported."""
import pytest
import torch

from omnitune.kernels.cuda_graph import GraphCaptureError, GraphedGrads


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

    def capture(inputs):
        raise RuntimeError("cudaErrorStreamCaptureImplicit")

    monkeypatch.setattr(step, "_capture", capture)
    on_gpu = type("OnGpu", (torch.Tensor,), {"is_cuda": property(lambda self: True)})
    x = torch.zeros(2).as_subclass(on_gpu)
    with pytest.raises(GraphCaptureError, match="capture failed.*StreamCaptureImplicit"):
        step(x)
    assert step.graphs == {} and step.eager_calls == 0
