"""Finding the runs: ``metalstm ui`` opens the store the project used, and every look-up that finds nothing names
the tracking URI it searched and creates nothing."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests
from servers import free_port, process_gone

from pipeline.cli import main

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return tmp_path


def _store(path: Path, model: str | None = None) -> str:
    """A sqlite MLflow store at ``path`` (optionally with a registered model), as training leaves one."""
    from mlflow.tracking import MlflowClient

    path.parent.mkdir(parents=True, exist_ok=True)
    uri = f"sqlite:///{path}"
    client = MlflowClient(uri, registry_uri=uri)
    client.search_experiments(max_results=1)
    if model:
        client.create_registered_model(model)
    return uri


def _children(pid: int) -> list[int]:
    """The processes whose parent is ``pid`` (Linux /proc)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            if int(stat.read_text().rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(stat.parent.name))
        except (OSError, ValueError, IndexError):
            continue
    return found


def _files(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


def test_lookups_in_a_directory_without_a_store_name_it_and_create_nothing(workdir, capsys):
    db, demo = workdir / "mlflow.db", workdir / ".metalstm" / "demo" / "mlflow.db"
    assert main(["ui"]) == 2
    err = capsys.readouterr().err
    assert f"sqlite:///{db}" in err and f"sqlite:///{demo}" in err and "nothing was created" in err
    for argv in (["evaluate", "--model", "models:/metalstm-demo@champion"], ["rollback", "metalstm-demo"],
                 ["promote", "metalstm-demo", "--version", "1"],
                 ["serve", "--model", "models:/metalstm-demo@champion"]):
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert f"no MLflow tracking store at sqlite:///{db}" in err, (argv, err)
    missing = workdir / "elsewhere" / "runs.db"
    assert main(["evaluate", "--model", "models:/m/1", "--tracking-uri", str(missing)]) == 2
    assert f"sqlite:///{missing}" in capsys.readouterr().err
    assert _files(workdir) == []  # no empty mlflow.db, no directories


def test_a_missing_model_names_the_store_searched_and_the_other_stores(workdir, capsys):
    demo = _store(workdir / ".metalstm" / "demo" / "mlflow.db", model="metalstm-demo")
    here = _store(workdir / "mlflow.db", model="metalstm-synthetic")
    before = _files(workdir)
    assert main(["evaluate", "--model", "models:/metalstm-demo@champion"]) == 2
    err = capsys.readouterr().err
    assert "no such registered model version or alias" in err
    assert f"in {here}" in err and demo in err and "registered models there: metalstm-synthetic" in err
    assert main(["evaluate", "--model", "models:/metalstm-demo@champion", "--tracking-uri", demo]) == 2
    err = capsys.readouterr().err
    assert f"in {demo}" in err and "registered models there: metalstm-demo" in err
    assert _files(workdir) == before


def test_ui_opens_the_store_the_runs_went_to(workdir, capsys, monkeypatch):
    demo = _store(workdir / ".metalstm" / "demo" / "mlflow.db")
    assert main(["ui", "--dry-run", "--port", "5123"]) == 0
    uri, command = capsys.readouterr().out.splitlines()
    assert uri == demo  # only the demo has run here
    assert f"--backend-store-uri {demo}" in command and "--port 5123" in command
    assert f"--artifacts-destination {workdir / '.metalstm' / 'demo' / 'mlartifacts'}" in command
    time.sleep(0.05)
    here = _store(workdir / "mlflow.db")  # then `metalstm train` here: the newer store wins
    assert main(["ui", "--dry-run"]) == 0
    assert capsys.readouterr().out.splitlines()[0] == here
    assert main(["ui", "--dry-run", "--tracking-uri", ".metalstm/demo/mlflow.db"]) == 0
    assert capsys.readouterr().out.splitlines()[0] == demo
    monkeypatch.setenv("MLFLOW_TRACKING_URI", str(workdir / "nowhere.db"))
    assert main(["ui", "--dry-run"]) == 2
    assert f"sqlite:///{workdir / 'nowhere.db'}" in capsys.readouterr().err
    assert not (workdir / "nowhere.db").exists()


@pytest.mark.integration
def test_ui_serves_the_runs_and_stops_with_its_server(tmp_path):
    """The real ``mlflow server`` behind ``metalstm ui``: it shows the store's experiments, listens on 127.0.0.1
    only, and SIGTERM stops it and its workers."""
    from mlflow.tracking import MlflowClient

    uri = _store(tmp_path / ".metalstm" / "demo" / "mlflow.db")
    MlflowClient(uri).create_experiment("seen-in-the-ui")
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    env["PYTHONPATH"] = str(ROOT)
    with open(tmp_path / "ui.log", "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "pipeline.cli", "ui", "--port", str(port)], cwd=tmp_path,
                                env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        base, deadline, reply = f"http://127.0.0.1:{port}", time.monotonic() + 180, None
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                reply = requests.get(f"{base}/api/2.0/mlflow/experiments/get-by-name",
                                     params={"experiment_name": "seen-in-the-ui"}, timeout=5)
                break
            except requests.RequestException:
                time.sleep(0.5)
        assert reply is not None and reply.ok, (tmp_path / "ui.log").read_text()[-2000:]
        assert reply.json()["experiment"]["name"] == "seen-in-the-ui"
        assert f"MLflow UI on {uri}" in (tmp_path / "ui.log").read_text()
        server = _children(proc.pid)
        assert server, "the mlflow server runs as a child of metalstm ui"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
        assert all(process_gone(pid) for pid in server)
        with pytest.raises(OSError):
            socket.create_connection(("127.0.0.1", port), timeout=2).close()
    finally:
        for pid in [proc.pid, *_children(proc.pid)]:  # the server runs in a process group of its own
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGKILL)
        assert process_gone(proc.pid)
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "mlruns").exists()
