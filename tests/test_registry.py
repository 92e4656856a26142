"""The model registry end to end: evaluate, gated promote, rollback, and the alias invariant.

Real components only: a local sqlite MLflow store (the default backend), a real ``mlflow server`` for the
server test, real task stores, real checkpoints of a tiny sinusoid MLP (meta-trained = good, untrained = worse).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient
from registered import points_store, sine_checkpoint
from servers import free_port, start_server, stop_server

from metalstm import MAMLConfig, MetaLearner, ModelConfig, build_model, save_checkpoint
from metalstm.evaluation import evaluate_learner
from metalstm.sinusoid import sinusoid_tasks
from pipeline.cli import main
from pipeline.errors import UserError
from pipeline.tracking.pyfunc import example_tasks, save_pyfunc
from pipeline.tracking.registry import load_learner, load_tasks, parse_model_uri
from pipeline.tracking.runs import Tracker

NAME = "sine"


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """A working directory with the default (local sqlite) store, a task store and two registered versions."""
    root = tmp_path_factory.mktemp("registry")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)
        mp.delenv("MLFLOW_TRACKING_URI", raising=False)
        mp.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
        mp.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "20")
        store = points_store(root, "store", seed=3, test_tasks=12)
        store_uri = store["uri"]
        bad = sine_checkpoint(root / "bad.pt", 0, store)
        good = sine_checkpoint(root / "good.pt", 100, store)
        tracker = Tracker(None, "registry-test", run_name="sine")
        tracker.start({"model": {"kind": "mlp"}}, {})
        versions = {"bad": tracker.log_model(str(bad), NAME, tag="final"),
                    "good": tracker.log_model(str(good), NAME, tag="best")}
        assert tracker.finish() == []
        assert versions == {"bad": "1", "good": "2"}
        yield {"root": root, "store": store_uri, "good": good, "bad": bad,
               "client": MlflowClient(f"sqlite:///{root / 'mlflow.db'}")}


def cli(capsys, *argv: str) -> tuple[int, dict | None, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    try:
        return code, json.loads(out), err
    except ValueError:
        return code, None, err


def alias_version(client: MlflowClient, alias: str) -> str | None:
    version = client.get_registered_model(NAME).aliases.get(alias)
    return None if version is None else str(version)


def test_parse_model_uri():
    assert parse_model_uri("models:/a-b@champion") == ("a-b", "champion", None)
    assert parse_model_uri("models:/sine/12") == ("sine", None, "12")
    for bad in ("runs:/x/model", "models:/sine", "models:/sine/latest", "models:/@x"):
        with pytest.raises(ValueError, match="models:/NAME"):
            parse_model_uri(bad)


FAMILIES = {
    "mlp": ModelConfig(kind="mlp", mlp_hidden=[8]),
    "forecaster": ModelConfig(kind="forecaster", hidden_size=8, input_size=2, horizon=3),
    "char_lm": ModelConfig(kind="char_lm", hidden_size=8, vocab_size=12, embedding_size=4),
    "seq2seq": ModelConfig(kind="seq2seq", hidden_size=8, vocab_size=12, tgt_vocab_size=10, embedding_size=4),
}


@pytest.mark.parametrize("kind", sorted(FAMILIES))
def test_pyfunc_model_for_every_family(kind, tmp_path):
    import mlflow

    cfg = FAMILIES[kind]
    learner = MetaLearner(build_model(cfg), MAMLConfig(inner_steps=1, inner_lr=0.01))
    ckpt = save_checkpoint(tmp_path / "c.pt", learner, cfg, {"store": {"vocab": {"a": 4}}, "step": 0})
    meta = save_pyfunc(ckpt, tmp_path / "model", tag="best")
    assert meta["store"] == {"vocab": {"a": 4}} and meta["model"]["kind"] == kind
    model = mlflow.pyfunc.load_model(str(tmp_path / "model"))
    tasks = example_tasks(cfg, seed=1)
    pred = model.predict(tasks)["prediction"][0]
    n = len(tasks[0]["query_x"])
    assert len(pred) == n
    if kind == "mlp":
        assert len(pred[0]) == cfg.output_size
    elif kind == "forecaster":
        assert len(pred[0]) == cfg.horizon
    elif kind == "char_lm":
        assert len(pred[0]) == len(tasks[0]["query_x"][0]) and all(0 <= t < cfg.vocab_size for t in pred[0])
        logprobs = model.predict(tasks, params={"output": "logprobs"})["prediction"][0]
        assert len(logprobs[0][0]) == cfg.vocab_size
    else:
        assert all(0 <= t < cfg.tgt_vocab_size for t in pred[0]) and len(pred[0]) <= 2 * 6 + 10
        assert len(model.predict(tasks, params={"max_len": 2})["prediction"][0][0]) <= 2


# the models-from-code file of every version registered before pipeline/ had folders, byte for byte
OLD_MODEL_CODE = (
    '"""MLflow models-from-code entry point: the model is this file and a MetaLSTM checkpoint, no pickle."""\n'
    "import mlflow\n"
    "\n"
    "from pipeline.registry import MetaLSTMPyfunc\n"
    "\n"
    "mlflow.models.set_model(MetaLSTMPyfunc())\n"
)


def test_a_version_registered_before_the_move_still_loads(tmp_path, monkeypatch):
    """Versions registered before ``pipeline/`` had folders name ``pipeline.registry`` in their code file."""
    import mlflow

    from pipeline.tracking import pyfunc

    cfg = FAMILIES["mlp"]
    learner = MetaLearner(build_model(cfg), MAMLConfig(inner_steps=1, inner_lr=0.01))
    ckpt = save_checkpoint(tmp_path / "c.pt", learner, cfg, {"step": 0})
    monkeypatch.setattr(pyfunc, "MODEL_CODE", OLD_MODEL_CODE)
    save_pyfunc(ckpt, tmp_path / "model")
    saved = [p for p in (tmp_path / "model").rglob("*.py") if "from pipeline.registry import" in p.read_text()]
    assert saved, "the saved model's code file is the old one"
    model = mlflow.pyfunc.load_model(str(tmp_path / "model"))
    tasks = example_tasks(cfg, seed=1)
    pred = model.predict(tasks)["prediction"][0]
    assert len(pred) == len(tasks[0]["query_x"]) and len(pred[0]) == cfg.output_size


def test_new_versions_name_the_pyfunc_module(tmp_path):
    cfg = FAMILIES["mlp"]
    learner = MetaLearner(build_model(cfg), MAMLConfig(inner_steps=1, inner_lr=0.01))
    save_pyfunc(save_checkpoint(tmp_path / "c.pt", learner, cfg, {}), tmp_path / "model")
    code = "\n".join(p.read_text() for p in (tmp_path / "model").rglob("*.py"))
    assert "from pipeline.tracking.pyfunc import MetaLSTMPyfunc" in code


def test_a_store_for_another_model_kind_is_refused(env):
    manifest_path = Path(env["store"]) / "manifest.json"
    original = manifest_path.read_text()
    try:
        manifest = json.loads(original)
        manifest.pop("model_kind", None)  # a store built before manifests named their model: not checked
        manifest_path.write_text(json.dumps(manifest))
        assert len(load_tasks(env["store"], "test", 2, "forecaster")) == 2
        manifest["model_kind"] = "mlp"
        manifest_path.write_text(json.dumps(manifest))
        assert len(load_tasks(env["store"], "test", 2, "mlp")) == 2
        with pytest.raises(UserError, match="'mlp' model, but the checkpoint is a 'forecaster' model"):
            load_tasks(env["store"], "test", 2, "forecaster")
    finally:
        manifest_path.write_text(original)


def test_evaluate_command_ranks_the_meta_trained_model_first(env, capsys):
    code, good, _ = cli(capsys, "evaluate", "--model", f"models:/{NAME}/2", "--tasks", env["store"])
    assert code == 0 and good["primary_metric"] == "post_mse" and good["metrics"]["num_tasks"] == 12
    code, bad, _ = cli(capsys, "evaluate", "--model", f"models:/{NAME}/1", "--tasks", env["store"], "--limit", "12")
    assert code == 0
    assert good["metrics"]["post_mse"] < bad["metrics"]["post_mse"]
    assert good["metrics"]["post_mse"] < good["metrics"]["pre_mse"]  # adaptation helps the meta-trained model

    code, _, err = cli(capsys, "evaluate", "--model", f"models:/{NAME}@nobody", "--tasks", env["store"])
    assert code == 2 and "no such registered model version or alias" in err
    code, _, err = cli(capsys, "evaluate", "--model", "sine", "--tasks", env["store"])
    assert code == 2 and "models:/NAME@ALIAS" in err
    code, _, err = cli(capsys, "evaluate", "--model", f"models:/{NAME}/2", "--tasks", str(env["root"] / "nothing"))
    assert code == 2 and "manifest" in err


def test_evaluate_learner_is_deterministic_and_batch_independent(env, tmp_path):
    learner, ckpt, resolved = load_learner(f"models:/{NAME}/2", dst_dir=str(tmp_path))
    assert resolved.version == "2" and resolved.family == "regression" and len(resolved.config_digest) == 16
    assert Path(resolved.checkpoint_path).is_file() and ckpt["extra"]["step"] == 100
    tasks = sinusoid_tasks(5, 10, 10, seed=11)
    a = evaluate_learner(learner, tasks, steps=3, batch_size=2, seed=0)
    b = evaluate_learner(learner, tasks, steps=3, batch_size=5, seed=0)
    assert a["post_mse"] == pytest.approx(b["post_mse"], rel=1e-5)
    with pytest.raises(ValueError, match="batch_size"):
        evaluate_learner(learner, tasks, steps=3, batch_size=0, seed=0)


def test_promote_is_gated_on_the_metric_and_rollback_restores(env, capsys):
    client = env["client"]
    # no holder yet: the first candidate is promoted
    code, result, _ = cli(capsys, "promote", NAME, "--version", "1")
    assert code == 0 and result["decision"] == "promoted" and alias_version(client, "champion") == "1"

    # better, but not by the margin: refused, alias untouched, comparison written on the version
    code, result, _ = cli(capsys, "promote", NAME, "--version", "2", "--margin", "1000")
    assert code == 3 and result["decision"] == "refused"
    assert alias_version(client, "champion") == "1"
    tags = client.get_model_version(NAME, "2").tags
    assert tags["promotion.champion.decision"] == "refused" and tags["promotion.champion.holder_version"] == "1"

    # better: promoted, the former holder kept as previous-champion
    code, result, _ = cli(capsys, "promote", NAME, "--version", "2", "--tasks", env["store"], "--seed", "5")
    assert code == 0 and result["decision"] == "promoted"
    assert result["candidate"] < result["holder"] and result["metric"] == "post_mse" and result["num_tasks"] == 12
    assert alias_version(client, "champion") == "2" and alias_version(client, "previous-champion") == "1"
    tags = client.get_model_version(NAME, "2").tags
    assert float(tags["promotion.champion.candidate"]) == pytest.approx(result["candidate"])
    assert tags["promotion.champion.seed"] == "5"

    # worse: refused with exit 3
    code, result, _ = cli(capsys, "promote", NAME, "--version", "1")
    assert code == 3 and result["candidate"] > result["holder"]
    assert alias_version(client, "champion") == "2"

    # rollback moves the alias back and consumes the history entry
    code, result, _ = cli(capsys, "rollback", NAME)
    assert code == 0 and result == {"alias": "champion", "version": "1", "from_version": "2"}
    assert alias_version(client, "champion") == "1" and alias_version(client, "previous-champion") is None
    assert "rollback.champion" in client.get_model_version(NAME, "2").tags
    code, _, err = cli(capsys, "rollback", NAME)
    assert code == 2 and "no previous-champion" in err

    # --force overrides the gate
    code, result, _ = cli(capsys, "promote", NAME, "--version", "2", "--margin", "1000", "--force")
    assert code == 0 and result["decision"] == "forced" and alias_version(client, "champion") == "2"
    code, result, _ = cli(capsys, "promote", NAME, "--version", "2")
    assert code == 0 and result["decision"] == "already"


def test_failed_registration_or_promotion_never_moves_the_alias(env, capsys, tmp_path):
    client = env["client"]
    holder = alias_version(client, "champion") or "2"
    client.set_registered_model_alias(NAME, "champion", holder)
    count = len(client.search_model_versions(f"name = '{NAME}'"))

    # a checkpoint that is not one: logging fails, nothing is registered, the run says so
    broken = tmp_path / "broken.pt"
    broken.write_bytes(b"not a checkpoint")
    tracker = Tracker(None, "registry-test", run_name="broken")
    tracker.start({}, {})
    assert tracker.log_model(str(broken), NAME, tag="final") is None
    missing = tracker.finish()
    assert any("broken.pt" in m for m in missing)
    assert len(client.search_model_versions(f"name = '{NAME}'")) == count

    # a registered version whose artifact is damaged afterwards: promotion refuses it, even with --force
    tracker = Tracker(None, "registry-test", run_name="damaged")
    tracker.start({}, {})
    version = tracker.log_model(str(env["good"]), NAME, tag="best")
    assert tracker.finish() == [] and version is not None
    mv = client.get_model_version(NAME, version)
    location = client.get_logged_model(mv.source.removeprefix("models:/")).artifact_location
    damaged = Path(location.removeprefix("file://")) / "artifacts" / "good.pt"
    damaged.write_bytes(b"half-written")
    code, _, err = cli(capsys, "promote", NAME, "--version", version, "--force")
    assert code == 2 and "cannot be downloaded or loaded" in err
    assert alias_version(client, "champion") == holder

    # a version that does not exist
    code, _, err = cli(capsys, "promote", NAME, "--version", "999")
    assert code == 2 and "no such" in err
    assert alias_version(client, "champion") == holder


def test_logged_model_loads_in_a_fresh_process_and_adapts(env):
    script = f"""
import json, mlflow, numpy as np
from pipeline.tasks.store import read_tasks
model = mlflow.pyfunc.load_model("models:/{NAME}/2")
tasks = read_tasks({env['store']!r}, split="test", limit=8)
records = [{{k: t[k] for k in ("support_x", "support_y", "query_x")}} for t in tasks]
def mse(steps):
    pred = model.predict(records, params={{"steps": steps}})["prediction"]
    return float(np.mean([np.mean((np.asarray(p) - np.stack(t["query_y"])) ** 2) for p, t in zip(pred, tasks)]))
pred = model.predict(records)["prediction"]
print(json.dumps({{"shape": list(np.asarray(pred[0]).shape), "unadapted": mse(0), "adapted": mse(-1)}}))
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                         cwd=env["root"], env=dict(os.environ, MLFLOW_TRACKING_URI=f"sqlite:///{env['root']}/mlflow.db"))
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["shape"] == [10, 1]
    assert result["adapted"] < result["unadapted"]


@pytest.mark.integration
def test_registry_commands_against_a_real_mlflow_server(env, capsys, tmp_path):
    port = free_port()
    server = start_server(tmp_path / "server", port)
    uri = f"http://127.0.0.1:{port}"
    try:
        tracker = Tracker(uri, "registry-server", run_name="sine")
        tracker.start({"model": {"kind": "mlp"}}, {})
        assert tracker.log_model(str(env["bad"]), NAME, tag="final") == "1"
        assert tracker.log_model(str(env["good"]), NAME, tag="best") == "2"
        assert tracker.finish() == []
        assert cli(capsys, "promote", NAME, "--version", "1", "--tracking-uri", uri)[0] == 0
        assert cli(capsys, "promote", NAME, "--version", "2", "--tracking-uri", uri)[0] == 0
        assert cli(capsys, "promote", NAME, "--version", "1", "--tracking-uri", uri)[0] == 3
        code, result, _ = cli(capsys, "evaluate", "--model", f"models:/{NAME}@champion", "--tasks", env["store"],
                              "--tracking-uri", uri)
        assert code == 0 and result["version"] == "2"
        assert cli(capsys, "rollback", NAME, "--tracking-uri", uri)[0] == 0
        assert {k: str(v) for k, v in MlflowClient(uri).get_registered_model(NAME).aliases.items()} == {"champion": "1"}
    finally:
        stop_server(server)
