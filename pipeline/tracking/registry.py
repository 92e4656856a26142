"""The MLflow model registry: resolving ``models:/`` URIs, evaluation and gated promotion.

Serving loads whatever an alias (``champion``) points to, so an alias only ever moves to a version that is
READY and that this module has downloaded and loaded successfully. The registered model itself (the pyfunc)
is :mod:`pipeline.tracking.pyfunc`.

Only the checkpoint of a version is ever loaded, with :func:`metalstm.load_checkpoint` (``weights_only``): never
``mlflow.pyfunc.load_model``, so no code file, ``code_paths`` or pickle stored with a version runs here.

Moving an alias is a compare-and-set under a lock: promote reads the holder, evaluates (unlocked, minutes),
then, holding the alias lock (:func:`alias_lock`), moves the alias only if the holder is still the one it
compared against; otherwise it changes nothing and exits 2 (:class:`PromotionConflict`). So
``previous-<alias>`` always names the version that held the alias just before.

Commands: ``metalstm evaluate``, ``metalstm promote`` (exit 0 promoted, 3 not better, 2 error or conflict) and
``metalstm rollback``.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import random
import socket
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import mlflow
import yaml
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from metalstm import MetaLearner, learner_from_checkpoint, load_checkpoint, model_class
from metalstm.evaluation import evaluate_learner
from metalstm.runtime import retain_freed_memory
from pipeline.errors import UserError
from pipeline.tasks.store import read_manifest, read_tasks
from pipeline.tracking.pyfunc import CHECKPOINT_ARTIFACT, MODEL_CODES, config_digest
from pipeline.tracking.runs import not_found_hint, require_store, resolve_tracking_uri

log = logging.getLogger(__name__)

EXIT_PROMOTED, EXIT_NOT_BETTER = 0, 3  # and 2 for an error or a conflict, as every command
LOCK_WAIT_S = 30.0  # how long a promote or rollback waits for another one's alias lock before giving up
LOCK_TTL_S = 300.0  # a lock older than this is stale (its holder died while moving the alias) and is broken
LOCK_OWNER, LOCK_EXPIRES = "metalstm.lock.owner", "metalstm.lock.expires"
CODE_LOADER = "mlflow.pyfunc.loaders.code_model"  # the loader of the models-from-code file this project writes


def primary_metric(ckpt: dict[str, Any]) -> str:
    """The metric promotion compares: the family's primary metric after adaptation (lower is better)."""
    return "post_" + model_class(ckpt["model"]["kind"]).primary_metric


# ----------------------------------------------------------------------------- resolving models:/ URIs


@dataclass
class ResolvedModel:
    name: str
    version: str
    alias: str | None
    checkpoint_path: str  # local file
    run_id: str | None
    config_digest: str
    model_dir: str = ""  # the downloaded pyfunc model directory
    family: str = ""
    foreign_code: list[str] = field(default_factory=list)  # code stored with it that this project did not write


def parse_model_uri(model_uri: str) -> tuple[str, str | None, str | None]:
    """``models:/NAME@ALIAS`` → (name, alias, None); ``models:/NAME/VERSION`` → (name, None, version)."""
    prefix = "models:/"
    if not model_uri.startswith(prefix):
        raise ValueError(f"model: expected models:/NAME@ALIAS or models:/NAME/VERSION, got {model_uri!r}")
    rest = model_uri[len(prefix):]
    if "@" in rest:
        name, alias = rest.rsplit("@", 1)
        if name and alias:
            return name, alias, None
    elif "/" in rest:
        name, version = rest.rsplit("/", 1)
        if name and version.isdigit():
            return name, None, version
    raise ValueError(f"model: expected models:/NAME@ALIAS or models:/NAME/VERSION (a number), got {model_uri!r}")


def _client(tracking_uri: str | None) -> tuple[MlflowClient, str]:
    """A client of an existing store: opening a local store creates it, and a look-up must create nothing."""
    uri = resolve_tracking_uri(tracking_uri)
    require_store(uri)
    return MlflowClient(tracking_uri=uri, registry_uri=uri), uri


def _not_found(e: MlflowException) -> bool:
    return e.error_code in ("RESOURCE_DOES_NOT_EXIST", "NOT_FOUND") or "not found" in str(e).lower()


def _registered_names(client: MlflowClient, limit: int = 10) -> str:
    """The store's registered models, for a "not found" message (the usual cause is the wrong store)."""
    try:
        names = sorted(m.name for m in client.search_registered_models(max_results=limit))
    except MlflowException:
        return ""
    return f" (registered models there: {', '.join(names)})" if names else " (no registered models there)"


def _get_version(client: MlflowClient, uri: str, name: str, alias: str | None, version: str | None) -> Any:
    what = f"models:/{name}@{alias}" if alias else f"models:/{name}/{version}"
    try:
        if alias:
            return client.get_model_version_by_alias(name, alias)
        return client.get_model_version(name, version)
    except MlflowException as e:
        if _not_found(e):
            raise UserError(f"{what}: no such registered model version or alias {not_found_hint(uri)}"
                            f"{_registered_names(client)}") from None
        raise


def _inside(root: Path, relative: str) -> Path:
    """``root / relative``, refused when a (tampered) MLmodel points outside the downloaded model."""
    path = (root / relative).resolve()
    if not path.is_relative_to(root.resolve()):
        raise ValueError(f"the checkpoint path {relative!r} points outside the model directory")
    return path


def _foreign_code(local: Path, pyfunc: dict[str, Any]) -> list[str]:
    """What in a downloaded model could run as code and is not this project's: never run here, only reported
    (``mlflow.pyfunc.load_model`` of that version would run it)."""
    found = []
    if pyfunc.get("loader_module") != CODE_LOADER:
        found.append(f"loader_module {pyfunc.get('loader_module')!r}")
    if pyfunc.get("code"):
        found.append(f"code_paths {pyfunc['code']!r}")
    for path in sorted(p for p in local.rglob("*") if p.is_file()):
        if path.suffix in (".pkl", ".pickle") or (path.suffix == ".py"
                                                  and path.read_text(errors="replace") not in MODEL_CODES):
            found.append(str(path.relative_to(local)))
    return found


def _fetch(client: MlflowClient, uri: str, mv: Any, alias: str | None,
           dst_dir: str | None) -> tuple[ResolvedModel, dict[str, Any]]:
    """Download a READY version and load its checkpoint: the "loadable" half of the alias invariant.

    Only ``MLmodel`` (as YAML data) and the checkpoint (weights only) are read; nothing stored with it runs.
    """
    what = f"models:/{mv.name}/{mv.version}"
    if str(mv.status) != "READY":
        raise UserError(f"{what}: version status is {mv.status}, not READY")
    dst = Path(dst_dir or tempfile.mkdtemp(prefix="metalstm-model-"))
    dst.mkdir(parents=True, exist_ok=True)
    try:
        # the version's storage location, not models:/NAME/V: MLflow resolves models:/ URIs through the *global*
        # tracking URI (ModelsArtifactRepository), which a Serve replica or a Ray job may not have set
        source = client.get_model_version_download_uri(mv.name, mv.version)
        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=source, dst_path=str(dst), tracking_uri=uri))
        pyfunc = yaml.safe_load((local / "MLmodel").read_text())["flavors"]["python_function"]
        checkpoint = _inside(local, pyfunc["artifacts"][CHECKPOINT_ARTIFACT]["path"])
        ckpt = load_checkpoint(checkpoint)
        foreign = _foreign_code(local, pyfunc)
    except Exception as e:  # any failure here means the version must not be used
        raise UserError(f"{what}: artifacts cannot be downloaded or loaded ({type(e).__name__}: {e})") from None
    if foreign:
        log.warning("%s carries code this project did not write (%s); it is not run here", what, ", ".join(foreign))
    resolved = ResolvedModel(name=mv.name, version=str(mv.version), alias=alias, checkpoint_path=str(checkpoint),
                             run_id=mv.run_id or None, config_digest=config_digest(ckpt), model_dir=str(local),
                             family=model_class(ckpt["model"]["kind"]).family, foreign_code=foreign)
    return resolved, ckpt


def _code_note(resolved: ResolvedModel, role: str) -> list[str]:
    if not resolved.foreign_code:
        return []
    return [f"the {role} (version {resolved.version}) carries code this project did not write "
            f"({', '.join(resolved.foreign_code)}): it was not run (only its checkpoint was loaded, weights-only); "
            "do not load this version with mlflow.pyfunc.load_model"]


def load_learner(model_uri: str, tracking_uri: str | None = None,
                 dst_dir: str | None = None) -> tuple[MetaLearner, dict[str, Any], ResolvedModel]:
    """The learner of a registered version, its checkpoint dict and where it came from."""
    name, alias, version = parse_model_uri(model_uri)
    client, uri = _client(tracking_uri)
    mv = _get_version(client, uri, name, alias, version)
    resolved, ckpt = _fetch(client, uri, mv, alias, dst_dir)
    learner, _ = learner_from_checkpoint(ckpt)
    learner.eval()
    return learner, ckpt, resolved


# ----------------------------------------------------------------------------- evaluation


def load_tasks(uri: str, split: str | None, limit: int | None, kind: str | None = None) -> list[dict]:
    """Held-out tasks from a task store, in the store's order (the same for every model compared).

    With ``kind``, a store whose manifest names another ``model_kind`` is refused: its tasks are laid out for
    a different network. Stores built before manifests carried ``model_kind`` are not checked.
    """
    if limit is not None and limit < 1:
        raise ValueError(f"--limit: must be >= 1, got {limit}")
    store_kind = read_manifest(uri).get("model_kind")
    if kind is not None and store_kind is not None and store_kind != kind:
        raise UserError(f"--tasks {uri}: the store's tasks are for a {store_kind!r} model, but the checkpoint "
                        f"is a {kind!r} model")
    tasks = read_tasks(uri, split=split, limit=limit)
    if not tasks:
        raise UserError(f"--tasks {uri}: no tasks in split {split!r}")
    return tasks


def held_out_tasks(ckpt: dict[str, Any], tasks_uri: str | None, split: str | None, limit: int | None,
                   whose: str = "model's") -> tuple[str, list[dict]]:
    """(store URI, tasks) to evaluate a checkpoint on: ``tasks_uri``, else the store it was trained on."""
    tasks_uri = tasks_uri or (ckpt.get("extra", {}).get("store") or {}).get("uri")
    if not tasks_uri:
        raise UserError(f"--tasks: the {whose} checkpoint names no task store; pass --tasks URI")
    return tasks_uri, load_tasks(tasks_uri, split, limit, ckpt["model"]["kind"])


def evaluate(model_uri: str, *, tasks_uri: str | None = None, split: str | None = "test", limit: int | None = None,
             steps: int | None = None, batch_size: int = 16, seed: int = 0,
             tracking_uri: str | None = None) -> dict[str, Any]:
    """Metrics of a registered version on held-out tasks (what ``metalstm evaluate`` prints)."""
    with tempfile.TemporaryDirectory(prefix="metalstm-evaluate-") as tmp:
        learner, ckpt, resolved = load_learner(model_uri, tracking_uri, tmp)
        tasks_uri, tasks = held_out_tasks(ckpt, tasks_uri, split, limit)
        metrics = evaluate_learner(learner, tasks, steps=steps, batch_size=batch_size, seed=seed)
    result = {"model": model_uri, "name": resolved.name, "version": resolved.version, "family": resolved.family,
              "primary_metric": primary_metric(ckpt), "tasks": tasks_uri, "split": split, "metrics": metrics}
    notes = _code_note(resolved, "model")
    return result | ({"notes": notes} if notes else {})


# ----------------------------------------------------------------------------- the alias lock


class PromotionConflict(UserError):
    """The alias moved while this promote or rollback was checking (another one moved it): nothing was changed."""

    def __init__(self, message: str, result: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.result = result or {}


def lock_name(name: str, alias: str) -> str:
    """The registered model that exists only while a promote or rollback holds the lock on ``name@alias``."""
    return f"{name}.alias-lock.{alias}"


def _lock_tags(client: MlflowClient, lock: str) -> dict[str, str]:
    """The lock's tags (owner, expiry), or {} when nobody holds it."""
    try:
        return dict(client.get_registered_model(lock).tags)
    except MlflowException as e:
        if _not_found(e):
            return {}
        raise


def _claim(client: MlflowClient, lock: str, owner: str, ttl: float) -> bool:
    """Create the lock model and read its owner back. Creating a registered model whose name exists fails in the
    registry itself (a unique key), so of two claims at once exactly one succeeds."""
    tags = {LOCK_OWNER: owner, LOCK_EXPIRES: f"{time.time() + ttl:.3f}"}
    try:
        client.create_registered_model(lock, tags=tags, description="metalstm: held while a promote or rollback "
                                       "moves the alias; removed when it is done (expires: tag metalstm.lock.expires)")
    except MlflowException as e:
        if e.error_code == "RESOURCE_ALREADY_EXISTS" or _not_found(e):
            return False
        raise
    return _lock_tags(client, lock).get(LOCK_OWNER) == owner


def _expired(tags: dict[str, str]) -> bool:
    try:
        return float(tags.get(LOCK_EXPIRES, "0")) < time.time()
    except ValueError:
        return True


def _acquire(client: MlflowClient, lock: str, owner: str, what: str, wait: float, ttl: float) -> None:
    deadline = time.monotonic() + wait
    while not _claim(client, lock, owner, ttl):
        held = _lock_tags(client, lock)
        if held and _expired(held):  # its holder died mid-move: the alias itself is consistent (history first)
            log.warning("breaking the stale lock on %s held by %s", what, held.get(LOCK_OWNER))
            if _lock_tags(client, lock).get(LOCK_OWNER) == held.get(LOCK_OWNER):
                _delete_lock(client, lock)
            continue
        if time.monotonic() >= deadline:
            until = time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(float(held.get(LOCK_EXPIRES) or 0)))
            raise UserError(f"{what} is being moved by another promote or rollback ({held.get(LOCK_OWNER, '?')}); "
                            f"waited {wait:g} s. Try again; if none is running, its lock expires at {until} (or "
                            f"delete the registered model {lock!r})")
        time.sleep(random.uniform(0.05, 0.3))


def _delete_lock(client: MlflowClient, lock: str) -> None:
    try:
        client.delete_registered_model(lock)
    except MlflowException as e:
        if not _not_found(e):
            raise


def _still_held(client: MlflowClient, name: str, alias: str, owner: str) -> None:
    """Right before the alias moves: the lock is still this one's and not expired (a registry that answered
    slower than the lock's lifetime may have let another promote break it)."""
    tags = _lock_tags(client, lock_name(name, alias))
    if tags.get(LOCK_OWNER) != owner or _expired(tags):
        raise UserError(f"{name}@{alias}: the alias lock expired before the alias moved (the registry answered too "
                        "slowly); nothing was moved. Run the command again")


@contextmanager
def alias_lock(client: MlflowClient, name: str, alias: str, *, wait: float = LOCK_WAIT_S,
               ttl: float = LOCK_TTL_S) -> Iterator[str]:
    """Hold the registry's lock on ``name@alias`` (waiting at most ``wait`` s); yields the owner id."""
    lock = lock_name(name, alias)
    owner = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:12]}"
    _acquire(client, lock, owner, f"{name}@{alias}", wait, ttl)
    try:
        yield owner
    finally:
        try:
            if _lock_tags(client, lock).get(LOCK_OWNER) == owner:
                _delete_lock(client, lock)
        except MlflowException as e:  # must not hide the outcome: an unreleased lock expires after ``ttl``
            log.warning("cannot release the lock %s (%s); it expires in %g s", lock, e.message, ttl)


# ----------------------------------------------------------------------------- promotion


def _alias_version(client: MlflowClient, name: str, alias: str) -> Any | None:
    try:
        return client.get_model_version_by_alias(name, alias)
    except MlflowException as e:
        if _not_found(e):
            return None
        raise


def _number(mv: Any | None) -> str | None:
    return None if mv is None else str(mv.version)


def _tags(client: MlflowClient, name: str, version: str, tags: dict[str, Any]) -> None:
    for key, value in tags.items():
        client.set_model_version_tag(name, version, key, str(value))


def _is_better(candidate: float, holder: float, margin: float) -> bool:
    return math.isfinite(candidate) and (not math.isfinite(holder) or candidate < holder - margin)


def _check_promotion(version: str, margin: float, alias: str) -> None:
    if not version.isdigit():
        raise ValueError(f"--version: expected a version number, got {version!r}")
    if margin < 0 or not math.isfinite(margin):
        raise ValueError(f"--margin: must be a finite number >= 0, got {margin}")
    if alias.startswith("previous-"):
        raise ValueError(f"--alias: {alias!r} is reserved for rollback history")


def _holder_checkpoint(client: MlflowClient, uri: str, holder_mv: Any, alias: str, family: str, force: bool,
                       dst_dir: str) -> tuple[ResolvedModel | None, dict[str, Any] | None]:
    """The alias holder and its checkpoint to compare against; (None, None) when it cannot be loaded and ``force``."""
    try:
        holder, ckpt = _fetch(client, uri, holder_mv, alias, dst_dir)
    except Exception as e:
        if not force:
            raise UserError(f"cannot load the current @{alias} (version {holder_mv.version}): {e}; "
                            "pass --force to replace it anyway") from None
        log.warning("current @%s cannot be loaded (%s); --force replaces it", alias, e)
        return None, None
    if holder.family != family:
        raise UserError(f"@{alias} holds a {holder.family!r} model; the candidate is {family!r}")
    return holder, ckpt


def _store(ckpt: dict[str, Any] | None) -> dict[str, Any]:
    return (ckpt or {}).get("extra", {}).get("store") or {}


def _same_store(a: dict[str, Any], b: dict[str, Any]) -> bool:
    if a.get("hash") and b.get("hash"):
        return a["hash"] == b["hash"]
    return a.get("uri") == b.get("uri")


def _describe(store: dict[str, Any]) -> str:
    return f"{store.get('uri') or '(none named)'}" + (f" (hash {store['hash']})" if store.get("hash") else "")


def _evaluation_store(cand_ckpt: dict[str, Any], holder_ckpt: dict[str, Any] | None, tasks_uri: str | None,
                      alias: str) -> tuple[str, str, list[str]]:
    """(store URI, whose, notes). ``--tasks``, else the holder's store: the champion sets the bar, so a
    candidate cannot pick easier tasks by how it was trained; with no holder, the candidate's."""
    cand, holder = _store(cand_ckpt), _store(holder_ckpt)
    notes = []
    if holder_ckpt is not None and not _same_store(cand, holder):
        notes.append(f"the candidate was trained on task store {_describe(cand)}, the @{alias} holder on "
                     f"{_describe(holder)}")
    if tasks_uri:
        return tasks_uri, "--tasks", notes
    if holder.get("uri"):
        if notes:
            notes.append(f"evaluated on the @{alias} holder's store {holder['uri']} (--tasks chooses another)")
        return holder["uri"], f"@{alias} holder", notes
    if holder_ckpt is not None:
        notes.append(f"the @{alias} holder's checkpoint names no task store: evaluated on the candidate's")
    if not cand.get("uri"):
        raise UserError("--tasks: neither the candidate's nor the holder's checkpoint names a task store; "
                        "pass --tasks URI")
    return cand["uri"], "candidate", notes


def _record(client: MlflowClient, name: str, version: str, alias: str, result: dict[str, Any]) -> None:
    """The comparison, written on the candidate version (``promotion.<alias>.*`` tags)."""
    prefix = f"promotion.{alias}."
    tags = {prefix + k: ("; ".join(v) if isinstance(v, list) else v)
            for k, v in result.items() if k != "candidate_version"}
    _tags(client, name, version, {k: str(v)[:4000] for k, v in tags.items()}
          | {prefix + "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")})


def _move(client: MlflowClient, name: str, alias: str, version: str, current: Any | None) -> None:
    """History first: a failure after it leaves the old holder in place. With no holder, an older
    ``previous-<alias>`` is removed: it would name a version that did not hold the alias just before."""
    history = f"previous-{alias}"
    if current is not None:
        client.set_registered_model_alias(name, history, str(current.version))
    elif _alias_version(client, name, history) is not None:
        client.delete_registered_model_alias(name, history)
    client.set_registered_model_alias(name, alias, version)


def _settle(client: MlflowClient, name: str, version: str, alias: str, holder_mv: Any | None, result: dict[str, Any],
            force: bool, lock_wait: float) -> tuple[int, dict[str, Any]]:
    """Record the comparison on the candidate; if it won (or ``force``), move the alias, under the alias lock
    and only if the holder is still the one it was compared against."""
    holder_value = result.get("holder", math.inf)
    better = _is_better(result["candidate"], holder_value, result["margin"])
    result["decision"] = "promoted" if better else ("forced" if force else "refused")
    if result["decision"] == "refused":
        _record(client, name, version, alias, result)
        log.info("not promoted: %s %s %.6g vs @%s %.6g (margin %g)", name, result["metric"], result["candidate"],
                 alias, holder_value, result["margin"])
        return EXIT_NOT_BETTER, result
    with alias_lock(client, name, alias, wait=lock_wait) as owner:
        current = _alias_version(client, name, alias)
        if _number(current) != _number(holder_mv):
            result |= {"decision": "conflict", "holder_now": _number(current)}
            _record(client, name, version, alias, result)
            raise PromotionConflict(
                f"{name}@{alias} moved from version {_number(holder_mv) or '(none)'} to {_number(current) or '(none)'}"
                f" while version {version} was being evaluated (another promote or rollback); nothing was changed. "
                f"Run promote again to compare against the new holder", result)
        _record(client, name, version, alias, result)
        _still_held(client, name, alias, owner)
        _move(client, name, alias, version, current)
    log.info("%s @%s -> version %s (%s)", name, alias, version, result["decision"])
    return EXIT_PROMOTED, result


def _compare(cand: ResolvedModel, cand_ckpt: dict[str, Any], holder: ResolvedModel | None,
             holder_ckpt: dict[str, Any] | None, alias: str, tasks_uri: str | None, split: str | None,
             limit: int | None, **evaluation: Any) -> dict[str, Any]:
    """Both models' primary metric on the same tasks (see :func:`_evaluation_store` for which)."""
    tasks_uri, whose, notes = _evaluation_store(cand_ckpt, holder_ckpt, tasks_uri, alias)
    tasks = load_tasks(tasks_uri, split, limit, cand_ckpt["model"]["kind"])
    metric = primary_metric(cand_ckpt)

    def score(ckpt: dict[str, Any]) -> float:
        learner, _ = learner_from_checkpoint(ckpt)
        return evaluate_learner(learner, tasks, **evaluation)[metric]

    result = {"metric": metric, "candidate_version": cand.version, "candidate": score(cand_ckpt),
              "tasks": tasks_uri, "tasks_from": whose, "split": split, "num_tasks": len(tasks),
              "seed": evaluation["seed"]}
    if holder is not None:
        result.update(holder=score(holder_ckpt))
        notes += _code_note(holder, f"@{alias} holder")
    notes = _code_note(cand, "candidate") + notes
    return result | ({"notes": notes} if notes else {})


def promote(name: str, version: str, *, alias: str = "champion", margin: float = 0.0, force: bool = False,
            tasks_uri: str | None = None, split: str | None = "test", limit: int | None = None,
            steps: int | None = None, batch_size: int = 16, seed: int = 0, tracking_uri: str | None = None,
            lock_wait: float = LOCK_WAIT_S) -> tuple[int, dict[str, Any]]:
    """Evaluate the candidate and the alias holder on the same tasks; move the alias only if it wins by ``margin``.

    Returns (exit code, comparison); raises :class:`PromotionConflict` when the alias moved meanwhile. The
    former holder keeps ``previous-<alias>`` for :func:`rollback`.
    """
    _check_promotion(version, margin, alias)
    client, uri = _client(tracking_uri)
    candidate_mv = _get_version(client, uri, name, None, version)
    holder_mv = _alias_version(client, name, alias)  # compared against; checked again before the alias moves
    if holder_mv is not None and str(holder_mv.version) == str(version):  # nothing to move: nothing to download
        log.info("%s version %s already holds @%s", name, version, alias)
        return EXIT_PROMOTED, {"decision": "already", "candidate_version": version}
    with tempfile.TemporaryDirectory(prefix="metalstm-promote-") as tmp:
        cand, cand_ckpt = _fetch(client, uri, candidate_mv, None, f"{tmp}/candidate")
        holder, holder_ckpt = (None, None) if holder_mv is None else _holder_checkpoint(
            client, uri, holder_mv, alias, cand.family, force, f"{tmp}/holder")
        result = _compare(cand, cand_ckpt, holder, holder_ckpt, alias, tasks_uri, split, limit, steps=steps,
                          batch_size=batch_size, seed=seed)
    result["margin"] = margin
    if holder_mv is not None:
        result["holder_version"] = str(holder_mv.version)
        if holder is None:  # --force over a holder that cannot be loaded
            result["holder"] = math.inf
            result["notes"] = [*result.get("notes", []), f"the @{alias} holder (version {holder_mv.version}) "
                               "cannot be loaded: evaluated on the candidate's store, and --force replaces it"]
    return _settle(client, name, version, alias, holder_mv, result, force, lock_wait)


def rollback(name: str, *, alias: str = "champion", tracking_uri: str | None = None,
             lock_wait: float = LOCK_WAIT_S) -> dict[str, Any]:
    """Move ``alias`` back to ``previous-<alias>`` (checked loadable first); the history entry is consumed."""
    client, uri = _client(tracking_uri)
    history = f"previous-{alias}"
    previous = _alias_version(client, name, history)
    if previous is None:
        raise UserError(f"{name}: no {history} to roll back to")
    current = _alias_version(client, name, alias)
    with tempfile.TemporaryDirectory(prefix="metalstm-rollback-") as tmp:
        _fetch(client, uri, previous, history, tmp)
    with alias_lock(client, name, alias, wait=lock_wait) as owner:
        now = (_number(_alias_version(client, name, history)), _number(_alias_version(client, name, alias)))
        if now != (_number(previous), _number(current)):
            raise PromotionConflict(f"{name}@{alias} or {history} moved while the rollback checked version "
                                    f"{previous.version} (another promote or rollback); nothing was changed. "
                                    "Run rollback again if still wanted")
        _still_held(client, name, alias, owner)
        client.set_registered_model_alias(name, alias, str(previous.version))
        client.delete_registered_model_alias(name, history)
    if current is not None:
        when = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        client.set_model_version_tag(name, str(current.version), f"rollback.{alias}",
                                     f"replaced by version {previous.version} at {when}")
    return {"alias": alias, "version": str(previous.version), "from_version": _number(current)}


# ----------------------------------------------------------------------------- CLI


def add_arguments(parser: argparse.ArgumentParser, command: str) -> None:
    parser.add_argument("--tracking-uri", default=None,
                        help="MLflow tracking/registry URI (default: MLFLOW_TRACKING_URI, else ./mlflow.db; the "
                             "demo's is .metalstm/demo/mlflow.db)")
    if command in ("evaluate", "promote"):
        if command == "evaluate":
            parser.add_argument("--model", required=True, help="models:/NAME@ALIAS or models:/NAME/VERSION")
            parser.add_argument("--tasks", default=None, help="task-store URI (default: the store it was trained on)")
        else:
            parser.add_argument("name", help="registered model name")
            parser.add_argument("--version", required=True, help="candidate version")
            parser.add_argument("--alias", default="champion", help="the alias to move (default champion)")
            parser.add_argument("--margin", type=float, default=0.0,
                                help="required improvement of the primary metric, in its units (default 0)")
            parser.add_argument("--force", action="store_true", help="move the alias even if not better")
            parser.add_argument("--tasks", default=None, help="task-store URI (default: the store the current "
                                "holder was trained on, else the candidate's)")
        parser.add_argument("--split", default="test", help="task-store split, or 'all' (default: test)")
        parser.add_argument("--limit", type=int, default=None, help="evaluate the first N tasks only")
        parser.add_argument("--steps", type=int, default=None, help="adaptation steps (default: the model's)")
        parser.add_argument("--batch-size", type=int, default=16,
                            help="tasks adapted together (default 16; results do not depend on it)")
        parser.add_argument("--seed", type=int, default=0,
                            help="torch seed for evaluation (default 0; the same for every model compared)")
    elif command == "rollback":
        parser.add_argument("name", help="registered model name")
        parser.add_argument("--alias", default="champion",
                            help="the alias to move back to previous-ALIAS (default champion)")


def run(args: argparse.Namespace) -> int:
    logging.getLogger("mlflow").setLevel(logging.WARNING)
    retain_freed_memory()  # evaluation adapts on every task in this process
    args.tracking_uri = resolve_tracking_uri(args.tracking_uri)
    require_store(args.tracking_uri)  # a clear error now (not HTTP retries), and no empty store left behind
    try:
        return _run(args)
    except MlflowException as e:
        raise UserError(f"MLflow ({args.tracking_uri}): {e.message}") from None


def _run(args: argparse.Namespace) -> int:
    split = getattr(args, "split", None)
    split = None if split in ("", "all") else split
    code = 0
    if args.command == "evaluate":
        result = evaluate(args.model, tasks_uri=args.tasks, split=split, limit=args.limit, steps=args.steps,
                          batch_size=args.batch_size, seed=args.seed, tracking_uri=args.tracking_uri)
    elif args.command == "promote":
        try:
            code, result = promote(args.name, args.version, alias=args.alias, margin=args.margin, force=args.force,
                                   tasks_uri=args.tasks, split=split, limit=args.limit, steps=args.steps,
                                   batch_size=args.batch_size, seed=args.seed, tracking_uri=args.tracking_uri)
        except PromotionConflict as e:  # the comparison is still worth printing; the error follows (exit 2)
            print(json.dumps(e.result, indent=2))
            raise
    elif args.command == "rollback":
        result = rollback(args.name, alias=args.alias, tracking_uri=args.tracking_uri)
    else:
        raise ValueError(f"command: expected evaluate, promote or rollback, got {args.command!r}")
    print(json.dumps(result, indent=2))
    return code
