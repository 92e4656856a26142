"""Shared test setup."""

from __future__ import annotations

from pathlib import Path

import pytest

from metalstm import kernels

ROOT = Path(__file__).resolve().parents[1]
CACHES = {".pytest_cache", ".ruff_cache", "__pycache__"}  # what running the tools themselves may create


@pytest.fixture(scope="session", autouse=True)
def fused_kernels_built() -> None:
    """Build (or load) the fused LSTM kernels once, before any test: the first build takes about 30 s, which no
    test that times out, serves requests or trains in a Ray worker should pay for."""
    kernels.warm_up()


@pytest.fixture(scope="session", autouse=True)
def kept_models_in_a_temporary_dir(tmp_path_factory):
    """A run that cannot log its model to MLflow keeps the checkpoint under METALSTM_KEEP_DIR (default
    ``~/.metalstm``): during tests, in a temporary folder, never the user's home."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("METALSTM_KEEP_DIR", str(tmp_path_factory.mktemp("unlogged-models")))
        yield


@pytest.fixture(scope="session", autouse=True)
def checkout_left_clean():
    """Tests write under tmp_path, never into the checkout: a new top-level entry after the session fails it
    (MLflow, for one, puts ``mlruns/`` in the working directory when an experiment has no artifact location)."""
    before = {p.name for p in ROOT.iterdir()}
    yield
    left = sorted({p.name for p in ROOT.iterdir()} - before - CACHES)
    assert not left, f"tests left these in the checkout {ROOT}: {left}"
