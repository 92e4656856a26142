"""Log (and register) a checkpoint that a run could not log because MLflow was unreachable at its end.

The tracker kept the checkpoint at a stable path and its warning printed this command::

    metalstm register CHECKPOINT --tracking-uri URI --tag best --run-id RUN [--name NAME]

It logs the checkpoint as a model of that run and registers it as ``NAME`` (a new version; no alias moves). Without
``--run-id`` the model goes into a new run of ``--experiment``. The kept file is left in place.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import Any

from metalstm import load_checkpoint
from pipeline.errors import UserError
from pipeline.tracking.runs import Tracker, redact, require_store, resolve_tracking_uri

log = logging.getLogger(__name__)

DEFAULT_EXPERIMENT = "metalstm-recovered"


def _tracker(uri: str, run_id: str | None, experiment: str, tag: str, checkpoint: Path) -> Tracker:
    tracker = Tracker(uri, experiment, run_name=f"recovered-{tag}", run_id=run_id, max_retries=2, backoff=1.0)
    if run_id:
        tracker.attach()
    else:
        tracker.start({"recovered_checkpoint": str(checkpoint)}, {"metalstm.recovered_from": str(checkpoint)})
    return tracker


def register_checkpoint(checkpoint: str | Path, *, tracking_uri: str | None = None, run_id: str | None = None,
                        experiment: str = DEFAULT_EXPERIMENT, name: str | None = None,
                        tag: str = "best") -> dict[str, Any]:
    """Log ``checkpoint`` to ``run_id`` (else a new run of ``experiment``) and register it as ``name``."""
    path = Path(checkpoint).expanduser().resolve()
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint: {path} does not exist")
    try:
        load_checkpoint(path)
    except Exception as e:  # noqa: BLE001 - any failure means it is not a checkpoint this project can load
        raise UserError(f"checkpoint: {path} cannot be loaded ({type(e).__name__}: {e})") from None
    uri = resolve_tracking_uri(tracking_uri)
    require_store(uri)  # a store that does not exist is the wrong store: never create an empty one
    tracker = _tracker(uri, run_id, experiment, tag, path)
    version = tracker.log_model(str(path), name, tag=tag, keep_on_failure=False)
    failures = tracker.pending_failures()
    if not run_id:
        tracker.finish("FAILED" if failures else "FINISHED")
    if failures:
        raise UserError(f"{path} was not logged to {redact(uri)}: {'; '.join(failures)}. The file is unchanged; "
                        "run this command again once the store answers")
    log.info("logged %s to run %s%s", path, tracker.run_id, f" as {name} version {version}" if name else "")
    return {"checkpoint": str(path), "run_id": tracker.run_id, "tag": tag, "registered_model": name,
            "version": version, "note": f"logged; the kept file {path} is no longer needed"}


def add_arguments(parser: argparse.ArgumentParser, command: str = "register") -> None:
    parser.add_argument("checkpoint", help="the kept checkpoint file (.pt)")
    parser.add_argument("--tracking-uri", default=None,
                        help="MLflow tracking/registry URI (default: MLFLOW_TRACKING_URI, else ./mlflow.db)")
    parser.add_argument("--run-id", default=None, help="the run to log it to (default: a new run)")
    parser.add_argument("--experiment", default=DEFAULT_EXPERIMENT,
                        help=f"experiment of the new run without --run-id (default {DEFAULT_EXPERIMENT})")
    parser.add_argument("--name", default=None, help="register it as this model (default: log it only)")
    parser.add_argument("--tag", default="best", help="the model's tag: best or final (default best)")


def run(args: argparse.Namespace) -> int:
    logging.getLogger("mlflow").setLevel(logging.WARNING)
    result = register_checkpoint(args.checkpoint, tracking_uri=args.tracking_uri, run_id=args.run_id,
                                 experiment=args.experiment, name=args.name, tag=args.tag)
    print(json.dumps(result, indent=2))
    return 0
