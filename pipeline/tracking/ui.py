"""``metalstm ui``: the MLflow UI on the store this project's runs actually went to.

Runs land in one of several places: ``--tracking-uri`` / ``MLFLOW_TRACKING_URI`` when set, else ``./mlflow.db``
(``metalstm train``, ``metalstm experiment``) or ``.metalstm/demo/mlflow.db`` (``metalstm demo``). A plain
``mlflow ui`` opens neither of the last two unless told, and silently creates an empty store where it starts,
so "where are my runs?" gets one answer here: the store that exists (the most recently written when both do),
or an error that names every URI searched and creates nothing.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import shlex
import signal
import subprocess
import sys
from pathlib import Path

from pipeline.errors import UserError

log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser, command: str) -> None:
    parser.add_argument("--tracking-uri", default=None,
                        help="the store to open (default: MLFLOW_TRACKING_URI, else the most recently written of "
                             "./mlflow.db and the demo's .metalstm/demo/mlflow.db)")
    parser.add_argument("--host", default="127.0.0.1", help="address the UI listens on (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=5000, help="the UI's port (default 5000)")
    parser.add_argument("--dry-run", action="store_true", help="print the chosen store and the command; start nothing")


def choose_store(tracking_uri: str | None) -> str:
    """The tracking URI to open: explicit or ``MLFLOW_TRACKING_URI`` (which must exist), else a local store."""
    # runs (and MLflow) load here, not at module import: the CLI imports this module for ``ui --help``
    from pipeline.tracking.runs import DEFAULT_DB, DEMO_DB, local_stores, require_store, resolve_tracking_uri

    if (tracking_uri or "").strip() or os.environ.get("MLFLOW_TRACKING_URI", "").strip():
        uri = resolve_tracking_uri(tracking_uri)
        require_store(uri)
        return uri
    found = local_stores()
    if not found:
        searched = ", ".join(f"sqlite:///{(Path.cwd() / name).resolve()}" for name in (DEFAULT_DB, DEMO_DB))
        raise UserError(f"no MLflow tracking store found: searched {searched} (nothing was created); run "
                        "`metalstm demo` or `metalstm train` here first, or pass --tracking-uri")
    return found[0]


def server_command(uri: str, host: str, port: int) -> list[str]:
    """``mlflow server`` on ``uri``, with new artifacts kept beside a local store (as training keeps them)."""
    from pipeline.tracking.runs import local_artifact_root

    cmd = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", uri, "--host", host,
           "--port", str(port), "--workers", "1"]
    root = local_artifact_root(uri)
    if root is not None:
        cmd += ["--artifacts-destination", str(root)]
    return cmd


def run(args: argparse.Namespace) -> int:
    from pipeline.tracking.runs import local_stores, redact

    if not 0 < args.port < 65536:
        raise ValueError(f"--port: expected 1-65535, got {args.port}")
    uri = choose_store(args.tracking_uri)
    if uri.split("://", 1)[0].lower() in ("http", "https"):
        print(f"{redact(uri)} is an MLflow server: its UI is at that address")
        return 0
    cmd = server_command(uri, args.host, args.port)
    others = [u for u in local_stores() if u != uri]
    if args.dry_run:
        print(uri)
        print(shlex.join(cmd))
        return 0
    print(f"MLflow UI on {uri}\n  open http://{args.host}:{args.port}  (Ctrl-C stops it)", flush=True)
    if others:
        print(f"  other stores here: {', '.join(others)} (metalstm ui --tracking-uri URI)", flush=True)
    env = dict(os.environ)
    env.setdefault("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "false")  # no background job runner for a local viewer
    # its own process group: the server's workers stop with it, however this command is stopped
    proc = subprocess.Popen(cmd, env=env, start_new_session=True)
    stopped = []

    def on_term(*_: object) -> None:
        stopped.append(True)
        proc.terminate()

    previous = signal.signal(signal.SIGTERM, on_term)
    try:
        code = proc.wait()
        return 0 if stopped else code
    except KeyboardInterrupt:
        return 0
    finally:
        signal.signal(signal.SIGTERM, previous)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
