"""Promotion under faults: concurrent promotes, a held or stale alias lock, a version whose stored code is hostile,
and a candidate trained on another task store than the champion.

Real components only: a local sqlite MLflow store, real task stores, real checkpoints of a tiny sinusoid MLP,
two real ``metalstm promote`` processes. Each test registers its own model name, so the tests do not share state.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient
from registered import points_store, sine_checkpoint

from pipeline.cli import main
from pipeline.errors import UserError
from pipeline.tracking import registry
from pipeline.tracking.registry import LOCK_EXPIRES, LOCK_OWNER, PromotionConflict, lock_name, promote, rollback
from pipeline.tracking.runs import Tracker


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """A working directory with the default (local sqlite) store, two task stores and four checkpoints."""
    root = tmp_path_factory.mktemp("registry-faults")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)
        mp.delenv("MLFLOW_TRACKING_URI", raising=False)
        mp.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
        mp.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "20")
        mp.setenv("METALSTM_KEEP_DIR", str(root / "kept"))
        a, b = points_store(root, "store-a", 3, test_tasks=8), points_store(root, "store-b", 4, test_tasks=8)
        ckpts = {"untrained": sine_checkpoint(root / "untrained.pt", 0, a),
                 "trained": sine_checkpoint(root / "trained.pt", 100, a),
                 "trained-more": sine_checkpoint(root / "trained-more.pt", 120, a),
                 "trained-on-b": sine_checkpoint(root / "trained-on-b.pt", 100, b)}
        uri = f"sqlite:///{root / 'mlflow.db'}"
        yield {"root": root, "uri": uri, "a": a, "b": b, "ckpts": ckpts, "client": MlflowClient(uri)}


def register(env: dict, name: str, *which: str) -> list[str]:
    """Register the named checkpoints as versions 1, 2, ... of ``name``."""
    tracker = Tracker(env["uri"], "faults", run_name=name)
    tracker.start({"model": {"kind": "mlp"}}, {})
    versions = [tracker.log_model(str(env["ckpts"][w]), name, tag="best") for w in which]
    assert tracker.finish() == []
    assert versions == [str(i + 1) for i in range(len(which))]
    return versions


def aliases(env: dict, name: str) -> dict[str, str]:
    return {k: str(v) for k, v in env["client"].get_registered_model(name).aliases.items()}


def version_tags(env: dict, name: str, version: str) -> dict[str, str]:
    return env["client"].get_model_version(name, version).tags


def test_two_concurrent_promotes_one_moves_the_alias_the_other_reports_the_conflict(env, monkeypatch):
    """Both read the holder (version 1) before either moves: the second to reach the alias must not overwrite it."""
    name = "concurrent-threads"
    register(env, name, "untrained", "trained", "trained-more")
    env["client"].set_registered_model_alias(name, "champion", "1")
    barrier, entered = threading.Barrier(2, timeout=300), set()
    real = registry.evaluate_learner

    def evaluate_after_both_read_the_holder(*args, **kwargs):  # delays evaluation only: everything else is real
        if threading.get_ident() not in entered:
            entered.add(threading.get_ident())
            barrier.wait()
        return real(*args, **kwargs)

    monkeypatch.setattr(registry, "evaluate_learner", evaluate_after_both_read_the_holder)
    outcomes: dict[str, object] = {}

    def attempt(version: str) -> None:
        try:
            outcomes[version] = promote(name, version, tasks_uri=env["a"]["uri"], tracking_uri=env["uri"])
        except Exception as e:  # noqa: BLE001 - the outcome is what the test checks
            outcomes[version] = e

    threads = [threading.Thread(target=attempt, args=(v,)) for v in ("2", "3")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(600)
    conflicts = {v: o for v, o in outcomes.items() if isinstance(o, PromotionConflict)}
    winners = {v: o for v, o in outcomes.items() if isinstance(o, tuple) and o[0] == 0}
    assert len(conflicts) == 1 and len(winners) == 1, outcomes
    (winner, (_, result)), (loser, error) = next(iter(winners.items())), next(iter(conflicts.items()))
    assert result["decision"] == "promoted" and result["holder_version"] == "1"
    assert f"moved from version 1 to {winner}" in str(error) and error.result["decision"] == "conflict"
    assert aliases(env, name) == {"champion": winner, "previous-champion": "1"}
    assert version_tags(env, name, winner)["promotion.champion.holder_version"] == "1"
    assert version_tags(env, name, loser)["promotion.champion.decision"] == "conflict"
    assert version_tags(env, name, loser)["promotion.champion.holder_now"] == winner
    with pytest.raises(Exception, match="(?i)not found|does not exist"):
        env["client"].get_registered_model(lock_name(name, "champion"))  # the lock was released


def test_two_promote_processes_leave_a_consistent_history(env):
    """Two real ``metalstm promote`` commands at once: whatever the interleaving, ``previous-champion`` is the
    version the champion replaced, and either one reports the conflict or they applied one after the other."""
    name = "concurrent-processes"
    register(env, name, "untrained", "trained", "trained-more")
    env["client"].set_registered_model_alias(name, "champion", "1")
    argv = [sys.executable, "-m", "pipeline.cli", "promote", name, "--tasks", env["a"]["uri"], "--tracking-uri",
            env["uri"], "--version"]
    procs = {v: subprocess.Popen([*argv, v], cwd=env["root"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                 text=True, env=dict(os.environ)) for v in ("2", "3")}
    done = {v: (p.wait(600), *p.communicate()) for v, p in procs.items()}
    codes = {v: d[0] for v, d in done.items()}
    assert sorted(codes.values()) in ([0, 0], [0, 2], [0, 3]), done
    champion, previous = aliases(env, name)["champion"], aliases(env, name)["previous-champion"]
    assert codes[champion] == 0
    assert version_tags(env, name, champion)["promotion.champion.holder_version"] == previous
    other = "3" if champion == "2" else "2"
    if codes[other] == 2:  # detected: it changed nothing
        assert previous == "1" and "moved from version 1 to" in done[other][2]
        assert json.loads(done[other][1])["decision"] == "conflict"
    elif codes[other] == 0:  # one after the other: the first winner is the history of the second
        assert previous == other and version_tags(env, name, other)["promotion.champion.holder_version"] == "1"
    else:  # the second compared against the first winner and lost
        assert previous == "1" and version_tags(env, name, other)["promotion.champion.holder_version"] == champion


def test_a_held_alias_lock_makes_promote_and_rollback_wait_then_fail_clearly(env):
    name = "locked"
    register(env, name, "untrained", "trained")
    client, lock = env["client"], lock_name(name, "champion")
    client.set_registered_model_alias(name, "champion", "1")
    client.set_registered_model_alias(name, "previous-champion", "2")
    client.create_registered_model(lock, tags={LOCK_OWNER: "other-host:123:abc", LOCK_EXPIRES: str(time.time() + 600)})
    started = time.monotonic()
    with pytest.raises(UserError, match=f"being moved by another promote or rollback \\(other-host:123:abc\\).*{lock}"):
        promote(name, "2", tasks_uri=env["a"]["uri"], tracking_uri=env["uri"], lock_wait=1.0)
    assert time.monotonic() - started < 300  # bounded: it gave up instead of waiting for the holder
    with pytest.raises(UserError, match="being moved by another promote or rollback"):
        rollback(name, tracking_uri=env["uri"], lock_wait=1.0)
    assert aliases(env, name) == {"champion": "1", "previous-champion": "2"}
    assert client.get_registered_model(lock).tags[LOCK_OWNER] == "other-host:123:abc"  # not taken from its holder

    # its holder died long ago: the expired lock is broken and the promote goes through
    client.set_registered_model_tag(lock, LOCK_EXPIRES, str(time.time() - 1))
    code, result = promote(name, "2", tasks_uri=env["a"]["uri"], tracking_uri=env["uri"], lock_wait=1.0)
    assert code == 0 and result["decision"] == "promoted"
    assert aliases(env, name) == {"champion": "2", "previous-champion": "1"}
    assert lock not in {m.name for m in client.search_registered_models()}


def tamper(env: dict, name: str, version: str, marker: Path) -> Path:
    """Replace the version's stored models-from-code file (and add a code_paths module) with code that leaves
    ``marker`` behind and raises when imported; returns the model's storage directory."""
    client = env["client"]
    source = client.get_model_version(name, version).source
    model_dir = Path(client.get_logged_model(source.removeprefix("models:/")).artifact_location.removeprefix("file://"))
    hostile = (f"from pathlib import Path\nPath({str(marker)!r}).write_text('ran')\n"
               "raise SystemExit('hostile code ran')\n")
    (model_dir / "metalstm_model.py").write_text(hostile)
    (model_dir / "code").mkdir(exist_ok=True)
    (model_dir / "code" / "helpers.py").write_text(hostile)
    return model_dir


def test_promote_and_evaluate_never_run_the_code_stored_with_a_version(env, capsys, tmp_path):
    name = "tampered"
    register(env, name, "untrained", "trained")
    marker = tmp_path / "hostile-code-ran"
    model_dir = tamper(env, name, "2", marker)
    argv = ["--tracking-uri", env["uri"], "--tasks", env["a"]["uri"]]

    assert main(["promote", name, "--version", "1", *argv]) == 0  # an untouched holder
    capsys.readouterr()
    assert main(["promote", name, "--version", "2", *argv]) == 0  # the weights are fine and better: promoted
    result = json.loads(capsys.readouterr().out)
    assert result["decision"] == "promoted" and not marker.exists()
    assert "metalstm_model.py" in result["notes"][0] and "code/helpers.py" in result["notes"][0]
    assert main(["evaluate", "--model", f"models:/{name}@champion", *argv]) == 0
    assert not marker.exists() and "was not run" in json.loads(capsys.readouterr().out)["notes"][0]
    assert main(["rollback", name, "--tracking-uri", env["uri"]]) == 0 and not marker.exists()

    # the tampering is real: loading that version the pyfunc way runs the code
    script = f"import mlflow; mlflow.pyfunc.load_model({str(model_dir)!r})"
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert out.returncode != 0 and marker.read_text() == "ran"


def test_without_tasks_promotion_evaluates_on_the_champions_store(env, capsys):
    name = "stores"
    register(env, name, "untrained", "trained-on-b")
    env["client"].set_registered_model_alias(name, "previous-champion", "2")  # left over from before
    argv = ["--tracking-uri", env["uri"]]

    # no holder: the candidate's own store, and the stale history entry is dropped (nothing held the alias)
    assert main(["promote", name, "--version", "1", *argv]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["tasks"] == env["a"]["uri"] and result["tasks_from"] == "candidate" and "notes" not in result
    assert aliases(env, name) == {"champion": "1"}

    # a holder trained on store a: the candidate (trained on b) is evaluated on a, and the output says so
    code = main(["promote", name, "--version", "2", "--margin", "1000", *argv])
    result = json.loads(capsys.readouterr().out)
    assert code == 3 and result["tasks"] == env["a"]["uri"] and result["tasks_from"] == "@champion holder"
    notes = " ".join(result["notes"])
    assert f"trained on task store {env['b']['uri']}" in notes and f"holder on {env['a']['uri']}" in notes
    assert env["a"]["uri"] in version_tags(env, name, "2")["promotion.champion.notes"]

    # --tasks still decides, and the difference is still reported
    main(["promote", name, "--version", "2", "--tasks", env["b"]["uri"], "--force", *argv])
    result = json.loads(capsys.readouterr().out)
    assert result["tasks"] == env["b"]["uri"] and result["tasks_from"] == "--tasks" and result["notes"]
    assert aliases(env, name) == {"champion": "2", "previous-champion": "1"}
