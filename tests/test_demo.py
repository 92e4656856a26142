"""The README's quick start: ``metalstm demo`` on its embedded defaults, end to end, in a fresh directory."""

from __future__ import annotations

import json
import os
import re
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
from servers import free_port

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.integration
def test_demo_trains_registers_serves_and_adapts(tmp_path):
    """Nothing configured: it builds the built-in store, trains on a local Ray, registers and promotes the model
    in a local MLflow, serves it on 127.0.0.1, adapts one task over HTTP, and stops everything it started."""
    port = free_port()
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    for name in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI"):
        env.pop(name, None)
    proc = subprocess.run([sys.executable, "-m", "pipeline.cli", "demo", "--port", str(port)], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=540)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    assert re.search(r"done in \d+ s", out), out[-2000:]

    start = out.index("{", out.index("[6/6]"))  # the /v1/adapt answer the demo printed
    answer = json.loads(out[start:out.index("\n}", start) + 2])
    assert answer["model"]["name"] == "metalstm-demo" and answer["steps"] >= 1
    assert answer["support_loss_after"] < answer["support_loss_before"]
    assert re.search(r"query 0: predicted \[-?\d", out)

    # the run and the promoted version are in the local MLflow under the working directory
    db = tmp_path / ".metalstm" / "demo" / "mlflow.db"
    with sqlite3.connect(db) as con:
        assert con.execute("select count(*) from runs where status = 'FINISHED'").fetchone()[0] >= 1
        assert con.execute("select count(*) from registered_model_aliases where alias = 'champion'").fetchone()[0] == 1

    # the endpoint was stopped with everything else
    with pytest.raises(OSError):
        import socket

        socket.create_connection(("127.0.0.1", port), timeout=2).close()
