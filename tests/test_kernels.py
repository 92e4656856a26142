"""The fused kernels' cache: one folder per Python environment, so two virtual environments never rebuild each
other's kernels, and ``TORCH_EXTENSIONS_DIR`` still wins when a user sets it."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from metalstm import kernels


def test_each_python_environment_has_its_own_build_folder(monkeypatch, tmp_path):
    monkeypatch.delenv("TORCH_EXTENSIONS_DIR", raising=False)
    here = kernels.build_directory("k")
    assert here is not None and here.name == "k"
    assert here == kernels.build_directory("k")  # stable: a later process finds the same cache
    monkeypatch.setattr(sys, "prefix", str(tmp_path / "other-venv"))
    there = kernels.build_directory("k")
    assert there is not None and there != here and there.parent.parent == here.parent.parent
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "mine"))
    assert kernels.build_directory("k") is None  # PyTorch then builds under the user's folder


def test_the_loaded_kernels_come_from_this_environments_folder():
    module = kernels._build() if kernels.enabled() else None
    if module is None:
        pytest.skip("the fused kernels cannot be built here (no compiler or ninja)")
    library = Path(module.__file__)
    expected = kernels.build_directory(library.parent.name)
    if expected is None:
        pytest.skip("TORCH_EXTENSIONS_DIR is set: PyTorch chose the folder")
    assert library.parent == expected and (expected / "build.ninja").is_file()
