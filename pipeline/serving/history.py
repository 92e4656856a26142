"""A raw forecasting history → support windows and a query window, cut and scaled as the task builder did.

The checkpoint's ``extra.store`` records how the builder windowed and normalised its series; the service reads
those settings and calls the same ``metalstm.series`` functions, so a history sent over HTTP becomes exactly the
arrays a task store of that layout would hold, and forecasts come back in the history's original units.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from metalstm import series
from pipeline.serving.jobs import ServedModel
from pipeline.serving.schema import MAX_SUPPORT, ForecastHistory, RequestError


@dataclass(frozen=True)
class Windowing:
    """How the task builder windowed and scaled a series (from the checkpoint's ``extra.store``)."""

    window: int
    horizon: int
    stride: int
    support_windows: int | None
    covariates: list[str]
    scale_method: str
    max_gap: int

    @classmethod
    def of(cls, served: ServedModel) -> Windowing:
        feats, norm = served.store.get("features") or {}, served.store.get("normalisation") or {}
        if "window" not in feats:
            raise RequestError(("history",), "this model's checkpoint has no extra.store.features.window, so a raw "
                                             "history cannot be windowed the way it was trained; send support/query")
        covariates = [c for c in feats.get("covariates") or [] if c != "value"]  # the builder lists "value" first
        if 1 + len(covariates) != served.model.input_size:
            raise RequestError(("history",), f"the store's covariates {covariates} do not match the model's "
                                             f"input_size {served.model.input_size}")
        horizon = int(feats.get("horizon", served.model.horizon))
        return cls(window=int(feats["window"]), horizon=horizon, stride=int(feats.get("stride", horizon)),
                   support_windows=feats.get("support_windows"), covariates=covariates,
                   scale_method=norm.get("method", "mean"), max_gap=int(norm.get("max_gap", 0)))


def _values(h: ForecastHistory) -> np.ndarray:
    return np.asarray([np.nan if v is None else v for v in h.values], np.float64)


def _timestamps(h: ForecastHistory, covariates: list[str]) -> list[str] | np.ndarray:
    if h.timestamps is not None:
        return h.timestamps
    if covariates:
        raise RequestError(("history", "timestamps"), f"required: the model uses calendar covariates {covariates}")
    return np.arange(len(h.values)).astype("datetime64[h]")  # placeholders: no covariate reads them


def support_task(served: ServedModel, h: ForecastHistory) -> dict[str, Any]:
    """The latest windows to adapt on, the window after them to forecast, and the history's ``offset``/``scale``."""
    w = Windowing.of(served)
    timestamps = _timestamps(h, w.covariates)  # outside the try: its error names its own field
    try:
        task = series.adaptation_task(_values(h), timestamps, window=w.window, horizon=w.horizon,
                                      stride=w.stride, support_windows=h.support_windows or w.support_windows,
                                      covariates=w.covariates, scale_method=w.scale_method, max_gap=w.max_gap)
    except ValueError as e:
        raise RequestError(("history",), str(e)) from None
    if len(task["support_x"]) > MAX_SUPPORT:
        task["support_x"], task["support_y"] = task["support_x"][-MAX_SUPPORT:], task["support_y"][-MAX_SUPPORT:]
    return task


def query_window(served: ServedModel, h: ForecastHistory) -> tuple[list[np.ndarray], tuple[float, float]]:
    """The window that ends the history (one query) and the ``(offset, scale)`` that maps forecasts back."""
    w = Windowing.of(served)
    timestamps = _timestamps(h, w.covariates)
    try:
        values = series.interpolate_gaps(_values(h), w.max_gap)
        offset, scale = series.series_scale(values, w.scale_method)
        x = series.forecast_input(values, timestamps, w.window, offset=offset, scale=scale,
                                  covariates=w.covariates)
    except ValueError as e:
        raise RequestError(("history",), str(e)) from None
    return [x], (offset, scale)
