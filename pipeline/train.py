"""Distributed meta-training on Ray Train (V2).

Each meta-step the global meta-batch of B tasks is split across N workers; every worker adapts its own
slice of tasks (the core's task-batched inner loop, on its own GPU when there is one), sums its tasks'
meta-gradients, and one flat, bucketed all-reduce adds them up. Every worker then divides by the global
task count and takes the same optimiser step, so θ stays identical everywhere without DDP (whose hooks
never see a functional inner loop's gradients).

With ``pretrain.steps > 0`` a conventional pre-training stage runs first (``pretrain_stage``): the same network
trained with Adam on the pooled support + query sequences of each worker's training tasks, gradients all-reduced
the same way; meta-training then starts from the pre-trained θ. Both stages checkpoint and resume.

``train_func`` reads like single-process code plus a few Ray calls; ``train`` is the driver.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from metalstm import (
    MetaLearner,
    build_model,
    collate,
    kernels,
    learner_from_checkpoint,
    load_checkpoint,
    save_checkpoint,
)
from metalstm.baselines import as_split, pooled_sequences
from metalstm.runtime import retain_freed_memory
from metalstm.training import pretrain_loss, pretrain_step
from pipeline.config import TrainConfig, apply_manifest, from_dict, load_config, to_dict

log = logging.getLogger("metalstm.train")
CHECKPOINT_FILE = "checkpoint.pt"


# ----------------------------------------------------------------------------- worker side


def split_sizes(total: int, parts: int) -> list[int]:
    """Uneven split of ``total`` tasks over ``parts`` workers: the first ``total % parts`` get one more."""
    return [total // parts + (1 if i < total % parts else 0) for i in range(parts)]


def allreduce_sum(tensors: list[torch.Tensor], bucket_bytes: int) -> None:
    """Sum ``tensors`` in place across workers: flattened into one buffer, reduced bucket by bucket."""
    if not dist.is_available() or not dist.is_initialized() or dist.get_world_size() == 1:
        return
    flat = torch.cat([t.reshape(-1) for t in tensors])
    per_bucket = max(1, bucket_bytes // flat.element_size())
    for bucket in flat.split(per_bucket):
        dist.all_reduce(bucket, op=dist.ReduceOp.SUM)
    offset = 0
    for t in tensors:
        t.copy_(flat[offset: offset + t.numel()].view_as(t))
        offset += t.numel()


def read_shard(shard: Any) -> Any:
    """This worker's training tasks as one Arrow table, read once for both stages: re-executing the Ray Data
    pipeline every epoch costs seconds on small stores."""
    from pipeline.taskstore import shard_table

    table = shard_table(shard)
    if table is None:
        raise RuntimeError("this worker's training shard is empty: more workers than training tasks?")
    return table


def task_stream(table: Any, batch_size: int, seed: int, first_epoch: int) -> Iterator[list[dict]]:
    """This worker's tasks (``read_shard``), ``batch_size`` at a time, epoch after epoch (a fresh seeded shuffle
    each)."""
    from pipeline.taskstore import task_batches

    epoch = first_epoch
    while True:
        yield from task_batches(table, batch_size, seed=seed, epoch=epoch)
        epoch += 1


def _rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "numpy": torch.from_numpy(
        np.frombuffer(np.random.get_state()[1].tobytes(), dtype=np.uint8).copy())}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def sequence_pool(table: Any) -> list[tuple[Any, Any]]:
    """Every (x, y) sequence of this worker's training tasks, support and query: its pre-training data."""
    from pipeline.taskstore import task_batches

    return [pair for tasks in task_batches(table, 1024, seed=0, epoch=0) for pair in pooled_sequences(tasks)]


def pretrain_batch(pool: list[tuple[Any, Any]], size: int, seed: int, rank: int, step: int) -> list[tuple[Any, Any]]:
    """This worker's ``size`` sequences for pre-training step ``step``, drawn without replacement from its pool.

    Seeded by (seed, rank, step) alone, so a resumed run draws what the interrupted one would have drawn.
    """
    if size < 1 or not pool:
        return []
    idx = np.random.default_rng([seed, rank, step]).choice(len(pool), size=min(size, len(pool)), replace=False)
    return [pool[j] for j in idx]


def pretrain_stage(cfg: TrainConfig, learner: MetaLearner, pool: list[tuple[Any, Any]], state: dict[str, Any], *,
                   val_split: Any, tracker: Any, base_extra: dict[str, Any]) -> dict[str, Any]:
    """Conventional pre-training of θ (``cfg.pretrain``), data-parallel over the workers; returns the stage state.

    Every step each worker takes its share of the global ``pretrain.batch_size`` sequences from its own pool and
    ``metalstm.training.pretrain_step`` sums the gradients over workers (``allreduce_sum``) so that the identical
    Adam step on every worker is the step on the global minibatch. ``state`` (``step``, ``history``, ``wall_s``,
    ``optimizer``, ``resumed_at``) comes from a resumed checkpoint or starts empty; a checkpoint marked
    ``stage: pretrain`` is reported every ``pretrain.val_every`` steps (default ``schedule.val_every``) and after
    the last step.
    """
    import ray.train

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    p, model = cfg.pretrain, learner.model
    device, dtype = next(model.parameters()).device, getattr(torch, cfg.dtype)
    optimizer = torch.optim.Adam(model.parameters(), lr=p.lr)
    if state.get("optimizer"):
        optimizer.load_state_dict(state["optimizer"])
    step, history, wall = int(state.get("step", 0)), list(state.get("history", [])), float(state.get("wall_s", 0.0))
    local = split_sizes(p.batch_size, world)[rank]
    bucket_bytes = int(cfg.scaling.bucket_mb * 2**20)
    val_every = p.val_every or cfg.schedule.val_every
    log.info("rank %d: pre-training from step %d to %d, %d of %d sequences a step from a pool of %d", rank, step,
             p.steps, local, p.batch_size, len(pool))
    window = {"loss": 0.0, "steps": 0, "targets": 0.0, "time": 0.0}
    while step < p.steps:
        t0 = time.perf_counter()
        pairs = pretrain_batch(pool, local, cfg.schedule.seed, rank, step)
        split = as_split(pairs).to(device, dtype) if pairs else None
        out = pretrain_step(model, split, optimizer, grad_clip=cfg.optim.grad_clip, step=step + 1,
                            all_reduce=(lambda ts: allreduce_sum(ts, bucket_bytes)) if world > 1 else None)
        step += 1
        elapsed = time.perf_counter() - t0
        wall += elapsed
        window = {"loss": window["loss"] + out["loss"], "steps": window["steps"] + 1,
                  "targets": window["targets"] + out["targets"], "time": window["time"] + elapsed}
        last = step == p.steps
        if rank == 0 and (step % cfg.schedule.log_every == 0 or last):
            row = {"step": step, "loss": window["loss"] / window["steps"],
                   "targets_per_s": window["targets"] / max(window["time"], 1e-9)}
            window = {k: 0 for k in window}
            history.append(row)
            log.info("pretrain step %d/%d  loss %.4f  %.0f targets/s", step, p.steps, row["loss"],
                     row["targets_per_s"])
            if tracker:
                tracker.log_metrics({f"pretrain/{k}": v for k, v in row.items() if k != "step"}, step)
        if (val_every and step % val_every == 0) or last:
            metrics: dict[str, Any] = {"pretrain/step": step}
            extra = None
            if rank == 0:
                row = history[-1] if history and history[-1]["step"] == step else {}
                if row:
                    metrics["pretrain/loss"] = row["loss"]
                if val_split is not None:
                    with torch.no_grad():
                        metrics["pretrain/val_loss"] = float(pretrain_loss(model, val_split))
                    row["val_loss"] = metrics["pretrain/val_loss"]
                    log.info("pretrain step %d validation: loss %.4f", step, metrics["pretrain/val_loss"])
                    if tracker:
                        tracker.log_metrics({"pretrain/val_loss": metrics["pretrain/val_loss"]}, step)
                stage = {**state, "step": step, "history": history, "wall_s": wall, "optimizer": optimizer.state_dict()}
                extra = {**base_extra, "stage": "pretrain", "pretrain": stage, "rng": _rng_state()}
            _report(learner, cfg, metrics, extra, f"pretrain-{step:07d}")
    if rank == 0 and p.steps:
        log.info("pre-training done: %d steps, %.1f s; meta-training starts from the pre-trained θ", step, wall)
    return {**{k: v for k, v in state.items() if k != "optimizer"}, "step": step, "history": history, "wall_s": wall}


def _report(learner: MetaLearner, cfg: TrainConfig, metrics: dict[str, Any], extra: dict[str, Any] | None,
            dir_name: str) -> None:
    """``ray.train.report`` on every worker; the one passing ``extra`` (rank 0) attaches a checkpoint of θ."""
    import ray.train

    checkpoint_dir = None
    if extra is not None:
        checkpoint_dir = tempfile.mkdtemp(prefix="metalstm-ckpt-")
        save_checkpoint(Path(checkpoint_dir) / CHECKPOINT_FILE, learner, cfg.model, extra)
    ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(checkpoint_dir)
                     if checkpoint_dir else None, checkpoint_dir_name=dir_name)
    if checkpoint_dir:
        shutil.rmtree(checkpoint_dir, ignore_errors=True)


def train_func(config: dict[str, Any]) -> None:
    """One Ray Train worker: meta-train θ on this worker's slice of every meta-batch."""
    import ray.train
    import ray.train.torch

    from pipeline.registry import adaptation_curve, evaluate_learner

    cfg: TrainConfig = from_dict(config["train"])
    retain_freed_memory()
    kernels.warm_up()  # load (on a node's first run: build) the fused LSTM kernels before the first step
    if not log.handlers:  # worker processes start without logging configured; progress goes to the job log
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)
        log.propagate = False
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device() if cfg.scaling.use_gpu else torch.device("cpu")
    dtype = getattr(torch, cfg.dtype)

    torch.manual_seed(cfg.schedule.seed)
    learner = MetaLearner(build_model(cfg.model), cfg.maml).to(device=device, dtype=dtype)
    optimizer = torch.optim.Adam(learner.parameters(), lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay)
    step, history, best = 0, [], {"val_loss": float("inf"), "step": -1}
    curves: dict[str, list[float]] = {}  # query loss against inner step, before and after meta-training
    pretrained: dict[str, Any] = {}  # the pre-training stage's state: step, history, wall_s (+ optimizer mid-stage)
    stage = "pretrain"  # the stage to run from: pretrain (skipped when pretrain.steps = 0) or meta

    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:  # resume: after a worker failure or a driver restart with the same name
        with checkpoint.as_directory() as d:
            state = load_checkpoint(Path(d) / CHECKPOINT_FILE, map_location=device)
        learner.load_state_dict(state["state_dict"])
        pretrained = state["extra"].get("pretrain", {})
        if state["extra"].get("stage") == "pretrain":  # stopped mid pre-training: continue it, meta-train fresh
            _set_rng_state(state["extra"]["rng"])
            pretrained["resumed_at"] = [*pretrained.get("resumed_at", []), pretrained["step"]]
            log.info("rank %d: resumed pre-training from step %d", rank, pretrained["step"])
        else:  # meta-training had started: pre-training (if any) is done and never repeated
            stage = "meta"
            optimizer.load_state_dict(state["extra"]["optimizer"])
            step, history, best = state["extra"]["step"], state["extra"]["history"], state["extra"]["best"]
            curves = state["extra"].get("curves", {})
            _set_rng_state(state["extra"]["rng"])
            log.info("rank %d: resumed from step %d", rank, step)
    elif cfg.checkpoint.warm_start:
        warm, _ = learner_from_checkpoint(load_checkpoint(cfg.checkpoint.warm_start))
        learner.model.load_state_dict(warm.model.state_dict())
        log.info("rank %d: warm-started θ from %s", rank, cfg.checkpoint.warm_start)
    params = list(learner.parameters())
    if world > 1:  # identical θ everywhere, whatever each process's RNG did
        for p in params:
            dist.broadcast(p.data, src=0)

    table = read_shard(ray.train.get_dataset_shard("train"))
    val_tasks: list[dict] = []
    if rank == 0 and cfg.schedule.val_tasks > 0:
        val_tasks = _take(ray.train.get_dataset_shard("val"), cfg.schedule.val_tasks)

    tracker = None
    if rank == 0 and config.get("tracking"):
        from pipeline.tracking import Tracker

        t = config["tracking"]
        tracker = Tracker(t["uri"], t["experiment"], run_name=cfg.name, run_id=t["run_id"])
        tracker.start(config["train"], t["tags"])

    if stage == "pretrain" and cfg.pretrain.steps > int(pretrained.get("step", 0)):
        val_split = as_split(pooled_sequences(val_tasks)).to(device, dtype) if val_tasks else None
        base_extra = {"step": 0, "history": [], "best": best, "config": config["train"], "store": config["store"],
                      "curves": {}, "batch_task_ids": [], "val_loss": float("nan")}
        pretrained = pretrain_stage(cfg, learner, sequence_pool(table), pretrained, val_split=val_split,
                                    tracker=tracker, base_extra=base_extra)
    pretrained.pop("optimizer", None)  # meta-training has its own optimiser, fresh
    if val_tasks and step == 0:
        curves["before"] = adaptation_curve(learner, val_tasks)  # before meta-training: after any pre-training

    local_batch = split_sizes(cfg.schedule.meta_batch_size, world)[rank]
    stream = task_stream(table, max(local_batch, 1), cfg.schedule.seed + rank, first_epoch=step)

    bucket_bytes = int(cfg.scaling.bucket_mb * 2**20)
    stats = torch.zeros(3, dtype=torch.float64, device=device)  # query-loss sum, support-loss sum, task count
    window = {"tasks": 0, "time": 0.0, "allreduce": 0.0, "wait": 0.0, "loss": 0.0, "support": 0.0}
    local_ids: list[str] = []
    while step < cfg.schedule.meta_steps:
        t0 = time.perf_counter()
        tasks = next(stream)[:local_batch] if local_batch > 0 else []
        local_ids = [str(t.get("task_id", "")) for t in tasks]
        optimizer.zero_grad(set_to_none=False)
        stats.zero_()
        if tasks:
            batch = collate(tasks).to(device, dtype)
            progress = step / max(1, cfg.maml.multi_step_anneal)
            result = learner.meta_loss(batch, progress=progress)
            result.query.sum().backward()
            stats[0] = result.query_final.sum()
            stats[1] = result.support_curve[0].sum() if result.support_curve else 0.0
            stats[2] = len(tasks)
        t1 = time.perf_counter()
        allreduce_sum([stats], bucket_bytes)  # tiny: also where workers wait for the slowest one
        t_wait = time.perf_counter()
        allreduce_sum([p.grad for p in params], bucket_bytes)
        t2 = time.perf_counter()
        count = float(stats[2])
        for p in params:
            p.grad.div_(max(count, 1.0))
        if cfg.optim.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(params, cfg.optim.grad_clip)
        optimizer.step()
        step += 1
        t3 = time.perf_counter()
        window = {"tasks": window["tasks"] + count, "time": window["time"] + (t3 - t0),
                  "allreduce": window["allreduce"] + (t2 - t_wait), "wait": window["wait"] + (t_wait - t1),
                  "loss": window["loss"] + float(stats[0]), "support": window["support"] + float(stats[1])}

        last = step == cfg.schedule.meta_steps
        if step % cfg.schedule.log_every == 0 or last:
            row = {"step": step, "train_loss": window["loss"] / max(window["tasks"], 1),
                   "train_support_loss": window["support"] / max(window["tasks"], 1),
                   "tasks_per_s": window["tasks"] / max(window["time"], 1e-9),
                   "allreduce_share": window["allreduce"] / max(window["time"], 1e-9),
                   "straggler_wait_share": window["wait"] / max(window["time"], 1e-9)}
            window = {k: 0 for k in window}
            if rank == 0:
                log.info("step %d/%d  meta-train loss %.4f  support loss %.4f  %.1f tasks/s  all-reduce %.1f%%  "
                         "waiting for stragglers %.1f%%", step, cfg.schedule.meta_steps, row["train_loss"],
                         row["train_support_loss"], row["tasks_per_s"], 100 * row["allreduce_share"],
                         100 * row["straggler_wait_share"])
                history.append(row)
                if tracker:
                    tracker.log_metrics({k: v for k, v in row.items() if k != "step"}, step)

        if (cfg.schedule.val_every and step % cfg.schedule.val_every == 0) or last:
            metrics: dict[str, Any] = {"step": step}
            ids = local_ids
            if world > 1:
                gathered: list[Any] = [None] * world
                dist.all_gather_object(gathered, local_ids)
                ids = [i for part in gathered for i in part]
            checkpoint_dir = None
            if rank == 0:
                if val_tasks:
                    val = {f"val_{k}": v for k, v in evaluate_learner(learner, val_tasks).items()
                           if k.startswith(("pre_", "post_"))}
                    metrics.update(val)
                    loss_key = next(k for k in val if k.startswith("val_post_"))
                    metrics["val_loss"] = val[loss_key]
                    log.info("step %d validation: %s", step, "  ".join(f"{k} {v:.4f}" for k, v in val.items()))
                    if tracker:
                        tracker.log_metrics(val, step)
                    if history:
                        history[-1].update({"val_pre_loss": val[loss_key.replace("post", "pre")],
                                            "val_post_loss": val[loss_key]})
                    if last:
                        curves["after"] = adaptation_curve(learner, val_tasks)
                checkpoint_dir = tempfile.mkdtemp(prefix="metalstm-ckpt-")
                extra = {"optimizer": optimizer.state_dict(), "step": step, "history": history, "best": best,
                         "rng": _rng_state(), "config": config["train"], "store": config["store"], "curves": curves,
                         "batch_task_ids": ids, "val_loss": metrics.get("val_loss", float("nan")),
                         "stage": "meta", "pretrain": pretrained}
                is_best = metrics.get("val_loss", float("inf")) < best["val_loss"]
                if is_best:  # ``extra["best"]`` is this same dict
                    best.update(val_loss=metrics["val_loss"], step=step)
                path = save_checkpoint(Path(checkpoint_dir) / CHECKPOINT_FILE, learner, cfg.model, extra)
                if tracker and is_best:
                    tracker.best_checkpoint = _keep_copy(path, "best")
                if tracker and last:
                    tracker.final_checkpoint = _keep_copy(path, "final")
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(checkpoint_dir)
                             if checkpoint_dir else None, checkpoint_dir_name=f"step-{step:07d}")
            if checkpoint_dir:
                shutil.rmtree(checkpoint_dir, ignore_errors=True)

    if tracker:
        _finish_tracking(tracker, history, curves, config)


def _take(shard: Any, n: int) -> list[dict]:
    from pipeline.taskstore import task_batches

    out: list[dict] = []
    for tasks in task_batches(shard, n, seed=0, epoch=0):
        out.extend(tasks)
        if len(out) >= n:
            break
    return sorted(out[:n], key=lambda t: str(t.get("task_id", "")))


def _keep_copy(path: Path, tag: str) -> str:
    keep = Path(tempfile.gettempdir()) / f"metalstm-{tag}-{os.getpid()}.pt"
    shutil.copyfile(path, keep)
    return str(keep)


def _finish_tracking(tracker: Any, history: list[dict], curves: dict[str, list[float]],
                     config: dict[str, Any]) -> None:
    """Plots and models at the end of the run (rank 0)."""
    tracker.log_learning_curves(history)
    if "before" in curves and "after" in curves:
        tracker.log_adaptation_curves(curves["before"], curves["after"])
    name = config["tracking"].get("registered_model") or None
    best = getattr(tracker, "best_checkpoint", None)
    final = getattr(tracker, "final_checkpoint", None)
    if final:
        tracker.log_model(final, None if best else name, tag="final")
    if best:
        version = tracker.log_model(best, name, tag="best")
        if version:
            log.info("registered %s version %s", name, version)
    for path in (best, final):
        if path:
            Path(path).unlink(missing_ok=True)
    missing = tracker.finish()
    if missing:
        log.warning("not logged to MLflow: %s", "; ".join(missing))


# ----------------------------------------------------------------------------- driver side


def prepare_store(cfg: TrainConfig) -> str:
    """The task-store URI to train on; the built-in synthetic store is built on first use."""
    if cfg.data.store:
        return cfg.data.store
    from pipeline.builders.synthetic import build_synthetic

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

    from pipeline.tracking import check_tracking_server, ensure_experiment, resolve_tracking_uri, standard_tags

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

    from pipeline.taskstore import read_dataset, read_manifest

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
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=cfg.checkpoint.num_to_keep)),
        datasets=datasets,
        dataset_config=ray.train.DataConfig(datasets_to_split=["train"]),
    )
    if cfg.pretrain.steps:
        log.info("pre-training %s first: %d Adam steps of %d sequences", cfg.name, cfg.pretrain.steps,
                 cfg.pretrain.batch_size)
    log.info("meta-training %s: %d workers, %d meta-steps of %d tasks, store %s", cfg.name,
             cfg.scaling.num_workers, cfg.schedule.meta_steps, cfg.schedule.meta_batch_size, store_uri)
    return trainer.fit()


def add_arguments(parser: argparse.ArgumentParser, command: str) -> None:
    parser.add_argument("--config", help="an OmegaConf YAML file (configs/*.yaml); defaults are embedded")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="config overrides, e.g. scaling.num_workers=4")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")


def run(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.overrides)
    if args.print_config:
        from pipeline.config import printable_yaml

        print(printable_yaml(cfg), end="")
        return 0
    result = train(cfg)
    checkpoint = result.checkpoint
    print(f"finished {cfg.name}: {result.metrics}")
    if checkpoint is not None:
        print(f"last checkpoint: {checkpoint.path}/{CHECKPOINT_FILE}")
    return 0
