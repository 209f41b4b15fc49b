"""bench/bench_talker.py dry-run on the CPU at tiny widths (BENCH_TINY), so the GPU script cannot rot between GPU
runs: both paths train through `omnitune train`'s code and the table and JSON come out. No timing is asserted."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_bench_talker_dry_run_trains_both_paths_and_writes_json(tmp_path):
    env = {**os.environ, "BENCH_DEVICE": "cpu", "BENCH_TINY": "1", "OUT": str(tmp_path / "out"),
           "PYTHONPATH": f"{ROOT / 'src'}{os.pathsep}{ROOT / 'bench'}"}
    res = subprocess.run([sys.executable, str(ROOT / "bench" / "bench_talker.py"), "--thinker-layers", "2",
                          "--steps", "3", "--warmup", "1", "--records", "3", "--prompt", "12", "--answer", "6",
                          "--seconds", "1"], capture_output=True, text=True, env=env, timeout=600)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    results = json.loads((tmp_path / "out" / "bench_talker.json").read_text())["results"]
    assert [r["run"] for r in results] == ["ours", "peft"]
    assert all("error" not in r for r in results), results
    assert all(r["frames"] == 13 for r in results)  # 1 s of speech at 12.5 frames a second, the last one partial
    assert "objective: talker_codec" in results[0]["plan"]
    assert "| ours | omnitune train (r32) | 2 / 2 |" in res.stdout
