"""Frozen-encoder outputs stored beside the token ids: the audio and vision towers run once, not every epoch.

Why: with the towers frozen (every LoRA recipe) their outputs for a sample never change, yet the plain path runs
them in every step, eagerly, with data-dependent shapes: at 8 layers a media step was 6-7x a text step (issue 22).
Here each prepared data file's samples go through the towers once (`omnitune prepare`, else the start of
`omnitune train`), in batches (on the GPU when there is one), and each sample's outputs are stored in its cache
directory under `encoded-<weights fingerprint>/`: `audio_embeds` [audio tokens, H], `image_embeds` /
`video_embeds` [tokens, H] and their deepstack features `image_deepstack` / `video_deepstack` [tokens, deepstack
layers, H], in the towers' dtype. A training sample then carries these in place of its mel features and pixels
(`CachedDataset`), and model/encoded_inputs.py feeds them to the Thinker's forward.

Invalidation: the token cache's own key (data file, media, data section, processor, data/cache.py), plus the
fingerprint of the tower weights and dtype: other weights are encoded again, into their own folder. Like the token
cache, a folder is built under a temporary name, renamed into place, and checked by SHA-256 before it is read.

Disk per sample (hidden 2048, bf16, 3 deepstack layers; computed from the shapes): 4 KiB per audio token (13 per
second of audio: 52 KiB/s), 16 KiB per visual token (a 448x448 image is 196 tokens: 3.1 MiB; a second of video at
2 fps and 320x320 frames is 100 tokens: 1.6 MiB), about three times the packed pixels it replaces (1.1 MiB for
that image).
"""
from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from rich.markup import escape

from omnitune.model import parts

# What the stored outputs replace in a sample (the towers' inputs); grids, seconds per grid and the audio frame
# masks stay: the M-RoPE positions are computed from them.
TOWER_INPUTS = ("input_features", "pixel_values", "pixel_values_videos", "pixel_values:norm",
                "pixel_values_videos:norm")
BATCH_TOKENS = 16384  # visual patches + audio frames per tower batch: batched, within a few GiB of activations


def towers(thinker: torch.nn.Module) -> list[torch.nn.Module]:
    """The audio and vision towers (projector and mergers inside them) of a Thinker, wrapped or not."""
    return [parts.module(thinker, "audio_tower"), parts.module(thinker, "vision_tower")]


@torch.no_grad()
def weights_fingerprint(thinker: torch.nn.Module) -> str:
    """A digest of the towers' weights (names, shapes, dtypes and three sums per tensor, computed where the weights
    are): cheap on the GPU, and any real change of the weights changes it."""
    h = hashlib.sha256()
    for tower in towers(thinker):
        for name, t in tower.state_dict().items():
            x = t.detach().reshape(-1).double()
            w = torch.arange(x.numel(), device=x.device, dtype=torch.float64).mul_(0.618034).frac_()
            sums = torch.stack([x.sum(), (x * x).sum(), (x * w).sum()]).tolist()
            h.update(f"{name}|{tuple(t.shape)}|{t.dtype}|{sums}|".encode())
    return h.hexdigest()[:16]


def _tower_batches(dataset):
    """The dataset's samples in order, in consecutive groups of up to BATCH_TOKENS tower input tokens (at least one
    sample each), read as they are needed: a large file is never held in memory at once."""
    group: list[dict[str, Any]] = []
    size = 0
    for i in range(len(dataset)):
        s = dataset[i]
        n = sum(int(s[k].shape[0]) for k in ("pixel_values", "pixel_values_videos") if k in s)
        n += int(s["feature_attention_mask"].sum()) if "feature_attention_mask" in s else 0
        if group and size + n > BATCH_TOKENS:
            yield group
            group, size = [], 0
        group.append(s)
        size += n
    if group:
        yield group


@torch.no_grad()
def encode_samples(thinker: torch.nn.Module, samples: list[dict[str, Any]]) -> list[dict[str, torch.Tensor]]:
    """Each sample's tower outputs (module docstring's keys), computed in one tower call per modality for the
    whole list, on the towers' device and in their dtype, returned on the host."""
    from omnitune.data.collate import media_batch

    backbone = parts.module(thinker, "backbone")
    cfg = backbone.config
    device = next(towers(thinker)[0].parameters()).device
    dtype = next(towers(thinker)[0].parameters()).dtype
    media = {k: v.to(device) for k, v in media_batch(samples).items()}
    outs: list[dict[str, torch.Tensor]] = [{} for _ in samples]

    def split(key: str, values: torch.Tensor, token_id: int) -> None:
        counts = [int((s["input_ids"] == token_id).sum()) for s in samples]
        if sum(counts) != values.shape[0]:
            raise ValueError(f"{key}: the towers gave {values.shape[0]} tokens, the samples hold {sum(counts)}")
        for out, part in zip(outs, values.cpu().split(counts)):
            if part.shape[0]:
                out[key] = part.clone()  # its own storage: a view would save the whole batch's with each sample

    if "input_features" in media:
        audio = backbone.get_audio_features(media["input_features"].to(dtype), media["feature_attention_mask"],
                                            return_dict=True).last_hidden_state
        split("audio_embeds", audio, cfg.audio_token_id)
    for kind, pixels, grid, token_id in (("image", "pixel_values", "image_grid_thw", cfg.image_token_id),
                                         ("video", "pixel_values_videos", "video_grid_thw", cfg.video_token_id)):
        if pixels not in media:
            continue
        get = backbone.get_image_features if kind == "image" else backbone.get_video_features
        out = get(media[pixels].to(dtype), media[grid], return_dict=True)
        split(f"{kind}_embeds", torch.cat(out.pooler_output), token_id)
        split(f"{kind}_deepstack", torch.stack([torch.cat(f) for f in out.deepstack_features], dim=1), token_id)
    return outs


def encode_dataset(thinker: torch.nn.Module, dataset, console=None) -> Path:
    """The folder of a prepared file's tower outputs (`dataset.dir/encoded-<fingerprint>`), computed now when it is
    missing or damaged; every sample of the prepared file is encoded, whatever subset `dataset` is."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from omnitune.data.cache import CachedDataset, ShardWriter, cache_problem, remove_orphans

    console = console or _console()
    fingerprint = weights_fingerprint(thinker)
    final = Path(dataset.dir) / f"encoded-{fingerprint}"
    problem = cache_problem(final, fingerprint)
    if problem is None:
        console.print(f"[dim]{escape(str(final))}: using the stored encoder outputs[/dim]")
        return final
    if final.exists():
        console.print(f"[yellow]{escape(str(final))}: {escape(problem)}; encoding again[/yellow]")
    full = CachedDataset(dataset.dir)
    remove_orphans(full.dir.parent)
    work = Path(tempfile.mkdtemp(prefix=f".tmp-{os.getpid()}-encoded-", dir=full.dir.parent))
    try:
        writer = ShardWriter(work / "out")
        columns = (TextColumn(f"encoding media of {escape(Path(full.manifest['source']).name)}"), BarColumn(),
                   MofNCompleteColumn(), TimeRemainingColumn())
        with Progress(*columns, console=console, transient=True) as bar:
            task = bar.add_task("encode", total=len(full))
            for group in _tower_batches(full):
                for out in encode_samples(thinker, group):
                    writer.add(out)
                bar.advance(task, len(group))
        writer.finish(fingerprint, source=Path(full.manifest["source"]))
        shutil.rmtree(final, ignore_errors=True)
        os.replace(work / "out", final)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    console.print(f"encoded the media of {len(full)} samples once: {escape(str(final))}", highlight=False)
    return final


def encode_at_prepare(recipe, caches: list[str | None], device: str, console=None) -> None:
    """`omnitune prepare`'s last step: the prepared files' media through the frozen towers, the Thinker loaded on
    `device` as training loads it (so `omnitune train` finds the outputs under the same fingerprint). Without a GPU
    only the tiny model does this: a real checkpoint would load its 30B weights into host memory for the towers'
    sake, so `omnitune train` encodes at its start instead."""
    from omnitune.data.cache import CachedDataset
    from omnitune.model.load import load_thinker

    console = console or _console()
    datasets = [CachedDataset(c) for c in caches if c is not None]
    if not any({"audio", "vision"} & set(ds.stats()["modalities"]) for ds in datasets):
        return
    if device == "cpu" and recipe.model.path != "tiny":
        console.print("encoder cache: no GPU here, so `omnitune train` runs the towers over the media at its start")
        return
    thinker = load_thinker(recipe.model, device_map={"": device} if device != "cpu" else None)
    with_encoder_outputs(datasets, thinker, device, console)


def with_encoder_outputs(datasets: list, thinker: torch.nn.Module, device: str, console=None) -> list:
    """The datasets (None stays None) whose samples carry the towers' stored outputs in place of the towers'
    inputs; each prepared file is encoded once, however many subsets of it are given, by the towers on `device`
    (where they stay until `towers_to_host`). Text-only data is returned as it is."""
    folders: dict[Path, Path] = {}
    out = []
    for ds in datasets:
        if ds is None or not {"audio", "vision"} & set(ds.stats()["modalities"]):
            out.append(ds)
            continue
        for tower in towers(thinker):
            tower.to(device)
        if Path(ds.dir) not in folders:
            folders[Path(ds.dir)] = encode_dataset(thinker, ds, console)
        out.append(ds.with_encoded(folders[Path(ds.dir)]))
    return out


def towers_to_host(thinker: torch.nn.Module) -> None:
    """Move the towers to the host once their outputs are stored, and say so in `hf_device_map`, which HF's Trainer
    and accelerate read before moving a model onto its device: training never holds the towers on the GPU. One
    process only: DDP wants every parameter on the process's device (and accelerate refuses such maps under it)."""
    base = parts.unwrap(thinker)
    device = next(parts.stack_model(base, "text").parameters()).device
    if device.type == "cpu":
        return
    names = parts.module_names(base, "audio_tower") + parts.module_names(base, "vision_tower")
    for tower in towers(base):
        tower.to("cpu")
    # the map lists whole modules: the backbone's other children and the Thinker's other children
    (backbone,) = parts.module_names(base, "backbone")
    on_device = [n for n, _ in base.named_children() if n != backbone]
    on_device += [f"{backbone}.{n}" for n, _ in parts.module(base, "backbone").named_children()
                  if f"{backbone}.{n}" not in names]
    base.hf_device_map = {**dict.fromkeys(on_device, str(device)), **dict.fromkeys(names, "cpu")}
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _console():
    from rich.console import Console

    return Console(stderr=True)
