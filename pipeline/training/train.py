"""The driver of ``metalstm train``: prepare the task store and the MLflow run, then hand ``train_func`` to Ray.

Everything that can fail cheaply (the config, the store's manifest, the tracking server) is checked before any
Ray work; ``TorchTrainer`` then runs ``pipeline.training.worker.train_func`` on ``scaling.num_workers`` workers,
with the train split sharded over them by Ray Data, and restarts the group from its last checkpoint after a
failure (``scaling.max_failures``). Running the same command with the same ``name`` resumes a stopped run.
Ray keeps the ``checkpoint.num_to_keep`` best validated checkpoints and the newest (``reporting.SCORE``); a run
that stopped on a divergence raises ``TrainingDiverged`` here, naming where its best checkpoint is.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from metalstm import kernels
from pipeline.config import TrainConfig, apply_manifest, to_dict
from pipeline.training.divergence import TrainingDiverged
from pipeline.training.reporting import SCORE, UNSCORED
from pipeline.training.state import CHECKPOINT_FILE
from pipeline.training.worker import train_func

log = logging.getLogger("metalstm.train")


def prepare_store(cfg: TrainConfig) -> str:
    """The task-store URI to train on; the built-in synthetic store is built on first use."""
    if cfg.data.store:
        return cfg.data.store
    from pipeline.tasks.builders.synthetic import build_synthetic

    s = cfg.data.synthetic
    uri = str(Path(".metalstm/data").resolve() / f"synthetic-{s.layout}-{s.train_tasks}-{s.val_tasks}-"
                                                   f"{s.test_tasks}-seed{s.seed}")
    if not (Path(uri) / "manifest.json").exists():
        log.info("building the built-in synthetic task store at %s", uri)
        build_synthetic(uri, layout=s.layout, train_tasks=s.train_tasks, val_tasks=s.val_tasks,
                        test_tasks=s.test_tasks, seed=s.seed)
    return uri


def _tracking_setup(cfg: TrainConfig, store_uri: str, manifest: dict[str, Any]) -> dict[str, Any] | None:
    """Check the tracking store and create (or find, to resume) this run's MLflow run, before any Ray work."""
    if not cfg.tracking.enabled:
        return None
    from mlflow.tracking import MlflowClient

    from pipeline.tracking.runs import check_tracking_server, ensure_experiment, resolve_tracking_uri, standard_tags

    uri = resolve_tracking_uri(cfg.tracking.uri or None)
    check_tracking_server(uri)
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    experiment_id = ensure_experiment(client, cfg.tracking.experiment, uri)
    run_name = cfg.tracking.run_name or cfg.name
    runs = client.search_runs([experiment_id], filter_string=f"tags.`metalstm.run_name` = '{run_name}' "
                              "and attributes.status != 'FINISHED'", max_results=1)
    if runs:
        run_id = runs[0].info.run_id
        log.info("resuming MLflow run %s", run_id)
    else:
        run_id = client.create_run(experiment_id, run_name=run_name,
                                   tags={"metalstm.run_name": run_name}).info.run_id
    tags = {**standard_tags(store_uri, str(manifest.get("content_hash", ""))), "metalstm.family": manifest["family"]}
    return {"uri": uri, "experiment": cfg.tracking.experiment, "run_id": run_id, "tags": tags,
            "registered_model": cfg.tracking.registered_model}


def train(cfg: TrainConfig) -> Any:
    """Run meta-training for a validated config; returns Ray Train's ``Result``."""
    import ray
    import ray.train
    from ray.train.torch import TorchTrainer

    from pipeline.tasks.store import read_dataset, read_manifest

    store_uri = prepare_store(cfg)
    manifest = read_manifest(store_uri)
    apply_manifest(cfg, manifest)
    tracking = _tracking_setup(cfg, store_uri, manifest)
    store = {"uri": store_uri, "hash": str(manifest.get("content_hash", "")), "family": manifest["family"],
             "features": manifest.get("features", {}), "vocab": manifest.get("vocab") or {},
             "normalisation": manifest.get("normalisation") or {}}

    kernels.warm_up()  # one build on this node before the workers start, not one wait per worker
    if not ray.is_initialized():
        ray.init(address=os.environ.get("RAY_ADDRESS"), log_to_driver=True)
    datasets = {"train": read_dataset(store_uri, cfg.data.train_split)}
    if cfg.schedule.val_tasks > 0:
        datasets["val"] = read_dataset(store_uri, cfg.data.val_split)
    resources = {"CPU": cfg.scaling.cpus_per_worker}
    if cfg.scaling.use_gpu:
        resources["GPU"] = 1
    storage = cfg.checkpoint.storage_path or str(Path(".metalstm/runs").resolve())
    trainer = TorchTrainer(
        train_func,
        train_loop_config={"train": to_dict(cfg), "store": store, "tracking": tracking},
        scaling_config=ray.train.ScalingConfig(num_workers=cfg.scaling.num_workers, use_gpu=cfg.scaling.use_gpu,
                                               resources_per_worker=resources),
        run_config=ray.train.RunConfig(
            name=cfg.name, storage_path=storage,
            failure_config=ray.train.FailureConfig(max_failures=cfg.scaling.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=cfg.checkpoint.num_to_keep,
                                                         checkpoint_score_attribute=SCORE,
                                                         checkpoint_score_order="min")),
        datasets=datasets,
        dataset_config=ray.train.DataConfig(datasets_to_split=["train"]),
    )
    if cfg.pretrain.steps:
        log.info("pre-training %s first: %d Adam steps of %d sequences", cfg.name, cfg.pretrain.steps,
                 cfg.pretrain.batch_size)
    log.info("meta-training %s: %d workers, %d meta-steps of %d tasks, store %s", cfg.name,
             cfg.scaling.num_workers, cfg.schedule.meta_steps, cfg.schedule.meta_batch_size, store_uri)
    result = trainer.fit()
    stopped = (result.metrics or {}).get("diverged")
    if stopped:
        raise TrainingDiverged(f"{stopped}. {best_checkpoint_note(result)}")
    return result


def best_checkpoint_note(result: Any) -> str:
    """Where a stopped run's best validated checkpoint is (Ray keeps it), or where its last one is."""
    scored = [(m.get(SCORE, UNSCORED), m.get("step"), c) for c, m in (result.best_checkpoints or [])]
    validated = [s for s in scored if s[0] < UNSCORED]
    if validated:
        loss, step, checkpoint = min(validated, key=lambda s: s[0])
        return f"The best checkpoint (step {step}, val_loss {loss:.4g}) is kept: {checkpoint.path}/{CHECKPOINT_FILE}"
    last = f"{result.checkpoint.path}/{CHECKPOINT_FILE}" if result.checkpoint else "none"
    return f"No validated checkpoint was written before it; the last checkpoint: {last}"
