"""Directories written whole or not at all: built under a temporary name beside their place, then renamed into it,
so a crash or Ctrl-C never leaves a half-written run, export or checkpoint that a later command trusts.

The temporary directory gets the permissions a plain `mkdir` would give (the user's umask), not `mkdtemp`'s 0700:
renamed into place it keeps its mode, and a server or a colleague running as another user could not read it.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path


def staging_dir(parent: str | Path, prefix: str) -> Path:
    """A new empty directory under `parent` to build in, with the user's umask applied (module docstring)."""
    tmp = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
    umask = os.umask(0)
    os.umask(umask)
    tmp.chmod(0o777 & ~umask)
    return tmp


def replace_dir(tmp: Path, target: Path) -> None:
    """Put the finished `tmp` where `target` is, replacing an older `target` (moved aside first, deleted after)."""
    if target.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
        os.replace(target, old / target.name)
        os.replace(tmp, target)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, target)
