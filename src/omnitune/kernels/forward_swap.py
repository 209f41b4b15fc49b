"""Swapping a module's forward for a fast one on the instance, reversibly: the instance attribute shadows the
class's forward, and deleting it brings the class's back. Each caller marks its modules with its own flag, so
undoing one swap never touches another's."""
from __future__ import annotations

import types
from collections.abc import Callable, Iterable

import torch


def swap_forwards(modules: Iterable[torch.nn.Module], forward: Callable, flag: str) -> int:
    """Give each module `forward` (bound to it) and mark it with `flag`; returns how many."""
    count = 0
    for m in modules:
        m.forward = types.MethodType(forward, m)
        setattr(m, flag, True)
        count += 1
    return count


def swapped(module: torch.nn.Module, flag: str) -> bool:
    return getattr(module, flag, False)


def restore_forwards(modules: Iterable[torch.nn.Module], flag: str) -> int:
    """Undo `swap_forwards` on the modules marked with `flag`; returns how many were restored."""
    restored = [m for m in modules if swapped(m, flag)]
    for m in restored:
        del m.forward
        delattr(m, flag)
    return len(restored)
