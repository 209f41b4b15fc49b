"""GraphedGrads without a GPU: the eager path accumulates like backward, and the capture retry rule."""
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


def test_capture_is_retried_once_then_reported(monkeypatch):
    monkeypatch.setattr(torch.cuda, "synchronize", lambda: None)
    step = GraphedGrads(lambda x: x.sum(), [])
    attempts = []

    def flaky(inputs):
        attempts.append(1)
        if len(attempts) == 1:
            raise RuntimeError("cudaErrorStreamCaptureImplicit")
        return "captured"

    monkeypatch.setattr(step, "_capture", flaky)
    assert step._capture_with_retry([]) == "captured" and len(attempts) == 2

    monkeypatch.setattr(step, "_capture", lambda inputs: (_ for _ in ()).throw(RuntimeError("sync in capture")))
    with pytest.raises(GraphCaptureError, match="failed twice.*sync in capture"):
        step._capture_with_retry([])
