"""Save -> kill -9 -> resume under each sharded engine on N GPUs (issue 20, run 4): `omnitune train --nproc N`
trains the tiny model uninterrupted; a second run is killed with SIGKILL (every process of the launch at once)
after its step-`--kill-after` checkpoint, then resumed with `--resume` in fresh processes. The resumed run's losses
must equal the uninterrupted run's at every step (within --tol). The tiny model keeps the check to seconds: what
is checked is the engines' checkpoints and NCCL, not the model's size.

Usage (GPU machine): source bench/gpu_env.sh && python3 bench/check_scaleout_resume.py --nproc 2 \\
    --strategies fsdp2,zero3
On a CPU (gloo) it runs as is. Prints a table, writes $OUT/check_scaleout_resume.json.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # the tests' text data: the same runs as the CPU tests
from distributed_helpers import text_dataset


def command(out: Path, data: Path, strategy: str, nproc: int, steps: int, resume: bool) -> list[str]:
    sets = [f"data.train={data}", f"output_dir={out}", "data.workers=1", "log.tensorboard=false",
            "train.logging_steps=1", "adapter.train=[]", f"train.max_steps={steps}", "train.save_steps=2",
            "train.batch_size=2", "train.lr=5e-3", "train.scheduler=constant", "train.warmup_ratio=0",
            "train.save_total_limit=10", f"distributed.strategy={strategy}"]
    return [sys.executable, "-m", "omnitune", "train", "demo", *[x for s in sets for x in ("--set", s)],
            "--nproc", str(nproc), *(["--resume"] if resume else [])]


def losses(out: Path) -> dict[int, float]:
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def kill_tree(pid: int) -> None:
    """SIGKILL a launch and every process under it (torchrun starts its workers in sessions of their own)."""
    import psutil

    root = psutil.Process(pid)
    for proc in [*root.children(recursive=True), root]:
        try:
            proc.kill()
        except psutil.NoSuchProcess:
            pass


def killed_after(cmd: list[str], checkpoint: Path, timeout: int) -> float:
    """Run `cmd` and SIGKILL it with all its processes once `checkpoint` is in place."""
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    t0 = time.time()
    while not (checkpoint / "trainer_state.json").exists():
        if proc.poll() is not None:
            raise RuntimeError(f"the run ended (exit {proc.returncode}) before {checkpoint.name} was written")
        if time.time() - t0 > timeout:
            kill_tree(proc.pid)
            raise TimeoutError(f"no {checkpoint.name} after {timeout}s")
        time.sleep(0.1)
    kill_tree(proc.pid)  # the launcher, torchrun and every worker, mid-step
    proc.wait()
    return time.time() - t0


def check(strategy: str, nproc: int, steps: int, kill_after: int, timeout: int, tol: float) -> dict:
    work = Path(tempfile.mkdtemp(prefix=f"resume-{strategy}-"))
    data = text_dataset(work / "data", n=4 * steps * nproc)
    env_run = {"timeout": timeout, "capture_output": True, "text": True}
    whole = subprocess.run(command(work / "whole", data, strategy, nproc, steps, False), check=False, **env_run)
    if whole.returncode != 0:
        return {"strategy": strategy, "nproc": nproc, "error": (whole.stdout + whole.stderr)[-3000:]}
    cut = work / "cut"
    try:
        killed_s = killed_after(command(cut, data, strategy, nproc, steps, False),
                                cut / "checkpoints" / f"checkpoint-{kill_after}", timeout)
    except (RuntimeError, TimeoutError) as e:
        return {"strategy": strategy, "nproc": nproc, "error": str(e)}
    at_kill = sorted(p.name for p in (cut / "checkpoints").glob("checkpoint-*"))
    resumed = subprocess.run(command(cut, data, strategy, nproc, steps, True), check=False, **env_run)
    if resumed.returncode != 0:
        return {"strategy": strategy, "nproc": nproc, "error": (resumed.stdout + resumed.stderr)[-3000:]}
    a, b = losses(work / "whole"), losses(cut)
    worst = max(abs(a[s] - b[s]) for s in a) if a.keys() == b.keys() else float("inf")
    return {"strategy": strategy, "nproc": nproc, "steps": steps, "killed_after_s": killed_s,
                "checkpoints_at_kill": at_kill, "whole": a, "resumed": b,
                "max_abs_diff": worst, "ok": worst <= tol}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--strategies", default="fsdp2,zero3")
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--kill-after", type=int, default=4, help="the checkpoint whose appearance triggers the kill")
    ap.add_argument("--timeout", type=int, default=240)
    ap.add_argument("--tol", type=float, default=1e-5)
    args = ap.parse_args()
    out_dir = Path(os.environ.get("OUT", "."))
    out_dir.mkdir(parents=True, exist_ok=True)
    results = []
    for strategy in args.strategies.split(","):
        results.append(check(strategy, args.nproc, args.steps, args.kill_after, args.timeout, args.tol))
        print(json.dumps(results[-1]), flush=True)
        (out_dir / "check_scaleout_resume.json").write_text(json.dumps(results, indent=1))
    print("| strategy | GPUs | killed after | max |loss diff| over steps | same curve |\n|---|---|---|---|---|")
    for r in results:
        if "error" in r:
            print(f"| {r['strategy']} | {r['nproc']} | error: {r['error'].splitlines()[-1][:80]} | | |")
        else:
            print(f"| {r['strategy']} | {r['nproc']} | checkpoint-{args.kill_after} ({r['killed_after_s']:.0f} s) "
                  f"| {r['max_abs_diff']:.2e} over {len(r['whole'])} | {'yes' if r['ok'] else 'NO'} |")


if __name__ == "__main__":
    main()
