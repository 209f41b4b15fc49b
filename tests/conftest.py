"""Shared fixtures: one tiny Qwen3-Omni checkpoint (real classes, real tokenizer) per test session."""

from __future__ import annotations

import os
import warnings

import pytest

warnings.filterwarnings("ignore", message=".*rope_parameters.*")


@pytest.fixture(scope="session", autouse=True)
def omnitune_cache(tmp_path_factory):
    """Keep the tiny checkpoint and other caches out of the user's home; subprocesses inherit it."""
    path = tmp_path_factory.mktemp("omnitune-cache")
    old = os.environ.get("OMNITUNE_CACHE")
    os.environ["OMNITUNE_CACHE"] = str(path)
    yield path
    if old is None:
        os.environ.pop("OMNITUNE_CACHE", None)
    else:
        os.environ["OMNITUNE_CACHE"] = old


@pytest.fixture(scope="session")
def tiny_dir(omnitune_cache):
    from omnitune.model.tiny import tiny_checkpoint
    return tiny_checkpoint()
