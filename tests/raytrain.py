"""Test helpers for data-parallel training, shared by the training and task-store tests: a local Ray cluster, the
small task store, a tiny training config, a run whose worker is SIGKILLed mid-way, and threads standing in for
workers with a summing all-reduce (data-parallel equals one process, without Ray)."""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil

from metalstm import load_checkpoint
from pipeline.config import TrainConfig, load_config
from pipeline.training.state import CHECKPOINT_FILE


def start_cluster(env: dict[str, str] | None = None) -> Any:
    """``ray.init`` of a 2-CPU local cluster; ``env`` is in the raylet's environment, which every worker
    inherits whichever driver starts a run (the test-only fault hook travels this way)."""
    import ray

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    saved = {k: os.environ.get(k) for k in env or {}}
    os.environ.update(env or {})
    try:
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k)
            else:
                os.environ[k] = v
    return ray


def small_store(folder: Path) -> str:
    """10 train tasks of short sinusoid windows: every run in these modules trains on it."""
    from pipeline.tasks.builders.synthetic import build_synthetic

    uri = str(folder / "sinusoid")
    build_synthetic(uri, layout="sequence", train_tasks=10, val_tasks=4, test_tasks=4, seed=3,
                    window=12, horizon=4, shots=3, queries=3)
    return uri


def overrides(store: str, tmp_path: Path, **items: Any) -> list[str]:
    """``key=value`` items of a tiny float64 run on ``store``, checkpoints under ``tmp_path/runs``."""
    base = {"data.store": store, "tracking.enabled": "false", "dtype": "float64", "model.hidden_size": 8,
            "maml.inner_steps": 2, "maml.inner_lr": 0.05, "schedule.val_tasks": 0, "schedule.log_every": 1,
            "checkpoint.storage_path": str(tmp_path / "runs"), "scaling.max_failures": 0}
    base.update({k: str(v) for k, v in items.items()})
    return [f"{k}={v}" for k, v in base.items()]


def train_config(store: str, tmp_path: Path, **items: Any) -> TrainConfig:
    return load_config(None, overrides(store, tmp_path, **items))


def final_checkpoint(result: Any) -> dict:
    with result.checkpoint.as_directory() as d:
        return load_checkpoint(Path(d) / CHECKPOINT_FILE)


def train_workers() -> list[psutil.Process]:
    """This test's Ray Train workers: descendants of this process (its local raylet), never another cluster's."""
    found = []
    for proc in psutil.Process().children(recursive=True):
        try:
            if " ".join(proc.cmdline()).startswith("ray::RayTrainWorker"):
                found.append(proc)
        except psutil.Error:
            continue
    return found


def wait_for_checkpoint(root: Path, timeout: float = 300.0, log_file: Path | None = None,
                        marker: str = "step-", alive: threading.Thread | None = None) -> None:
    """Until Ray Train's snapshot (what a restarted run restores from) names a checkpoint with ``marker``."""
    deadline = time.time() + timeout
    snapshot = root / "checkpoint_manager_snapshot.json"
    while time.time() < deadline and (alive is None or alive.is_alive()):
        if snapshot.exists() and marker in snapshot.read_text(errors="ignore"):
            return
        time.sleep(0.1)
    output = log_file.read_text()[-3000:] if log_file else ""
    raise TimeoutError(f"no checkpoint under {root} after {timeout}s (or the run ended first)\n{output}")


def train_killing_a_worker(cfg: TrainConfig, run_dir: Path, marker: str = "step-") -> dict:
    """``train(cfg)`` with a Train worker SIGKILLed after the run's first checkpoint; the final checkpoint."""
    from pipeline.training.train import train

    outcome: dict = {}
    thread = threading.Thread(target=lambda: outcome.update(result=train(cfg)))
    thread.start()
    wait_for_checkpoint(run_dir, marker=marker, alive=thread)
    victims = train_workers()
    assert victims, "no Ray Train worker process found to kill"
    victims[-1].send_signal(signal.SIGKILL)
    thread.join(timeout=300)
    assert not thread.is_alive() and "result" in outcome
    return final_checkpoint(outcome["result"])


def thread_workers(parts: list, run: Callable[[int, Any, Callable], Any]) -> list:
    """``run(rank, part, all_reduce)`` on one thread per "worker"; ``all_reduce`` sums a list of tensors in place
    across the threads, as the flat all-reduce does across Ray Train workers. Returns each worker's result."""
    n = len(parts)
    barrier, posted, outs = threading.Barrier(n), [None] * n, [None] * n

    def worker(rank: int) -> None:
        def all_reduce(tensors):
            posted[rank] = [t.clone() for t in tensors]
            barrier.wait()
            for i, t in enumerate(tensors):
                t.copy_(sum(p[i] for p in posted))
            barrier.wait()

        outs[rank] = run(rank, parts[rank], all_reduce)

    threads = [threading.Thread(target=worker, args=(r,)) for r in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    return outs
