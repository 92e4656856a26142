"""The README's quick start and Serving section: ``metalstm demo`` on its embedded defaults, end to end, in a
fresh directory, then the README's curl examples run as written against the model it serves."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from readme import shell_commands, words
from servers import free_port

ROOT = Path(__file__).resolve().parents[1]
MAX_LINES = 60
ALARMING = re.compile(r"error|traceback|exception|failed|warning|killed", re.I)


def test_a_failed_step_shows_the_log_and_verbose_shows_everything(tmp_path, monkeypatch, capfd):
    """What Ray prints goes to demo.log, and a failure's screen shows that log's last lines; with --verbose
    it all goes to the terminal and there is no log."""
    from pipeline.cli import parse_args
    from pipeline.demo import command as demo

    def fail(args, workdir, console):
        os.write(2, b"what Ray said before it broke\n")
        raise RuntimeError("training failed: no workers")

    monkeypatch.setattr(demo, "_run", fail)
    with pytest.raises(RuntimeError):
        demo.run(parse_args(["demo", "--workdir", str(tmp_path / "quiet")]))
    out, err = capfd.readouterr()
    assert "The demo stopped: RuntimeError: training failed: no workers" in out
    assert "  what Ray said before it broke" in out and "what Ray said" not in err  # the log's tail, on screen
    assert "what Ray said" in (tmp_path / "quiet" / "demo.log").read_text()
    with pytest.raises(RuntimeError):
        demo.run(parse_args(["demo", "--workdir", str(tmp_path / "loud"), "--verbose"]))
    out, err = capfd.readouterr()
    assert "what Ray said" in err and "demo.log" not in out and not (tmp_path / "loud" / "demo.log").exists()


def test_the_demo_trains_configs_demo_yaml_from_any_directory(tmp_path, monkeypatch):
    """configs/demo.yaml, then the run-time settings (a fresh run name, stores under --workdir), then the user's
    ``key=value`` overrides; found from any working directory."""
    from pipeline.demo import command as demo

    monkeypatch.chdir(tmp_path)
    workdir = tmp_path / "work"
    cfg = demo._config(["schedule.meta_steps=7"], workdir)
    assert demo.CONFIG == ROOT / "configs" / "demo.yaml"
    assert re.fullmatch(r"demo-\d{8}-\d{6}", cfg.name)
    assert cfg.tracking.uri == f"sqlite:///{workdir / 'mlflow.db'}"
    assert cfg.checkpoint.storage_path == str(workdir / "runs")
    assert cfg.tracking.registered_model == "metalstm-demo" and cfg.data.store == ""
    assert (cfg.model.hidden_size, cfg.maml.inner_steps, cfg.scaling.num_workers) == (32, 3, 2)
    assert (cfg.schedule.meta_steps, cfg.schedule.meta_batch_size) == (7, 16)  # the user's override wins
    with pytest.raises(ValueError, match="tracking.registered_model"):
        demo._config(["tracking.registered_model=''"], workdir)


def _run_readme_curls(port: int) -> list[tuple[str, dict]]:
    """Each curl command of the README's bash blocks, pointed at ``port``, run by bash from the repository root."""
    out = []
    for command in shell_commands():
        if words(command)[:1] != ["curl"]:
            continue
        assert "127.0.0.1:8000" in command, command  # the address `metalstm serve` and the demo use by default
        done = subprocess.run(["bash", "-c", command.replace("127.0.0.1:8000", f"127.0.0.1:{port}")], cwd=ROOT,
                              capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, (command, done.stderr)
        reply = json.loads(done.stdout)
        assert "detail" not in reply, (command, reply)  # FastAPI's error body
        out.append((command, reply))
    return out


@pytest.mark.integration
@pytest.mark.timeout(1200)
@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed: the README's examples use it")
def test_demo_then_the_readmes_serving_examples(tmp_path, monkeypatch, capsys):
    """Nothing configured: it builds the built-in store, trains on a local Ray, registers and promotes the model
    in a local MLflow, serves it on 127.0.0.1 and adapts a held-out task; its console stays short and calm, Ray's
    output goes to its log; the README's curl examples work against it; SIGTERM stops everything it started."""
    port = free_port()
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    for name in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI"):
        env.pop(name, None)
    lines: list[str] = []
    finished = threading.Event()
    with open(tmp_path / "stderr.txt", "w") as err:
        proc = subprocess.Popen([sys.executable, "-m", "pipeline.cli", "demo", "--port", str(port), "--keep-serving"],
                                cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=err, text=True,
                                start_new_session=True)

    def read() -> None:
        for line in proc.stdout:
            lines.append(line.rstrip("\n"))
            if line.startswith("done in"):
                finished.set()
        finished.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        finished.wait(1000)
        console = "\n".join(lines)
        assert lines and lines[-1].startswith("done in") and proc.poll() is None, \
            console[-3000:] + (tmp_path / "stderr.txt").read_text()[-3000:]

        # the console: short, nothing alarming, and a last screen that explains the numbers
        assert len(lines) <= MAX_LINES, console
        assert not ALARMING.search(console), ALARMING.search(console).group(0) + "\n" + console
        assert [n for n in range(1, 7) if any(s.startswith(f"[{n}/6]") for s in lines)] == list(range(1, 7)), console
        before, after = map(float, re.search(r"support loss +([\d.]+) -> ([\d.]+)", console).groups())
        assert after < before, console
        adapted = float(re.search(r"query MSE +([\d.]+) adapted", console).group(1))
        naive = float(re.search(r"([\d.]+) seasonal naive", console).group(1))
        assert adapted >= 0 and naive > 0
        assert re.search(r"MLflow UI +metalstm ui\b", console) and "docs/results.md" in console
        log_text = (tmp_path / ".metalstm" / "demo" / "demo.log").read_text()
        assert "ray" in log_text.lower() and len(log_text.splitlines()) > len(lines)  # Ray's output went there

        # the README's curl examples, as written, against the demo's model
        replies = _run_readme_curls(port)
        assert len(replies) >= 3, replies
        for command, reply in replies:
            if "/healthz" in command:
                assert reply["status"] == "ok"
            elif "/v1/model" in command:
                assert reply["name"] == "metalstm-demo" and reply["alias"] == "champion"
            elif "/v1/adapt" in command:
                body = json.loads((ROOT / re.search(r"@(\S+)", command).group(1)).read_text())
                assert len(reply["predictions"]) == len(body["query"])
                assert all(len(p["values"]) == 24 for p in reply["predictions"])
                assert reply["support_loss_after"] < reply["support_loss_before"]

        # the README's `metalstm serve` and `metalstm ui` lines find the demo's model and store from here
        from pipeline.cli import main, parse_args
        from pipeline.serving.app import resolve
        from pipeline.tracking.runs import resolve_tracking_uri

        monkeypatch.chdir(tmp_path)
        monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
        serve_line = next(c for c in shell_commands() if words(c)[:2] == ["metalstm", "serve"])
        args = parse_args(words(serve_line)[1:])
        config = resolve(args.model, resolve_tracking_uri(args.tracking_uri))
        assert config["model_uri"] == "models:/metalstm-demo/1"
        db = tmp_path / ".metalstm" / "demo" / "mlflow.db"
        capsys.readouterr()
        assert main(["ui", "--dry-run"]) == 0
        assert capsys.readouterr().out.splitlines()[0] == f"sqlite:///{db}"
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        try:
            code = proc.wait(180)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            raise
        reader.join(30)
    stderr = (tmp_path / "stderr.txt").read_text()
    assert code == 0, "\n".join(lines[-20:]) + stderr[-3000:]
    assert lines[-1] == "stopped Serve and Ray" and len(lines) <= MAX_LINES + 1
    assert not ALARMING.search(stderr), stderr[-3000:]  # the terminal's stderr too: Ray's output is in the log

    # the run and the promoted version are in the local MLflow under the working directory
    with sqlite3.connect(db) as con:
        assert con.execute("select count(*) from runs where status = 'FINISHED'").fetchone()[0] >= 1
        assert con.execute("select count(*) from registered_model_aliases where alias = 'champion'").fetchone()[0] == 1

    # the endpoint was stopped with everything else
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
