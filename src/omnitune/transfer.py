"""Host-to-device copies that do not make the host wait for the GPU.

A plain `.to("cuda")` (or `torch.tensor(x, device="cuda")`) of pageable host memory synchronises the stream: the host
waits until every kernel queued before it has run. In a training step that wait leaves the GPU idle while the host
prepares the next step. A pinned source copied with `non_blocking=True` is queued like a kernel instead.
"""
from __future__ import annotations

import torch


def to_device(t: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """`t` on `device`, queued without a host wait where the device is CUDA (pinned source; torch's caching host
    allocator keeps it alive until the copy has run)."""
    device = torch.device(device)
    return t.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else t.to(device)


def scalar(value: float | int, device: torch.device | str, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """A 0-dim tensor holding `value` on `device`, without a host wait: a fill kernel takes the value as its
    argument (no host buffer, pinned or not)."""
    return torch.full((), value, dtype=dtype, device=device)
