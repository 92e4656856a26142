"""MLflow tracking from rank 0: the default local store, a real ``mlflow server``, and both failure cases.

No mocks: the outage test kills a real server mid-run and brings it back on the same port and database.
"""

from __future__ import annotations

import logging
import shlex
import shutil
import subprocess
from pathlib import Path

import mlflow
import pytest
import torch
from mlflow.tracking import MlflowClient
from servers import free_port, start_server, stop_server

from metalstm import MAMLConfig, MetaLearner, ModelConfig, build_model, save_checkpoint
from metalstm.checkpoint import learner_from_checkpoint, load_checkpoint
from pipeline.cli import main
from pipeline.errors import UserError
from pipeline.tracking import plots
from pipeline.tracking.registry import load_learner
from pipeline.tracking.runs import Tracker, check_tracking_server, flatten_params, redact, resolve_tracking_uri

CONFIG = {"name": "tiny", "model": {"kind": "mlp", "mlp_hidden": [8, 8]}, "optim": {"lr": 0.001},
          "data": {"store": "memory://tiny"}}


@pytest.fixture(autouse=True)
def http_env(monkeypatch):
    """The tracker sets MLflow's HTTP defaults process-wide; pin them here so they are restored after."""
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")


@pytest.fixture(autouse=True)
def keep_dir(monkeypatch, tmp_path) -> Path:
    """Where a model that cannot be logged is kept (by default under the home directory): here, under tmp_path."""
    monkeypatch.setenv("METALSTM_KEEP_DIR", str(tmp_path / "kept"))
    return tmp_path / "kept"


@pytest.fixture
def checkpoint(tmp_path) -> Path:
    torch.manual_seed(0)
    cfg = ModelConfig(kind="mlp", mlp_hidden=[8, 8])
    learner = MetaLearner(build_model(cfg), MAMLConfig(inner_steps=1, inner_lr=0.01))
    store = {"uri": "memory://tiny", "hash": "sha256:abc", "family": "synthetic", "features": {}, "vocab": {},
             "normalisation": {}}
    return save_checkpoint(tmp_path / "ckpt" / "checkpoint.pt", learner, cfg,
                           {"config": CONFIG, "store": store, "step": 3, "val_loss": 1.5})


def steps_logged(client: MlflowClient, run_id: str, key: str = "train_loss") -> list[int]:
    return sorted(m.step for m in client.get_metric_history(run_id, key))


def test_resolve_tracking_uri(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert resolve_tracking_uri() == f"sqlite:///{tmp_path}/mlflow.db"
    assert resolve_tracking_uri("sqlite:///sub/x.db") == f"sqlite:///{tmp_path}/sub/x.db"  # absolute for workers
    assert resolve_tracking_uri("runs.db") == f"sqlite:///{tmp_path}/runs.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://tracking:5000")
    assert resolve_tracking_uri() == "http://tracking:5000"
    assert resolve_tracking_uri("http://other:1") == "http://other:1"
    assert redact("https://user:secret@host:8443/x") == "https://***@host:8443/x"


def test_flatten_params_and_plots():
    flat = flatten_params({"model": {"kind": "mlp", "mlp_hidden": [40, 40]}, "note": "x" * 7000, "n": None})
    assert flat["model.kind"] == "mlp" and flat["model.mlp_hidden"] == "[40, 40]" and flat["n"] == "None"
    assert len(flat["note"]) == 6000 and flat["note"].endswith("[truncated]")
    history = [{"step": 1, "train_loss": 2.0}, {"step": 2, "train_loss": 1.0, "val_post_loss": 0.5,
                                                 "val_support_curve": [1.0, 0.5]}]
    for fig in (plots.learning_curves(history), plots.adaptation_curves([3.0, 2.0], [2.0, 0.5])):
        png = plots.to_png(fig)
        assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000


def test_unreachable_server_at_start_is_a_clear_error(tmp_path, capsys):
    uri = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    with pytest.raises(UserError, match="unreachable"):
        check_tracking_server(uri, timeout=2)
    tracker = Tracker(uri, "exp")
    with pytest.raises(UserError, match=f"{uri}.*unreachable"):
        tracker.start(CONFIG, {})
    assert tracker.run_id is None
    assert tracker.log_model(str(tmp_path / "x.pt"), "m") is None  # never raises, even unstarted
    # the registry commands fail the same way, with exit code 2 and no traceback
    assert main(["evaluate", "--model", "models:/m@champion", "--tasks", "x", "--tracking-uri", uri]) == 2
    assert "unreachable" in capsys.readouterr().err


def test_tracker_on_the_default_local_store(tmp_path, monkeypatch, checkpoint):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    tracker = Tracker(None, "tiny-exp", run_name="tiny")
    run_id = tracker.start(CONFIG, {"metalstm.task_store": "memory://tiny", "metalstm.task_store_hash": "sha256:abc"})
    tracker.log_metrics({"train_loss": 1.0, "tasks_per_s": 12.5, "text": "skipped"}, step=1)
    tracker.log_metrics({"train_loss": 0.5, "val_pre_loss": 2.0, "val_post_loss": 1.0}, step=2)
    tracker.log_learning_curves([{"step": 1, "train_loss": 1.0},
                                 {"step": 2, "train_loss": 0.5, "val_post_loss": 1.0, "val_support_curve": [2, 1]}])
    tracker.log_adaptation_curves([2.0, 1.8, 1.7], [2.0, 1.0, 0.6])
    tracker.log_artifact(checkpoint, "files")
    assert tracker.log_model(str(checkpoint), "tiny-model", tag="best") == "1"
    assert tracker.finish() == []
    assert checkpoint.exists()  # the caller's checkpoint is left alone

    assert (tmp_path / "mlflow.db").is_file()
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.info.artifact_uri.startswith((tmp_path / "mlartifacts").as_uri())
    assert run.data.params["model.mlp_hidden"] == "[8, 8]" and run.data.params["optim.lr"] == "0.001"
    tags = run.data.tags
    assert tags["metalstm.task_store"] == "memory://tiny" and tags["metalstm.task_store_hash"] == "sha256:abc"
    assert tags["metalstm.version"] and tags["metalstm.git_commit"]
    assert steps_logged(client, run_id) == [1, 2] and "text" not in run.data.metrics
    assert steps_logged(client, run_id, "adaptation_curve_after") == [0, 1, 2]
    files = {f.path for f in client.list_artifacts(run_id)} | {f.path for f in client.list_artifacts(run_id, "plots")}
    assert {"config.yaml", "plots/learning_curves.png", "plots/adaptation_curves.png", "files"} <= files
    local = Path(mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path="plots/learning_curves.png",
                                                     dst_path=str(tmp_path / "dl"), tracking_uri=client.tracking_uri))
    assert local.read_bytes()[:4] == b"\x89PNG"

    mv = client.get_model_version("tiny-model", "1")
    assert mv.status == "READY" and mv.run_id == run_id and mv.source.startswith("models:/m-")
    assert mv.tags["metalstm.tag"] == "best" and mv.tags["metalstm.family"] == "regression"
    assert mv.tags["metalstm.task_store_hash"] == "sha256:abc"
    model_dir = Path(mlflow.artifacts.download_artifacts("models:/tiny-model/1", dst_path=str(tmp_path / "model"),
                                                         tracking_uri=client.tracking_uri,
                                                         registry_uri=client.tracking_uri))
    assert (model_dir / "artifacts" / "checkpoint.pt").is_file() and (model_dir / "metalstm_model.py").is_file()
    assert not list(model_dir.rglob("*.pkl"))  # no pickled python model, only the weights_only checkpoint
    assert mlflow.models.get_model_info(str(model_dir)).signature.inputs.input_names() == [
        "support_x", "support_y", "query_x"]

    # resuming the run (a restarted rank 0) continues it and notes changed params
    resumed = Tracker(None, "tiny-exp", run_id=run_id)
    assert resumed.start({**CONFIG, "optim": {"lr": 0.01}}, {}) == run_id
    assert client.get_run(run_id).info.status == "RUNNING"
    resumed.log_metrics({"train_loss": 0.25}, step=3)
    assert resumed.finish() == []
    run = client.get_run(run_id)
    assert run.data.params["optim.lr"] == "0.001" and run.data.tags["metalstm.resume_param_changes"] == "optim.lr"
    assert steps_logged(client, run_id) == [1, 2, 3] and run.info.status == "FINISHED"

    # the trainer's flow: the driver creates the run, rank 0 fills it in
    driver_run = client.create_run(run.info.experiment_id, run_name="driver").info.run_id
    filled = Tracker(None, "tiny-exp", run_id=driver_run)
    filled.start(CONFIG, {})
    assert filled.finish() == []
    assert "config.yaml" in {f.path for f in client.list_artifacts(driver_run)}
    assert client.get_run(driver_run).data.params["model.kind"] == "mlp"


@pytest.mark.integration
def test_server_outage_mid_run_does_not_stop_training(tmp_path, checkpoint, keep_dir):
    root, port = tmp_path / "server", free_port()
    uri = f"http://127.0.0.1:{port}"
    server = start_server(root, port)
    try:
        tracker = Tracker(uri, "outage", run_name="outage", max_retries=2, backoff=0.05, max_backoff=0.2,
                          flush_timeout=20, http_timeout=5)
        run_id = tracker.start(CONFIG, {})
        tracker.log_metrics({"train_loss": 1.0}, step=0)
        assert tracker.flush(60)

        # the server dies: logging keeps returning, failures wait, the checkpoint stays on disk
        stop_server(server)
        tracker.log_metrics({"train_loss": 0.9}, step=1)
        tracker.log_metrics({"train_loss": 0.8}, step=2)
        assert tracker.log_model(str(checkpoint), "outage-model", tag="best") is None
        assert checkpoint.exists()
        assert tracker.flush(60)
        pending = tracker.pending_failures()
        assert any("step 1" in p for p in pending) and any("step 2" in p for p in pending)
        assert any("model 'best'" in p for p in pending)

        # it comes back (same port, same database): the failed metrics are sent again
        server = start_server(root, port)
        tracker.log_metrics({"train_loss": 0.7}, step=3)
        assert tracker.flush(60)
        assert steps_logged(MlflowClient(uri), run_id) == [0, 1, 2, 3]

        # it dies for good: finish() still returns, and says what was not logged
        stop_server(server)
        tracker.log_metrics({"train_loss": 0.6}, step=4)
        missing = tracker.finish()
    finally:
        stop_server(server)
    assert any("step 4" in m for m in missing)
    assert any("model 'best'" in m and f"kept on disk at {keep_dir / run_id / 'best.pt'}" in m for m in missing)
    assert any(m.startswith("run status FINISHED") for m in missing)
    offline = MlflowClient(f"sqlite:///{root / 'server.db'}")  # read the server's database directly
    assert steps_logged(offline, run_id) == [0, 1, 2, 3]
    assert offline.get_run(run_id).info.status == "RUNNING"


@pytest.mark.integration
def test_model_kept_and_registrable_when_mlflow_is_down_at_the_end(tmp_path, checkpoint, keep_dir, caplog):
    """The trainer hands log_model temporary copies and deletes them afterwards: with the server down at that
    moment, the checkpoints must survive at a reported path, and the reported command must register them."""
    root, port = tmp_path / "server", free_port()
    uri = f"http://127.0.0.1:{port}"
    server = start_server(root, port)
    try:
        tracker = Tracker(uri, "down-at-end", run_name="down", max_retries=1, backoff=0.05, max_backoff=0.1,
                          flush_timeout=10, http_timeout=5)
        run_id = tracker.start(CONFIG, {})
        tracker.log_metrics({"train_loss": 1.0}, step=0)
        assert tracker.flush(60)
        stop_server(server)

        temporary = tmp_path / "tmp-copies"
        temporary.mkdir()
        with caplog.at_level(logging.WARNING, logger="pipeline.tracking.runs"):
            for tag in ("final", "best", "best"):  # the same tag twice: the second copy must not replace the first
                copy = temporary / f"metalstm-{tag}.pt"
                shutil.copyfile(checkpoint, copy)
                assert tracker.log_model(str(copy), "down-model", tag=tag) is None
            missing = tracker.finish()
        shutil.rmtree(temporary)  # what the trainer does with its copies after the run

        kept = tracker.unlogged_models()
        paths = [Path(k["path"]) for k in kept]
        assert paths == [keep_dir / run_id / "final.pt", keep_dir / run_id / "best.pt", keep_dir / run_id / "best-2.pt"]
        for path in paths:
            ckpt = load_checkpoint(path)  # the project's loader, weights only
            assert ckpt["extra"]["step"] == 3
            learner_from_checkpoint(ckpt)
            assert f"kept on disk at {path}" in caplog.text
            assert any(f"kept on disk at {path}" in m for m in missing)
        best = kept[1]
        assert best["command"] in caplog.text and "--run-id " + run_id in best["command"]
        assert "--name down-model" in best["command"] and (keep_dir / run_id / "best.json").is_file()

        # the store is back: the reported command logs and registers the kept checkpoint, in a fresh process
        server = start_server(root, port)
        out = subprocess.run(shlex.split(best["command"]), capture_output=True, text=True, timeout=300, cwd=tmp_path)
        assert out.returncode == 0, out.stderr[-3000:]
        client = MlflowClient(uri)
        (mv,) = client.search_model_versions("name = 'down-model'")
        assert mv.status == "READY" and mv.run_id == run_id and mv.tags["metalstm.tag"] == "best"
        learner, ckpt, resolved = load_learner(f"models:/down-model/{mv.version}", uri, str(tmp_path / "dl"))
        assert ckpt["extra"]["step"] == 3 and resolved.version == mv.version
        assert paths[1].is_file()  # the kept copy is left in place

        # a store that is still down: the command fails with exit 2 and changes nothing
        stop_server(server)
        out = subprocess.run(shlex.split(kept[0]["command"]), capture_output=True, text=True, timeout=300)
        assert out.returncode == 2 and "unreachable" in out.stderr and paths[0].is_file()
    finally:
        stop_server(server)


def test_register_command_refuses_a_file_that_is_no_checkpoint(tmp_path, capsys):
    from pipeline.cli import main as metalstm

    bad = tmp_path / "x.pt"
    bad.write_bytes(b"not a checkpoint")
    assert metalstm(["register", str(bad), "--tracking-uri", f"sqlite:///{tmp_path}/mlflow.db"]) == 2
    assert "cannot be loaded" in capsys.readouterr().err
    assert metalstm(["register", str(tmp_path / "missing.pt")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert not (tmp_path / "mlflow.db").exists()
