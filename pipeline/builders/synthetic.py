"""Synthetic sinusoid task stores: the built-in data of the demo and the tests (no files needed).

Two layouts:

- ``sequence`` (default, for the LSTM forecaster): a task is one series ``y_t = A sin(ω t + φ) + ε``;
  the support set is ``shots`` windows early in the series and the query set the ``queries`` windows after
  them (no target of a support window overlaps a query target when ``stride >= horizon``). ``x`` is a window
  ``[window, 1]`` and ``y`` the next ``horizon`` values.
- ``points``: the canonical MAML regression of Finn et al. (``metalstm.sinusoid``): each example is one
  ``x`` in [-5, 5] with target ``A sin(x - φ)``, for the MLP.
"""

from __future__ import annotations

import argparse
import logging
import math
from collections.abc import Iterator

import numpy as np

from metalstm.sinusoid import sinusoid_tasks
from pipeline.taskstore import SPLITS, write_store

log = logging.getLogger(__name__)

LAYOUTS = ("sequence", "points")
DEFAULTS = {
    "layout": "sequence", "train_tasks": 256, "val_tasks": 32, "test_tasks": 32, "shots": 10, "queries": 10,
    "window": 48, "horizon": 24, "stride": 0, "amplitude": (0.1, 5.0), "phase": (0.0, math.pi),
    "frequency": (0.1, 0.5), "noise": 0.05, "seed": 0,
}


def _positive(name: str, value: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name}: expected a positive integer, got {value!r}")
    return int(value)


def _range(name: str, value, low: float | None = None) -> tuple[float, float]:
    try:
        lo, hi = (float(v) for v in value)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{name}: expected two numbers LOW HIGH, got {value!r}") from e
    if not (math.isfinite(lo) and math.isfinite(hi)) or lo > hi or (low is not None and lo < low):
        bound = f" with LOW >= {low}" if low is not None else ""
        raise ValueError(f"{name}: expected finite LOW <= HIGH{bound}, got {lo} {hi}")
    return lo, hi


def _sequence_tasks(split: str, n: int, o: dict) -> Iterator[dict]:
    rng = np.random.default_rng([o["seed"], SPLITS.index(split)])
    windows = o["shots"] + o["queries"]
    stride, length = o["stride"], o["window"] + o["horizon"]
    t = np.arange((windows - 1) * stride + length, dtype=np.float64)
    for i in range(n):
        a, p, w = rng.uniform(*o["amplitude"]), rng.uniform(*o["phase"]), rng.uniform(*o["frequency"])
        series = (a * np.sin(w * t + p) + o["noise"] * rng.standard_normal(t.shape)).astype(np.float32)
        x = [series[k * stride:k * stride + o["window"], None] for k in range(windows)]
        y = [series[k * stride + o["window"]:k * stride + length] for k in range(windows)]
        k = o["shots"]
        yield {"task_id": f"{split}-{i:05d}", "entity": f"sine-{split}-{i:05d}", "split": split,
               "support_x": x[:k], "support_y": y[:k], "query_x": x[k:], "query_y": y[k:],
               "amplitude": float(a), "phase": float(p), "frequency": float(w)}


def _points_tasks(split: str, n: int, o: dict) -> Iterator[dict]:
    seed = o["seed"] * len(SPLITS) + SPLITS.index(split)  # distinct per (seed, split)
    for i, task in enumerate(sinusoid_tasks(n, o["shots"], o["queries"], seed, amplitude=o["amplitude"],
                                            phase=o["phase"])):
        yield {"task_id": f"{split}-{i:05d}", "entity": f"sine-{split}-{i:05d}", "split": split,
               "support_x": list(task["support_x"]), "support_y": list(task["support_y"]),
               "query_x": list(task["query_x"]), "query_y": list(task["query_y"]),
               "amplitude": task["amplitude"], "phase": task["phase"]}


def build_synthetic(uri: str, *, overwrite: bool = False, tasks_per_split: int | None = None,
                    rows_per_group: int | None = None, **options) -> dict:
    """Write a sinusoid store to ``uri`` and return its manifest.

    Options (defaults in ``DEFAULTS``): layout, train_tasks, val_tasks, test_tasks (``tasks_per_split``
    sets all three unless one is given), shots, queries, window, horizon, stride (0 = horizon),
    amplitude/phase/frequency (LOW, HIGH), noise (std of ε), seed. Sequence-only options are ignored by
    ``points``.
    """
    unknown = sorted(set(options) - set(DEFAULTS))
    if unknown:
        raise ValueError(f"synthetic: unknown option(s) {unknown}; expected {sorted(DEFAULTS)} or tasks_per_split")
    o = dict(DEFAULTS)
    if tasks_per_split is not None:
        o.update(dict.fromkeys(("train_tasks", "val_tasks", "test_tasks"), tasks_per_split))
    o.update({k: v for k, v in options.items() if v is not None})
    if o["layout"] not in LAYOUTS:
        raise ValueError(f"layout: expected one of {', '.join(LAYOUTS)}, got {o['layout']!r}")
    for name in ("train_tasks", "val_tasks", "test_tasks"):
        if isinstance(o[name], bool) or not isinstance(o[name], (int, np.integer)) or o[name] < 0:
            raise ValueError(f"{name}: expected a non-negative integer, got {o[name]!r}")
    if o["train_tasks"] + o["val_tasks"] + o["test_tasks"] == 0:
        raise ValueError("train_tasks, val_tasks, test_tasks: at least one split needs tasks")
    for name in ("shots", "queries", "window", "horizon"):
        o[name] = _positive(name, o[name])
    if isinstance(o["stride"], bool) or not isinstance(o["stride"], (int, np.integer)) or o["stride"] < 0:
        raise ValueError(f"stride: expected a non-negative integer (0 = horizon), got {o['stride']!r}")
    o["stride"] = int(o["stride"]) or o["horizon"]
    o["amplitude"] = _range("amplitude", o["amplitude"])
    o["phase"] = _range("phase", o["phase"])
    o["frequency"] = _range("frequency", o["frequency"], low=0.0)
    if not (isinstance(o["noise"], (int, float)) and math.isfinite(o["noise"]) and o["noise"] >= 0):
        raise ValueError(f"noise: expected a finite number >= 0, got {o['noise']!r}")
    if isinstance(o["seed"], bool) or not isinstance(o["seed"], (int, np.integer)) or o["seed"] < 0:
        raise ValueError(f"seed: expected a non-negative integer, got {o['seed']!r}")

    make = _sequence_tasks if o["layout"] == "sequence" else _points_tasks
    counts = {"train": o["train_tasks"], "val": o["val_tasks"], "test": o["test_tasks"]}
    tasks = (task for split in SPLITS for task in make(split, counts[split], o))
    if o["layout"] == "sequence":
        features = {"layout": "sequence", "model": "forecaster", "input_size": 1, "horizon": o["horizon"],
                    "window": o["window"], "stride": o["stride"], "shots": o["shots"], "queries": o["queries"]}
    else:
        features = {"layout": "points", "model": "mlp", "input_size": 1, "output_size": 1,
                    "shots": o["shots"], "queries": o["queries"]}
    return write_store(uri, tasks, family="synthetic", features=features, normalisation=None,
                       builder={"name": "synthetic", "options": o}, overwrite=overwrite,
                       **({"rows_per_group": rows_per_group} if rows_per_group else {}))


def add_options(parser: argparse.ArgumentParser) -> None:
    d = DEFAULTS
    parser.add_argument("--layout", choices=LAYOUTS, default=d["layout"],
                        help="sequence: windows of one sinusoid per task (LSTM); points: Finn et al. regression (MLP)")
    parser.add_argument("--tasks-per-split", type=int, default=None, metavar="N",
                        help="tasks in each of train/val/test (the per-split options override it)")
    for split in SPLITS:
        parser.add_argument(f"--{split}-tasks", type=int, default=None, metavar="N",
                            help=f"tasks in {split} (default {d[split + '_tasks']})")
    parser.add_argument("--shots", type=int, default=d["shots"], help="support examples per task")
    parser.add_argument("--queries", type=int, default=d["queries"], help="query examples per task")
    parser.add_argument("--window", type=int, default=d["window"], help="sequence: input steps per example")
    parser.add_argument("--horizon", type=int, default=d["horizon"], help="sequence: values predicted per example")
    parser.add_argument("--stride", type=int, default=d["stride"], help="sequence: steps between windows (0 = horizon)")
    parser.add_argument("--amplitude", type=float, nargs=2, default=d["amplitude"], metavar=("LOW", "HIGH"),
                        help="sine amplitude A drawn uniformly from [LOW, HIGH] per task")
    parser.add_argument("--phase", type=float, nargs=2, default=d["phase"], metavar=("LOW", "HIGH"),
                        help="sine phase drawn uniformly from [LOW, HIGH] per task (radians)")
    parser.add_argument("--frequency", type=float, nargs=2, default=d["frequency"], metavar=("LOW", "HIGH"),
                        help="sequence: ω in radians per step")
    parser.add_argument("--noise", type=float, default=d["noise"], help="sequence: std of the added Gaussian noise")
    parser.add_argument("--seed", type=int, default=d["seed"], help="seed of the task draws (each split its own)")


def build(args: argparse.Namespace) -> dict:
    if getattr(args, "source", None):
        log.warning("synthetic: --source %s ignored (synthetic tasks need no data)", args.source)
    return build_synthetic(
        args.out, overwrite=args.overwrite, rows_per_group=getattr(args, "rows_per_group", None),
        tasks_per_split=args.tasks_per_split, layout=args.layout,
        train_tasks=args.train_tasks, val_tasks=args.val_tasks, test_tasks=args.test_tasks, shots=args.shots,
        queries=args.queries, window=args.window, horizon=args.horizon, stride=args.stride,
        amplitude=tuple(args.amplitude), phase=tuple(args.phase), frequency=tuple(args.frequency),
        noise=args.noise, seed=args.seed)
