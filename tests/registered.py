"""Test helpers shared by the registry and serving tests: tiny checkpoints and registered model versions."""

from __future__ import annotations

from pathlib import Path

import torch
import yaml

from metalstm import MAMLConfig, MetaLearner, ModelConfig, build_model, collate, save_checkpoint
from metalstm.sinusoid import sinusoid_tasks


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
