"""bench/bench_scaleout.py's code paths, dry-run on the CPU at tiny sizes (engines at world size 1 under torchrun)
so the GPU script cannot rot between GPU runs. No timing is asserted."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_bench_scaleout_dry_run_measures_an_engine_under_torchrun(tmp_path):
    pytest.importorskip("deepspeed")
    env = {**os.environ, "BENCH_DEVICE": "cpu", "BENCH_TINY": "1", "OUT": str(tmp_path / "out"),
           "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT / "bench")])}
    res = subprocess.run([sys.executable, str(ROOT / "bench" / "bench_scaleout.py"), "--runs", "zero3",
                          "--nproc", "1", "--seq", "96", "--layers", "2", "--steps", "2", "--warmup", "1",
                          "--set", "train.precision=fp32"], check=False, capture_output=True, text=True, env=env,
                         timeout=600)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    results = json.loads((tmp_path / "out" / "bench_scaleout.json").read_text())["results"]
    assert [r["run"] for r in results] == ["zero3"] and "error" not in results[0]
    assert results[0]["plan"][0] == "device: cpu (zero3)"  # the engine at world size 1, under torchrun
    assert "| zero3 | 1 | lora r16 |" in res.stdout
