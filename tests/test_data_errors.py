"""Every bad record is reported as file:line: reason; data.on_error decides between failing and skipping."""

from __future__ import annotations

import json

import pytest

from data_helpers import console, media_files, processor, recipe_for, user, write_jsonl
from omnitune.data.cache import prepare_split
from omnitune.data.schema import RecordError, read_records

OK = {"conversations": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}


def _bad_records(tmp_path):
    files = media_files(tmp_path / "media")
    (tmp_path / "media" / "broken.wav").write_bytes(b"RIFF garbage")
    (tmp_path / "media" / "broken.mp4").write_bytes(b"\x00\x00\x00 ftyp garbage")
    a = {"role": "assistant", "content": "ok"}
    long_text = "word " * 400
    # (record, expected reason) in line order; line 1 is good.
    return [
        (OK, None),
        ({"conversations": [user(("audio", tmp_path / "media" / "nope.wav")), a]}, "audio file not found"),
        ({"conversations": [user(("audio", "media/broken.wav")), a]}, "cannot decode audio"),
        ({"conversations": [user(("video", "media/broken.mp4")), a]}, "cannot decode video"),
        ({"conversations": [a, {"role": "user", "content": "hi"}]}, "wrong role order"),
        ({"conversations": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": ""}]},
         "empty assistant turn"),
        ({"conversations": [{"role": "user", "content": long_text}, a]}, "over data.max_length=64"),
        ({"conversations": [{"role": "user", "content": [{"type": "pdf", "pdf": "x.pdf"}]}, a]},
         "unsupported content type 'pdf'"),
        ('{"conversations": [', "bad JSON"),
        ({"conversations": [user(("image", files["image"])),
                            {"role": "assistant", "content": [{"type": "audio", "audio": str(files["image"])},
                                                              {"type": "audio", "audio": str(files["image"])}]}]},
         "holds one target speech file, not several"),
        ({"conversations": [{"role": "user", "content": "q"},
                            {"role": "assistant", "content": "a", "reasoning_content": "r"}]},
         "--set model.variant=thinking"),
        ({"conversations": [{"role": "user", "content": "q"}]}, "last turn must be an assistant turn"),
        ({"conversations": [{"role": "user", "content": "q"}, a, {"role": "system", "content": "s"}, a]},
         "system turn may only come first"),
        ({"conversations": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "\nHi"}]},
         "starts with a newline"),
        (OK, None),
    ]


def test_each_bad_record_is_reported_with_file_line_and_skipped(tmp_path):
    cases = _bad_records(tmp_path)
    path = write_jsonl(tmp_path / "train.jsonl", [r for r, _ in cases])
    out = console()
    ds = prepare_split(recipe_for(tmp_path, path, on_error="skip", max_length=64), processor(), path, out)
    log = out.file.getvalue()
    for line, (_, reason) in enumerate(cases, 1):
        if reason:
            assert f"{path}:{line}: " in log and reason in log.split(f"{path}:{line}: ")[1].splitlines()[0], reason
    bad = sum(reason is not None for _, reason in cases)
    assert f"skipped {bad} bad record(s)" in log
    assert ds.lines == [1, len(cases)] and ds.stats()["skipped"] == bad


def test_on_error_fail_stops_at_the_first_bad_record(tmp_path):
    cases = _bad_records(tmp_path)
    path = write_jsonl(tmp_path / "train.jsonl", [r for r, _ in cases])
    with pytest.raises(RecordError) as e:
        prepare_split(recipe_for(tmp_path, path, on_error="fail", max_length=64), processor(), path, console())
    assert str(e.value).startswith(f"{path}:2: ") and "audio file not found" in str(e.value)
    assert not list((tmp_path / "run" / "cache").glob("train-*"))  # nothing cached


@pytest.mark.parametrize("kind,reason", [("max_length", "over data.max_length"), ("media", "cannot decode")])
def test_render_time_errors_fail_too(tmp_path, kind, reason):
    (tmp_path / "b.wav").write_bytes(b"garbage")
    first = user(("audio", "b.wav")) if kind == "media" else {"role": "user", "content": "many words " * 20}
    rec = {"conversations": [first, {"role": "assistant", "content": "x"}]}
    path = write_jsonl(tmp_path / "t.jsonl", [OK, rec])
    recipe = recipe_for(tmp_path, path, max_length=32)
    with pytest.raises(RecordError, match=f"t.jsonl:2: .*{reason}"):
        prepare_split(recipe, processor(), path, console())


def test_json_list_records_keep_their_line_numbers(tmp_path):
    bad = {"conversations": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "  "}]}
    path = tmp_path / "d.json"
    path.write_text("[\n" + json.dumps(OK) + ",\n\n" + json.dumps(bad, indent=1) + "\n]\n")
    got = list(read_records(path))
    assert got[0].line == 2 and isinstance(got[1], RecordError) and str(got[1]).startswith(f"{path}:4: ")
    path.write_text("[\n" + json.dumps(OK) + ",\n{\"conversations\": oops}\n]")
    got = list(read_records(path))
    assert got[0].line == 2 and str(got[1]).startswith(f"{path}:3: bad JSON")


def test_media_paths_are_relative_to_the_data_file(tmp_path):
    media_files(tmp_path / "sub" / "media")
    path = write_jsonl(tmp_path / "sub" / "d.jsonl", [{"conversations": [
        user(("image", "media/i.png")), {"role": "assistant", "content": "blue"}]}])
    (rec,) = read_records(path)
    assert rec.media[0].path == (tmp_path / "sub" / "media" / "i.png").resolve()


def test_a_prompt_for_generation_may_end_with_a_user_turn():
    from omnitune.data.schema import validate_record

    prompt = {"conversations": [{"role": "system", "content": "s"}, {"role": "user", "content": "q"}]}
    assert validate_record(prompt, "p.jsonl", 1, require_answer=False).n_assistant == 0
    with pytest.raises(RecordError, match="last turn must be an assistant turn"):
        validate_record(prompt, "p.jsonl", 1)


def _media_record(kind, ref):
    return {"conversations": [{"role": "user", "content": [{"type": kind, kind: str(ref)}]},
                              {"role": "assistant", "content": "ok"}]}


def test_media_outside_the_data_folder_is_refused_before_it_is_opened(tmp_path):
    files = media_files(tmp_path / "outside")
    data = tmp_path / "data"
    (data / "media").mkdir(parents=True)
    (data / "media" / "link.png").symlink_to(files["image"])
    (data / "media" / "ok.png").symlink_to(data / "media" / "link.png")  # inside -> inside -> outside
    path = write_jsonl(data / "d.jsonl", [_media_record("image", "../outside/i.png"),
                                          _media_record("audio", files["audio"]),
                                          _media_record("image", "media/link.png"),
                                          _media_record("image", "media/ok.png"),
                                          _media_record("image", "~/../../etc/passwd")])
    got = list(read_records(path))
    for line, err in enumerate(got, 1):
        assert isinstance(err, RecordError) and err.line == line and "outside the allowed folders" in err.reason
        assert f"({data})" in err.reason and "data.media_roots" in err.reason
    # Folders the caller allows (the recipe's data.media_roots) let the same files in, resolved.
    got = list(read_records(path, media_roots=[data, tmp_path / "outside"]))[:4]
    assert [r.media[0].path for r in got] == [files["image"], files["audio"], files["image"], files["image"]]


def test_recipe_media_roots_are_relative_to_the_recipe_and_reach_prepare(tmp_path):
    from omnitune.recipe import load_recipe

    files = media_files(tmp_path / "shared")
    (tmp_path / "data").mkdir()
    path = write_jsonl(tmp_path / "data" / "d.jsonl", [_media_record("image", files["image"])])
    recipe_file = tmp_path / "recipe.yaml"
    recipe_file.write_text("model: {path: tiny}\ndata: {workers: 1, image_max_pixels: 4096, image_min_pixels: 1024}\n")
    overrides = [f"data.train={path}", f"output_dir={tmp_path / 'run'}"]
    with pytest.raises(RecordError, match="d.jsonl:1: .*outside the allowed folders"):
        prepare_split(load_recipe(recipe_file, overrides), processor(), path, console())
    recipe = load_recipe(recipe_file, overrides + ["data.media_roots=[shared]"])
    assert recipe.data.media_roots == [str(tmp_path / "shared")]  # absolute, as RUN/recipe.yaml keeps it
    assert len(prepare_split(recipe, processor(), path, console())) == 1


@pytest.mark.parametrize("ref,reason", [("a\u0000.wav", "cannot be resolved"), ("x" * 300 + ".wav", "too long")])
def test_unusable_media_paths_are_record_errors(tmp_path, ref, reason):
    path = write_jsonl(tmp_path / "d.jsonl", [_media_record("audio", ref)])
    (err,) = read_records(path)
    assert isinstance(err, RecordError) and err.line == 1 and reason in err.reason


def test_a_record_nested_10000_levels_is_one_bad_record(tmp_path):
    deep = '{"conversations": ' + "[" * 10000 + "]" * 10000 + "}"
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps(OK) + "\n" + deep + "\n" + json.dumps(OK) + "\n")
    ok, bad, ok2 = read_records(path)
    assert ok.line == 1 and ok2.line == 3 and str(bad) == f"{path}:2: nested too deeply to read " \
                                                          "(over ~1000 levels of lists/objects)"
    path = tmp_path / "d.json"
    path.write_text("[\n" + json.dumps(OK) + ",\n" + deep + "\n]\n")
    ok, bad = read_records(path)
    assert ok.line == 2 and str(bad).startswith(f"{path}:3: nested too deeply")
    # Deep or huge values that do parse are never echoed whole.
    role = json.loads("[" * 900 + "]" * 900)
    (bad,) = read_records(write_jsonl(tmp_path / "r.jsonl", [{"conversations": [{"role": role, "content": "x"}]}]))
    assert "unknown role [[[[[[[...]]]]]]] (roles" in str(bad) and len(str(bad)) < 300


def test_a_line_that_is_not_utf8_is_one_bad_record_at_its_line(tmp_path):
    path = tmp_path / "d.jsonl"
    good = json.dumps(OK).encode()
    path.write_bytes(good + b"\n" + good.replace(b"hello", b"hel\xfflo") + b"\r\n" + good + b"\n")
    ok, bad, ok2 = read_records(path)
    assert (ok.line, ok2.line) == (1, 3)
    assert str(bad).startswith(f"{path}:2: not UTF-8 text: byte 0xff at column {good.index(b'hello') + 4}")
    # A JSON list is decoded whole: the file is refused, at the line of the bad byte.
    path = tmp_path / "d.json"
    path.write_bytes(b"[\n" + good + b",\n" + good.replace(b"hello", b"hel\xfflo") + b"\n]\n")
    with pytest.raises(RecordError, match=r"d.json:3: not UTF-8 text: byte 0xff"):
        list(read_records(path))
