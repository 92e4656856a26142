"""The code base stays ruff-clean and the core stays free of Ray and MLflow."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(shutil.which("ruff") is None, reason="ruff is not installed (pip install -e '.[test]')")
def test_ruff_clean():
    out = subprocess.run(["ruff", "check", "--output-format", "concise", "."], cwd=REPO, capture_output=True,
                         text=True)
    assert out.returncode == 0, out.stdout + out.stderr


def test_core_imports_no_ray_or_mlflow():
    for path in (REPO / "metalstm").glob("*.py"):
        text = path.read_text()
        for banned in ("import ray", "from ray", "import mlflow", "from mlflow"):
            assert banned not in text, f"{path.name} must stay plain PyTorch: found {banned!r}"
