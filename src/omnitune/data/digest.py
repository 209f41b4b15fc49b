"""Content hashes: what the cache key and the cache's integrity checks compare (SHA-256, hex).

SHA-256 runs on the CPU's SHA extensions where present. Measured on one core of the 2-core dev machine, file in
the page cache: a 225 MiB torch shard hashes in 0.124 s (blake2b 0.177 s; 256 MB in memory: sha256 0.13 s,
blake2b 0.19 s, md5 0.30 s), so checking a cache before it is trusted costs ~0.55 s per GiB and core (against
8 ms to open the shard); files are hashed in threads, since hashlib releases the GIL.
"""

from __future__ import annotations

import hashlib
import json
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

BLOCK = 1 << 20


def file_digest(path: str | Path) -> str:
    """SHA-256 of a file's bytes, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(BLOCK):
            h.update(block)
    return h.hexdigest()


def file_digests(paths: list[Path]) -> list[str]:
    """file_digest of each path, in order, hashed in threads."""
    if len(paths) <= 1:
        return [file_digest(p) for p in paths]
    with ThreadPoolExecutor(min(len(paths), os.cpu_count() or 1, 32)) as pool:
        return list(pool.map(file_digest, paths))


def json_digest(value: Any) -> str:
    """SHA-256 of a JSON value, keys sorted: the same for the value and its JSON round trip."""
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()
