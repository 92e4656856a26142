"""The forecasting layout in pure numpy: calendar covariates, per-series scaling and input/target windows.

The builders and serving both go through these functions, so a raw history a client sends becomes support
windows and a query input exactly as the task store's windows were made.

Units. ``values`` passed in are always in the series' ORIGINAL units (kW, ...). Every window this module
returns is in SCALED units, ``(value - offset) / scale``, with ``(offset, scale)`` from :func:`series_scale`
over the history that precedes the first forecast (never over the targets being forecast). Model outputs are
therefore scaled too; :func:`unscale` maps them back. With the default ``"mean"`` method the offset is 0,
so normalised deviation (ND) is the same in scaled and original units.

Layout (``metalstm.data.collate``'s real-valued layout):

- ``x``: ``[L, F]`` float32, ``x[:, 0]`` the scaled value at each input step, ``x[:, 1:]`` the calendar
  covariates of that step's timestamp (see :data:`COVARIATES`);
- ``y``: ``[H]`` float32, the scaled values of the ``H`` steps right after the input window.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

# cycle -> period in seconds: a timestamp's phase in its cycle, encoded as sin/cos so that 23:00 meets midnight.
_CYCLES = {"hour": 86400.0, "dow": 7 * 86400.0, "doy": 365.2425 * 86400.0}
COVARIATES = tuple(f"{c}_{f}" for c in _CYCLES for f in ("sin", "cos"))
SUB_DAILY_COVARIATES = ("hour_sin", "hour_cos", "dow_sin", "dow_cos")
DAILY_COVARIATES = ("dow_sin", "dow_cos", "doy_sin", "doy_cos")
SCALE_METHODS = ("mean", "standard")
_EPOCH_MONDAY = np.datetime64("1970-01-05T00:00:00", "s")  # day-of-week phase 0 = Monday 00:00


def as_timestamps(timestamps) -> np.ndarray:
    """Anything numpy can read as datetimes (ISO strings, datetime64, datetime) → ``datetime64[s]`` array."""
    try:
        ts = np.asarray(timestamps, dtype="datetime64[s]")
    except (ValueError, TypeError) as e:
        raise ValueError(f"timestamps: cannot parse as datetimes ({e})") from e
    if ts.ndim != 1:
        raise ValueError(f"timestamps: expected a 1-D sequence, got shape {ts.shape}")
    if np.isnat(ts).any():
        raise ValueError(f"timestamps: {int(np.isnat(ts).sum())} missing (NaT) timestamps")
    return ts


def default_covariates(frequency_seconds: float) -> tuple[str, ...]:
    """Hour-of-day and day-of-week for sub-daily series; day-of-week and day-of-year for daily or coarser."""
    return SUB_DAILY_COVARIATES if frequency_seconds < 86400 else DAILY_COVARIATES


def calendar_covariates(timestamps, names: Sequence[str] = SUB_DAILY_COVARIATES) -> np.ndarray:
    """``[N, len(names)]`` float32 sin/cos phases of each timestamp in its day, week or year."""
    unknown = [n for n in names if n not in COVARIATES]
    if unknown:
        raise ValueError(f"covariates: unknown names {unknown}; choose from {list(COVARIATES)}")
    ts = as_timestamps(timestamps)
    seconds = (ts - _EPOCH_MONDAY).astype(np.float64)
    out = np.empty((len(ts), len(names)), np.float32)
    for j, name in enumerate(names):
        cycle, fn = name.rsplit("_", 1)
        phase = 2 * np.pi * np.mod(seconds, _CYCLES[cycle]) / _CYCLES[cycle]
        out[:, j] = np.sin(phase) if fn == "sin" else np.cos(phase)
    return out


def series_scale(values, method: str = "mean") -> tuple[float, float]:
    """``(offset, scale)`` of a history (original units, NaNs ignored) so that scaled = (v - offset) / scale.

    ``"mean"``: offset 0, scale = mean |v| (DeepAR-style; keeps ND scale-free). ``"standard"``: mean and std.
    A flat or all-zero history gets scale 1 rather than a division by zero.
    """
    if method not in SCALE_METHODS:
        raise ValueError(f"scale method: expected one of {list(SCALE_METHODS)}, got {method!r}")
    v = np.asarray(values, np.float64)
    v = v[np.isfinite(v)]
    if v.size == 0:
        raise ValueError("values: no finite values to compute a scale from")
    if method == "mean":
        offset, scale = 0.0, float(np.abs(v).mean())
    else:
        offset, scale = float(v.mean()), float(v.std())
    if not np.isfinite(scale) or scale <= 1e-8 * max(1.0, abs(offset)):
        scale = 1.0
    return offset, scale


def unscale(scaled, offset: float, scale: float) -> np.ndarray:
    """Scaled model outputs back to original units."""
    return np.asarray(scaled, np.float64) * scale + offset


def interpolate_gaps(values, max_gap: int) -> np.ndarray:
    """Fill interior NaN runs of at most ``max_gap`` steps linearly; longer runs and edges stay NaN (float64 copy)."""
    if max_gap < 0:
        raise ValueError(f"max_gap: must be >= 0, got {max_gap}")
    v = np.array(values, np.float64)
    missing = ~np.isfinite(v)
    if not missing.any() or max_gap == 0:
        return v
    v[missing] = np.nan
    idx = np.flatnonzero(missing)
    breaks = np.flatnonzero(np.diff(idx) > 1)
    starts = np.concatenate([idx[:1], idx[breaks + 1]])
    ends = np.concatenate([idx[breaks], idx[-1:]]) + 1  # exclusive
    for s, e in zip(starts, ends):
        if s == 0 or e == len(v) or e - s > max_gap:
            continue
        left, right = v[s - 1], v[e]
        v[s:e] = left + (right - left) * np.arange(1, e - s + 1) / (e - s + 1)
    return v


def finite_runs(values) -> list[tuple[int, int]]:
    """``[start, stop)`` ranges of consecutive finite values."""
    ok = np.isfinite(np.asarray(values, np.float64)).astype(np.int8)
    edges = np.diff(np.concatenate([[0], ok, [0]]))
    return list(zip(np.flatnonzero(edges == 1).tolist(), np.flatnonzero(edges == -1).tolist()))


def common_dips(matrix, *, share: float = 0.95, ratio: float = 0.5, min_series: int = 3) -> np.ndarray:
    """Steps at which (nearly) every series collapses at once: indices into the rows of a ``[T, N]`` matrix.

    Why: a reading that drops in every meter during the same single step is not consumption but an artefact
    of how the data were recorded, e.g. the hour lost when clocks go forward (the UCI export's 2014-03-30
    01:00 holds one quarter-hour's load, or 0). Left in, every window over it teaches a fake dip.
    A step counts when, among the series whose two neighbouring values are positive (finite), at least
    ``share`` read below ``ratio`` x the smaller neighbour (exact zeros included) and there are at least
    ``min_series`` such series. The first and last steps have one neighbour and never count. NaN = absent.
    """
    m = np.asarray(matrix, np.float64)
    if m.ndim != 2:
        raise ValueError(f"matrix: expected [steps, series], got shape {m.shape}")
    if len(m) < 3:
        return np.zeros(0, np.int64)
    with np.errstate(invalid="ignore"):
        low = np.fmin(m[:-2], m[2:])
        low = np.where(np.isfinite(m[:-2]) & np.isfinite(m[2:]), low, np.nan)
        active = low > 0
        dips = (active & (m[1:-1] < ratio * low)).sum(axis=1)
    n = active.sum(axis=1)
    hit = (n >= min_series) & (dips >= share * np.maximum(n, 1))
    return np.flatnonzero(hit) + 1


def _features(values: np.ndarray, covariates: np.ndarray | None, offset: float, scale: float) -> np.ndarray:
    v = ((np.asarray(values, np.float64) - offset) / scale).astype(np.float32)[:, None]
    if covariates is None or covariates.shape[1] == 0:
        return v
    if len(covariates) != len(v):
        raise ValueError(f"covariates: {len(covariates)} rows for {len(v)} values")
    return np.concatenate([v, np.asarray(covariates, np.float32)], axis=1)


def make_windows(values, covariates: np.ndarray | None, window: int, horizon: int, stride: int = 1, *,
                 offset: float = 0.0, scale: float = 1.0, end: int | None = None,
                 count: int | None = None) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Input/target windows whose targets end at ``end``, ``end - stride``, ... (as many as fit, or ``count``).

    ``values`` are original units over steps ``0..N-1`` and ``covariates`` the matching ``[N, C]`` rows (or
    None); the windows are returned oldest first, in scaled units: ``x [window, 1 + C]``, ``y [horizon]``.
    Aligning to ``end`` (default ``N``) keeps the most recent history, which is what forecasting adapts on.
    Raises if a window would contain a NaN: callers cut series at gaps first (:func:`finite_runs`).
    """
    for name, val, low in (("window", window, 1), ("horizon", horizon, 1), ("stride", stride, 1)):
        if int(val) < low:
            raise ValueError(f"{name}: must be >= {low}, got {val}")
    n = len(values)
    end = n if end is None else end
    if not 0 <= end <= n:
        raise ValueError(f"end: must be in [0, {n}], got {end}")
    if count is not None and count < 0:
        raise ValueError(f"count: must be >= 0, got {count}")
    starts = []
    s = end - window - horizon
    while s >= 0 and (count is None or len(starts) < count):
        starts.append(s)
        s -= stride
    if not starts:
        return [], []
    lo = starts[-1]
    feats = _features(np.asarray(values)[lo:end], None if covariates is None else covariates[lo:end], offset, scale)
    if not np.isfinite(feats).all():
        raise ValueError(f"values: NaN or inf inside the windows of steps [{lo}, {end}); cut the series at gaps first")
    xs, ys = [], []
    for s in reversed(starts):
        xs.append(np.ascontiguousarray(feats[s - lo : s - lo + window]))
        ys.append(np.ascontiguousarray(feats[s - lo + window : s - lo + window + horizon, 0]))
    return xs, ys


def forecast_input(history_values, history_timestamps, window: int, *, offset: float, scale: float,
                   covariates: Sequence[str] | None = SUB_DAILY_COVARIATES) -> np.ndarray:
    """The ``[window, F]`` input for forecasting the horizon right after a history (original units in).

    Uses the last ``window`` steps of the history; ``covariates=None`` or ``()`` gives ``F = 1``.
    """
    v = np.asarray(history_values, np.float64)
    if v.ndim != 1:
        raise ValueError(f"history_values: expected a 1-D sequence, got shape {v.shape}")
    if len(v) < window:
        raise ValueError(f"history_values: need at least window={window} steps, got {len(v)}")
    if len(history_timestamps) != len(v):
        raise ValueError(f"history_timestamps: {len(history_timestamps)} timestamps for {len(v)} values")
    cov = calendar_covariates(history_timestamps[-window:], covariates) if covariates else None
    x = _features(v[-window:], cov, offset, scale)
    if not np.isfinite(x).all():
        raise ValueError(f"history_values: NaN or inf in the last {window} steps")
    return x


def adaptation_task(history_values, history_timestamps, *, window: int, horizon: int, stride: int,
                    support_windows: int | None, covariates: Sequence[str] | None = SUB_DAILY_COVARIATES,
                    scale_method: str = "mean", max_gap: int = 0) -> dict:
    """A raw history → what a forecaster adapts on and forecasts from, as the electricity builder does it.

    Returns ``support_x``/``support_y`` (the latest ``support_windows`` windows, targets ending at the end of
    the history), ``query_x`` (one input for the next ``horizon`` steps), ``offset``, ``scale`` (computed over
    the whole history) and ``covariates``. Gaps up to ``max_gap`` steps are interpolated first.
    """
    ts = as_timestamps(history_timestamps)
    v = interpolate_gaps(history_values, max_gap)
    if len(ts) != len(v):
        raise ValueError(f"history_timestamps: {len(ts)} timestamps for {len(v)} values")
    if not np.isfinite(v).all():
        raise ValueError(f"history_values: {int((~np.isfinite(v)).sum())} missing values left after "
                         f"interpolating gaps of up to {max_gap} steps")
    offset, scale = series_scale(v, scale_method)
    names = tuple(covariates or ())
    cov = calendar_covariates(ts, names) if names else None
    sx, sy = make_windows(v, cov, window, horizon, stride, offset=offset, scale=scale, count=support_windows)
    if not sx:
        raise ValueError(f"history_values: {len(v)} steps is too short for one support window "
                         f"(window {window} + horizon {horizon})")
    qx = forecast_input(v, ts, window, offset=offset, scale=scale, covariates=names)
    return {"support_x": sx, "support_y": sy, "query_x": [qx], "offset": offset, "scale": scale,
            "covariates": list(names)}
