"""Prepare a data file once: validate, decode and render every record in worker processes, cache it on disk.

A cache directory `<cache root>/<file stem>-<key>` holds torch shards of rendered samples (a list of per-sample
dicts of tensors each) and a manifest.json written last; the whole directory is built under a temporary name and
renamed into place, so a crash or Ctrl-C never leaves a directory that a later run trusts. The key hashes the
data file's bytes and path, the content of every media file it names, the recipe's data section (minus
train/eval/eval_fraction/workers/cache_dir/packing), the model variant and the processor's saved files: change
any of them and the file is prepared again.

Bytes on disk are not trusted: the manifest records each shard's size and SHA-256 (and its own checksum), and
all of them are checked before a cache is reused, before any shard is unpickled; a damaged cache is prepared
again with a one-line notice. The cost (data/digest.py): 0.12 s per 225 MiB shard on one core here, ~0.55 s per GiB.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import shutil
import tempfile
import time
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.markup import escape

from omnitune.data.digest import file_digest, file_digests, json_digest
from omnitune.data.encoder_cache import TOWER_INPUTS
from omnitune.data.pixels import pack_pixels, pixel_norms, unpack_pixels
from omnitune.data.render import render
from omnitune.data.schema import Record, RecordError, read_records
from omnitune.data.speech import SpeechTargets
from omnitune.model.template import chat_template
from omnitune.recipe import DataConfig, Recipe, RecipeError
from omnitune.tokens import IGNORE_INDEX

CACHE_VERSION = 3
SHARD_BYTES = 256 << 20
# Rendered in the main process before worker processes are started (see _render_all).
INLINE_SECONDS = 5.0
# packing, group_by_length: the collator's and the sampler's; encoder_cache: stored beside the tokens under its own
# key (data/encoder_cache.py)
_KEY_EXCLUDES = ("train", "eval", "eval_fraction", "workers", "cache_dir", "packing", "encoder_cache",
                 "group_by_length")


class CachedDataset(torch.utils.data.Dataset):
    """Rendered samples of one prepared file (or a subset of them), memory-mapped from the cache shards."""

    def __init__(self, directory: str | Path, indices: list[int] | None = None, encoded: str | Path | None = None):
        self.dir = Path(directory)
        self.manifest = json.loads((self.dir / "manifest.json").read_text())
        self._shards = _open_shards(self.dir, self.manifest)
        self._where = [(si, j) for si, s in enumerate(self._shards) for j in range(len(s))]
        self.indices = list(range(len(self._where))) if indices is None else list(indices)
        self.encoded = None if encoded is None else Path(encoded)
        self._encoded = None  # the stored tower outputs' shards, in sample order (data/encoder_cache.py)
        if self.encoded is not None:
            shards = _open_shards(self.encoded, json.loads((self.encoded / "manifest.json").read_text()))
            self._encoded = [x for shard in shards for x in shard]

    def __len__(self) -> int:
        return len(self.indices)

    def __getstate__(self):  # DataLoader workers reopen the memory maps instead of receiving copies
        return {"dir": self.dir, "indices": self.indices, "encoded": self.encoded}

    def __setstate__(self, state):
        self.__init__(state["dir"], state["indices"], state.get("encoded"))

    def __getitem__(self, i: int) -> dict[str, Any]:
        k = self.indices[i]
        si, j = self._where[k]
        sample = self._shards[si][j]
        if self._encoded is None:
            return unpack_pixels(sample)
        # the towers' stored outputs in place of their inputs (data/encoder_cache.py)
        return {**{key: v for key, v in sample.items() if key not in TOWER_INPUTS}, **self._encoded[k]}

    def subset(self, indices: list[int]) -> "CachedDataset":
        sub = copy.copy(self)
        sub.indices = [self.indices[i] for i in indices]
        return sub

    def with_encoded(self, folder: str | Path) -> "CachedDataset":
        """These samples with the towers' stored outputs (a folder `encoder_cache.encode_dataset` wrote)."""
        return CachedDataset(self.dir, self.indices, folder)

    @property
    def lengths(self) -> list[int]:
        """The token count of each sample (from the manifest: no sample is read)."""
        return [self.manifest["lengths"][k] for k in self.indices]

    @property
    def lines(self) -> list[int]:
        """The source line of each sample."""
        return [self.manifest["lines"][k] for k in self.indices]

    def stats(self) -> dict[str, Any]:
        """Records kept and skipped, token lengths, counts per modality, trained tokens."""
        m = self.manifest
        lengths = [m["lengths"][k] for k in self.indices]
        mods: dict[str, int] = {}
        for k in self.indices:
            for mod in m["modalities"][k]:
                mods[mod] = mods.get(mod, 0) + 1
        return {"file": m["source"], "kept": len(self.indices), "skipped": len(m["skipped"]),
                "min_len": min(lengths, default=0), "max_len": max(lengths, default=0),
                "mean_len": float(np.mean(lengths)) if lengths else 0.0, "modalities": mods,
                "trained_tokens": sum(m["trained"][k] for k in self.indices)}


def cache_root(recipe: Recipe) -> Path:
    """data.cache_dir, or <output_dir>/cache."""
    return recipe.resolve(recipe.data.cache_dir) if recipe.data.cache_dir else recipe.out / "cache"


def resolve_workers(data: DataConfig, n_records: int) -> int:
    """Worker processes for n_records: data.workers (0 = one per core); 0 means render in this process only."""
    n = min(data.workers or os.cpu_count() or 1, n_records)
    return 0 if n <= 1 else n


def save_processor(processor, directory: Path) -> str:
    """Save the processor (so workers can rebuild it) and return a hash of its files."""
    processor.save_pretrained(directory)
    files = sorted(f for f in directory.rglob("*") if f.is_file())
    h = hashlib.sha256()
    for f, digest in zip(files, file_digests(files)):
        h.update(f"{f.relative_to(directory).as_posix()}|{digest}|".encode())
    return h.hexdigest()[:16]


def media_roots(recipe: Recipe, path: Path) -> list[Path]:
    """The folders the media of data file `path` may resolve inside: its own and data.media_roots."""
    return [path.resolve().parent, *(recipe.resolve(r) for r in recipe.data.media_roots)]


def cache_key(recipe: Recipe, path: Path, records: list[Record | RecordError], processor_hash: str) -> str:
    h = hashlib.sha256()
    h.update(f"v{CACHE_VERSION}|{path.resolve()}|{recipe.model.variant}|{processor_hash}|".encode())
    data = {k: v for k, v in recipe.dump()["data"].items() if k not in _KEY_EXCLUDES}
    h.update(json.dumps(data, sort_keys=True).encode())
    h.update(path.read_bytes())
    for r in records:
        if isinstance(r, RecordError):  # e.g. a missing file that appears later must invalidate the cache
            h.update(f"|{r}".encode())
    # Content, not size and mtime: a file rewritten with its old size and mtime is still noticed.
    media = sorted({m.path for r in records for m in getattr(r, "media", [])}
                   | {r.speech for r in records if getattr(r, "speech", None) is not None})
    for p, digest in zip(media, file_digests(media)):
        h.update(f"|{p}|{digest}".encode())
    return h.hexdigest()[:20]


def _open_shards(directory: Path, manifest: dict) -> list[list[dict[str, Any]]]:
    return [torch.load(directory / s["file"], mmap=True, weights_only=True) for s in manifest["shards"]]


def cache_problem(directory: Path, key: str) -> str | None:
    """Why `directory` is not a complete, intact cache of `key`, or None when it is one; no shard is unpickled."""
    try:
        m = json.loads((directory / "manifest.json").read_text())
    except FileNotFoundError:
        return "no manifest.json (never finished)"
    except (OSError, ValueError) as e:
        return f"manifest.json cannot be read ({e})"
    if not isinstance(m, dict) or m.pop("checksum", None) != json_digest(m):
        return "manifest.json fails its checksum"
    if m["version"] != CACHE_VERSION or m["key"] != key:
        return "written for other inputs"
    files = [directory / s["file"] for s in m["shards"]]
    for s, f in zip(m["shards"], files):
        if not f.is_file():
            return f"{s['file']} is missing"
        if f.stat().st_size != s["bytes"]:
            return f"{s['file']} has {f.stat().st_size} bytes, the manifest says {s['bytes']}"
    for s, digest in zip(m["shards"], file_digests(files)):
        if digest != s["sha256"]:
            return f"{s['file']} fails its checksum"
    return None


def prepare_split(recipe: Recipe, processor, path: str | Path, console=None) -> CachedDataset:
    """Validate, decode and render every record of one data file, or reuse its valid cache."""
    console = console or _console()
    path = Path(path)
    if getattr(processor, "chat_template", None) != chat_template(recipe.model.variant):
        console.print(f"[yellow]warning:[/yellow] the processor's chat template is not omnitune's "
                      f"'{recipe.model.variant}' template (model.variant); samples follow the processor's")
    records = list(read_records(path, recipe.model.variant, media_roots(recipe, path)))
    root = cache_root(recipe)
    root.mkdir(parents=True, exist_ok=True)
    remove_orphans(root)
    work = Path(tempfile.mkdtemp(prefix=f".tmp-{os.getpid()}-{path.stem}-", dir=root))
    try:
        proc_hash = save_processor(processor, work / "processor")
        # target speech (voice training): its codes depend on the codec, which keys the cache too
        speech = SpeechTargets(recipe) if any(getattr(r, "speech", None) for r in records) else None
        key = cache_key(recipe, path, records, proc_hash + (f"|{speech.fingerprint}" if speech else ""))
        final = root / f"{path.stem}-{key}"
        problem = cache_problem(final, key)
        if problem is None:
            console.print(f"[dim]{escape(str(path))}: using cache {escape(str(final))}[/dim]")
            return CachedDataset(final)
        if final.exists():
            console.print(f"[yellow]{escape(str(final))}: {escape(problem)}; preparing it again[/yellow]")
        writer = ShardWriter(work / "out")
        skipped = _render_all(recipe.data, processor, work / "processor", records, path, console, writer, speech)
        writer.finish(key, path, skipped=skipped,
                      **{k: writer.meta.get(k, []) for k in ("lines", "lengths", "trained", "modalities")})
        if final.exists():  # an invalid leftover (or another run's): never trusted, replace it
            shutil.rmtree(final, ignore_errors=True)
        try:
            os.replace(work / "out", final)
        except OSError:
            if cache_problem(final, key) is not None:  # a concurrent run won the rename with a good cache otherwise
                raise
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return CachedDataset(final)


def remove_orphans(root: Path) -> None:
    """Delete temporary directories left by prepare runs that were killed (their process is gone)."""
    for d in root.glob(".tmp-*"):
        try:
            os.kill(int(d.name.split("-")[1]), 0)
        except ProcessLookupError:
            shutil.rmtree(d, ignore_errors=True)
        except (ValueError, IndexError, PermissionError, OSError):
            pass


def _render_all(data: DataConfig, processor, processor_dir: Path, records: list, path: Path, console,
                writer: "ShardWriter", speech: SpeechTargets | None = None) -> list[str]:
    """Render valid records (in worker processes when worth it) into `writer` in file order; return the skipped.
    `speech`: adds each record's target speech codes (here, in this process: the codec is loaded once)."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    skipped: list[str] = []
    norms = pixel_norms(processor)

    def bad(err: RecordError) -> None:
        if data.on_error == "fail":
            raise err
        skipped.append(str(err))
        console.print("[yellow]skipped[/yellow]", escape(str(err)))

    todo: list[Record] = []
    for r in records:
        if isinstance(r, RecordError):
            bad(r)
        else:
            todo.append(r)
    # Workers finish out of order; samples wait here until every earlier record is written or skipped.
    ready: dict[int, dict | RecordError] = {}
    written = 0

    def deliver(i: int, result: dict | RecordError) -> None:
        nonlocal written
        ready[i] = result
        while written in ready:
            r = ready.pop(written)
            if speech is not None and not isinstance(r, RecordError):
                try:
                    r = speech(todo[written], r)
                except RecordError as e:
                    r = e
            if isinstance(r, RecordError):
                bad(r)
            else:
                writer.add(r, lines=todo[written].line, lengths=len(r["input_ids"]),
                           trained=int((r["labels"] != IGNORE_INDEX).sum()), modalities=r["modalities"])
            written += 1

    workers = resolve_workers(data, len(todo))
    columns = (TextColumn(f"preparing {escape(path.name)}"), BarColumn(), MofNCompleteColumn(),
               TimeRemainingColumn())
    with Progress(*columns, console=console, transient=True) as bar:
        task = bar.add_task("render", total=len(todo))
        # Render here first: worker processes take seconds to start (torch, transformers, the processor), so
        # they are started only for what is left after INLINE_SECONDS.
        start, i = time.monotonic(), 0
        while i < len(todo) and (workers == 0 or time.monotonic() - start < INLINE_SECONDS):
            try:
                deliver(i, pack_pixels(render(processor, todo[i], data), norms))
            except RecordError as e:
                deliver(i, e)
            bar.advance(task)
            i += 1
        if i < len(todo):
            _render_in_workers(min(workers, len(todo) - i), processor_dir, data, todo, i, deliver,
                               lambda: bar.advance(task))
    if skipped:
        console.print(f"[yellow]{escape(str(path))}: skipped {len(skipped)} bad record(s)[/yellow]")
    return skipped


def _render_in_workers(workers: int, processor_dir: Path, data: DataConfig, todo: list[Record], first: int,
                       deliver, advance) -> None:
    """Render todo[first:] in `workers` spawned processes, a bounded number of records in flight."""
    ctx = get_context("spawn")  # fork after torch/tokenizer threads start can deadlock
    window = 4 * workers  # bounds the results held in memory while an earlier record is still rendering
    with ProcessPoolExecutor(workers, mp_context=ctx, initializer=_worker_init,
                             initargs=(str(processor_dir), data.model_dump())) as pool:
        queue = iter(range(first, len(todo)))
        pending = set()
        try:
            for j in queue:
                pending.add(pool.submit(_worker_render, j, todo[j]))
                if len(pending) >= window:
                    break
            while pending:
                done, pending = wait(pending, return_when=FIRST_COMPLETED)
                for fut in done:
                    j, sample, err = fut.result()
                    if err is not None and data.on_error == "fail":
                        raise err
                    deliver(j, err if err is not None else
                            {k: torch.from_numpy(v) if isinstance(v, np.ndarray) else v for k, v in sample.items()})
                    advance()
                    nxt = next(queue, None)
                    if nxt is not None:
                        pending.add(pool.submit(_worker_render, nxt, todo[nxt]))
        finally:
            for fut in pending:
                fut.cancel()


_WORKER: dict[str, Any] = {}


def _worker_init(processor_dir: str, data: dict) -> None:
    import warnings

    from transformers import AutoProcessor

    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    _WORKER["processor"] = AutoProcessor.from_pretrained(processor_dir)
    _WORKER["data"] = DataConfig(**data)
    _WORKER["norms"] = pixel_norms(_WORKER["processor"])


def _worker_render(i: int, record: Record):
    try:
        sample = pack_pixels(render(_WORKER["processor"], record, _WORKER["data"]), _WORKER["norms"])
    except RecordError as e:
        return i, None, e
    # numpy pickles by value; torch tensors would travel as shared-memory handles.
    return i, {k: v.numpy() if isinstance(v, torch.Tensor) else v for k, v in sample.items()}, None


class ShardWriter:
    """Writes samples into ~SHARD_BYTES torch shards as they come, then the manifest, last (the token cache here,
    the towers' outputs in data/encoder_cache.py)."""

    def __init__(self, out: Path):
        self.out = out
        out.mkdir(parents=True)
        self.shards: list[dict] = []
        self.current: list[dict] = []
        self.size = 0
        self.meta: dict[str, list] = {}  # per sample, what `add` was told about it, for the manifest

    def add(self, sample: dict[str, Any], **meta: Any) -> None:
        self.current.append(sample)
        self.size += sum(v.numel() * v.element_size() for v in sample.values() if isinstance(v, torch.Tensor))
        for k, v in meta.items():
            self.meta.setdefault(k, []).append(v)
        if self.size >= SHARD_BYTES:
            self._flush()

    def _flush(self) -> None:
        name = f"shard-{len(self.shards):05d}.pt"
        torch.save(self.current, self.out / name)
        self.shards.append({"file": name, "count": len(self.current), "bytes": (self.out / name).stat().st_size,
                            "sha256": file_digest(self.out / name)})
        self.current, self.size = [], 0

    def finish(self, key: str, source: Path, **fields: Any) -> None:
        if self.current or not self.shards:
            self._flush()
        manifest = {"version": CACHE_VERSION, "key": key, "source": str(source), "created": time.time(),
                    "shards": self.shards, **fields}
        manifest["checksum"] = json_digest(manifest)
        # The manifest is written last: a directory without it is never trusted.
        (self.out / "manifest.json").write_text(json.dumps(manifest))


def load_or_prepare(recipe: Recipe, processor, console=None) -> tuple[CachedDataset, CachedDataset | None]:
    """The train and eval datasets: prepared (or taken from a valid cache), eval from data.eval or held out."""
    console = console or _console()
    data = recipe.data
    if not data.train:
        raise RecipeError("data.train is not set: give a JSONL file (e.g. --set data.train=train.jsonl)")
    train = prepare_split(recipe, processor, recipe.resolve(data.train), console)
    if data.eval:
        evals = prepare_split(recipe, processor, recipe.resolve(data.eval), console)
    elif data.eval_fraction > 0 and len(train) > 1:
        n_eval = min(len(train) - 1, max(1, math.ceil(data.eval_fraction * len(train))))
        order = np.random.default_rng(recipe.train.seed).permutation(len(train))
        held = sorted(int(i) for i in order[:n_eval])
        keep = sorted(int(i) for i in order[n_eval:])
        train, evals = train.subset(keep), train.subset(held)
        console.print(f"held out {n_eval} of {len(keep) + n_eval} records for eval (data.eval_fraction="
                      f"{data.eval_fraction}, seed {recipe.train.seed})")
    else:
        evals = None
    _print_stats(console, "train", train)
    if evals is not None:
        _print_stats(console, "eval", evals)
    return train, evals


def _print_stats(console, name: str, ds: CachedDataset) -> None:
    s = ds.stats()
    mods = ", ".join(f"{k} {v}" for k, v in sorted(s["modalities"].items()))
    console.print(f"[bold]{name}[/bold] {escape(s['file'])}: {s['kept']} kept, {s['skipped']} skipped; tokens "
                  f"min {s['min_len']} / mean {s['mean_len']:.1f} / max {s['max_len']}; {mods}; "
                  f"{s['trained_tokens']} trained tokens")


def _console():
    from rich.console import Console

    return Console(stderr=True)
