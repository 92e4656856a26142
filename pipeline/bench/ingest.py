"""``metalstm bench ingest``: can the task store feed meta-training faster than meta-training eats tasks?

Measures, on a synthetic store in the default forecaster shape (10 support + 10 query windows of 48
steps, horizon 24) built in a temporary directory:

- ``ingest``: tasks/s through Ray Data → ``task_batches`` → ``metalstm.collate`` (collated tensors), per
  epoch: with ``read_dataset``'s default (a small split materialised once), re-reading the Parquet files
  every epoch (``streaming_*``), and without Ray (pyarrow ``read_tasks`` + collate) for reference;
- ``meta_step``: tasks/s consumed by the default meta-step (Forecaster hidden 128, 1 layer; 32 tasks,
  5 inner steps, second order; ``meta_loss(batch).query.sum().backward()``);
- ``ratio`` = ingest / consumption (the target is ≥ 10);
- with ``gefcom=1``: the peak RSS of building the full GEFCom2012 store (``metalstm tasks build electricity``)
  in a subprocess of its own, next to its RSS after imports.

Options (key=value): tasks=512 batch=32 epochs=3 reps=3 hidden=128 inner_steps=5 window=48 horizon=24
shots=10 queries=10 num_cpus=2 gefcom=0 gefcom_source=<../shared/data/electricity/gefcom2012_load>.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from metalstm.config import MAMLConfig
from metalstm.data import collate
from metalstm.maml import MetaLearner
from metalstm.models import Forecaster
from pipeline.tasks.builders.synthetic import build_synthetic
from pipeline.tasks.store import read_dataset, read_tasks, task_batches

DEFAULTS = {"tasks": 512, "batch": 32, "epochs": 3, "reps": 3, "hidden": 128, "inner_steps": 5, "window": 48,
            "horizon": 24, "shots": 10, "queries": 10, "num_cpus": 2, "gefcom": 0}
# ../shared/data beside the checkout (this file is pipeline/bench/ingest.py), where tests/ find it too
GEFCOM = Path(__file__).resolve().parents[3] / "shared" / "data" / "electricity" / "gefcom2012_load"

# Peak RSS from /proc's VmHWM where there is one: ru_maxrss survives exec, so it can report the parent's peak.
_GEFCOM_CHILD = """
import json, resource, sys, time
def peak():
    try:
        with open("/proc/self/status") as f:
            return next(int(ln.split()[1]) for ln in f if ln.startswith("VmHWM:")) / 1024
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
import pipeline.tasks.builders.electricity, pipeline.tasks.command
from pipeline.cli import main
imports = peak()
t0 = time.perf_counter()
rc = main(["tasks", "build", "electricity", "--source", sys.argv[1], "--out", sys.argv[2]])
peak = peak()
print(json.dumps({"rc": rc, "seconds": time.perf_counter() - t0, "peak_rss_mib": peak, "imports_rss_mib": imports}))
"""


def _options(options: dict[str, str]) -> dict:
    unknown = sorted(set(options) - set(DEFAULTS) - {"gefcom_source"})
    if unknown:
        raise ValueError(f"ingest bench: unknown option(s) {unknown}; expected {sorted(DEFAULTS)} or gefcom_source")
    out: dict = dict(DEFAULTS)
    for key, value in options.items():
        if key == "gefcom_source":
            out[key] = value
            continue
        try:
            out[key] = int(value)
        except ValueError as e:
            raise ValueError(f"ingest bench: {key}: expected an integer, got {value!r}") from e
        if out[key] < (0 if key == "gefcom" else 1):
            raise ValueError(f"ingest bench: {key}: must be >= 1, got {out[key]}")
    return out


def _epochs(ds, o: dict) -> list[float]:
    rates = []
    for epoch in range(o["epochs"]):
        t0, n = time.perf_counter(), 0
        for batch in task_batches(ds, o["batch"], seed=0, epoch=epoch):
            n += collate(batch).num_tasks
        rates.append(n / (time.perf_counter() - t0))
    return rates


def _ingest(uri: str, o: dict) -> dict:
    import ray

    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=o["num_cpus"], include_dashboard=False, log_to_driver=False)
    try:
        ray.data.DataContext.get_current().enable_progress_bars = False
        t0 = time.perf_counter()
        ds = read_dataset(uri, "train")  # the default: a small split is materialised once
        load = time.perf_counter() - t0
        rates = _epochs(ds, o)
        streaming = _epochs(read_dataset(uri, "train", materialize=False), o)  # re-read every epoch
    finally:
        if started:
            ray.shutdown()
    t0 = time.perf_counter()
    tasks = read_tasks(uri, "train")
    n = sum(collate(tasks[i:i + o["batch"]]).num_tasks for i in range(0, len(tasks), o["batch"]))
    direct = n / (time.perf_counter() - t0)
    return {"tasks_per_s": round(statistics.median(rates), 1), "epochs_tasks_per_s": [round(r, 1) for r in rates],
            "read_dataset_s": round(load, 2),
            "streaming_tasks_per_s": round(statistics.median(streaming), 1),
            "streaming_epochs_tasks_per_s": [round(r, 1) for r in streaming],
            "pyarrow_direct_tasks_per_s": round(direct, 1)}


def _meta_step(uri: str, o: dict) -> dict:
    torch.manual_seed(0)
    batch = collate(read_tasks(uri, "train", limit=o["batch"]))
    learner = MetaLearner(Forecaster(1, o["hidden"], 1, o["horizon"]), MAMLConfig(inner_steps=o["inner_steps"]))
    times = []
    for _ in range(o["reps"]):  # the median discards a slow first (warm-up) step once reps >= 3
        t0 = time.perf_counter()
        learner.meta_loss(batch).query.sum().backward()
        times.append(time.perf_counter() - t0)
        learner.zero_grad(set_to_none=True)
    step = statistics.median(times)
    return {"seconds_per_step": round(step, 4), "steps_seconds": [round(t, 3) for t in times],
            "tasks_per_s": round(batch.num_tasks / step, 2),
            "torch_threads": torch.get_num_threads()}


def _gefcom(o: dict) -> dict:
    source = Path(o.get("gefcom_source") or GEFCOM)
    if not source.exists():
        return {"skipped": f"no GEFCom2012 data at {source}"}
    with tempfile.TemporaryDirectory(prefix="gefcom-store-") as tmp:
        proc = subprocess.run([sys.executable, "-c", _GEFCOM_CHILD, str(source), f"{tmp}/store"],
                              capture_output=True, text=True, check=False)
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
        if proc.returncode != 0 or not lines:
            return {"error": f"builder exited {proc.returncode}: {proc.stderr.strip()[-500:]}"}
        result = json.loads(lines[-1])
        manifest = json.loads((Path(tmp) / "store" / "manifest.json").read_text())
        result["counts"] = manifest["counts"]
        result["store_mib"] = round(sum(f["bytes"] for f in manifest["files"]) / 2**20, 2)
    result["peak_rss_mib"] = round(result["peak_rss_mib"], 1)
    result["imports_rss_mib"] = round(result["imports_rss_mib"], 1)
    result["seconds"] = round(result["seconds"], 2)
    return result


def bench(options: dict[str, str]) -> dict:
    o = _options(options)
    with tempfile.TemporaryDirectory(prefix="ingest-bench-") as tmp:
        uri = f"{tmp}/store"
        build_synthetic(uri, train_tasks=o["tasks"], val_tasks=0, test_tasks=0, shots=o["shots"],
                        queries=o["queries"], window=o["window"], horizon=o["horizon"])
        ingest = _ingest(uri, o)
        step = _meta_step(uri, o)
    out = {"store": {"tasks": o["tasks"], "shots": o["shots"], "queries": o["queries"], "window": o["window"],
                     "horizon": o["horizon"]},
           "ingest": ingest, "meta_step": {"batch": o["batch"], "hidden": o["hidden"],
                                           "inner_steps": o["inner_steps"], "second_order": True, **step},
           "ratio": round(ingest["tasks_per_s"] / step["tasks_per_s"], 1),
           "ratio_streaming": round(ingest["streaming_tasks_per_s"] / step["tasks_per_s"], 1), "target_ratio": 10}
    if o["gefcom"]:
        out["gefcom_build"] = _gefcom(o)
    return out
