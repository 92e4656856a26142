"""``metalstm bench train``: meta-steps/s, tasks/s and the all-reduce's share of a step, for 1 and 2 workers.

Runs the real trainer (Ray Train, Ray Data shards, the flat all-reduce) on a synthetic store in the default
benchmark shape (forecaster, hidden 128, 10 support + 10 query windows of 48 steps) with tracking off, and
reads the per-window timings every worker logs into the final checkpoint's history.
"""

from __future__ import annotations

import logging
import tempfile
import time
from pathlib import Path
from typing import Any

log = logging.getLogger("metalstm.bench.train")


def _run(workers: int, opts: dict[str, str], store: str, storage: str) -> dict[str, Any]:
    from metalstm import load_checkpoint
    from pipeline.config import load_config
    from pipeline.training.state import CHECKPOINT_FILE
    from pipeline.training.train import train

    steps = int(opts.get("steps", 30))
    cfg = load_config(None, [
        f"name=bench-{workers}w-{int(time.time())}", f"data.store={store}", "tracking.enabled=false",
        f"model.hidden_size={opts.get('hidden', 128)}", f"maml.inner_steps={opts.get('inner_steps', 5)}",
        f"schedule.meta_batch_size={opts.get('tasks', 32)}", f"schedule.meta_steps={steps}",
        f"schedule.log_every={max(1, steps // 3)}", "schedule.val_every=0", "schedule.val_tasks=0",
        f"scaling.num_workers={workers}", f"scaling.use_gpu={opts.get('device', 'cpu') == 'cuda'}",
        f"scaling.cpus_per_worker={opts.get('cpus_per_worker', 0.5)}", f"checkpoint.storage_path={storage}",
    ])
    started = time.perf_counter()
    result = train(cfg)
    wall = time.perf_counter() - started
    with result.checkpoint.as_directory() as d:
        ckpt = load_checkpoint(Path(d) / CHECKPOINT_FILE)
    rows = ckpt["extra"]["history"][1:] or ckpt["extra"]["history"]  # drop the warm-up window
    tasks_per_s = sum(r["tasks_per_s"] for r in rows) / len(rows)
    share = sum(r["allreduce_share"] for r in rows) / len(rows)
    wait = sum(r.get("straggler_wait_share", 0.0) for r in rows) / len(rows)
    numel = sum(v.numel() for v in ckpt["state_dict"].values())
    element = next(iter(ckpt["state_dict"].values())).element_size()
    return {"workers": workers, "tasks_per_s": round(tasks_per_s, 2),
            "meta_steps_per_s": round(tasks_per_s / cfg.schedule.meta_batch_size, 3),
            "allreduce_share": round(share, 4), "straggler_wait_share": round(wait, 4),
            "allreduce_bytes_per_step": numel * element + 5 * 8,
            "parameters": numel, "wall_s_including_startup": round(wall, 1)}


def bench(options: dict[str, str]) -> dict[str, Any]:
    import ray

    from pipeline.tasks.builders.synthetic import build_synthetic

    with tempfile.TemporaryDirectory() as tmp:
        store = str(Path(tmp) / "store")
        build_synthetic(store, layout="sequence", train_tasks=int(options.get("store_tasks", 256)), val_tasks=8,
                        test_tasks=8, seed=0, window=48, horizon=24, shots=10, queries=10)
        if not ray.is_initialized():
            ray.init(include_dashboard=False, log_to_driver=False)
        runs = [_run(int(w), options, store, str(Path(tmp) / "runs"))
                for w in options.get("workers", "1,2").split(",")]
    base = runs[0]["tasks_per_s"]
    for r in runs:
        r["speedup_vs_first"] = round(r["tasks_per_s"] / base, 3)
    return {"benchmark": "train", "case": {"model": "forecaster", "hidden": int(options.get("hidden", 128)),
                                           "tasks_per_step": int(options.get("tasks", 32)),
                                           "inner_steps": int(options.get("inner_steps", 5)),
                                           "support": 10, "query": 10, "window": 48},
            "runs": runs}
