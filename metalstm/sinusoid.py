"""The canonical MAML task family: regress y = A sin(x - φ) from K points (Finn et al. 2017, §5.1)."""

from __future__ import annotations

import numpy as np


def sinusoid_tasks(num_tasks: int, shots: int, queries: int, seed: int,
                   amplitude: tuple[float, float] = (0.1, 5.0), phase: tuple[float, float] = (0.0, np.pi),
                   x_range: tuple[float, float] = (-5.0, 5.0)) -> list[dict]:
    """Task records in the collate layout: each point is one ``[1]`` input with a ``[1]`` target."""
    rng = np.random.default_rng(seed)
    tasks = []
    for i in range(num_tasks):
        a, p = rng.uniform(*amplitude), rng.uniform(*phase)
        x = rng.uniform(*x_range, size=(shots + queries, 1)).astype(np.float32)
        y = (a * np.sin(x - p)).astype(np.float32)
        tasks.append({"task_id": f"sinusoid-{seed}-{i}", "amplitude": float(a), "phase": float(p),
                      "support_x": x[:shots], "support_y": y[:shots],
                      "query_x": x[shots:], "query_y": y[shots:]})
    return tasks
