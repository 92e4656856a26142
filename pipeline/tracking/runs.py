"""MLflow tracking from rank 0: params, metrics, plots and the registered model, without ever stalling training.

Where runs go: an explicit URI, else ``MLFLOW_TRACKING_URI``, else a local sqlite store ``./mlflow.db`` with
artifacts under ``./mlartifacts`` (so the registry works with no server).

Failure policy: an unreachable store at :meth:`Tracker.start` is a clear error before any training. After
that nothing raises. Metrics and plots go through a background thread that retries with exponential
backoff; an operation that still fails is kept and retried once the store answers again. Whatever is
still missing at :meth:`Tracker.finish` is returned, logged as a warning, and written on the run (tag
``metalstm.not_logged`` and ``not_logged.txt``) if the store is back by then.

A model that cannot be logged at the end is not lost with the caller's (often temporary) checkpoint file: the
tracker copies it to a stable local path (:func:`default_keep_dir`) and its message names that path and the
command that logs and registers it later (``metalstm register``, :mod:`pipeline.tracking.register`).
"""

from __future__ import annotations

import json
import logging
import os
import re
import shlex
import shutil
import subprocess
import tempfile
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import mlflow
import requests
import yaml
from mlflow.entities import LoggedModelOutput, Metric, Param, RunTag
from mlflow.exceptions import MlflowException
from mlflow.models import Model
from mlflow.tracking import MlflowClient

import metalstm
from metalstm import load_checkpoint
from pipeline.errors import UserError
from pipeline.tracking import plots
from pipeline.tracking.pyfunc import save_pyfunc

log = logging.getLogger(__name__)

DEFAULT_DB = "mlflow.db"
DEMO_DB = ".metalstm/demo/mlflow.db"  # where ``metalstm demo`` tracks (its default --workdir)
ARTIFACT_DIR = "mlartifacts"
KEEP_DIR_ENV = "METALSTM_KEEP_DIR"  # where checkpoints that could not be logged are kept (default: see below)
REGISTER_COMMAND = ("metalstm", "register")
MAX_PARAM_LENGTH = 6000  # MLflow's limit on a param value
BATCH_PARAMS, BATCH_METRICS = 100, 1000  # MLflow's per-request limits
RETRY_ROUNDS = 3  # an operation that exhausted its retries gets this many more rounds once the store is back
# Errors a retry cannot fix (bad value, missing entity, auth): recorded at once, never retried.
PERMANENT_ERRORS = {"INVALID_PARAMETER_VALUE", "RESOURCE_ALREADY_EXISTS", "RESOURCE_DOES_NOT_EXIST", "BAD_REQUEST",
                    "INVALID_STATE", "PERMISSION_DENIED", "UNAUTHENTICATED", "NOT_FOUND", "ENDPOINT_NOT_FOUND"}


# ----------------------------------------------------------------------------- URIs and the store


def resolve_tracking_uri(uri: str | None = None) -> str:
    """Explicit > ``MLFLOW_TRACKING_URI`` > ``sqlite:///<cwd>/mlflow.db``; local paths made absolute.

    Absolute paths matter: Ray workers do not share the driver's working directory.
    """
    uri = (uri or "").strip() or os.environ.get("MLFLOW_TRACKING_URI", "").strip()
    if not uri:
        return f"sqlite:///{Path.cwd() / DEFAULT_DB}"
    if "://" not in uri:  # a bare path: a sqlite file, else a directory (file store)
        path = Path(uri).expanduser().resolve()
        return f"sqlite:///{path}" if path.suffix == ".db" else path.as_uri()
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        rel = uri[len("sqlite:///"):]
        if rel and rel != ":memory:":
            return f"sqlite:///{Path(rel).expanduser().resolve()}"
    return uri


def _sqlite_path(uri: str) -> Path | None:
    if uri.startswith("sqlite:///"):
        path = uri[len("sqlite:///"):].split("?", 1)[0]
        return Path(path) if path and path != ":memory:" else None
    return None


def local_artifact_root(uri: str) -> Path | None:
    """Where experiments created through a local sqlite store keep artifacts: ``mlartifacts`` beside the db."""
    path = _sqlite_path(uri)
    return path.parent / ARTIFACT_DIR if path else None


def redact(uri: str) -> str:
    """The URI without credentials, for messages."""
    parts = urlsplit(uri)
    if parts.username or parts.password:
        host = parts.hostname or ""
        if parts.port:
            host += f":{parts.port}"
        return urlunsplit((parts.scheme, f"***@{host}", parts.path, parts.query, parts.fragment))
    return uri


def default_keep_dir() -> Path:
    """``$METALSTM_KEEP_DIR``, else ``~/.metalstm/unlogged-models``: outside any temporary or Ray-managed directory,
    so a kept checkpoint outlives the process and the run's own copies (which the trainer deletes)."""
    env = os.environ.get(KEEP_DIR_ENV, "").strip()
    return Path(env).expanduser().resolve() if env else Path.home() / ".metalstm" / "unlogged-models"


def register_command(checkpoint: str | Path, *, tracking_uri: str, run_id: str | None, tag: str,
                     name: str | None) -> str:
    """The shell command that logs a kept checkpoint to ``run_id`` (and registers it as ``name``) later."""
    argv = [*REGISTER_COMMAND, str(checkpoint), "--tracking-uri", redact(tracking_uri), "--tag", tag]
    argv += ["--run-id", run_id] if run_id else []
    argv += ["--name", name] if name else []
    return shlex.join(argv)


def check_tracking_server(uri: str, timeout: float = 5.0) -> None:
    """Fail fast, with a message a user can act on, when the tracking store cannot be reached or written."""
    scheme = uri.split("://", 1)[0].lower() if "://" in uri else ""
    hint = ("start the server, fix MLFLOW_TRACKING_URI / tracking.uri, or leave both empty to track in "
            f"sqlite:///{Path.cwd() / DEFAULT_DB}")
    if scheme in ("http", "https"):
        try:
            response = requests.get(uri.rstrip("/") + "/health", timeout=timeout)
        except requests.RequestException as e:
            raise UserError(f"MLflow tracking server {redact(uri)} is unreachable ({type(e).__name__}): {hint}") \
                from None
        if response.status_code >= 500:
            raise UserError(f"MLflow tracking server {redact(uri)} answered HTTP {response.status_code} on /health: "
                            f"{hint}")
        return
    local = _sqlite_path(uri) if scheme == "sqlite" else (Path(urlsplit(uri).path) if scheme == "file" else None)
    if local is not None:
        directory = local.parent if scheme == "sqlite" else local
        try:
            directory.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise UserError(f"MLflow tracking store {uri}: cannot create {directory} ({e})") from None
        if not os.access(directory, os.W_OK):
            raise UserError(f"MLflow tracking store {uri}: {directory} is not writable")


def local_stores(root: Path | None = None) -> list[str]:
    """The sqlite stores this project's commands create by default under ``root`` (the working directory) that
    exist, most recently written first: ``./mlflow.db`` (train, experiment) and the demo's."""
    root = Path.cwd() if root is None else root
    found = [root / name for name in (DEFAULT_DB, DEMO_DB) if (root / name).is_file()]
    found.sort(key=lambda p: p.stat().st_mtime, reverse=True)
    return [f"sqlite:///{p.resolve()}" for p in found]


def _elsewhere(uri: str) -> str:
    """A hint naming the project's other local stores, for "not found" messages."""
    others = [u for u in local_stores() if u != uri]
    if others:
        return f"; stores here: {', '.join(others)} (pass --tracking-uri)"
    return "; pass --tracking-uri or set MLFLOW_TRACKING_URI"


def require_store(uri: str) -> None:
    """For commands that only look things up (evaluate, promote, rollback, serve, ui): the store must exist.

    Opening a sqlite or file store creates it, so without this a mistyped URI or the wrong directory would
    leave an empty ``mlflow.db`` behind and report a missing model instead of a missing store. Remote stores
    are checked for reachability.
    """
    scheme = uri.split("://", 1)[0].lower() if "://" in uri else ""
    if scheme in ("http", "https"):
        check_tracking_server(uri)
        return
    path = _sqlite_path(uri) if scheme == "sqlite" else (Path(urlsplit(uri).path) if scheme == "file" else None)
    if path is not None and not (path.is_file() if scheme == "sqlite" else path.is_dir()):
        raise UserError(f"no MLflow tracking store at {redact(uri)}: nothing has been tracked there "
                        f"(nothing was created){_elsewhere(uri)}")


def not_found_hint(uri: str) -> str:
    """``in <uri>`` plus the other local stores, for a model or run that the store at ``uri`` does not have."""
    return f"in {redact(uri)}{_elsewhere(uri)}"


def ensure_experiment(client: MlflowClient, name: str, uri: str) -> str:
    """The experiment's id, created if needed (artifacts under ``mlartifacts/`` for local sqlite stores)."""
    if not name:
        raise ValueError("tracking.experiment: must be a non-empty name")
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        if experiment.lifecycle_stage == "deleted":
            raise UserError(f"MLflow experiment {name!r} is deleted: restore it or choose another name")
        return experiment.experiment_id
    root = local_artifact_root(uri)
    location = (root / re.sub(r"[^A-Za-z0-9._-]+", "_", name)).as_uri() if root else None
    try:
        return client.create_experiment(name, artifact_location=location)
    except MlflowException as e:
        if e.error_code == "RESOURCE_ALREADY_EXISTS":  # created concurrently
            return client.get_experiment_by_name(name).experiment_id
        raise


def git_commit() -> str:
    """The project's commit (with ``-dirty`` when the tree has changes), or ``unknown`` outside git."""
    here = Path(__file__).resolve().parent
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                                cwd=here).stdout.strip()
        if not commit:
            return "unknown"
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                               text=True, timeout=5, cwd=here).stdout.strip()
        return commit + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def standard_tags(store_uri: str | None = None, store_hash: str | None = None) -> dict[str, str]:
    """The run's provenance tags: code version, commit and (when known) the task store and its content hash."""
    tags = {"metalstm.version": metalstm.__version__, "metalstm.git_commit": git_commit()}
    if store_uri:
        tags["metalstm.task_store"] = store_uri
    if store_hash:
        tags["metalstm.task_store_hash"] = store_hash
    return tags


def flatten_params(config: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested config → ``{"model.hidden_size": "64", ...}``; lists as JSON; over-long values truncated."""
    out: dict[str, str] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(flatten_params(value, name + "."))
            continue
        text = json.dumps(value) if isinstance(value, (list, tuple)) else str(value)
        if len(text) > MAX_PARAM_LENGTH:
            marker = "...[truncated]"
            text = text[: MAX_PARAM_LENGTH - len(marker)] + marker
        out[name] = text
    return out


_METRIC_KEY = re.compile(r"[^A-Za-z0-9_\-. :/]")


def _is_permanent(e: BaseException) -> bool:
    if isinstance(e, MlflowException):
        return e.error_code in PERMANENT_ERRORS
    return isinstance(e, (ValueError, TypeError, UserError))


def _short(e: BaseException) -> str:
    text = str(getattr(e, "message", None) or e).strip().splitlines()
    return f"{type(e).__name__}: {text[0][:300] if text else ''}"


def _configure_http(timeout: float) -> None:
    """MLflow's own HTTP retries (minutes by default) would stall the caller: the tracker retries instead.

    Only defaults are set; values the user exported win.
    """
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", str(max(1, int(timeout))))


def _copy_new(source: Path, directory: Path, stem: str) -> Path:
    """Copy ``source`` to ``directory/stem.pt`` (``stem-2.pt``, ... if taken: nothing is overwritten), atomically."""
    directory.mkdir(parents=True, exist_ok=True)
    for n in range(1, 1000):
        target = directory / (f"{stem}.pt" if n == 1 else f"{stem}-{n}.pt")
        if target.exists():
            continue
        partial = target.with_name(f".{target.name}.{uuid.uuid4().hex[:8]}.partial")
        shutil.copyfile(source, partial)
        try:
            os.link(partial, target)  # fails if another copy took the name meanwhile: never replaces a file
        except FileExistsError:
            continue
        except OSError:  # no hard links on this file system: a rename, unless the name was taken meanwhile
            if target.exists():
                continue
            os.replace(partial, target)
        finally:
            partial.unlink(missing_ok=True)
        return target
    raise FileExistsError(f"{directory}: too many kept copies named {stem}")


# ----------------------------------------------------------------------------- the tracker


@dataclass
class _Op:
    what: str
    fn: Callable[[], Any]
    rounds: int = 0
    error: str = ""


class Tracker:
    """One MLflow run, written from rank 0. Only :meth:`start` raises; every later call returns normally.

    ``keep_dir``: where :meth:`log_model` keeps checkpoints it could not log (default :func:`default_keep_dir`);
    give the trainer's persistent storage on a cluster whose home directories do not outlive the job.
    """

    def __init__(self, uri: str | None, experiment: str, run_name: str | None = None, run_id: str | None = None,
                 *, max_retries: int = 5, backoff: float = 1.0, max_backoff: float = 30.0,
                 flush_timeout: float = 120.0, http_timeout: float = 30.0,
                 keep_dir: str | Path | None = None) -> None:
        if max_retries < 0:
            raise ValueError(f"max_retries: must be >= 0, got {max_retries}")
        if backoff < 0 or max_backoff < backoff:
            raise ValueError(f"backoff: need 0 <= backoff <= max_backoff, got {backoff}, {max_backoff}")
        if flush_timeout < 0:
            raise ValueError(f"flush_timeout: must be >= 0, got {flush_timeout}")
        self.uri = resolve_tracking_uri(uri)
        _configure_http(http_timeout)
        self.client = MlflowClient(tracking_uri=self.uri, registry_uri=self.uri)
        self.experiment, self.run_name, self.run_id = experiment, run_name, run_id
        self.max_retries, self.backoff, self.max_backoff = max_retries, backoff, max_backoff
        self.flush_timeout = flush_timeout
        self.keep_dir = Path(keep_dir).expanduser().resolve() if keep_dir else None  # None: default_keep_dir()
        self._kept: list[dict[str, str]] = []
        self._queue: deque[_Op] = deque()
        self._failed: list[_Op] = []
        self._not_logged: list[str] = []
        self._cond = threading.Condition()
        self._hurry = threading.Event()
        self._closing = False
        self._inflight = False
        self._deadline: float | None = None
        self._thread: threading.Thread | None = None
        self._tmp = Path(tempfile.gettempdir())  # replaced by a private directory in start()
        self._finished: list[str] | None = None

    # -- retries

    def _past_deadline(self) -> bool:
        return self._deadline is not None and time.monotonic() >= self._deadline

    def _sleep(self, delay: float) -> None:
        if self._deadline is not None:
            delay = min(delay, max(0.0, self._deadline - time.monotonic()))
        if self._hurry.is_set():
            time.sleep(delay)
        else:
            self._hurry.wait(delay)

    def _attempt(self, what: str, fn: Callable[[], Any]) -> tuple[bool, Any]:
        """Call ``fn`` until it succeeds, with exponential backoff; (ok, result or the last exception)."""
        delay = self.backoff
        for attempt in range(self.max_retries + 1):
            try:
                return True, fn()
            except Exception as e:  # noqa: BLE001 - every failure is recorded, none may escape mid-run
                if _is_permanent(e) or attempt == self.max_retries or self._past_deadline():
                    log.warning("MLflow: %s failed after %d attempt(s): %s", what, attempt + 1, _short(e))
                    return False, e
                log.info("MLflow: %s failed (%s); retry %d/%d in %.1fs", what, _short(e), attempt + 1,
                         self.max_retries, delay)
                self._sleep(delay)
                delay = min(delay * 2, self.max_backoff)
        raise AssertionError("unreachable")

    def _record(self, item: str) -> None:
        with self._cond:
            self._not_logged.append(item)
        log.warning("MLflow: not logged: %s", item)

    # -- the background queue

    def _submit(self, what: str, fn: Callable[[], Any]) -> None:
        if self.run_id is None or self._thread is None:
            self._record(f"{what}: the run was never started")
            return
        with self._cond:
            if self._closing:
                self._not_logged.append(f"{what}: submitted after finish()")
                return
            self._queue.append(_Op(what, fn))
            self._cond.notify_all()

    def _work(self) -> None:
        while True:
            with self._cond:
                while not self._queue and not self._closing:
                    self._cond.wait()
                if not self._queue:
                    return
                op = self._queue.popleft()
                self._inflight = True
            if self._past_deadline():
                with self._cond:
                    op.error = op.error or "flush timeout"
                    self._failed.append(op)
                    self._inflight = False
                    self._cond.notify_all()
                continue
            ok, result = self._attempt(op.what, op.fn)
            with self._cond:
                if ok:
                    if self._failed:  # the store answers again: earlier failures get another round
                        again = [f for f in self._failed if f.rounds < RETRY_ROUNDS]
                        self._failed = [f for f in self._failed if f.rounds >= RETRY_ROUNDS]
                        self._queue.extend(again)
                else:
                    op.rounds = RETRY_ROUNDS if _is_permanent(result) else op.rounds + 1
                    op.error = _short(result)
                    self._failed.append(op)
                self._inflight = False
                self._cond.notify_all()

    # -- public API

    def start(self, config: Mapping[str, Any], tags: Mapping[str, str]) -> str:
        """Create (or resume, when ``run_id`` was given) the run; params, config.yaml and tags. Raises UserError."""
        if self._thread is not None:
            raise ValueError(f"Tracker.start: run {self.run_id} is already started")
        check_tracking_server(self.uri)

        def begin() -> Any:
            experiment_id = ensure_experiment(self.client, self.experiment, self.uri)
            if self.run_id is not None:
                run = self.client.get_run(self.run_id)
                if run.info.lifecycle_stage == "deleted":
                    raise UserError(f"MLflow run {self.run_id} is deleted")
                self.client.update_run(self.run_id, status="RUNNING")
                return run
            return self.client.create_run(experiment_id, run_name=self.run_name)

        ok, run = self._attempt("start the run", begin)
        if not ok:
            raise UserError(f"cannot start the MLflow run on {redact(self.uri)}: {_short(run)}")
        self.run_id = run.info.run_id
        existing = dict(run.data.params)  # empty for a new run, or one the driver created for this rank 0
        params = flatten_params(config)
        conflicts = sorted(k for k, v in params.items() if k in existing and existing[k] != v)
        new = [Param(k, v) for k, v in params.items() if k not in existing]
        all_tags = {**standard_tags(), **{k: str(v) for k, v in tags.items()}}
        if conflicts:
            all_tags["metalstm.resume_param_changes"] = ", ".join(conflicts)[:5000]
            log.warning("MLflow: resumed run %s with changed params (kept the first values): %s", self.run_id,
                        ", ".join(conflicts))
        text = yaml.safe_dump(json.loads(json.dumps(dict(config), default=str)), sort_keys=False)
        config_file = "config.yaml" if not existing else f"config-resumed-{time.strftime('%Y%m%dT%H%M%S')}.yaml"
        steps: list[tuple[str, Callable[[], Any]]] = [
            ("tags", lambda: self.client.log_batch(self.run_id, tags=[RunTag(k, v) for k, v in all_tags.items()]))]
        for i in range(0, len(new), BATCH_PARAMS):
            chunk = new[i:i + BATCH_PARAMS]
            steps.append((f"params {i + 1}-{i + len(chunk)}", lambda c=chunk: self.client.log_batch(self.run_id,
                                                                                                   params=c)))
        if not existing or conflicts:
            steps.append((config_file, lambda: self.client.log_text(self.run_id, text, config_file)))
        for what, fn in steps:
            ok, err = self._attempt(what, fn)
            if not ok:
                if not _is_permanent(err):
                    raise UserError(f"MLflow tracking store {redact(self.uri)} failed at start ({what}): {_short(err)}")
                self._record(f"{what}: {_short(err)}")
        self._tmp = Path(tempfile.mkdtemp(prefix="metalstm-tracking-"))
        self._thread = threading.Thread(target=self._work, name="metalstm-tracking", daemon=True)
        self._thread.start()
        log.info("MLflow run %s (%s) in experiment %r at %s", self.run_id, "resumed" if existing else "new",
                 self.experiment, redact(self.uri))
        return self.run_id

    def attach(self) -> str:
        """Use the existing run ``run_id`` for :meth:`log_model` only: no background queue, and its params, tags
        and status are left as they are (logging a kept model later, after the run ended). Raises UserError."""
        if self.run_id is None:
            raise ValueError("Tracker.attach: needs run_id")
        check_tracking_server(self.uri)
        try:
            run = self.client.get_run(self.run_id)
        except MlflowException as e:
            raise UserError(f"MLflow run {self.run_id} in {redact(self.uri)}: {_short(e)}") from None
        if run.info.lifecycle_stage == "deleted":
            raise UserError(f"MLflow run {self.run_id} is deleted")
        return self.run_id

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until everything queued so far was tried (logged or set aside as failed); False on timeout."""
        with self._cond:
            return self._cond.wait_for(lambda: not self._queue and not self._inflight, timeout)

    def pending_failures(self) -> list[str]:
        """What failed so far and waits for the store to come back (the run continues regardless)."""
        with self._cond:
            return [f"{op.what}: {op.error}" for op in self._failed] + list(self._not_logged)

    def log_metrics(self, metrics: Mapping[str, Any], step: int) -> None:
        """Queue numeric metrics at ``step`` (timestamped now); non-numeric values are skipped."""
        now = int(time.time() * 1000)
        batch = []
        for key, value in metrics.items():
            try:
                number = float(value)
            except (TypeError, ValueError):
                continue
            batch.append(Metric(_METRIC_KEY.sub("_", str(key)), number, now, int(step)))
        for i in range(0, len(batch), BATCH_METRICS):
            chunk = batch[i:i + BATCH_METRICS]
            names = ", ".join(m.key for m in chunk[:4]) + (", ..." if len(chunk) > 4 else "")
            self._submit(f"metrics at step {step} ({names})",
                         lambda c=chunk: self.client.log_batch(self.run_id, metrics=c))

    def log_figure(self, fig: Any, artifact_file: str) -> None:
        """Render now (on this thread) and queue the PNG upload as ``artifact_file``."""
        try:
            png = plots.to_png(fig)
        except Exception as e:  # noqa: BLE001 - a broken figure must not stop training
            self._record(f"{artifact_file}: cannot render ({_short(e)})")
            return
        self._upload_bytes(png, artifact_file)

    def log_artifact(self, local_path: str | Path, artifact_path: str | None = None) -> None:
        """Queue a copy of a local file (taken now, so the caller may delete or rewrite it) as a run artifact."""
        source = Path(local_path)
        if not source.is_file():
            self._record(f"{source}: not a file")
            return
        name = f"{artifact_path.strip('/')}/{source.name}" if artifact_path else source.name
        self._upload_bytes(source.read_bytes(), name)

    def _upload_bytes(self, data: bytes, artifact_file: str) -> None:
        path = self._tmp / uuid.uuid4().hex / Path(artifact_file).name
        path.parent.mkdir(parents=True)
        path.write_bytes(data)
        directory = str(Path(artifact_file).parent)
        self._submit(artifact_file, lambda: self.client.log_artifact(self.run_id, str(path),
                                                                     None if directory == "." else directory))

    def log_learning_curves(self, history: list[dict]) -> None:
        """``plots/learning_curves.png`` plus the scalar history as ``plots/learning_curves.json``."""
        rows = [{k: v for k, v in row.items() if isinstance(v, (int, float))} for row in history]
        if not rows:
            return
        self.log_figure(plots.learning_curves(rows), "plots/learning_curves.png")
        self._upload_bytes(json.dumps(rows, indent=1).encode(), "plots/learning_curves.json")

    def log_adaptation_curves(self, before: list[float], after: list[float]) -> None:
        """Query loss against inner step, before and after meta-training: a plot, JSON and step-indexed metrics."""
        before, after = [float(v) for v in before], [float(v) for v in after]
        self.log_figure(plots.adaptation_curves(before, after), "plots/adaptation_curves.png")
        self._upload_bytes(json.dumps({"before": before, "after": after}).encode(), "plots/adaptation_curves.json")
        for k in range(max(len(before), len(after))):
            values = {}
            if k < len(before):
                values["adaptation_curve_before"] = before[k]
            if k < len(after):
                values["adaptation_curve_after"] = after[k]
            self.log_metrics(values, k)

    def log_model(self, checkpoint_path: str, registered_model_name: str | None, *, tag: str = "final",
                  input_example: list[dict] | None = None, keep_on_failure: bool = True) -> str | None:
        """Log the checkpoint as a pyfunc model and register it; returns the new version, or None on failure.

        Synchronous (the caller wants the version). Order: upload, mark the logged model READY, then create
        the version and wait for READY; a failure leaves no version behind, or a non-READY one that
        promotion refuses. Nothing here moves an alias. On failure the checkpoint is copied to a stable
        path first (``keep_on_failure``; see :meth:`unlogged_models`), so the caller may delete its file.
        """
        what = f"model {tag!r} ({checkpoint_path})"
        if self.run_id is None:
            self._record(f"{what}: the run was never started")
            return None
        if not Path(checkpoint_path).is_file():
            self._record(f"model {tag!r}: checkpoint {checkpoint_path} does not exist")
            return None
        try:  # a file that is not a loadable checkpoint is refused before anything is created in MLflow
            load_checkpoint(checkpoint_path)
        except Exception as e:  # noqa: BLE001
            self._record(f"{what}: not a loadable checkpoint ({_short(e)})")
            return None
        version, problem = self._log_and_register(what, checkpoint_path, registered_model_name, tag, input_example)
        if problem is not None:
            self._record(self._keep(checkpoint_path, registered_model_name, tag, problem) if keep_on_failure
                         else f"{what}: {problem}")
        return version

    def unlogged_models(self) -> list[dict[str, str]]:
        """The checkpoints :meth:`log_model` could not log: ``tag``, ``path`` (the stable copy), ``command``."""
        with self._cond:
            return [dict(k) for k in self._kept]

    def _log_and_register(self, what: str, checkpoint_path: str, name: str | None, tag: str,
                          input_example: list[dict] | None) -> tuple[str | None, str | None]:
        """(version, None) when done (version None if not asked to register); (None, problem) on failure."""
        run_id = self.run_id
        state: dict[str, Any] = {}

        def create() -> Any:  # idempotent across retries: a retried request creates no second logged model
            if "model" not in state:
                experiment_id = self.client.get_run(run_id).info.experiment_id
                state["model"] = self.client.create_logged_model(experiment_id, name=f"model-{tag}",
                                                                 source_run_id=run_id, tags={"metalstm.tag": tag})
            return state["model"]

        ok, logged = self._attempt(f"{what}: create", create)
        if not ok:
            return None, _short(logged)
        meta, problem = self._upload_model(what, logged, checkpoint_path, tag, input_example)
        if problem is not None or not name:
            return None, problem
        version = self._register(name, logged, run_id, meta, tag)
        if version is None:
            return None, f"registration as {name!r} failed (model {logged.model_id} is logged, not registered)"
        return version, None

    def _keep(self, checkpoint_path: str, name: str | None, tag: str, problem: str) -> str:
        """Copy a checkpoint that could not be logged to ``<keep dir>/<run id>/<tag>.pt`` (never overwriting)
        with a JSON note beside it; the message says where, and the command that logs it later."""
        root = (self.keep_dir or default_keep_dir()) / (self.run_id or "no-run")
        try:
            kept = _copy_new(Path(checkpoint_path), root, tag)
            load_checkpoint(kept)  # the copy itself must load, or it is no copy
        except Exception as e:  # noqa: BLE001 - the message must still be recorded
            return (f"model {tag!r} not logged ({problem}) and NOT kept: cannot copy {checkpoint_path} into {root} "
                    f"({_short(e)}); {checkpoint_path} is the only copy")
        command = register_command(kept, tracking_uri=self.uri, run_id=self.run_id, tag=tag, name=name)
        note = {"checkpoint": str(kept), "source": str(checkpoint_path), "run_id": self.run_id, "tag": tag,
                "registered_model": name, "tracking_uri": redact(self.uri), "problem": problem,
                "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "command": command}
        try:
            kept.with_suffix(".json").write_text(json.dumps(note, indent=2) + "\n")
        except OSError as e:
            log.warning("cannot write %s: %s", kept.with_suffix(".json"), e)
        with self._cond:
            self._kept.append({"tag": tag, "path": str(kept), "command": command})
        action = "log and register" if name else "log"
        return (f"model {tag!r} not logged ({problem}); checkpoint kept on disk at {kept}; "
                f"{action} it later with: {command}")

    def _upload_model(self, what: str, logged: Any, checkpoint_path: str, tag: str,
                      input_example: list[dict] | None) -> tuple[dict[str, Any], str | None]:
        """Build the pyfunc model and upload it as ``logged``'s artifacts, then mark it READY: (metadata, None),
        or ({}, problem) with the logged model marked FAILED."""
        local = self._tmp / f"model-{tag}-{uuid.uuid4().hex[:8]}"
        meta: dict[str, Any] = {}
        try:
            meta = save_pyfunc(checkpoint_path, local, tag=tag, input_example=input_example,
                               mlflow_model=Model(artifact_path=logged.artifact_location, run_id=self.run_id,
                                                  model_uuid=logged.model_id, model_id=logged.model_id))
        except Exception as e:  # noqa: BLE001
            problem: str | None = f"cannot build the pyfunc model ({_short(e)})"
        else:
            ok, err = self._attempt(f"{what}: upload", lambda: self._publish(logged, local, int(meta.get("step") or 0)))
            problem = None if ok else f"upload failed ({_short(err)})"
        shutil.rmtree(local, ignore_errors=True)
        if problem is not None:
            self._attempt(f"{what}: mark failed", lambda: self.client.finalize_logged_model(logged.model_id, "FAILED"))
            return {}, problem
        log.info("MLflow: logged model %s (%s)", logged.model_id, tag)
        return meta, None

    def _publish(self, logged: Any, local: Path, step: int) -> None:
        """Upload the model directory, mark the logged model READY and link it to the run as an output."""
        self.client.log_model_artifacts(logged.model_id, str(local))
        self.client.finalize_logged_model(logged.model_id, "READY")
        self.client.log_outputs(self.run_id, [LoggedModelOutput(logged.model_id, step=step)])

    def _register(self, name: str, logged: Any, run_id: str, meta: dict[str, Any], tag: str,
                  ready_timeout: float = 300.0) -> str | None:
        tags = {"metalstm.tag": tag, "metalstm.family": meta["family"], "metalstm.config_digest": meta["config_digest"],
                "metalstm.step": str(meta.get("step")), "metalstm.val_loss": str(meta.get("val_loss"))}
        store = meta.get("store") or {}
        if store.get("hash"):
            tags["metalstm.task_store_hash"] = str(store["hash"])

        def register() -> str:
            if urlsplit(self.uri).scheme not in ("http", "https"):
                # MLflow's SQL registry looks a models:/<id> source up through the *global* tracking URI
                # (sqlalchemy_store.create_model_version): without this, tracking.uri=sqlite:///... registers nothing
                mlflow.set_tracking_uri(self.uri)
            try:
                self.client.create_registered_model(name)
            except MlflowException as e:
                if e.error_code != "RESOURCE_ALREADY_EXISTS":
                    raise
            # a retried request may have created the version already: never register the same model twice
            found = [mv for mv in self.client.search_model_versions(f"name = '{name}' and run_id = '{run_id}'")
                     if mv.source == logged.model_uri]
            mv = found[0] if found else self.client.create_model_version(
                name, source=logged.model_uri, run_id=run_id, tags=tags, model_id=logged.model_id,
                await_creation_for=0)
            deadline = time.monotonic() + ready_timeout
            while str(mv.status) == "PENDING_REGISTRATION" and time.monotonic() < deadline:
                time.sleep(0.5)
                mv = self.client.get_model_version(name, mv.version)
            if str(mv.status) != "READY":
                raise MlflowException(f"version {mv.version} is {mv.status}, not READY", error_code="INVALID_STATE")
            return str(mv.version)

        ok, result = self._attempt(f"register {name!r}", register)
        if ok:
            log.info("MLflow: registered %s version %s (%s)", name, result, tag)
            return result
        return None

    def finish(self, status: str = "FINISHED") -> list[str]:
        """Flush (at most ``flush_timeout`` s), end the run and return what could not be logged."""
        if self._finished is not None:
            return list(self._finished)
        if status not in ("FINISHED", "FAILED", "KILLED"):
            raise ValueError(f"status: expected FINISHED, FAILED or KILLED, got {status!r}")
        with self._cond:
            self._deadline = time.monotonic() + self.flush_timeout
            self._closing = True
            self._cond.notify_all()
        self._hurry.set()
        if self._thread is not None:
            self._thread.join(self.flush_timeout + 5.0)
        with self._cond:
            stuck = self._thread is not None and self._thread.is_alive()
            leftover = list(self._queue) + self._failed
            self._queue.clear()
            self._failed = []
        if stuck:
            self._not_logged.append("an MLflow request still in flight at the flush timeout")
        # the store may have come back while nothing was queued: one last round for what failed
        retry = [op for op in leftover if op.rounds < RETRY_ROUNDS and op.error != "flush timeout"]
        if retry and self.run_id is not None and not self._past_deadline() and self._reachable():
            for op in retry:
                ok, result = self._attempt(op.what, op.fn)
                if ok:
                    leftover.remove(op)
                else:
                    op.error = _short(result)
        missing = self._not_logged + [f"{op.what}: {op.error or 'not attempted'}" for op in leftover]
        if self.run_id is not None:
            if missing:
                text = "\n".join(missing) + "\n"
                self._attempt("not_logged.txt", lambda: self.client.log_text(self.run_id, text, "not_logged.txt"))
                self._attempt("not-logged tag",
                              lambda: self.client.set_tag(self.run_id, "metalstm.not_logged", str(len(missing))))
            ok, err = self._attempt(f"run status {status}", lambda: self.client.set_terminated(self.run_id, status))
            if not ok:
                missing.append(f"run status {status}: {_short(err)}")
        if missing:
            log.warning("MLflow: %d item(s) not logged for run %s:\n  %s", len(missing), self.run_id,
                        "\n  ".join(missing))
        if self._thread is not None:
            shutil.rmtree(self._tmp, ignore_errors=True)
        self._finished = missing
        return list(missing)

    def _reachable(self) -> bool:
        try:
            check_tracking_server(self.uri, timeout=2.0)
            return True
        except UserError:
            return False

    def __enter__(self) -> Tracker:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if self.run_id is not None:
            self.finish("FAILED" if exc_type is not None else "FINISHED")
