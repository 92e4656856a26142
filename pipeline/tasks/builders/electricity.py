"""Electricity-load forecasting tasks: one task = one series (entity) over one stretch of time (episode).

Sources (``--layout``, auto-detected from the files when omitted):

- ``uci``: the TAGI-LSTM export of UCI ElectricityLoadDiagrams20112014 — headerless CSVs, one column per
  client (MT_001..MT_370), rows = hours, with ``*_{train,val,test}.csv`` and matching ``*_datetime.csv``.
  The "2014-03-31" test-week protocol, one task per client: the history is train+val (168 h), the test week
  follows. Test clients: query = the test week as consecutive ``horizon``-step forecasts (7 x 24 h), each
  input = the ``window`` actual values before that day; support = the latest windows of the history.
  Train/val clients never see the test week: query = the last ``--query-windows`` forecasts of the
  history, support = windows whose targets end before the first query target. That last history day is
  Sunday 2014-03-30, the daylight-saving day, while every test query is a 24 h forecast of the test week;
  ``--history-episodes N`` gives each train/val client up to N tasks whose queries step back a day (a block
  of ``--query-windows`` forecasts) at a time (at the UCI defaults 3 fit: Fri, Sat, Sun).
- ``gefcom``: GEFCom2012 ``Load_history.csv`` (zipped or not): zone_id,year,month,day,h1..h24, quoted values
  with thousands commas; blank day-rows are missing values. ``h1`` is the hour starting 00:00.
- ``csv-wide``: a timestamp column + one numeric column per series. ``csv-long``: series_id,timestamp,value.
  Any regular frequency (inferred as the most common step, or ``--frequency``); absent timestamps are gaps.

Episodes (gefcom and csv layouts): within each gap-free stretch, consecutive non-overlapping episodes of
``support_windows`` windows (stride ``--stride``, oldest first) followed by ``query_windows`` consecutive
``horizon``-step forecasts. Every support target ends before the first query target starts.

Artefacts (default on for ``uci``, ``--keep-dst-artefact`` / ``--mask-dst-artefact``): steps where >= 95 % of
the series read below half of both neighbouring values at once (:func:`metalstm.series.common_dips`; in the
UCI export the 2014-03-30 01:00 clock change, ~30 % of the neighbours' load in 98.6 % of the clients) become
missing values, which the interpolation below fills.

Extra training source (``--extra-train-source``, gefcom or csv layouts): all its series go to the train
split as episodes at the main source's window, horizon, stride, support/query windows and covariates, ids
prefixed with its layout (``gefcom:zone_1@...``), so train queries cover every weekday.

Missing values: empty cells (and pandas' NA tokens, except in the headerless UCI files); any other cell
that is not a finite number is an error naming its file, line, column and value. Interior gaps of up to
``--max-gap`` steps are interpolated linearly; no window ever spans a
remaining gap (episodes are cut from gap-free stretches; UCI tasks that would need one are dropped).

Scaling: per task, ``(offset, scale)`` from the task's history before its first query target
(:func:`metalstm.series.series_scale`), stored as the task's ``offset`` and ``scale`` columns.

Splits are by series: test/val series are chosen by ranking series ids by ``sha256(seed/id)``, so a test
series never contributes a training task and the choice is the same on every run.
"""

from __future__ import annotations

import argparse
import csv
import gzip
import hashlib
import io
import logging
import re
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from metalstm.series import (
    SCALE_METHODS,
    calendar_covariates,
    common_dips,
    default_covariates,
    finite_runs,
    interpolate_gaps,
    make_windows,
    series_scale,
)

log = logging.getLogger(__name__)

LAYOUTS = ("uci", "gefcom", "csv-wide", "csv-long")
SPLITS = ("train", "val", "test")
ID_COLUMNS = ("series_id", "id", "series", "item_id", "unique_id")
TIME_COLUMNS = ("timestamp", "time", "datetime", "date", "ds")
VALUE_COLUMNS = ("value", "y", "target", "load")
UCI_PARTS = ("train", "val", "test")
EXTRA_LAYOUTS = ("gefcom", "csv-wide", "csv-long")
EXTRA_MAX_TASKS = 3000
EXTRA_STRIDE_DAYS = 5  # 5 days between extra episodes: 5 and 7 are coprime, so query weekdays rotate
DIP_SHARE, DIP_RATIO = 0.95, 0.5  # a step is an artefact when >= 95 % of series read < 0.5 x both neighbours


@dataclass
class Series:
    """One series on a regular grid: ``timestamps`` (datetime64[s]) and ``values`` (original units, NaN = gap)."""

    id: str
    timestamps: np.ndarray
    values: np.ndarray


@dataclass(kw_only=True)
class ElectricityOptions:
    """``metalstm tasks build electricity`` options (the module docstring and ``--help`` explain them).

    ``None`` window sizes take the layout's defaults (:func:`_defaults`).
    """

    source: str | Path  # UCI or GEFCom folder, or a CSV file
    layout: str | None = None  # uci | gefcom | csv-wide | csv-long; None: detected from the files
    window: int | None = None
    horizon: int | None = None
    stride: int | None = None
    support_windows: int | None = None
    query_windows: int | None = None
    episode_stride: int | None = None  # None: non-overlapping episodes
    max_episodes_per_series: int | None = None
    covariates: bool = True  # value + calendar sin/cos covariates; False: values only
    val_fraction: float = 0.1
    test_fraction: float = 0.2
    val_series: list[str] | None = None  # held-out series by id (overrides the fractions)
    test_series: list[str] | None = None
    seed: int = 0  # of the series-id hash that picks held-out series
    max_gap: int = 3
    scale_method: str = "mean"  # mean | standard
    frequency: str | None = None  # e.g. 1h, 30min; None: inferred
    timestamp_column: str | None = None
    id_column: str | None = None
    value_column: str | None = None
    sep: str = ","
    decimal: str = "."
    max_tasks_per_split: int | None = None
    mask_dst: bool | None = None  # None: mask for the uci layout only
    history_episodes: int | None = None  # uci only; None: 1
    extra_train_source: str | Path | None = None
    extra_train_layout: str | None = None
    extra_episode_stride: int | None = None  # None: EXTRA_STRIDE_DAYS days of steps
    extra_max_tasks: int = EXTRA_MAX_TASKS


OPTIONS = ElectricityOptions


# --------------------------------------------------------------------------------------------- sources


def _open_text(path: Path) -> io.TextIOBase:
    """A text stream for ``.csv``, ``.csv.gz`` or a ``.zip`` holding one CSV."""
    if path.suffix == ".zip":
        zf = zipfile.ZipFile(path)
        names = [n for n in zf.namelist() if n.endswith(".csv") and not n.startswith("__MACOSX")]
        if len(names) != 1:
            raise ValueError(f"{path}: expected one .csv inside the zip, found {names}")
        return io.TextIOWrapper(zf.open(names[0]), "utf-8", newline="")
    if path.suffix == ".gz":
        return io.TextIOWrapper(gzip.open(path), "utf-8", newline="")
    return open(path, encoding="utf-8", newline="")


def _uci_files(source: Path) -> dict[str, tuple[Path, Path]] | None:
    """``{part: (values.csv, datetime.csv)}`` if ``source`` is a TAGI-style UCI folder, else None."""
    if not source.is_dir():
        return None
    found = {}
    for part in UCI_PARTS:
        values = [p for p in source.glob(f"*_{part}.csv")]
        if len(values) != 1:
            return None
        stamps = values[0].with_name(values[0].name[: -len(".csv")] + "_datetime.csv")
        if not stamps.exists():
            raise FileNotFoundError(f"{stamps}: UCI layout needs the datetime file next to {values[0].name}")
        found[part] = (values[0], stamps)
    return found


def _gefcom_file(source: Path) -> Path | None:
    if source.is_file():
        return source if source.name.lower().startswith("load_history.csv") else None
    for name in ("Load_history.csv", "Load_history.csv.zip", "Load_history.csv.gz"):
        if (source / name).exists():
            return source / name
    return None


def _read_header(path: Path, sep: str) -> list[str]:
    with _open_text(path) as f:
        line = f.readline()
    if not line.strip():
        raise ValueError(f"{path}: empty file (expected a CSV header)")
    return [c.strip() for c in next(csv.reader([line], delimiter=sep))]


def _pick(columns: list[str], wanted: str | None, candidates: tuple[str, ...], what: str, path: Path) -> str | None:
    if wanted is not None:
        if wanted not in columns:
            raise ValueError(f"{path}: no {what} column {wanted!r} (columns: {columns[:20]})")
        return wanted
    lower = {c.lower(): c for c in columns}
    return next((lower[c] for c in candidates if c in lower), None)


def detect_layout(source: Path, sep: str = ",") -> str:
    """The layout of ``source`` from its files (see the module docstring)."""
    if not source.exists():
        raise FileNotFoundError(f"{source}: electricity source not found")
    if _uci_files(source):
        return "uci"
    if _gefcom_file(source):
        return "gefcom"
    if source.is_dir():
        raise ValueError(f"{source}: not a UCI (*_train.csv + *_datetime.csv) or GEFCom (Load_history.csv) folder; "
                         f"pass a CSV file with --layout csv-wide or csv-long")
    cols = _read_header(source, sep)
    has_id = _pick(cols, None, ID_COLUMNS, "id", source)
    has_value = _pick(cols, None, VALUE_COLUMNS, "value", source)
    return "csv-long" if has_id and has_value and len(cols) == 3 else "csv-wide"


def _cell(text: str) -> float | None:
    """A headerless CSV cell as a float: empty is a missing value (NaN), not a finite number is None."""
    if not text.strip():
        return np.nan
    try:
        value = float(text)
    except ValueError:
        return None
    return value if np.isfinite(value) else None


def _data_line(path: Path, sep: str, row: int) -> int:
    """The file line where data row ``row`` (0-based, after the header) ends; blank lines are skipped, as
    pandas skips them. Only called to name a bad cell, so the extra pass over the file costs nothing else."""
    with _open_text(path) as f:
        reader = csv.reader(f, delimiter=sep)
        k = -1  # the header is record -1
        for record in reader:
            if not record:
                continue
            if k == row:
                return reader.line_num
            k += 1
    return -1


def _numbers(col: Any, path: Path, sep: str, decimal: str = ".") -> np.ndarray:
    """A CSV column as float64: empty and NA cells (pandas' defaults: "", NA, NaN, null, ...) are missing
    values (NaN); any other cell that is not a finite number is an error naming its file, line, column and
    value. Thousands separators ("16,853") are allowed when the decimal mark is "."."""
    import pandas as pd

    missing = np.array(col.isna(), dtype=bool)
    if pd.api.types.is_numeric_dtype(col.dtype):
        values = col.to_numpy(np.float64, na_value=np.nan)
    else:
        text = col.astype("string").str.strip()
        missing |= (text == "").fillna(True).to_numpy(bool)
        text = text.str.replace(",", "", regex=False) if decimal == "." else text.str.replace(decimal, ".",
                                                                                             regex=False)
        values = pd.to_numeric(text, errors="coerce").to_numpy(np.float64, na_value=np.nan)
    bad = np.flatnonzero(~missing & ~np.isfinite(values))
    if bad.size:
        i = int(bad[0])
        raise _bad_cell(path, _data_line(path, sep, i), repr(str(col.name)), col.iloc[i])
    return values


def _bad_cell(path: Path, line: int, column: str, value: Any) -> ValueError:
    """The error of a cell that is not a number: the file, its line, its column and the value."""
    shown = value if isinstance(value, str) else str(value)  # inf read as a float shows as 'inf'
    return ValueError(f"{path}: line {line}, column {column}: {shown!r} is not a finite number "
                      f"(leave the cell empty for a missing value)")


def _read_matrix(path: Path) -> np.ndarray:
    rows = []
    with _open_text(path) as f:
        reader = csv.reader(f)
        for row in reader:
            if not row:
                continue
            values = [_cell(v) for v in row]
            if None in values:
                j = values.index(None)
                raise _bad_cell(path, reader.line_num, f"{j + 1} (MT_{j + 1:03d})", row[j])
            rows.append(values)
    widths = {len(r) for r in rows}
    if len(widths) != 1:
        raise ValueError(f"{path}: rows have different numbers of columns {sorted(widths)}")
    return np.asarray(rows, np.float64)


def read_uci(source: Path) -> tuple[list[Series], int]:
    """UCI clients over train+val+test hours, and the index of the first test hour."""
    files = _uci_files(source)
    if files is None:
        raise ValueError(f"{source}: not a UCI folder (needs *_train.csv, *_val.csv, *_test.csv and *_datetime.csv)")
    mats, stamps = [], []
    for part in UCI_PARTS:
        values_path, stamps_path = files[part]
        m = _read_matrix(values_path)
        with _open_text(stamps_path) as f:
            ts = [line.strip().strip('"') for line in f if line.strip()]
        if ts and not re.match(r"\d{4}-\d\d-\d\d", ts[0]):
            ts = ts[1:]  # a header line
        if len(ts) != len(m):
            raise ValueError(f"{stamps_path}: {len(ts)} timestamps for {len(m)} rows of {values_path.name}")
        if mats and m.shape[1] != mats[0].shape[1]:
            raise ValueError(f"{values_path}: {m.shape[1]} columns, but {files['train'][0].name} has "
                             f"{mats[0].shape[1]}")
        mats.append(m)
        stamps.append(np.asarray(ts, dtype="datetime64[s]"))
    values = np.concatenate(mats)
    timestamps = np.concatenate(stamps)
    step = np.diff(timestamps)
    if len(step) and (step != step[0]).any():
        bad = int(np.flatnonzero(step != step[0])[0])
        raise ValueError(f"{source}: timestamps are not regular around {timestamps[bad]} (train, val, test must be "
                         f"consecutive)")
    width = max(3, len(str(values.shape[1])))
    series = [Series(f"MT_{j + 1:0{width}d}", timestamps, values[:, j]) for j in range(values.shape[1])]
    return series, len(mats[0]) + len(mats[1])


def read_gefcom(source: Path) -> list[Series]:
    """GEFCom2012 zones as hourly series; blank day-rows (and absent days) become NaN. ``h1`` starts at 00:00."""
    import pandas as pd

    path = _gefcom_file(source) if source.is_dir() else source
    if path is None:
        raise FileNotFoundError(f"{source}: no Load_history.csv(.zip) here")
    hours = [f"h{i}" for i in range(1, 25)]
    missing = [c for c in ("zone_id", "year", "month", "day", *hours) if c not in _read_header(path, ",")]
    if missing:
        raise ValueError(f"{path}: missing columns {missing} (GEFCom layout: zone_id,year,month,day,h1..h24)")
    try:  # values are quoted with thousands commas ("16,853"); blank cells are missing values
        frame = pd.read_csv(path, usecols=["zone_id", "year", "month", "day", *hours], dtype={h: str for h in hours})
        days = pd.to_datetime(frame[["year", "month", "day"]]).to_numpy("datetime64[D]")
    except (ValueError, TypeError) as e:
        raise ValueError(f"{path}: {e}") from e
    zones = frame["zone_id"].astype(str).str.strip().to_numpy()
    values = np.stack([_numbers(frame[h], path, ",") for h in hours], axis=1)
    out = []
    for zone in sorted(set(zones.tolist()), key=lambda z: (len(z), z)):
        rows = np.flatnonzero(zones == zone)
        first = days[rows].min()
        index = (days[rows] - first).astype(np.int64)
        grid = np.full((int(index.max()) + 1, 24), np.nan)
        grid[index] = values[rows]
        ts = first.astype("datetime64[s]") + np.arange(grid.size) * np.timedelta64(3600, "s")
        out.append(Series(f"zone_{zone}", ts, grid.reshape(-1)))
    return out


def _regular_grid(timestamps: np.ndarray, values: np.ndarray, frequency_s: float | None, where: str,
                  ) -> tuple[np.ndarray, np.ndarray, float]:
    """Put ``values`` on a regular grid (absent steps NaN); the step is inferred as the most common one."""
    order = np.argsort(timestamps, kind="stable")
    ts, vals = timestamps[order], values[order]
    if len(ts) > 1 and (np.diff(ts) == np.timedelta64(0, "s")).any():
        dup = ts[np.flatnonzero(np.diff(ts) == np.timedelta64(0, "s"))[0]]
        raise ValueError(f"{where}: duplicate timestamp {dup}")
    if frequency_s is None:
        if len(ts) < 2:
            raise ValueError(f"{where}: need at least 2 timestamps to infer the frequency (or pass --frequency)")
        steps, counts = np.unique(np.diff(ts).astype(np.int64), return_counts=True)
        frequency_s = float(steps[np.argmax(counts)])
    step = np.timedelta64(int(frequency_s), "s")
    offsets = (ts - ts[0]).astype(np.int64)
    if (offsets % int(frequency_s)).any():
        bad = ts[np.flatnonzero(offsets % int(frequency_s))[0]]
        raise ValueError(f"{where}: timestamp {bad} is off the {int(frequency_s)} s grid starting at {ts[0]}; "
                         f"pass --frequency")
    n = int(offsets[-1] // int(frequency_s)) + 1
    grid = np.full(n, np.nan)
    grid[offsets // int(frequency_s)] = vals
    return ts[0] + np.arange(n) * step, grid, frequency_s


def _parse_times(raw, path: Path, sep: str) -> np.ndarray:
    """A CSV column of timestamps; an empty or unreadable one is an error naming its line and value."""
    import pandas as pd

    raw = pd.Series(raw)
    where = f"{path}: column {str(raw.name)!r}"
    try:
        t = pd.to_datetime(raw)
    except (ValueError, TypeError) as e:
        coerced = pd.to_datetime(raw, errors="coerce", format="mixed")
        bad = np.flatnonzero(coerced.isna().to_numpy())
        if not bad.size:
            raise ValueError(f"{where}: cannot parse timestamps ({e})") from e
        i = int(bad[0])
        raise ValueError(f"{path}: line {_data_line(path, sep, i)}, column {str(raw.name)!r}: {raw.iloc[i]!r} is "
                         f"not a timestamp like those before it ({str(e).splitlines()[0]})") from e
    if t.dt.tz is not None:
        t = t.dt.tz_localize(None)  # keep the local wall-clock time: that is what the calendar covariates mean
    if t.isna().any():
        i = int(np.flatnonzero(t.isna().to_numpy())[0])
        raise ValueError(f"{where}: {int(t.isna().sum())} empty timestamps, the first on line "
                         f"{_data_line(path, sep, i)}")
    return t.to_numpy(dtype="datetime64[s]")


def read_csv_wide(path: Path, *, timestamp_column: str | None = None, frequency_s: float | None = None,
                  sep: str = ",", decimal: str = ".") -> tuple[list[Series], float]:
    """A timestamp column + one numeric column per series (empty cells are missing values; any other cell
    that is not a number is an error naming its line and column)."""
    import pandas as pd

    cols = _read_header(path, sep)
    tcol = _pick(cols, timestamp_column, TIME_COLUMNS, "timestamp", path) or cols[0]
    frame = pd.read_csv(path, sep=sep, decimal=decimal, dtype={tcol: str}, low_memory=False)
    frame.columns = [str(c).strip() for c in frame.columns]
    series_cols = [c for c in frame.columns if c != tcol]
    if not series_cols:
        raise ValueError(f"{path}: only the timestamp column {tcol!r}; a wide CSV needs one column per series")
    ts = _parse_times(frame[tcol], path, sep)
    out = []
    for c in series_cols:
        vals = _numbers(frame[c], path, sep, decimal)
        if not np.isfinite(vals).any():
            raise ValueError(f"{path}: column {c!r} has no numeric values")
        grid_ts, grid, frequency_s = _regular_grid(ts, vals, frequency_s, f"{path}")
        out.append(Series(c, grid_ts, grid))
    return out, float(frequency_s)


def read_csv_long(path: Path, *, id_column: str | None = None, timestamp_column: str | None = None,
                  value_column: str | None = None, frequency_s: float | None = None, sep: str = ",",
                  decimal: str = ".") -> tuple[list[Series], float]:
    """Rows of (series id, timestamp, value); each series on its own regular grid."""
    import pandas as pd

    cols = _read_header(path, sep)
    picked = {}
    for what, wanted, cands in (("id", id_column, ID_COLUMNS), ("timestamp", timestamp_column, TIME_COLUMNS),
                                ("value", value_column, VALUE_COLUMNS)):
        picked[what] = _pick(cols, wanted, cands, what, path)
        if picked[what] is None:
            raise ValueError(f"{path}: no {what} column (tried {list(cands)}; columns: {cols[:20]}); "
                             f"name it with --{what}-column")
    frame = pd.read_csv(path, sep=sep, decimal=decimal, usecols=list(picked.values()),
                        dtype={picked["id"]: str, picked["timestamp"]: str})
    values = _numbers(frame[picked["value"]], path, sep, decimal)
    ts = _parse_times(frame[picked["timestamp"]], path, sep)
    ids = frame[picked["id"]].to_numpy()
    out = []
    freq = frequency_s
    for sid in sorted(set(ids.tolist())):
        rows = ids == sid
        grid_ts, grid, f = _regular_grid(ts[rows], values[rows], frequency_s, f"{path}: series {sid!r}")
        freq = freq or f
        if f != freq:
            raise ValueError(f"{path}: series {sid!r} has step {f:g} s, others {freq:g} s; pass --frequency")
        out.append(Series(str(sid), grid_ts, grid))
    if not out:
        raise ValueError(f"{path}: no rows")
    return out, float(freq)


# --------------------------------------------------------------------------------------------- tasks


def assign_splits(ids: list[str], *, val_fraction: float, test_fraction: float, seed: int,
                  val_ids: list[str] | None = None, test_ids: list[str] | None = None) -> dict[str, str]:
    """Series id → split. Test/val series are the lowest ``sha256(f"{seed}/{id}")`` ranks (or named explicitly)."""
    for name, frac in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
        if not 0.0 <= frac < 1.0:
            raise ValueError(f"{name}: must be in [0, 1), got {frac}")
    known = set(ids)
    for name, given in (("val_series", val_ids), ("test_series", test_ids)):
        unknown = sorted(set(given or ()) - known)
        if unknown:
            raise ValueError(f"{name}: unknown series {unknown[:5]} (have e.g. {sorted(known)[:5]})")
    out = {i: "train" for i in ids}
    if test_ids is not None or val_ids is not None:
        for i in val_ids or ():
            out[i] = "val"
        for i in test_ids or ():
            out[i] = "test"
        return out
    n = len(ids)
    n_test = max(1, round(test_fraction * n)) if test_fraction > 0 else 0
    n_val = max(1, round(val_fraction * n)) if val_fraction > 0 else 0
    if n_test + n_val >= n:
        raise ValueError(f"val_fraction/test_fraction: {n_val} val + {n_test} test series leave no training "
                         f"series out of {n}")
    ranked = sorted(ids, key=lambda i: hashlib.sha256(f"{seed}/{i}".encode()).hexdigest())
    for i in ranked[:n_test]:
        out[i] = "test"
    for i in ranked[n_test : n_test + n_val]:
        out[i] = "val"
    return out


def _format_frequency(seconds: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= size and seconds % size == 0:
            return f"{int(seconds // size)}{unit}"
    return f"{seconds:g}s"


def _parse_frequency(text: str | None) -> float | None:
    if text is None:
        return None
    import pandas as pd

    try:
        seconds = pd.Timedelta(text if any(ch.isalpha() for ch in text) else f"{text}s").total_seconds()
    except ValueError as e:
        raise ValueError(f"frequency: cannot parse {text!r} (e.g. 1h, 30min, 1d)") from e
    if seconds <= 0:
        raise ValueError(f"frequency: must be positive, got {text!r}")
    return seconds


def _defaults(layout: str, frequency_s: float) -> dict[str, int]:
    """Window sizes in steps: a week in, a day out for sub-daily data; the UCI export has only 168 h of history."""
    if layout == "uci":  # 72 + 24 h windows leave room for 5 support windows before the last history day
        return {"window": 72, "horizon": 24, "stride": 12, "support_windows": 5, "query_windows": 1}
    per_day = 86400 / frequency_s
    if frequency_s < 86400 and per_day == int(per_day):
        d = int(per_day)
        return {"window": 7 * d, "horizon": d, "stride": d, "support_windows": 8, "query_windows": 7}
    return {"window": 28, "horizon": 7, "stride": 7, "support_windows": 8, "query_windows": 4}


def read_source(source: Path, layout: str, *, frequency_s: float | None = None, timestamp_column: str | None = None,
                id_column: str | None = None, value_column: str | None = None, sep: str = ",",
                decimal: str = ".") -> tuple[list[Series], float, int | None]:
    """``(series, frequency in seconds, first UCI test step or None)`` of a source in a known layout."""
    if layout == "uci":
        series, test_start = read_uci(source)
        return series, float((series[0].timestamps[1] - series[0].timestamps[0]).astype(np.int64)), test_start
    if layout == "gefcom":
        return read_gefcom(source), 3600.0, None
    if layout == "csv-wide":
        series, freq = read_csv_wide(source, timestamp_column=timestamp_column, frequency_s=frequency_s, sep=sep,
                                     decimal=decimal)
    else:
        series, freq = read_csv_long(source, id_column=id_column, timestamp_column=timestamp_column,
                                     value_column=value_column, frequency_s=frequency_s, sep=sep, decimal=decimal)
    return series, float(freq), None


def mask_common_dips(series: list[Series], where: str) -> list[str]:
    """Set the steps where nearly every series collapses at once (:func:`metalstm.series.common_dips`) to NaN.

    Why: the UCI export's daylight-saving hour (2014-03-30 01:00) reads a fraction of the load, or 0, in every
    client; as a gap it is interpolated (``--max-gap``) like any other missing reading instead of being
    learnt as a nightly dip. Series are aligned on their timestamps; returns the masked timestamps.
    """
    grid = np.unique(np.concatenate([s.timestamps for s in series]))
    matrix = np.full((len(grid), len(series)), np.nan)
    for j, s in enumerate(series):
        matrix[np.searchsorted(grid, s.timestamps), j] = s.values
    bad = grid[common_dips(matrix, share=DIP_SHARE, ratio=DIP_RATIO)]
    values = 0
    for s in series:
        hit = np.isin(s.timestamps, bad) & np.isfinite(s.values)
        if hit.any():
            s.values = np.where(hit, np.nan, s.values)
            values += int(hit.sum())
    stamps = [str(t) for t in bad]
    log.info("electricity: %s: masked %d step(s) where >= %d%% of series read < %g x both neighbours (%s): %d "
             "values, interpolated where the gap is <= --max-gap", where, len(stamps), round(100 * DIP_SHARE),
             DIP_RATIO, ", ".join(stamps[:5]) or "none", values)
    return stamps


def _positive(**values: int | None) -> None:
    for name, value in values.items():
        if value is not None and int(value) < 1:
            raise ValueError(f"{name}: must be >= 1, got {value}")


class ElectricityBuild:
    """Reads a source once, resolves the options, then yields task records lazily (:meth:`tasks`)."""

    def __init__(self, options: ElectricityOptions) -> None:
        o = options
        self.source = Path(o.source)
        self.layout = o.layout or detect_layout(self.source, o.sep)
        if self.layout not in LAYOUTS:
            raise ValueError(f"layout: expected one of {list(LAYOUTS)}, got {self.layout!r}")
        if o.scale_method not in SCALE_METHODS:
            raise ValueError(f"scale_method: expected one of {list(SCALE_METHODS)}, got {o.scale_method!r}")
        self.series, freq, self.test_start = read_source(
            self.source, self.layout, frequency_s=_parse_frequency(o.frequency), timestamp_column=o.timestamp_column,
            id_column=o.id_column, value_column=o.value_column, sep=o.sep, decimal=o.decimal)
        self.frequency_s = float(freq)
        given = {"window": o.window, "horizon": o.horizon, "stride": o.stride, "support_windows": o.support_windows,
                 "query_windows": o.query_windows}
        self.opts = {k: (v if v is not None else d) for (k, v), d in zip(given.items(),
                                                                         _defaults(self.layout, freq).values())}
        _positive(**self.opts, max_tasks_per_split=o.max_tasks_per_split, episode_stride=o.episode_stride,
                  max_episodes_per_series=o.max_episodes_per_series, history_episodes=o.history_episodes)
        if o.max_gap < 0:
            raise ValueError(f"max_gap: must be >= 0, got {o.max_gap}")
        self.covariates = tuple(default_covariates(self.frequency_s)) if o.covariates else ()
        self.max_gap, self.scale_method = o.max_gap, o.scale_method
        self.episode_stride, self.max_episodes = o.episode_stride, o.max_episodes_per_series
        self.max_tasks_per_split = o.max_tasks_per_split
        self.mask_dst = self.layout == "uci" if o.mask_dst is None else bool(o.mask_dst)
        masked = mask_common_dips(self.series, str(self.source)) if self.mask_dst else []
        self.history_episodes = self._resolve_history_episodes(o.history_episodes)
        self.splits = assign_splits([s.id for s in self.series], val_fraction=o.val_fraction,
                                    test_fraction=o.test_fraction, seed=o.seed, val_ids=o.val_series,
                                    test_ids=o.test_series)
        self.settings = {"layout": self.layout, "source": str(self.source), **self.opts,
                         "episode_stride": o.episode_stride, "max_episodes_per_series": o.max_episodes_per_series,
                         "val_fraction": o.val_fraction, "test_fraction": o.test_fraction, "seed": o.seed,
                         "max_gap": o.max_gap, "max_tasks_per_split": o.max_tasks_per_split,
                         "series_per_split": {s: sum(v == s for v in self.splits.values()) for s in SPLITS},
                         "mask_dst": self.mask_dst, "dst_masked_steps": len(masked), "dst_masked_at": masked[:20],
                         "history_episodes": o.history_episodes}
        if self.layout == "uci":
            self.settings["history_episodes_per_client"] = self.history_episodes
        self.stats = {"tasks": dict.fromkeys(SPLITS, 0), "dropped_series": 0, "missing_steps": 0,
                      "dst_masked_steps": len(masked), "extra_train_tasks": 0}
        self.extra_plan: list[tuple[Series, list[int]]] = []
        if o.extra_train_source is not None:
            self.settings["extra_train"] = self._plan_extra(Path(o.extra_train_source), o.extra_train_layout,
                                                            o.extra_episode_stride, o.extra_max_tasks, o.sep)

    def _resolve_history_episodes(self, wanted: int | None) -> int:
        """Episodes per UCI train/val client: ``wanted`` (default 1), cut to what the history holds."""
        if self.layout != "uci":
            if wanted is not None:
                raise ValueError(f"history_episodes: only for the uci layout (got {self.layout!r}; its episodes "
                                 f"are set by --episode-stride / --max-episodes-per-series)")
            return 1
        self._check_uci()
        fits = uci_history_episodes(self.test_start, **{k: self.opts[k] for k in ("window", "horizon",
                                                                                   "query_windows")})
        if wanted is not None and wanted > fits:
            log.warning("electricity: --history-episodes %d: the %d-step history holds only %d (window %d, horizon "
                        "%d, query_windows %d); building %d per train/val client", wanted, self.test_start, fits,
                        self.opts["window"], self.opts["horizon"], self.opts["query_windows"], fits)
        return min(wanted or 1, fits)

    def _check_uci(self) -> None:
        o, test_len = self.opts, len(self.series[0].values) - self.test_start
        if o["window"] > self.test_start:
            raise ValueError(f"window: {o['window']} steps exceed the {self.test_start} h of UCI history")
        if test_len // o["horizon"] < 1:
            raise ValueError(f"horizon: {o['horizon']} exceeds the {test_len} h test week")
        need = o["window"] + o["horizon"] * (o["query_windows"] + 1)
        if need > self.test_start:
            raise ValueError(f"window/horizon/query_windows: train clients need window + horizon x (query_windows + "
                             f"1) = {need} h of history for one support window, the UCI history has {self.test_start}")

    def _plan_extra(self, source: Path, layout: str | None, stride: int | None, max_tasks: int, sep: str) -> dict:
        """Read an extra training source and choose its episodes: all its series are train-only.

        Why: the UCI history is one week, so its train queries can only be its last days (Fri-Sun), while the
        test week is Mon-Sun; a longer source (GEFCom2012: 4.5 years of 20 zones) adds training episodes on
        every weekday. Episodes use the main source's window, horizon, stride, support and query windows and
        covariates (the same input width); ``stride`` steps apart (default 5 days, so query weekdays rotate),
        each series' latest ``ceil(max_tasks / series)``, at most ``max_tasks`` in all.
        """
        layout = layout or detect_layout(source, sep)
        if layout not in EXTRA_LAYOUTS:
            raise ValueError(f"extra_train_layout: expected one of {list(EXTRA_LAYOUTS)}, got {layout!r} "
                             f"({source})")
        _positive(extra_episode_stride=stride, extra_max_tasks=max_tasks)
        series, freq, _ = read_source(source, layout, sep=sep)
        if freq != self.frequency_s:
            raise ValueError(f"extra_train_source: {source} has frequency {_format_frequency(freq)}, the main source "
                             f"{self.source} has {_format_frequency(self.frequency_s)}; they must match")
        masked = mask_common_dips(series, str(source)) if self.mask_dst else []
        step = stride or max(1, round(EXTRA_STRIDE_DAYS * 86400 / freq))
        quota, left = -(-max_tasks // len(series)), max_tasks
        for s in series:
            starts = self._episode_starts(interpolate_gaps(s.values, self.max_gap), step, quota)[-left:]
            if starts:
                self.extra_plan.append((Series(f"{layout}:{s.id}", s.timestamps, s.values), starts))
                left -= len(starts)
            if left <= 0:
                break
        tasks = max_tasks - left
        log.info("electricity: extra training source %s (%s): %d series, %d tasks (episode stride %d steps, cap %d)",
                 source, layout, len(series), tasks, step, max_tasks)
        return {"source": str(source), "layout": layout, "series": len(series), "tasks": tasks,
                "episode_stride": step, "max_tasks": max_tasks, "id_prefix": f"{layout}:",
                "dst_masked_steps": len(masked)}

    @property
    def features(self) -> dict[str, Any]:
        return {"input_size": 1 + len(self.covariates), "horizon": self.opts["horizon"],
                "window": self.opts["window"], "covariates": list(self.covariates),
                "inputs": ["value", *self.covariates],
                "frequency": _format_frequency(self.frequency_s), "frequency_seconds": self.frequency_s,
                "support_windows": self.opts["support_windows"],
                "query_windows": self.opts["query_windows"], "stride": self.opts["stride"]}

    @property
    def normalisation(self) -> dict[str, Any]:
        return {"method": self.scale_method, "per": "task", "columns": ["offset", "scale"], "max_gap": self.max_gap,
                "scaled": "x[..., 0] and y are (value - offset) / scale; covariates x[..., 1:] are unscaled",
                "fit_on": "the task's history before its first query target (never the query targets)",
                "missing": f"interior gaps of <= {self.max_gap} steps interpolated linearly; no window spans a "
                           f"remaining gap"}

    # -- task generation

    def _cov(self, s: Series) -> np.ndarray | None:
        return calendar_covariates(s.timestamps, self.covariates) if self.covariates else None

    def _record(self, s: Series, split: str, first_query: int, sx, sy, qx, qy, offset: float, scale: float) -> dict:
        stamp = str(s.timestamps[first_query])
        return {"task_id": f"{s.id}@{stamp}", "entity": s.id, "split": split, "support_x": sx, "support_y": sy,
                "query_x": qx, "query_y": qy, "offset": offset, "scale": scale, "forecast_start": stamp}

    def _uci_tasks(self, s: Series, split: str) -> Iterator[dict]:
        """Test clients: one task, the test week. Train/val clients: ``history_episodes`` tasks whose queries
        are the last blocks of ``query_windows`` forecasts of the history, latest first (never the test week)."""
        h, q_count = self.opts["horizon"], self.opts["query_windows"]
        values = interpolate_gaps(s.values, self.max_gap)
        if split == "test":
            q_count = (len(values) - self.test_start) // h
            bounds = [(self.test_start, self.test_start + q_count * h)]
        else:
            bounds = [(self.test_start - (k + 1) * q_count * h, self.test_start - k * q_count * h)
                      for k in range(self.history_episodes)]
        if not np.isfinite(values[: bounds[0][1]]).all():
            self.stats["dropped_series"] += 1
            log.warning("electricity: %s dropped: missing values left after interpolating gaps of <= %d steps",
                        s.id, self.max_gap)
            return
        cov = self._cov(s)
        for k, (cutoff, q_end) in enumerate(bounds):
            task = self._uci_task(s, split, values, cov, cutoff, q_end, q_count)
            if task is None:
                self.stats["dropped_series"] += int(k == 0)
                return
            yield task

    def _uci_task(self, s: Series, split: str, values: np.ndarray, cov: np.ndarray | None, cutoff: int,
                  q_end: int, q_count: int) -> dict | None:
        """One task: queries end at ``q_end``, support targets end by ``cutoff``; scaled on ``values[:cutoff]``."""
        o, h = self.opts, self.opts["horizon"]
        if cutoff < o["window"] + h:
            return None
        offset, scale = series_scale(values[:cutoff], self.scale_method)
        sx, sy = make_windows(values, cov, o["window"], h, o["stride"], offset=offset, scale=scale, end=cutoff,
                              count=o["support_windows"])
        qx, qy = make_windows(values, cov, o["window"], h, h, offset=offset, scale=scale, end=q_end, count=q_count)
        if not sx or len(qx) != q_count:
            return None
        return self._record(s, split, cutoff, sx, sy, qx, qy, offset, scale)

    def _episode_span(self) -> tuple[int, int]:
        """``(first query step, episode length)`` relative to an episode's start."""
        o = self.opts
        cutoff_rel = (o["support_windows"] - 1) * o["stride"] + o["window"] + o["horizon"]
        return cutoff_rel, cutoff_rel + o["query_windows"] * o["horizon"]

    def _episode_starts(self, values: np.ndarray, step: int, keep: int | None) -> list[int]:
        """Episode starts ``step`` apart within each gap-free stretch; the latest ``keep`` if given."""
        span = self._episode_span()[1]
        starts = [e for a, b in finite_runs(values) for e in range(a, b - span + 1, step)]
        return starts[-keep:] if keep is not None else starts

    def _episode_tasks(self, s: Series, split: str, starts: list[int] | None = None) -> Iterator[dict]:
        """Episodes of a series (``starts`` planned already, or from --episode-stride / --max-episodes)."""
        o, h = self.opts, self.opts["horizon"]
        cutoff_rel, span = self._episode_span()
        values = interpolate_gaps(s.values, self.max_gap)
        if starts is None:
            self.stats["missing_steps"] += int((~np.isfinite(values)).sum())
            starts = self._episode_starts(values, self.episode_stride or span, self.max_episodes)
        if not starts:
            self.stats["dropped_series"] += 1
            log.warning("electricity: %s has no gap-free stretch of %d steps; no tasks", s.id, span)
            return
        cov = self._cov(s)
        for a in starts:
            cutoff, q_end = a + cutoff_rel, a + span
            offset, scale = series_scale(values[a:cutoff], self.scale_method)
            sx, sy = make_windows(values, cov, o["window"], h, o["stride"], offset=offset, scale=scale, end=cutoff,
                                  count=o["support_windows"])
            qx, qy = make_windows(values, cov, o["window"], h, h, offset=offset, scale=scale, end=q_end,
                                  count=o["query_windows"])
            yield self._record(s, split, cutoff, sx, sy, qx, qy, offset, scale)

    def _extra_tasks(self) -> Iterator[dict]:
        """The extra training source's planned episodes (train split only; not capped by --max-tasks-per-split)."""
        for s, starts in self.extra_plan:
            for task in self._episode_tasks(s, "train", starts):
                self.stats["tasks"]["train"] += 1
                self.stats["extra_train_tasks"] += 1
                yield task
        if self.extra_plan:
            log.info("electricity: extra training source: %d tasks", self.stats["extra_train_tasks"])

    def tasks(self) -> Iterator[dict]:
        """Task records, series by series (sorted ids as read), then any extra training source; logs progress."""
        limit = self.max_tasks_per_split
        per_series = self._uci_tasks if self.layout == "uci" else self._episode_tasks
        for k, s in enumerate(self.series):
            split = self.splits[s.id]
            if limit is not None and self.stats["tasks"][split] >= limit:
                if all(n >= limit for sp, n in self.stats["tasks"].items() if sp in self.splits.values()):
                    break
                continue
            for task in per_series(s, split):
                if limit is not None and self.stats["tasks"][split] >= limit:
                    break
                self.stats["tasks"][split] += 1
                yield task
            if (k + 1) % max(1, len(self.series) // 10) == 0 or k + 1 == len(self.series):
                log.info("electricity: %d/%d series, tasks %s", k + 1, len(self.series), self.stats["tasks"])
        yield from self._extra_tasks()


def uci_history_episodes(history: int, *, window: int, horizon: int, query_windows: int) -> int:
    """How many train/val episodes a UCI history of ``history`` steps holds: query blocks of ``query_windows``
    forecasts, stepped back a block at a time from the history's end, while one support window (``window +
    horizon`` steps) still fits before the block. UCI (168 h) at 72 / 24 / 1: 3 (queries Fri, Sat, Sun)."""
    block = query_windows * horizon
    return max(0, (history - block - window - horizon) // block + 1)


# --------------------------------------------------------------------------------------------- CLI


def add_options(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("electricity")
    g.add_argument("--source", required=True, help="UCI or GEFCom folder, or a CSV file (.csv, .csv.gz, .zip)")
    g.add_argument("--layout", choices=LAYOUTS, help="source layout (default: detected from the files)")
    g.add_argument("--window", type=int, help="input steps L (default: a week of steps; UCI 72)")
    g.add_argument("--horizon", type=int, help="forecast steps H (default: a day of steps)")
    g.add_argument("--stride", type=int, help="steps between support windows (default: a day; UCI 12)")
    g.add_argument("--support-windows", type=int, help="support windows per task (default 8; UCI 5)")
    g.add_argument("--query-windows", type=int,
                   help="consecutive H-step query forecasts per task (default 7; UCI train/val clients 1, "
                        "UCI test clients always the whole test week)")
    g.add_argument("--episode-stride", type=int, help="steps between a series' episodes (default: non-overlapping)")
    g.add_argument("--max-episodes-per-series", type=int, help="keep only each series' latest N episodes")
    g.add_argument("--no-covariates", dest="covariates", action="store_false",
                   help="values only (F = 1) instead of value + calendar sin/cos covariates")
    g.add_argument("--val-fraction", type=float, help="share of series held out for validation")
    g.add_argument("--test-fraction", type=float, help="share of series held out for testing")
    g.add_argument("--val-series", type=_ids,
                   help="comma-separated series ids for validation (overrides the fractions)")
    g.add_argument("--test-series", type=_ids, help="comma-separated series ids for testing (overrides the fractions)")
    g.add_argument("--seed", type=int, help="seed of the series-id hash that picks held-out series")
    g.add_argument("--max-gap", type=int, help="interpolate interior gaps up to this many steps")
    g.add_argument("--scale", dest="scale_method", choices=SCALE_METHODS,
                   help="per-task scaling: mean (offset 0, scale mean|v|) or standard (mean, std)")
    g.add_argument("--frequency", help="series step, e.g. 1h, 30min (default: inferred)")
    g.add_argument("--timestamp-column", help="CSV timestamp column (default: detected)")
    g.add_argument("--id-column", help="long CSV series-id column (default: detected)")
    g.add_argument("--value-column", help="long CSV value column (default: detected)")
    g.add_argument("--sep", help="CSV field separator")
    g.add_argument("--decimal", help="CSV decimal mark")
    g.add_argument("--max-tasks-per-split", type=int, help="stop after N tasks per split (quick small stores)")
    _add_history_options(parser)


def _add_history_options(parser: argparse.ArgumentParser) -> None:
    """Options against the UCI history's single Sunday/daylight-saving training query (all opt-in but the mask)."""
    g = parser.add_argument_group("electricity: training episodes")
    g.add_argument("--keep-dst-artefact", dest="mask_dst", action="store_false",
                   help="keep steps where >= 95%% of series read < 0.5 x both neighbours at once (UCI: the "
                        "2014-03-30 01:00 clock change) instead of masking them as gaps for --max-gap to fill "
                        "(masking is the default for --layout uci only)")
    g.add_argument("--mask-dst-artefact", dest="mask_dst", action="store_true",
                   help="mask such steps for any layout")
    g.add_argument("--history-episodes", type=int, metavar="N",
                   help="uci only: up to N tasks per train/val client instead of 1, queries = the last N blocks of "
                        "--query-windows forecasts of the history (days at the defaults), latest first, each "
                        "with the support windows that end before it (at most --support-windows, at least 1) "
                        "and its own scaling; at --window 72 --horizon 24 --stride 12 the 168 h history holds "
                        "3 (queries Fri 03-28, Sat 03-29, Sun 03-30 with 1, 3, 5 support windows); test "
                        "clients are unchanged")
    g.add_argument("--extra-train-source", metavar="PATH",
                   help="a GEFCom or CSV source whose series ALL become extra training tasks (never val/test), "
                        "at the main source's window, horizon, stride, support/query windows and covariates; "
                        "ids prefixed with its layout, e.g. gefcom:zone_1@...; same frequency required")
    g.add_argument("--extra-train-layout", choices=EXTRA_LAYOUTS,
                   help="layout of --extra-train-source (default: detected)")
    g.add_argument("--extra-episode-stride", type=int, metavar="STEPS",
                   help=f"steps between the extra source's episodes (default {EXTRA_STRIDE_DAYS} days of steps, "
                        f"so query weekdays rotate)")
    g.add_argument("--extra-max-tasks", type=int, metavar="N",
                   help="at most N extra training tasks, each series' latest ceil(N / series) episodes "
                        "(--max-tasks-per-split does not cap them)")


def _ids(text: str) -> list[str]:
    """``--val-series a,b`` → ``["a", "b"]``."""
    return [t.strip() for t in text.split(",") if t.strip()]


def build(options: ElectricityOptions, out: str, *, overwrite: bool = False,
          rows_per_group: int | None = None) -> dict:
    """Read the source, write the store to ``out`` and return its manifest."""
    from pipeline.tasks.store import write_store

    b = ElectricityBuild(options)
    log.info("electricity: %s layout, %d series (%s), frequency %s", b.layout, len(b.series),
             b.settings["series_per_split"], b.features["frequency"])
    limits = {"max_x_len": b.opts["window"], "max_y_len": b.opts["horizon"]}
    manifest = write_store(out, b.tasks(), family="electricity", model_kind="forecaster", features=b.features,
                           limits=limits, normalisation=b.normalisation, builder={"name": "electricity", **b.settings},
                           overwrite=overwrite, rows_per_group=rows_per_group)
    log.info("electricity: wrote %s (%s); %s", out, b.stats["tasks"], b.stats)
    return manifest
