"""The prepared-data cache: reused when nothing changed, rebuilt when anything that matters did, never trusted
half-written; worker processes give the same samples as rendering in-process; eval split; --show and --dump."""

from __future__ import annotations

import json
import os

import pytest
import torch

import omnitune.data.cache as cache
from data_helpers import console, media_files, processor, recipe_for, user, write_jsonl
from omnitune.data.cache import CachedDataset, load_or_prepare, prepare_split
from omnitune.data.prepare import run_prepare
from omnitune.data.render import render
from omnitune.data.schema import read_records
from omnitune.data.synthetic import make_demo_dataset


def _dataset(tmp_path, n=6):
    files = media_files(tmp_path / "media")
    kinds = ["audio", "image", "video"]
    records = [{"conversations": [user((kinds[i % 3], files[kinds[i % 3]]), text=f"q{i}"),
                                  {"role": "assistant", "content": f"answer {i}"}]} for i in range(n)]
    return write_jsonl(tmp_path / "train.jsonl", records)


def _prepare(recipe, path):
    out = console()
    ds = prepare_split(recipe, processor(), path, out)
    return ds, out.file.getvalue()


def _no_render(*a, **k):
    raise AssertionError("rendered again although the cache is valid")


def test_cache_is_reused_when_nothing_changed(tmp_path, monkeypatch):
    path = _dataset(tmp_path)
    recipe = recipe_for(tmp_path, path)
    first, _ = _prepare(recipe, path)
    monkeypatch.setattr(cache, "render", _no_render)
    second, log = _prepare(recipe, path)
    assert "using cache" in log and second.dir == first.dir and len(second) == 6
    for a, b in zip(first, second):
        assert torch.equal(a["input_ids"], b["input_ids"]) and torch.equal(a["labels"], b["labels"])


@pytest.mark.parametrize("change", ["data file", "recipe data", "media content", "variant", "missing file appears"])
def test_cache_is_rebuilt_when_an_input_changes(tmp_path, change):
    path = _dataset(tmp_path)
    recipe = recipe_for(tmp_path, path, on_error="skip")
    if change == "missing file appears":
        wav = tmp_path / "media" / "a.wav"
        wav.rename(tmp_path / "a.wav")
    first, _ = _prepare(recipe, path)
    if change == "missing file appears":
        assert len(first) == 4
        (tmp_path / "a.wav").rename(wav)
    elif change == "data file":
        path.write_text(path.read_text().replace("answer 0", "answer zero"))
    elif change == "recipe data":
        recipe = recipe_for(tmp_path, path, on_error="skip", max_length=2048)
    elif change == "media content":  # same size, same mtime: only the bytes say it changed
        wav = tmp_path / "media" / "a.wav"
        st, data = wav.stat(), bytearray(wav.read_bytes())
        data[-2:] = bytes([data[-2] ^ 0xFF, data[-1] ^ 0xFF])
        wav.write_bytes(bytes(data))
        os.utime(wav, ns=(st.st_atime_ns, st.st_mtime_ns))
    else:
        recipe = recipe_for(tmp_path, path, on_error="skip", variant="thinking")
    second, log = _prepare(recipe, path)
    assert "using cache" not in log and second.dir != first.dir
    # Settings that do not change samples keep the cache, and so does a media file touched but not changed.
    wav = tmp_path / "media" / "a.wav"
    os.utime(wav, ns=(wav.stat().st_atime_ns, wav.stat().st_mtime_ns + 10**9))
    third, log = _prepare(recipe.model_copy(update={"data": recipe.data.model_copy(update={"workers": 3})}), path)
    assert "using cache" in log and third.dir == second.dir


def test_a_crash_while_writing_leaves_no_trusted_cache(tmp_path, monkeypatch):
    path = _dataset(tmp_path)
    recipe = recipe_for(tmp_path, path)
    real_save = torch.save

    def save_then_die(obj, f, *a, **k):
        real_save(obj, f, *a, **k)
        raise KeyboardInterrupt  # as if Ctrl-C hit right after the first shard was written

    monkeypatch.setattr(torch, "save", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        _prepare(recipe, path)
    monkeypatch.setattr(torch, "save", real_save)
    root = tmp_path / "run" / "cache"
    assert list(root.iterdir()) == []  # neither a final directory nor a temporary one is left
    # A kill -9 leaves a temporary directory: never read, and removed once its process is gone.
    orphan = root / ".tmp-999999999-train-x"
    (orphan / "out").mkdir(parents=True)
    # A directory under the final name without its manifest (e.g. copied half-way) is not trusted either.
    ds, _ = _prepare(recipe, path)
    (ds.dir / "manifest.json").unlink()
    again, log = _prepare(recipe, path)
    assert "using cache" not in log and (again.dir / "manifest.json").exists() and len(again) == 6
    assert not orphan.exists()


def test_dataset_pickles_by_reference_for_dataloader_workers(tmp_path):
    import pickle

    path = _dataset(tmp_path)
    ds, _ = _prepare(recipe_for(tmp_path, path), path)
    sub = ds.subset([4, 1])
    blob = pickle.dumps(sub)
    assert len(blob) < 2000
    back = pickle.loads(blob)
    assert back.lines == [5, 2] and torch.equal(back[0]["input_ids"], sub[0]["input_ids"])


def test_worker_processes_render_the_same_samples_and_skips(tmp_path, monkeypatch):
    path = _dataset(tmp_path, n=5)
    (tmp_path / "media" / "bad.wav").write_bytes(b"garbage")
    lines = path.read_text().splitlines()
    bad = json.dumps({"conversations": [user(("audio", tmp_path / "media" / "bad.wav")),
                                        {"role": "assistant", "content": "x"}]})
    path.write_text("\n".join(lines[:3] + [bad] + lines[3:]) + "\n")
    inline, log_inline = _prepare(recipe_for(tmp_path / "a", path, on_error="skip"), path)
    monkeypatch.setattr(cache, "INLINE_SECONDS", 0.0)  # hand everything after the first record to workers
    parallel, log = _prepare(recipe_for(tmp_path / "b", path, workers=2, on_error="skip"), path)
    assert len(inline) == len(parallel) == 5 and inline.lines == parallel.lines == [1, 2, 3, 5, 6]
    assert f"{path}:4: cannot decode audio" in log and "skipped 1 bad record(s)" in log
    assert inline.manifest["skipped"] == parallel.manifest["skipped"]
    for a, b in zip(inline, parallel):
        assert a.keys() == b.keys()
        for k in a:
            assert torch.equal(a[k], b[k]) if isinstance(a[k], torch.Tensor) else a[k] == b[k], k


def test_eval_fraction_holds_out_a_deterministic_disjoint_split(tmp_path):
    path = _dataset(tmp_path, n=10)
    recipe = recipe_for(tmp_path, path, eval_fraction=0.3)
    train, evals = load_or_prepare(recipe, processor(), console())
    again_train, again_eval = load_or_prepare(recipe, processor(), console())
    assert len(evals) == 3 and len(train) == 7
    assert set(train.lines).isdisjoint(evals.lines) and sorted(train.lines + evals.lines) == list(range(1, 11))
    assert evals.lines == again_eval.lines
    other = recipe.model_copy(update={"train": recipe.train.model_copy(update={"seed": 7})})
    assert load_or_prepare(other, processor(), console())[1].lines != evals.lines


def test_prepare_prints_stats_shows_spans_and_dumps_labels(tmp_path):
    train, evals = make_demo_dataset(tmp_path / "demo", n_train=8, n_eval=3, seed=1)
    recipe = recipe_for(tmp_path, train, eval=str(evals))
    out = console()
    summary = run_prepare(recipe, processor(), show=2, dump=tmp_path / "dump.jsonl", console=out)
    log = out.file.getvalue()
    assert "8 kept, 0 skipped" in log and "trained tokens" in log and "sample 1 (line 2)" in log
    assert "<|im_start|>assistant\n[[" in log  # a console without colour marks trained spans with brackets
    assert "<|audio_pad|>x" in log or "<|image_pad|>x" in log
    assert summary["train"]["kept"] == 8 and summary["eval"]["kept"] == 3
    assert set(summary["train"]["modalities"]) == {"text", "audio", "vision"}
    rows = [json.loads(x) for x in (tmp_path / "dump.jsonl").read_text().splitlines()]
    ds = CachedDataset(summary["train_cache"])
    assert [r["line"] for r in rows] == list(range(1, 9))
    assert rows[0]["input_ids"] == ds[0]["input_ids"].tolist() and rows[0]["labels"] == ds[0]["labels"].tolist()
    assert -100 in rows[0]["labels"]


def test_cached_pixels_are_stored_as_uint8_and_load_bit_exact(tmp_path):
    path = _dataset(tmp_path, n=3)  # audio, image, video
    recipe = recipe_for(tmp_path, path)
    ds, _ = _prepare(recipe, path)
    stored = torch.load(ds.dir / "shard-00000.pt", weights_only=True)
    assert stored[1]["pixel_values"].dtype == torch.uint8 and stored[2]["pixel_values_videos"].dtype == torch.uint8
    records = list(read_records(path))
    for i, key in ((1, "pixel_values"), (2, "pixel_values_videos")):
        fresh = render(processor(), records[i], recipe.data)
        assert ds[i][key].dtype == torch.float32 and torch.equal(ds[i][key], fresh[key])


def test_pixel_packing_keeps_float32_unless_lossless():
    from omnitune.data.pixels import pack_pixels, unpack_pixels

    norms = {"pixel_values": ([127.5] * 3, [127.5] * 3)}
    levels = torch.randint(0, 256, (4, 6)).float()
    exact = {"pixel_values": (levels - 127.5) / 127.5}
    packed = pack_pixels(exact, norms)
    assert packed["pixel_values"].dtype == torch.uint8
    assert torch.equal(unpack_pixels(packed)["pixel_values"], exact["pixel_values"])
    noisy = {"pixel_values": exact["pixel_values"] + 1e-3}
    assert pack_pixels(noisy, norms)["pixel_values"].dtype == torch.float32


def test_a_processor_template_that_does_not_match_the_variant_is_warned_about(tmp_path):
    path = _dataset(tmp_path, n=1)
    _, log = _prepare(recipe_for(tmp_path, path, variant="thinking"), path)  # the instruct processor
    assert "is not omnitune's 'thinking' template" in log
    _, log = _prepare(recipe_for(tmp_path, path), path)
    assert "warning" not in log


def test_samples_stream_into_several_shards_in_file_order(tmp_path, monkeypatch):
    path = _dataset(tmp_path, n=4)
    one, _ = _prepare(recipe_for(tmp_path / "a", path), path)
    monkeypatch.setattr(cache, "SHARD_BYTES", 1)  # every sample closes its shard
    many, _ = _prepare(recipe_for(tmp_path / "b", path), path)
    assert len(one.manifest["shards"]) == 1 and len(many.manifest["shards"]) == 4
    assert [torch.equal(a["input_ids"], b["input_ids"]) for a, b in zip(one, many)] == [True] * 4


def test_packing_is_not_part_of_the_cache_key(tmp_path):
    from omnitune.data.cache import cache_key
    from omnitune.data.schema import read_records
    from omnitune.data.synthetic import make_demo_dataset
    from omnitune.recipe import load_recipe

    train_file, _ = make_demo_dataset(tmp_path, n_train=2, n_eval=1, seed=0)
    records = list(read_records(train_file))
    keys = {cache_key(load_recipe("demo", [f"data.packing={p}"]), train_file, records, "h") for p in ("false", "true")}
    assert len(keys) == 1


def _flip(path, offset):
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x5A
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage", ["tensor bytes", "pickle bytes", "truncated shard", "manifest values"])
def test_a_damaged_cache_is_noticed_and_prepared_again(tmp_path, damage):
    path = _dataset(tmp_path, n=3)
    recipe = recipe_for(tmp_path, path)
    first, _ = _prepare(recipe, path)
    expected = [first[i]["input_ids"].clone() for i in range(len(first))]
    shard = first.dir / "shard-00000.pt"
    if damage == "tensor bytes":  # same size, inside the first sample's token ids: used silently before
        _flip(shard, shard.read_bytes().index(first[0]["input_ids"].numpy().tobytes()) + 40)
    elif damage == "pickle bytes":  # an unpickling traceback before
        _flip(shard, shard.read_bytes().index(b"input_ids"))
    elif damage == "truncated shard":
        shard.write_bytes(shard.read_bytes()[:-100])
    else:
        manifest = json.loads((first.dir / "manifest.json").read_text())
        manifest["lines"][0] = 99
        (first.dir / "manifest.json").write_text(json.dumps(manifest))
    again, log = _prepare(recipe, path)
    reason = {"tensor bytes": "shard-00000.pt fails its checksum", "pickle bytes": "shard-00000.pt fails its checksum",
              "truncated shard": "shard-00000.pt has", "manifest values": "manifest.json fails its checksum"}[damage]
    (notice,) = [line for line in log.splitlines() if "preparing it again" in line]
    assert reason in notice and "using cache" not in log and "Traceback" not in log
    assert again.lines == [1, 2, 3] and all(torch.equal(again[i]["input_ids"], expected[i]) for i in range(3))
    _, log = _prepare(recipe, path)
    assert "using cache" in log
