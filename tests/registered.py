"""Test helpers shared by the registry and serving tests: tiny checkpoints, their task stores, an MLflow
experiment to register them in, and registered model versions."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

import torch
import yaml

from metalstm import MAMLConfig, MetaLearner, ModelConfig, build_model, collate, save_checkpoint
from metalstm.sinusoid import sinusoid_tasks


def points_store(root: Path, name: str, seed: int, test_tasks: int) -> dict:
    """A sinusoid test split (canonical points layout) and the store provenance a checkpoint records for it."""
    from pipeline.tasks.builders.synthetic import build_synthetic

    uri = str(root / name)
    manifest = build_synthetic(uri, layout="points", train_tasks=0, val_tasks=0, test_tasks=test_tasks, seed=seed)
    return {"uri": uri, "hash": manifest["content_hash"], "family": "synthetic", "features": manifest["features"],
            "vocab": {}, "normalisation": {}}


def untrained_checkpoint(path: Path, cfg: ModelConfig, seed: int, store: dict, *, inner_steps: int = 3,
                         inner_lr: float = 0.01) -> Path:
    """A freshly initialised (seeded) learner of ``cfg`` saved as a checkpoint that names ``store``."""
    torch.manual_seed(seed)
    learner = MetaLearner(build_model(cfg), MAMLConfig(inner_steps=inner_steps, inner_lr=inner_lr))
    return save_checkpoint(path, learner, cfg, {"store": store})


@contextlib.contextmanager
def tracking_experiment(folder: Path, name: str) -> Iterator[str]:
    """A sqlite MLflow in ``folder`` as the process's tracking URI, with experiment ``name`` (artifacts beside the
    db, as training keeps them: without a location MLflow writes ./mlruns in the checkout); restored after."""
    import mlflow
    from mlflow.tracking import MlflowClient

    from pipeline.tracking.runs import ensure_experiment

    uri = f"sqlite:///{folder / 'mlflow.db'}"
    old = os.environ.get("MLFLOW_TRACKING_URI")
    os.environ["MLFLOW_TRACKING_URI"] = uri
    mlflow.set_tracking_uri(uri)
    mlflow.set_experiment(experiment_id=ensure_experiment(MlflowClient(uri), name, uri))
    try:
        yield uri
    finally:
        if old is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = old


def sine_checkpoint(path: Path, meta_steps: int, store: dict) -> Path:
    """A tiny MAML sinusoid MLP; more meta-training steps evaluate better (``meta_steps=0``: untrained)."""
    torch.manual_seed(0)
    cfg = ModelConfig(kind="mlp", mlp_hidden=[32, 32])
    learner = MetaLearner(build_model(cfg), MAMLConfig(inner_steps=3, inner_lr=0.02))
    opt = torch.optim.Adam(learner.parameters(), lr=0.01)
    for step in range(meta_steps):
        opt.zero_grad()
        learner.meta_loss(collate(sinusoid_tasks(8, 10, 10, seed=1000 + step))).query.mean().backward()
        opt.step()
    extra = {"config": {"name": "sine", "model": {"kind": "mlp", "mlp_hidden": [32, 32]}}, "store": store,
             "step": meta_steps, "val_loss": 0.0}
    return save_checkpoint(path, learner, cfg, extra, overwrite=True)


def register_version(tmp: Path, ckpt: Path, name: str, *, corrupt: bool = False) -> str:
    """Register a checkpoint as the registry's pyfunc model version; ``corrupt`` breaks its weights file."""
    import mlflow

    from pipeline.tracking.pyfunc import save_pyfunc

    model_dir = tmp / f"pyfunc-{name}-{len(list(tmp.glob('pyfunc-*')))}"
    save_pyfunc(ckpt, model_dir)
    if corrupt:
        mlmodel = yaml.safe_load((model_dir / "MLmodel").read_text())
        entry = mlmodel["flavors"]["python_function"]["artifacts"]["checkpoint"]["path"]
        (model_dir / entry).write_bytes(b"this is not a checkpoint")
    with mlflow.start_run() as run:
        mlflow.log_artifacts(str(model_dir), "model")
    return str(mlflow.register_model(f"runs:/{run.info.run_id}/model", name).version)
