"""Which checkpoint `--resume` continues from: the newest one whose files are whole.

A checkpoint is renamed into place only once written (train/trainer.py), but a disk can still truncate or damage
one afterwards. Loading a damaged file fails deep inside torch with a traceback, after the model weights may already
have been replaced, so every file is checked first from its own structure, without loading it: JSON parses,
torch's zip archives have a readable directory (and their CRCs match, for files small enough to read in a second),
safetensors headers parse and the file is as long as the header says. Damaged checkpoints are skipped with a line
saying why; the newest whole one is used.
"""
from __future__ import annotations

import json
import re
import struct
import zipfile
from collections.abc import Callable
from pathlib import Path

from omnitune.errors import OmnituneError

CRC_CHECK_BYTES = 1 << 30  # torch archives up to this size get their CRCs checked (~1 s); bigger ones only opened


class CheckpointError(OmnituneError, RuntimeError):
    """A checkpoint that cannot be resumed from."""


def checkpoint_problem(checkpoint: Path) -> str | None:
    """Why `checkpoint` cannot be loaded, or None when every file of it is whole."""
    state = checkpoint / "trainer_state.json"
    if not state.is_file():
        return "trainer_state.json is missing"
    for file in sorted(checkpoint.iterdir()):
        try:
            if file.suffix == ".json":
                json.loads(file.read_text())
            elif file.suffix in (".pt", ".pth", ".bin"):
                with zipfile.ZipFile(file) as archive:
                    if file.stat().st_size <= CRC_CHECK_BYTES and archive.testzip() is not None:
                        return f"{file.name} is damaged (a checksum does not match)"
            elif file.suffix == ".safetensors":
                _check_safetensors(file)
        except (OSError, ValueError, zipfile.BadZipFile, struct.error) as e:
            return f"{file.name} cannot be read ({type(e).__name__}: {e})"
    return None


def _check_safetensors(file: Path) -> None:
    with file.open("rb") as f:
        (header_len,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(header_len))
    end = max((t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"), default=0)
    if file.stat().st_size < 8 + header_len + end:
        raise ValueError(f"truncated: {file.stat().st_size} bytes, the header says {8 + header_len + end}")


def resumable_checkpoint(checkpoints: Path, report: Callable[[str], object] = print) -> Path | None:
    """The newest checkpoint-N under `checkpoints` whose files are whole; damaged newer ones are reported."""
    found = sorted((p for p in checkpoints.glob("checkpoint-*") if re.fullmatch(r"checkpoint-\d+", p.name)),
                   key=lambda p: int(p.name.split("-")[1]), reverse=True) if checkpoints.is_dir() else []
    for checkpoint in found:
        problem = checkpoint_problem(checkpoint)
        if problem is None:
            return checkpoint
        report(f"[yellow]warning:[/] {checkpoint.name} cannot be resumed from: {problem}; trying the one before")
    if found:
        raise CheckpointError(f"--resume: no checkpoint under {checkpoints} can be loaded (all {len(found)} are "
                              "damaged): train into a new output_dir")
    return None
