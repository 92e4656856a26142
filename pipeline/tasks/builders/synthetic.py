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
from dataclasses import dataclass, fields
from typing import Any

import numpy as np

from metalstm.sinusoid import sinusoid_tasks
from pipeline.tasks.store import SPLITS, write_store

log = logging.getLogger(__name__)

LAYOUTS = ("sequence", "points")
SPLIT_TASKS = {"train": 256, "val": 32, "test": 32}  # tasks per split when neither it nor tasks_per_split is given


@dataclass(kw_only=True)
class SyntheticOptions:
    """``metalstm tasks build synthetic`` options. Sequence-only options are ignored by ``points``."""

    layout: str = "sequence"  # sequence (LSTM forecaster) | points (Finn et al. regression, MLP)
    tasks_per_split: int | None = None  # train/val/test tasks, for each split not given on its own
    train_tasks: int | None = None  # None: tasks_per_split, else SPLIT_TASKS
    val_tasks: int | None = None
    test_tasks: int | None = None
    shots: int = 10
    queries: int = 10
    window: int = 48
    horizon: int = 24
    stride: int = 0  # 0 = horizon
    amplitude: tuple[float, float] = (0.1, 5.0)  # LOW, HIGH of uniform draws per task
    phase: tuple[float, float] = (0.0, math.pi)
    frequency: tuple[float, float] = (0.1, 0.5)  # ω in radians per step
    noise: float = 0.05  # std of ε
    seed: int = 0


OPTIONS = SyntheticOptions


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


def _resolve(options: SyntheticOptions) -> dict[str, Any]:
    """The options as the manifest records them: split sizes and stride resolved, every value checked."""
    o = {k: v for k, v in vars(options).items() if k != "tasks_per_split"}
    for split in SPLITS:
        if o[f"{split}_tasks"] is None:
            o[f"{split}_tasks"] = SPLIT_TASKS[split] if options.tasks_per_split is None else options.tasks_per_split
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
    return o


def build(options: SyntheticOptions, out: str, *, overwrite: bool = False, rows_per_group: int | None = None) -> dict:
    """Write a sinusoid store to ``out`` and return its manifest."""
    o = _resolve(options)
    make = _sequence_tasks if o["layout"] == "sequence" else _points_tasks
    counts = {"train": o["train_tasks"], "val": o["val_tasks"], "test": o["test_tasks"]}
    tasks = (task for split in SPLITS for task in make(split, counts[split], o))
    if o["layout"] == "sequence":
        features = {"layout": "sequence", "model": "forecaster", "input_size": 1, "horizon": o["horizon"],
                    "window": o["window"], "stride": o["stride"], "shots": o["shots"], "queries": o["queries"]}
    else:
        features = {"layout": "points", "model": "mlp", "input_size": 1, "output_size": 1,
                    "shots": o["shots"], "queries": o["queries"]}
    return write_store(out, tasks, family="synthetic", model_kind=features["model"], features=features,
                       normalisation=None, builder={"name": "synthetic", "options": o}, overwrite=overwrite,
                       rows_per_group=rows_per_group)


def build_synthetic(uri: str, *, overwrite: bool = False, rows_per_group: int | None = None, **options: Any) -> dict:
    """:func:`build` with the options as keywords (``None`` = the default): the built-in store of training, the
    benchmarks and the tests."""
    known = sorted(f.name for f in fields(SyntheticOptions))
    unknown = sorted(set(options) - set(known))
    if unknown:
        raise ValueError(f"synthetic: unknown option(s) {unknown}; expected {known}")
    given = {k: v for k, v in options.items() if v is not None}
    return build(SyntheticOptions(**given), uri, overwrite=overwrite, rows_per_group=rows_per_group)


def add_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--layout", choices=LAYOUTS,
                        help="sequence: windows of one sinusoid per task (LSTM); points: Finn et al. regression (MLP)")
    parser.add_argument("--tasks-per-split", type=int, metavar="N",
                        help="tasks in each of train/val/test (the per-split options override it)")
    for split in SPLITS:
        parser.add_argument(f"--{split}-tasks", type=int, metavar="N",
                            help=f"tasks in {split} (default {SPLIT_TASKS[split]})")
    parser.add_argument("--shots", type=int, help="support examples per task")
    parser.add_argument("--queries", type=int, help="query examples per task")
    parser.add_argument("--window", type=int, help="sequence: input steps per example")
    parser.add_argument("--horizon", type=int, help="sequence: values predicted per example")
    parser.add_argument("--stride", type=int, help="sequence: steps between windows (0 = horizon)")
    parser.add_argument("--amplitude", type=float, nargs=2, metavar=("LOW", "HIGH"),
                        help="sine amplitude A drawn uniformly from [LOW, HIGH] per task")
    parser.add_argument("--phase", type=float, nargs=2, metavar=("LOW", "HIGH"),
                        help="sine phase drawn uniformly from [LOW, HIGH] per task (radians)")
    parser.add_argument("--frequency", type=float, nargs=2, metavar=("LOW", "HIGH"),
                        help="sequence: ω in radians per step")
    parser.add_argument("--noise", type=float, help="sequence: std of the added Gaussian noise")
    parser.add_argument("--seed", type=int, help="seed of the task draws (each split its own)")
