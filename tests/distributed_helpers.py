"""Helpers of the multi-process tests: a text dataset, and `omnitune train` run as one process or under torchrun
(gloo on the CPU), retried once when the launch itself fails (a port taken, a rendezvous that timed out)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LAUNCH_FLAKES = ("EADDRINUSE", "address already in use", "RendezvousTimeoutError", "Connection reset by peer")


def text_dataset(folder: Path, n: int = 8, seed: int = 0) -> Path:
    """n text conversations of different lengths (so ranks see different token counts)."""
    import random

    rng = random.Random(seed)
    words = ["red", "green", "blue", "sky", "sea", "tree", "stone", "river", "light", "cloud", "wind", "fire"]
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "train.jsonl"
    with path.open("w") as f:
        for _ in range(n):
            ask = " ".join(rng.choices(words, k=rng.randint(3, 12)))
            answer = " ".join(rng.choices(words, k=rng.randint(2, 20)))
            f.write(json.dumps({"conversations": [{"role": "user", "content": ask},
                                                  {"role": "assistant", "content": answer}]}) + "\n")
    return path


ROUTING_APART = ROOT / "tests" / "scripts" / "routing_apart"  # its sitecustomize forces routing apart per process


def child_env(routing_apart: bool = False) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_PORT")}
    paths = [str(ROOT / "src")] + ([str(ROUTING_APART)] if routing_apart else [])
    env.update(OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu", PYTHONPATH=os.pathsep.join(paths),
               OMNITUNE_TEST_ROUTING_APART="1" if routing_apart else "0")
    return env


def run(cmd: list[str], timeout: int = 300, routing_apart: bool = False) -> subprocess.CompletedProcess:
    """Run a launch, once more when the first attempt failed in the launch itself rather than in training."""
    for attempt in (1, 2):
        res = subprocess.run(cmd, check=False, capture_output=True, text=True, env=child_env(routing_apart),
                             cwd=ROOT, timeout=timeout)
        if res.returncode == 0 or attempt == 2 or not any(f in res.stdout + res.stderr for f in LAUNCH_FLAKES):
            return res
    return res


def omnitune_train(out: Path, data: Path, nproc: int, *sets: str, resume: bool = False, timeout: int = 300,
                   routing_apart: bool = False) -> subprocess.CompletedProcess:
    """`omnitune train demo` on `data` into `out`: one plain process, or `--nproc N` (torchrun underneath)."""
    args = ["train", "demo", "--set", f"data.train={data}", "--set", f"output_dir={out}", "--set", "data.workers=1",
            "--set", "log.tensorboard=false", "--set", "train.logging_steps=1", "--set", "adapter.train=[]",
            *[x for s in sets for x in ("--set", s)]]
    launch = (["--nproc", str(nproc)] if nproc > 1 else []) + (["--resume"] if resume else [])
    return run([sys.executable, "-m", "omnitune", *args, *launch], timeout=timeout, routing_apart=routing_apart)


def losses(out: Path) -> list[float]:
    """The per-step training losses the run logged (logging_steps=1)."""
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if "loss" in r]


def failed(res: subprocess.CompletedProcess) -> str:
    return res.stdout[-3000:] + res.stderr[-4000:]
