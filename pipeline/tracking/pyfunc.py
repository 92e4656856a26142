"""The registered model: an MLflow pyfunc whose only weights are a MetaLSTM checkpoint file.

The checkpoint is loaded with ``torch.load(weights_only=True)`` and the model's Python side is a three-line
models-from-code file (``MODEL_CODE``), so nothing is unpickled anywhere. Versions registered before the
``pipeline/`` folders existed name ``pipeline.registry.MetaLSTMPyfunc`` in that file; that module re-exports
this class so they still load.
"""

from __future__ import annotations

import hashlib
import json
import tempfile
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pandas as pd
import torch
from mlflow.models import infer_signature

import metalstm
from metalstm import ModelConfig, learner_from_checkpoint, load_checkpoint, model_class
from metalstm.evaluation import predict_tasks

# predict() params: steps -1 = the model's own adaptation steps (0 = no adaptation); max_len 0 = 2 * source + 10
PREDICT_PARAMS = {"steps": -1, "output": "argmax", "max_len": 0}
CHECKPOINT_ARTIFACT = "checkpoint"
TASK_KEYS = ("support_x", "support_y", "query_x")
MODEL_CODE = '''"""MLflow models-from-code entry point: the model is this file and a MetaLSTM checkpoint, no pickle."""
import mlflow

from pipeline.tracking.pyfunc import MetaLSTMPyfunc

mlflow.models.set_model(MetaLSTMPyfunc())
'''
# the code files this project writes (before pipeline/ had folders: the same, importing pipeline.registry); a
# version carrying any other code was not written by it (metalstm never runs that code; mlflow.pyfunc would)
MODEL_CODES = (MODEL_CODE, MODEL_CODE.replace("pipeline.tracking.pyfunc", "pipeline.registry"))


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
        for key in TASK_KEYS:
            if rec.get(key) is None or len(rec[key]) == 0:
                raise ValueError(f"model_input[{i}].{key}: missing or empty")
    return records


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
    return [model_class(model_cfg.kind).example_task(model_cfg, np.random.default_rng(seed))]


def _json_default(value: Any) -> Any:
    return value.tolist() if isinstance(value, (torch.Tensor, np.ndarray)) else str(value)


def _jsonable(value: Any) -> Any:
    """``value`` as plain JSON types: arrays and tensors as lists, anything else JSON lacks as its ``str``."""
    return json.loads(json.dumps(value, default=_json_default))


def config_digest(ckpt: dict[str, Any]) -> str:
    """A short digest of what defines the model (architecture, MAML settings, training config)."""
    payload = {"model": ckpt.get("model"), "maml": ckpt.get("maml"), "config": ckpt.get("extra", {}).get("config")}
    return hashlib.sha256(json.dumps(_jsonable(payload), sort_keys=True).encode()).hexdigest()[:16]


def model_metadata(ckpt: dict[str, Any], tag: str = "") -> dict[str, Any]:
    """What a user of the model needs besides the weights: config, vocabulary, normalisation, provenance."""
    extra = ckpt.get("extra", {})
    return _jsonable({"metalstm_version": metalstm.__version__, "family": model_class(ckpt["model"]["kind"]).family,
                      "tag": tag, "config_digest": config_digest(ckpt), "model": ckpt["model"], "maml": ckpt["maml"],
                      "config": extra.get("config"), "store": extra.get("store"), "step": extra.get("step"),
                      "val_loss": extra.get("val_loss")})


def save_pyfunc(checkpoint_path: str | Path, path: str | Path, *, tag: str = "", mlflow_model: Any = None,
                input_example: list[dict] | None = None) -> dict[str, Any]:
    """Write the pyfunc model directory for a checkpoint (validated by loading it first); returns its metadata."""
    ckpt = load_checkpoint(checkpoint_path)
    learner, model_cfg = learner_from_checkpoint(ckpt)
    example = input_example or example_tasks(model_cfg)
    frame = pd.DataFrame([{k: _jsonable(v) for k, v in t.items() if k in TASK_KEYS} for t in example])
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
