"""Shared test setup."""

from __future__ import annotations

import pytest

from metalstm import kernels


@pytest.fixture(scope="session", autouse=True)
def fused_kernels_built() -> None:
    """Build (or load) the fused LSTM kernels once, before any test: the first build takes about 30 s, which no
    test that times out, serves requests or trains in a Ray worker should pay for."""
    kernels.warm_up()
