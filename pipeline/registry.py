"""The MLflow model registry: the pyfunc model, resolving ``models:/`` URIs, evaluation and gated promotion.

A registered version is an MLflow pyfunc model whose only weights are the MetaLSTM checkpoint file (loaded
with ``torch.load(weights_only=True)``); the model's Python side is a three-line models-from-code file, so
nothing is unpickled anywhere. Serving loads whatever an alias (``champion``) points to, so an alias only
ever moves to a version that is READY and that this module has downloaded and loaded successfully.

Commands: ``metalstm evaluate``, ``metalstm promote`` (exit 0 promoted, 3 not better, 2 error) and
``metalstm rollback``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pandas as pd
import torch
import yaml
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

import metalstm
from metalstm import MetaLearner, ModelConfig, collate, learner_from_checkpoint, load_checkpoint
from metalstm.data import EOS
from metalstm.decoding import predict
from metalstm.runtime import retain_freed_memory

log = logging.getLogger(__name__)

# The family's primary metric after adaptation: lower is better. Promotion compares exactly this.
PRIMARY_METRIC = {"regression": "mse", "forecast": "mse", "lm": "bpc", "mt": "nll"}
EXIT_PROMOTED, EXIT_NOT_BETTER, EXIT_ERROR = 0, 3, 2
# predict() params: steps -1 = the model's own adaptation steps (0 = no adaptation); max_len 0 = 2 * source + 10
PREDICT_PARAMS = {"steps": -1, "output": "argmax", "max_len": 0}
CHECKPOINT_ARTIFACT = "checkpoint"
MODEL_CODE = '''"""MLflow models-from-code entry point: the model is this file and a MetaLSTM checkpoint, no pickle."""
import mlflow

from pipeline.registry import MetaLSTMPyfunc

mlflow.models.set_model(MetaLSTMPyfunc())
'''


def _user_error(message: str) -> Exception:
    from pipeline.cli import UserError

    return UserError(message)


# ----------------------------------------------------------------------------- prediction (the pyfunc)


def _dtype(learner: MetaLearner) -> torch.dtype:
    return next(learner.parameters()).dtype


def _device(learner: MetaLearner) -> torch.device:
    return next(learner.parameters()).device


def task_records(model_input: Any) -> list[dict]:
    """Task records from a DataFrame (one row per task), a list of dicts or a single dict."""
    if isinstance(model_input, pd.DataFrame):
        records = model_input.to_dict("records")
    elif isinstance(model_input, dict):
        records = [model_input]
    elif isinstance(model_input, (list, tuple)):
        records = list(model_input)
    else:
        raise ValueError(f"model_input: expected a DataFrame or a list of task dicts, got {type(model_input).__name__}")
    if not records:
        raise ValueError("model_input: no tasks")
    for i, rec in enumerate(records):
        if not isinstance(rec, dict):
            raise ValueError(f"model_input[{i}]: expected a dict with support_x, support_y, query_x")
        for key in ("support_x", "support_y", "query_x"):
            if rec.get(key) is None or len(rec[key]) == 0:
                raise ValueError(f"model_input[{i}].{key}: missing or empty")
    return records


def _placeholder_targets(task: dict, kind: str, size: int) -> list:
    """Query targets the collate layout needs but prediction never reads (``size``: outputs per example)."""
    n = len(task["query_x"])
    if kind in ("mlp", "forecaster"):
        return [np.zeros(size, np.float32)] * n
    if kind == "char_lm":
        return [np.zeros(len(x), np.int64) for x in task["query_x"]]
    return [np.array([EOS], np.int64)] * n


def predict_tasks(learner: MetaLearner, tasks: list[dict], *, steps: int | None = None, output: str = "argmax",
                  max_len: int = 0) -> list[list]:
    """Adapt on each task's support set, then predict its query inputs; one nested list per task.

    mlp / forecaster: values ``[N][O or H]``; char_lm: next-token ids ``[N][L]`` (``output="argmax"``) or
    log-probabilities ``[N][L][V]`` (``"logprobs"``); seq2seq: greedy decodings ``[N][<=max_len]`` without EOS.
    """
    if output not in ("argmax", "logprobs"):
        raise ValueError(f"output: expected argmax or logprobs, got {output!r}")
    if steps is not None and steps < 0:
        raise ValueError(f"steps: must be >= 0, got {steps}")
    model = learner.model
    kind = {"regression": "mlp", "forecast": "forecaster", "lm": "char_lm", "mt": "seq2seq"}[model.family]
    size = model.sizes[-1] if kind == "mlp" else getattr(model, "horizon", 1)
    filled = [{**t, "query_y": _placeholder_targets(t, kind, size)} for t in tasks]
    batch = collate(filled).to(_device(learner), _dtype(learner))
    fast, _ = learner.adapt(batch.support, steps)
    x, x_mask = batch.query.x, batch.query.x_mask
    pred = predict(model, fast, x, x_mask, max_len=max_len)
    if kind == "char_lm":
        pred = torch.log_softmax(pred, -1) if output == "logprobs" else pred.argmax(-1)
    out = []
    for t, task in enumerate(tasks):
        rows = []
        for n in range(len(task["query_x"])):
            p = pred[t, n]
            if kind == "char_lm":
                p = p[: int(x_mask[t, n].sum())]
            elif kind == "seq2seq":
                ids = p.tolist()
                p = torch.tensor(ids[: ids.index(EOS)] if EOS in ids else ids)
            rows.append(p.tolist())
        out.append(rows)
    return out


class MetaLSTMPyfunc(mlflow.pyfunc.PythonModel):
    """The registered model: adapts on each task's support set and predicts its query set."""

    _skip_type_hint_validation = True  # the signature is explicit (see save_pyfunc), not read from type hints

    def load_context(self, context: Any) -> None:
        ckpt = load_checkpoint(context.artifacts[CHECKPOINT_ARTIFACT])  # weights_only=True
        self.learner, self.model_cfg = learner_from_checkpoint(ckpt)
        self.learner.eval()
        self.extra = ckpt.get("extra", {})

    def predict(self, context, model_input, params=None):  # untyped: MLflow reads predict's type hints as a schema
        params = {**PREDICT_PARAMS, **(params or {})}
        steps = int(params["steps"])
        preds = predict_tasks(self.learner, task_records(model_input), steps=None if steps < 0 else steps,
                              output=str(params["output"]), max_len=int(params["max_len"]))
        return pd.DataFrame({"prediction": preds})


def example_tasks(model_cfg: ModelConfig, seed: int = 0) -> list[dict]:
    """A tiny, valid prediction input for the model's signature and input example (no ``query_y``)."""
    rng = np.random.default_rng(seed)
    if model_cfg.kind == "mlp":
        x = rng.uniform(-5, 5, size=(5, model_cfg.input_size)).round(3).tolist()
        y = rng.normal(size=(3, model_cfg.output_size)).round(3).tolist()
        return [{"support_x": x[:3], "support_y": y, "query_x": x[3:]}]
    if model_cfg.kind == "forecaster":
        x = rng.normal(size=(3, 8, model_cfg.input_size)).round(3).tolist()
        y = rng.normal(size=(2, model_cfg.horizon)).round(3).tolist()
        return [{"support_x": x[:2], "support_y": y, "query_x": x[2:]}]
    if model_cfg.kind == "char_lm":
        seqs = rng.integers(4, max(model_cfg.vocab_size, 5), size=(3, 9)).tolist()
        return [{"support_x": [s[:-1] for s in seqs[:2]], "support_y": [s[1:] for s in seqs[:2]],
                 "query_x": [seqs[2][:-1]]}]
    src = rng.integers(4, max(model_cfg.vocab_size, 5), size=(3, 6)).tolist()
    tgt = rng.integers(4, max(model_cfg.tgt_vocab_size, 5), size=(2, 5)).tolist()
    return [{"support_x": src[:2], "support_y": [t + [EOS] for t in tgt], "query_x": src[2:]}]


def _jsonable(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.tolist()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return str(value)


def config_digest(ckpt: dict[str, Any]) -> str:
    """A short digest of what defines the model (architecture, MAML settings, training config)."""
    payload = {"model": ckpt.get("model"), "maml": ckpt.get("maml"), "config": ckpt.get("extra", {}).get("config")}
    return hashlib.sha256(json.dumps(_jsonable(payload), sort_keys=True).encode()).hexdigest()[:16]


def family_of(ckpt: dict[str, Any]) -> str:
    kind = ckpt["model"]["kind"]
    return {"mlp": "regression", "forecaster": "forecast", "char_lm": "lm", "seq2seq": "mt"}[kind]


def model_metadata(ckpt: dict[str, Any], tag: str = "") -> dict[str, Any]:
    """What a user of the model needs besides the weights: config, vocabulary, normalisation, provenance."""
    extra = ckpt.get("extra", {})
    return _jsonable({"metalstm_version": metalstm.__version__, "family": family_of(ckpt), "tag": tag,
                      "config_digest": config_digest(ckpt), "model": ckpt["model"], "maml": ckpt["maml"],
                      "config": extra.get("config"), "store": extra.get("store"), "step": extra.get("step"),
                      "val_loss": extra.get("val_loss")})


def save_pyfunc(checkpoint_path: str | Path, path: str | Path, *, tag: str = "", mlflow_model: Any = None,
                input_example: list[dict] | None = None) -> dict[str, Any]:
    """Write the pyfunc model directory for a checkpoint (validated by loading it first); returns its metadata."""
    from mlflow.models import infer_signature

    ckpt = load_checkpoint(checkpoint_path)
    learner, model_cfg = learner_from_checkpoint(ckpt)
    example = input_example or example_tasks(model_cfg)
    frame = pd.DataFrame([{k: _jsonable(v) for k, v in t.items()
                           if k in ("support_x", "support_y", "query_x")} for t in example])
    output = pd.DataFrame({"prediction": predict_tasks(learner, task_records(frame))})
    signature = infer_signature(frame, output, params=PREDICT_PARAMS)
    meta = model_metadata(ckpt, tag)
    with tempfile.TemporaryDirectory(prefix="metalstm-pyfunc-") as tmp:
        code = Path(tmp) / "metalstm_model.py"
        code.write_text(MODEL_CODE)
        meta_path = Path(tmp) / "metalstm.json"
        meta_path.write_text(json.dumps(meta, indent=2))
        mlflow.pyfunc.save_model(
            path=str(path), python_model=str(code), mlflow_model=mlflow_model,
            artifacts={CHECKPOINT_ARTIFACT: str(checkpoint_path), "metadata": str(meta_path)},
            signature=signature, input_example=frame,
            pip_requirements=[f"metalstm=={metalstm.__version__}", f"torch=={torch.__version__.split('+')[0]}",
                              f"mlflow=={mlflow.__version__}", "pandas", "numpy"],
            metadata={k: meta[k] for k in ("family", "tag", "config_digest", "step", "metalstm_version")})
    return meta


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
    from pipeline.tracking import require_store, resolve_tracking_uri

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
    from pipeline.tracking import not_found_hint

    what = f"models:/{name}@{alias}" if alias else f"models:/{name}/{version}"
    try:
        if alias:
            return client.get_model_version_by_alias(name, alias)
        return client.get_model_version(name, version)
    except MlflowException as e:
        if _not_found(e):
            raise _user_error(f"{what}: no such registered model version or alias {not_found_hint(uri)}"
                              f"{_registered_names(client)}") from None
        raise


def _fetch(client: MlflowClient, uri: str, mv: Any, alias: str | None,
           dst_dir: str | None) -> tuple[ResolvedModel, dict[str, Any]]:
    """Download a READY version and load its checkpoint: the "loadable" half of the alias invariant."""
    what = f"models:/{mv.name}/{mv.version}"
    if str(mv.status) != "READY":
        raise _user_error(f"{what}: version status is {mv.status}, not READY")
    dst = Path(dst_dir or tempfile.mkdtemp(prefix="metalstm-model-"))
    dst.mkdir(parents=True, exist_ok=True)
    try:
        # the version's storage location, not models:/NAME/V: MLflow resolves models:/ URIs through the *global*
        # tracking URI (ModelsArtifactRepository), which a Serve replica or a Ray job may not have set
        source = client.get_model_version_download_uri(mv.name, mv.version)
        local = mlflow.artifacts.download_artifacts(artifact_uri=source, dst_path=str(dst), tracking_uri=uri)
        mlmodel = yaml.safe_load((Path(local) / "MLmodel").read_text())
        entry = mlmodel["flavors"]["python_function"]["artifacts"][CHECKPOINT_ARTIFACT]
        checkpoint = Path(local) / entry["path"]
        ckpt = load_checkpoint(checkpoint)
    except Exception as e:  # any failure here means the version must not be used
        raise _user_error(f"{what}: artifacts cannot be downloaded or loaded ({type(e).__name__}: {e})") from None
    resolved = ResolvedModel(name=mv.name, version=str(mv.version), alias=alias, checkpoint_path=str(checkpoint),
                             run_id=mv.run_id or None, config_digest=config_digest(ckpt), model_dir=str(local),
                             family=family_of(ckpt))
    return resolved, ckpt


def resolve_model(model_uri: str, tracking_uri: str | None = None, dst_dir: str | None = None) -> ResolvedModel:
    """The version a ``models:/`` URI names, downloaded (to ``dst_dir`` or a new temp dir) and checked."""
    return load_learner(model_uri, tracking_uri, dst_dir)[2]


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


def evaluate_learner(learner: MetaLearner, tasks: list[dict], *, steps: int | None = None, batch_size: int = 16,
                     seed: int = 0) -> dict[str, float]:
    """Mean per-task query metrics before (``pre_*``) and after (``post_*``) adaptation, in the given order."""
    if not tasks:
        raise ValueError("tasks: need at least one task to evaluate")
    if batch_size < 1:
        raise ValueError(f"batch_size: must be >= 1, got {batch_size}")
    if steps is not None and steps < 0:
        raise ValueError(f"steps: must be >= 0, got {steps}")
    torch.manual_seed(seed)
    dtype = _dtype(learner)
    sums: dict[str, float] = {}
    for i in range(0, len(tasks), batch_size):
        batch = collate(tasks[i:i + batch_size]).to(_device(learner), dtype)
        out = learner.evaluate(batch, steps)
        curve = out.pop("support_curve")
        out["post_support_loss"] = curve[:, -1]
        for key, values in out.items():
            sums[key] = sums.get(key, 0.0) + float(values.double().sum())
    metrics = {k: v / len(tasks) for k, v in sums.items()}
    metrics["num_tasks"] = float(len(tasks))
    metrics["steps"] = float(learner.cfg.adapt_steps if steps is None else steps)
    return metrics


def adaptation_curve(learner: MetaLearner, tasks: list[dict], *, steps: int | None = None,
                     batch_size: int = 16) -> list[float]:
    """Mean query loss after 0, 1, ..., ``steps`` inner steps (the adaptation-curve plot's data)."""
    steps = learner.cfg.adapt_steps if steps is None else steps
    dtype = _dtype(learner)
    totals = [0.0] * (steps + 1)
    for i in range(0, len(tasks), batch_size):
        batch = collate(tasks[i:i + batch_size]).to(_device(learner), dtype)
        for k in range(steps + 1):
            fast, _ = learner.adapt(batch.support, k)
            with torch.no_grad():
                totals[k] += float(learner.model.task_loss(fast, batch.query).double().sum())
    return [t / max(len(tasks), 1) for t in totals]


def load_tasks(uri: str, split: str | None, limit: int | None) -> list[dict]:
    """Held-out tasks from a task store, in the store's order (the same for every model compared)."""
    try:
        from pipeline.taskstore import read_tasks
    except ImportError as e:
        raise _user_error(f"--tasks {uri}: reading task stores needs pipeline.taskstore ({e})") from None
    if limit is not None and limit < 1:
        raise ValueError(f"--limit: must be >= 1, got {limit}")
    tasks = read_tasks(uri, split=split, limit=limit)
    if not tasks:
        raise _user_error(f"--tasks {uri}: no tasks in split {split!r}")
    return tasks


def _check_family(ckpt: dict[str, Any], uri: str) -> None:
    try:
        from pipeline.taskstore import read_manifest

        manifest = read_manifest(uri)
    except Exception:  # an unreadable manifest is reported by read_tasks
        return
    store_family = manifest.get("family")
    model_family = family_of(ckpt)
    store_model = (manifest.get("features") or {}).get("model")
    if store_model and store_model != ckpt["model"]["kind"]:
        raise _user_error(f"--tasks {uri}: the store's tasks are laid out for a {store_model!r} model, "
                          f"not {ckpt['model']['kind']!r}")
    compatible = {"synthetic": ("regression", "forecast"), "electricity": ("forecast",), "ptb-char": ("lm",),
                  "mt-en-de": ("mt",)}
    if store_family in compatible and model_family not in compatible[store_family]:
        raise _user_error(f"--tasks {uri}: a {store_family!r} task store cannot evaluate a {model_family!r} model")


# ----------------------------------------------------------------------------- promotion


def _alias_version(client: MlflowClient, name: str, alias: str) -> Any | None:
    try:
        return client.get_model_version_by_alias(name, alias)
    except MlflowException as e:
        if _not_found(e):
            return None
        raise


def _tags(client: MlflowClient, name: str, version: str, tags: dict[str, Any]) -> None:
    for key, value in tags.items():
        client.set_model_version_tag(name, version, key, str(value))


def _is_better(candidate: float, holder: float, margin: float) -> bool:
    return math.isfinite(candidate) and (not math.isfinite(holder) or candidate < holder - margin)


def promote(name: str, version: str, *, alias: str = "champion", margin: float = 0.0, force: bool = False,
            tasks_uri: str | None = None, split: str | None = "test", limit: int | None = None,
            steps: int | None = None, batch_size: int = 16, seed: int = 0,
            tracking_uri: str | None = None) -> tuple[int, dict[str, Any]]:
    """Evaluate the candidate and the alias holder on the same tasks; move the alias only if it wins by ``margin``.

    Returns (exit code, comparison). The former holder keeps ``previous-<alias>`` for :func:`rollback`.
    """
    if not version.isdigit():
        raise ValueError(f"--version: expected a version number, got {version!r}")
    if margin < 0 or not math.isfinite(margin):
        raise ValueError(f"--margin: must be a finite number >= 0, got {margin}")
    if alias.startswith("previous-"):
        raise ValueError(f"--alias: {alias!r} is reserved for rollback history")
    client, uri = _client(tracking_uri)
    candidate_mv = _get_version(client, uri, name, None, version)
    holder_mv = _alias_version(client, name, alias)
    with tempfile.TemporaryDirectory(prefix="metalstm-promote-") as tmp:
        cand, cand_ckpt = _fetch(client, uri, candidate_mv, None, f"{tmp}/candidate")
        mlflow.pyfunc.load_model(cand.model_dir)  # the same load Serve and users do
        if holder_mv is not None and str(holder_mv.version) == str(version):
            log.info("%s version %s already holds @%s", name, version, alias)
            return EXIT_PROMOTED, {"decision": "already", "candidate_version": version}
        tasks_uri = tasks_uri or (cand_ckpt.get("extra", {}).get("store") or {}).get("uri")
        if not tasks_uri:
            raise _user_error("--tasks: the candidate's checkpoint names no task store; pass --tasks URI")
        _check_family(cand_ckpt, tasks_uri)
        tasks = load_tasks(tasks_uri, split, limit)
        metric = "post_" + PRIMARY_METRIC[cand.family]
        cand_learner, _ = learner_from_checkpoint(cand_ckpt)
        cand_metrics = evaluate_learner(cand_learner, tasks, steps=steps, batch_size=batch_size, seed=seed)
        result: dict[str, Any] = {"metric": metric, "candidate_version": version,
                                  "candidate": cand_metrics[metric], "margin": margin, "tasks": tasks_uri,
                                  "split": split, "num_tasks": len(tasks), "seed": seed}
        holder_value = math.inf
        if holder_mv is not None:
            try:
                holder, holder_ckpt = _fetch(client, uri, holder_mv, alias, f"{tmp}/holder")
            except Exception as e:
                holder = None
                if not force:
                    raise _user_error(f"cannot load the current @{alias} (version {holder_mv.version}): {e}; "
                                      "pass --force to replace it anyway") from None
                log.warning("current @%s cannot be loaded (%s); --force replaces it", alias, e)
            if holder is not None:
                if holder.family != cand.family:
                    raise _user_error(f"@{alias} holds a {holder.family!r} model; the candidate is {cand.family!r}")
                holder_learner, _ = learner_from_checkpoint(holder_ckpt)
                holder_value = evaluate_learner(holder_learner, tasks, steps=steps, batch_size=batch_size,
                                                seed=seed)[metric]
            result.update(holder_version=str(holder_mv.version), holder=holder_value)
        better = _is_better(result["candidate"], holder_value, margin)
        decision = "promoted" if better else ("forced" if force else "refused")
        result["decision"] = decision
        prefix = f"promotion.{alias}."
        _tags(client, name, version, {prefix + k: v for k, v in result.items() if k != "candidate_version"}
              | {prefix + "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
        if decision == "refused":
            log.info("not promoted: %s %s %.6g vs @%s %.6g (margin %g)", name, metric, result["candidate"], alias,
                     holder_value, margin)
            return EXIT_NOT_BETTER, result
        if holder_mv is not None:  # history first: a failure after this leaves the old holder in place
            client.set_registered_model_alias(name, f"previous-{alias}", str(holder_mv.version))
        client.set_registered_model_alias(name, alias, version)
        log.info("%s @%s -> version %s (%s)", name, alias, version, decision)
        return EXIT_PROMOTED, result


def rollback(name: str, *, alias: str = "champion", tracking_uri: str | None = None) -> dict[str, Any]:
    """Move ``alias`` back to ``previous-<alias>`` (checked loadable first); the history entry is consumed."""
    client, uri = _client(tracking_uri)
    previous = _alias_version(client, name, f"previous-{alias}")
    if previous is None:
        raise _user_error(f"{name}: no previous-{alias} to roll back to")
    current = _alias_version(client, name, alias)
    with tempfile.TemporaryDirectory(prefix="metalstm-rollback-") as tmp:
        _fetch(client, uri, previous, f"previous-{alias}", tmp)
    client.set_registered_model_alias(name, alias, str(previous.version))
    client.delete_registered_model_alias(name, f"previous-{alias}")
    if current is not None:
        when = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        client.set_model_version_tag(name, str(current.version), f"rollback.{alias}",
                                     f"replaced by version {previous.version} at {when}")
    return {"alias": alias, "version": str(previous.version),
            "from_version": str(current.version) if current is not None else None}


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
            parser.add_argument("--tasks", default=None, help="task-store URI (default: the candidate's store)")
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
    from pipeline.tracking import require_store, resolve_tracking_uri

    logging.getLogger("mlflow").setLevel(logging.WARNING)
    retain_freed_memory()  # evaluation adapts on every task in this process
    args.tracking_uri = resolve_tracking_uri(args.tracking_uri)
    require_store(args.tracking_uri)  # a clear error now (not HTTP retries), and no empty store left behind
    try:
        return _run(args)
    except MlflowException as e:
        raise _user_error(f"MLflow ({args.tracking_uri}): {e.message}") from None


def _run(args: argparse.Namespace) -> int:
    split = getattr(args, "split", None)
    split = None if split in ("", "all") else split
    if args.command == "evaluate":
        with tempfile.TemporaryDirectory(prefix="metalstm-evaluate-") as tmp:
            learner, ckpt, resolved = load_learner(args.model, args.tracking_uri, tmp)
            args.tasks = args.tasks or (ckpt.get("extra", {}).get("store") or {}).get("uri")
            if not args.tasks:
                raise _user_error("--tasks: the model's checkpoint names no task store; pass --tasks URI")
            _check_family(ckpt, args.tasks)
            tasks = load_tasks(args.tasks, split, args.limit)
            metrics = evaluate_learner(learner, tasks, steps=args.steps, batch_size=args.batch_size, seed=args.seed)
        out = {"model": args.model, "name": resolved.name, "version": resolved.version, "family": resolved.family,
               "primary_metric": "post_" + PRIMARY_METRIC[resolved.family], "tasks": args.tasks, "split": split,
               "metrics": metrics}
        print(json.dumps(out, indent=2))
        return 0
    if args.command == "promote":
        code, result = promote(args.name, args.version, alias=args.alias, margin=args.margin, force=args.force,
                               tasks_uri=args.tasks, split=split, limit=args.limit, steps=args.steps,
                               batch_size=args.batch_size, seed=args.seed, tracking_uri=args.tracking_uri)
        print(json.dumps(result, indent=2))
        return code
    if args.command == "rollback":
        print(json.dumps(rollback(args.name, alias=args.alias, tracking_uri=args.tracking_uri), indent=2))
        return 0
    raise ValueError(f"command: expected evaluate, promote or rollback, got {args.command!r}")
