"""The run's figures: learning curves and adaptation curves, drawn headless (Agg) for MLflow artifacts.

Figures are built with ``matplotlib.figure.Figure`` directly, never ``pyplot``: no global figure registry,
no GUI backend, nothing to close, safe in a Ray worker.
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

# Learning-curve series drawn when present in the history rows, with their legend labels.
LEARNING_SERIES = {
    "train_loss": "meta-train query loss",
    "train_support_loss": "meta-train support loss, before adaptation",
    "val_pre_loss": "validation, before adaptation",
    "val_post_loss": "validation, after adaptation",
}


def _finite(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def learning_curves(history: Sequence[dict]) -> Figure:
    """Loss against meta-step; rows missing a series (validation is sparser than training) are skipped."""
    fig = Figure(figsize=(7, 4.5), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    drawn = 0
    for key, label in LEARNING_SERIES.items():
        points = [(row["step"], row[key]) for row in history if _finite(row.get(key)) and _finite(row.get("step"))]
        if points:
            steps, values = zip(*points)
            ax.plot(steps, values, marker="o" if len(points) < 30 else None, markersize=3, label=label)
            drawn += 1
    ax.set_xlabel("meta-step")
    ax.set_ylabel("loss")
    ax.set_title("learning curves")
    ax.grid(True, alpha=0.3)
    if drawn:
        ax.legend()
    else:
        ax.text(0.5, 0.5, "no finite values logged", ha="center", va="center", transform=ax.transAxes)
    fig.tight_layout()
    return fig


def adaptation_curves(before: Sequence[float], after: Sequence[float], ylabel: str = "query loss") -> Figure:
    """Loss against inner step, from the initial θ and from the meta-trained θ (what MAML buys)."""
    fig = Figure(figsize=(7, 4.5), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    for values, label in ((before, "before meta-training"), (after, "after meta-training")):
        if len(values):
            ax.plot(range(len(values)), [float(v) for v in values], marker="o", markersize=4, label=label)
    ax.set_xlabel("inner (adaptation) step")
    ax.set_ylabel(ylabel)
    ax.set_title("adaptation curves")
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    return fig


def to_png(fig: Figure) -> bytes:
    """Render on the calling thread (matplotlib is not thread-safe); the bytes can be uploaded anywhere."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()
