"""AdamW's update over many fp32 tensors as ONE Triton kernel launch, near the GPU's memory bandwidth.

AdamW is memory-bound: per value it reads p, g, m, v and writes p, m, v (28 bytes in fp32). For the 48-layer
Thinker's LoRA (576 tensors, 642.5M values, 18 GB per step) torch's fused AdamW took 5.16 ms on an H200 (3.5 TB/s,
also over one flat tensor of the same size), this kernel 4.28 ms (4.2 TB/s; bench/bench_optimizer.py). Each
program updates one block of one tensor: a table lists every block's tensor and start, another every tensor's four
addresses, so the tensors stay where they are (no flat copy, no change to the optimizer's state layout).
The math is torch's AdamW (`torch.optim.AdamW`, not amsgrad): decoupled weight decay, `lerp` for the first moment,
bias corrections, `addcdiv`; it matches torch's single-tensor and foreach AdamW to fp32 rounding. (torch's fused
kernel rounds 1 - beta2 in fp32, so its exp_avg_sq runs ~1.3e-5 relative lower; the parameters agree to fp32.)
"""
from __future__ import annotations

import functools

import torch

from omnitune.transfer import to_device

BLOCK = 1024  # values per program; 4 warps (the fastest of the block shapes tried on the H200)


@functools.cache
def _kernel():
    """The Triton kernel, built on first use (triton is imported only where it runs: CUDA, or its interpreter)."""
    import triton
    import triton.language as tl

    @triton.jit
    def adamw_kernel(addresses, block_tensor, block_start, numels, skip, keep, w1, beta2, w2, eps, step_size,
                     bias2_sqrt, BLOCK: tl.constexpr):
        pid = tl.program_id(0)
        t = tl.load(block_tensor + pid)
        idx = tl.load(block_start + pid) + tl.arange(0, BLOCK)
        # a set skip flag masks every load and store: the step is a no-op decided on the device, no host sync
        mask = (idx < tl.load(numels + t)) & (tl.load(skip) == 0)
        p_ptr = tl.load(addresses + 4 * t).to(tl.pointer_type(tl.float32))
        g_ptr = tl.load(addresses + 4 * t + 1).to(tl.pointer_type(tl.float32))
        m_ptr = tl.load(addresses + 4 * t + 2).to(tl.pointer_type(tl.float32))
        v_ptr = tl.load(addresses + 4 * t + 3).to(tl.pointer_type(tl.float32))
        p = tl.load(p_ptr + idx, mask=mask)
        g = tl.load(g_ptr + idx, mask=mask)
        m = tl.load(m_ptr + idx, mask=mask)
        v = tl.load(v_ptr + idx, mask=mask)
        p = p * keep
        m = m + w1 * (g - m)
        v = beta2 * v + w2 * g * g
        denom = tl.div_rn(tl.sqrt_rn(v), bias2_sqrt) + eps
        p = p - step_size * tl.div_rn(m, denom)
        tl.store(p_ptr + idx, p, mask=mask)
        tl.store(m_ptr + idx, m, mask=mask)
        tl.store(v_ptr + idx, v, mask=mask)

    return adamw_kernel


class _Tables:
    """The kernel's tables, kept on the device: every block's tensor and start, per list of sizes (built once: ~0.6M
    blocks for the Thinker's LoRA), and every tensor's four addresses, while they stay the same (the adapters, their
    states and a graph's gradient outputs do; eager gradients are new tensors every step, a 2304-value table)."""

    def __init__(self, capacity: int = 8):
        self.capacity = capacity
        self.blocks: dict[tuple, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
        self.addresses: dict[tuple, torch.Tensor] = {}

    def get(self, operands: list[list[torch.Tensor]]) -> tuple[torch.Tensor, ...]:
        device = operands[0][0].device
        numels = tuple(t.numel() for t in operands[0])
        blocks = self.blocks.get((numels, device))
        if blocks is None:
            if len(self.blocks) >= self.capacity:
                self.blocks.pop(next(iter(self.blocks)))
            sizes = torch.tensor(numels, dtype=torch.int64)
            counts = -(-sizes // BLOCK)
            block_tensor = torch.repeat_interleave(torch.arange(len(numels), dtype=torch.int32), counts)
            first = torch.repeat_interleave(torch.cumsum(counts, 0) - counts, counts)
            block_start = (torch.arange(int(counts.sum())) - first) * BLOCK
            blocks = self.blocks[(numels, device)] = tuple(to_device(t, device)
                                                           for t in (block_tensor, block_start, sizes))
        key = tuple(t.data_ptr() for group in zip(*operands) for t in group)  # per tensor: p, g, m, v
        addresses = self.addresses.get(key)
        if addresses is None:
            if len(self.addresses) >= self.capacity:
                self.addresses.pop(next(iter(self.addresses)))
            addresses = self.addresses[key] = to_device(torch.tensor(key, dtype=torch.int64), device)
        return (addresses, *blocks)


_TABLES = _Tables()


_NEVER: dict[torch.device, torch.Tensor] = {}  # per device, a skip flag that is never set


def adamw_update_(params: list[torch.Tensor], grads: list[torch.Tensor], exp_avgs: list[torch.Tensor],
                  exp_avg_sqs: list[torch.Tensor], *, lr: float, beta1: float, beta2: float, eps: float,
                  weight_decay: float, step: int, skip: torch.Tensor | None = None) -> None:
    """One AdamW step in place over contiguous fp32 tensors that share `step` (already incremented, >= 1).
    `skip`: an int32 flag on the device; when non-zero the kernel changes nothing (a step skipped without the host
    reading the flag)."""
    if not params:
        return
    device = params[0].device
    if skip is None:
        skip = _NEVER.get(device)
        if skip is None:
            skip = _NEVER[device] = torch.zeros((), dtype=torch.int32, device=device)
    addresses, block_tensor, block_start, numels = _TABLES.get([params, grads, exp_avgs, exp_avg_sqs])
    _kernel()[(block_tensor.numel(),)](
        # the scalars rounded once from float64, as torch's kernels receive them (1 - 0.9 in fp32 is one ulp off)
        addresses, block_tensor, block_start, numels, skip, 1 - lr * weight_decay, 1 - beta1, beta2, 1 - beta2,
        eps, lr / (1 - beta1 ** step), (1 - beta2 ** step) ** 0.5, BLOCK=BLOCK, num_warps=4)
