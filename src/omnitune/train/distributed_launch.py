"""`omnitune train RECIPE --nproc N`: the same command under torchrun, one process per GPU (and node).

torchrun does the launching (process per GPU, rendezvous, restarts of failed workers); this only writes its
command line, so `torchrun -m omnitune train RECIPE` stays the documented equivalent (docs/scaleout.md).
"""
from __future__ import annotations

import os
import subprocess
import sys

from omnitune.recipe import Recipe, RecipeError


def torchrun_command(recipe_source: str, overrides: list[str], resume: bool, nproc: int, nnodes: int = 1,
                     rdzv_endpoint: str | None = None, rdzv_id: str = "omnitune") -> list[str]:
    """The torchrun command line that runs `omnitune train` in `nproc` processes on each of `nnodes` machines."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc)]
    if nnodes > 1:
        if not rdzv_endpoint:
            raise RecipeError("--nnodes > 1 needs --rdzv-endpoint HOST:PORT (a machine every node reaches)")
        cmd += ["--nnodes", str(nnodes), "--rdzv-backend", "c10d", "--rdzv-endpoint", rdzv_endpoint,
                "--rdzv-id", rdzv_id]
    else:
        cmd += ["--standalone"]  # a free port on this machine: no clash with another run's rendezvous
    cmd += ["-m", "omnitune", "train", recipe_source]
    for item in overrides:
        cmd += ["--set", item]
    return cmd + (["--resume"] if resume else [])


def launch(recipe: Recipe, recipe_source: str, overrides: list[str], resume: bool, nproc: int, nnodes: int,
           rdzv_endpoint: str | None) -> int:
    """Run `omnitune train` under torchrun and return its exit code."""
    if "LOCAL_RANK" in os.environ:
        raise RecipeError("--nproc/--nnodes: already running under torchrun; launch either way, not both")
    if recipe.distributed.strategy == "none":
        raise RecipeError(f"--nproc {nproc}: set distributed.strategy (ddp, fsdp2, zero2 or zero3) to say how the "
                          "processes share the work, e.g. --set distributed.strategy=fsdp2")
    return subprocess.call(torchrun_command(recipe_source, overrides, resume, nproc, nnodes, rdzv_endpoint))
