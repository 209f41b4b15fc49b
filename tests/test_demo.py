"""`omnitune demo` end to end, through the installed command, as a new user would run it."""

import re
import subprocess

import pytest


@pytest.mark.slow
def test_demo_improves_the_held_out_score_by_a_clear_margin(tmp_path):
    res = subprocess.run(["omnitune", "demo", "--out", str(tmp_path / "demo")], capture_output=True, text=True,
                         timeout=900, cwd=tmp_path)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    out = res.stdout
    loss = re.search(r"loss[^│\n]*│\s+([\d.]+)\s+│\s+([\d.]+)", out)
    acc = re.search(r"exact match\s+│\s+([\d.]+)%\s+│\s+([\d.]+)%", out)
    assert loss and acc, out[-2000:]
    base_loss, tuned_loss = map(float, loss.groups())
    base_acc, tuned_acc = map(float, acc.groups())
    assert tuned_loss < base_loss - 2.0
    assert tuned_acc >= base_acc + 40.0
    voice = re.search(r"voice: codec CE\s+│\s+([\d.]+)\s+│\s+([\d.]+)", out)  # the Talker's new voice
    assert voice and float(voice.group(2)) < float(voice.group(1)) - 2.0, out[-2000:]
    assert (tmp_path / "demo" / "voice-reply.wav").exists()
    run = tmp_path / "demo" / "run"
    assert (run / "adapter" / "adapter_model.safetensors").exists()
    assert (run / "metrics.jsonl").exists()
