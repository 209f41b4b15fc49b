"""The hostile-input corpus (tests/hostile/): every case ends in a clear error or a reported skip, never a
traceback, never a silent wrong result.

Each case is a data file whose line 1 is a good record and whose `line` holds the hostile one (or a file refused
whole). `omnitune prepare demo` runs on it through the CLI under both data.on_error modes: `skip` exits 0, reports
`file:line: reason` and keeps exactly the good record; `fail` exits 1 with one line `error: file:line: reason`.
Adding a case: put its file (and its tiny media) under tests/hostile/, add a row to CASES.
"""

from __future__ import annotations

import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
# Imported at collection, transformers' log handler writes to the session's stderr, not to the stream of the first
# CliRunner call (closed after it: later calls would print "--- Logging error ---" tracebacks).
import transformers  # noqa: F401
from typer.testing import CliRunner

from data_helpers import tinted_frame, write_png
from omnitune.cli import app

CORPUS = Path(__file__).parent / "hostile"
# Made in the copy at test time (git does not carry them everywhere): link -> target, relative to the link.
SYMLINKS = {"media/outside-link.png": "../../outside.png",  # a real, decodable image outside the data folder
            "media/loop-a.wav": "loop-b.wav", "media/loop-b.wav": "loop-a.wav"}


@dataclass(frozen=True)
class Case:
    data: str  # the data file under tests/hostile/
    reason: str  # a regex the reported reason matches
    line: int = 2  # the line reported
    whole_file: bool = False  # the file itself is refused: an error under both modes
    overrides: tuple[str, ...] = ()


CASES = [
    Case("path_escape.jsonl", "resolves to /etc/passwd, outside the allowed folders"),
    Case("absolute_path.jsonl", "resolves to /etc/passwd, outside the allowed folders"),
    Case("home_path.jsonl", "outside the allowed folders"),
    Case("symlink_out.jsonl", "outside-link.png' resolves to .*outside.png, outside the allowed folders"),
    Case("symlink_loop.jsonl", "cannot be resolved|file not found"),
    Case("nul_in_path.jsonl", "cannot be resolved: embedded null byte"),
    Case("long_name.jsonl", "cannot be used: .*File name too long"),
    Case("url.jsonl", "is a URL; download it"),
    Case("deep_nesting.jsonl", "nested too deeply"),
    Case("deep_nesting_list.json", "nested too deeply", line=3),
    Case("bad_utf8.jsonl", "not UTF-8 text: byte 0xff at column 54"),
    Case("bad_utf8_list.json", "not UTF-8 text: byte 0xff at column 54", line=3, whole_file=True),
    Case("not_an_object.jsonl", "a record is an object"),
    Case("wrong_types.jsonl", "content must be a string or a list"),
    Case("reserved_token.jsonl", r"reserved token <\|audio_pad\|>"),
    Case("directory_as_media.jsonl", "image file not found"),
    Case("not_media.jsonl", "cannot decode image"),
    Case("truncated_wav.jsonl", "truncated.wav is truncated: its header declares 0.50 s, the file holds 0.06 s"),
    Case("empty_wav.jsonl", "shorter than 10 ms"),
    Case("nan_audio.jsonl", "non-finite samples"),
    Case("long_audio.jsonl", "6.0 s of audio is ~78 tokens, over data.max_length=64",
         overrides=("data.max_length=64",)),
    Case("huge_png.jsonl", "huge.png is too large to decode safely .*169000000 pixels"),
    Case("bomb_png.jsonl", "bomb.png is too large to decode safely .*10000000000 pixels"),
    Case("truncated_png.jsonl", "cannot decode image .*truncated"),
    Case("garbage_video.jsonl", "cannot decode video"),
]

runner = CliRunner()


_PROCESSORS: dict = {}


@pytest.fixture(autouse=True)
def processor_loaded_once(monkeypatch):
    """The real processor, loaded once for all cases: the CLI spends 2 s per call parsing the tokenizer."""
    import omnitune.model.load as load

    real = load.load_processor

    def once(cfg, path=None):
        key = (cfg.path, cfg.variant, path)
        if key not in _PROCESSORS:
            _PROCESSORS[key] = real(cfg, path)
        return _PROCESSORS[key]

    monkeypatch.setattr(load, "load_processor", once)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """A copy of the corpus (with its symlinks made) beside a decodable image outside it."""
    root = tmp_path_factory.mktemp("hostile")
    copy = root / "corpus"
    shutil.copytree(CORPUS, copy)
    write_png(root / "outside.png", tinted_frame("red", np.random.default_rng(0), 32))
    for link, target in SYMLINKS.items():
        (copy / link).symlink_to(target)
    return copy


def test_every_corpus_file_has_a_case():
    assert sorted(p.name for p in CORPUS.iterdir() if p.is_file() and p.suffix in (".jsonl", ".json")) == \
        sorted(c.data for c in CASES)


@pytest.mark.parametrize("mode", ["skip", "fail"])
@pytest.mark.parametrize("case", CASES, ids=[c.data for c in CASES])
def test_hostile_input_is_a_clear_error_or_a_reported_skip(corpus, tmp_path, case, mode):
    data = corpus / case.data
    args = ["prepare", "demo", "--set", f"data.train={data}", "--set", f"output_dir={tmp_path / 'run'}",
            "--set", f"data.on_error={mode}", "--set", "data.workers=1"]
    for item in case.overrides:
        args += ["--set", item]
    res = runner.invoke(app, args, env={"COLUMNS": "1000"})  # rich wraps at 80 columns without a terminal
    out = res.output
    assert "Traceback" not in out and (res.exception is None or isinstance(res.exception, SystemExit)), out
    where = re.escape(f"{data}:{case.line}: ")
    if mode == "skip" and not case.whole_file:
        assert res.exit_code == 0, out
        assert re.search(f"skipped {where}.*({case.reason})", out), out
        assert "1 kept, 1 skipped" in out  # only the hostile record is skipped; the good one is kept
    else:
        assert res.exit_code == 1, out
        (error,) = [line for line in out.splitlines() if line.startswith("error:")]
        assert re.match(f"error: {where}.*({case.reason})", error), out
        assert not list((tmp_path / "run" / "cache").glob("*-*")), "nothing is cached from a failed prepare"
