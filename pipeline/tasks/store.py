"""The task store: one family's tasks as Parquet part files plus a manifest, read with pyarrow or Ray Data.

A store at ``URI`` (any fsspec URL: a local path, ``memory://``, ``s3://`` when s3fs is installed)::

    URI/manifest.json                  its presence means the build finished (stores are published whole)
    URI/<split>/part-00000.parquet     one row per task, row groups of ``rows_per_group`` tasks

Every task is validated on the way in (dtypes, NaN/inf, empty sets, length limits), and every read checks
again that float values are finite (a store edited after its build is refused); ``verify_store`` checks the
files still match the manifest. Builds are staged and published whole (``pipeline.tasks.staging``).
docs/taskstore.md has the format.

``memory://`` stores live in one process: Ray workers cannot see them, so ``read_dataset`` reads those in
the driver and hands Ray the Arrow tables (fine for tests and demos; use a path or s3:// for real runs).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import posixpath
import re
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import PurePath
from typing import TYPE_CHECKING, Any

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline.tasks import staging
from pipeline.tasks.builders import BUILDERS

if TYPE_CHECKING:  # Ray is imported only by the functions that need it
    import ray.data

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
FAMILIES = tuple(BUILDERS)  # a store's family names the builder that wrote it
# the model kind of stores written before manifests named it (``model_kind``): all a family's stores had one
# kind, except synthetic, whose layout decides (see store_model_kind)
_LEGACY_MODEL_KINDS = {"electricity": "forecaster", "ptb-char": "char_lm", "mt-en-de": "seq2seq"}
SPLITS = ("train", "val", "test")
MANIFEST = "manifest.json"
KEY_COLUMNS = ("task_id", "family", "entity", "split")
SEQUENCE_COLUMNS = ("support_x", "support_y", "query_x", "query_y")
DEFAULT_LIMITS = {"max_seq_len": 4096, "max_support": 4096, "max_query": 4096}
LIMIT_KEYS = ("max_seq_len", "max_x_len", "max_y_len", "max_support", "max_query")
MATERIALIZE_BYTES = 256 * 2**20  # read_dataset keeps splits up to this size in the object store
DEFAULT_ROWS_PER_GROUP = 256
_PUBLISH_TRIES = 8  # publish attempts while concurrent builds keep replacing the target
GROUPS_PER_FILE = 16  # row groups per part file: several files per split let Ray Data read in parallel
_INT32 = np.iinfo(np.int32)
_PART = re.compile(r"(train|val|test)/part-\d{5,}\.parquet")
_SCALAR_TYPES = {"string": pa.string(), "float64": pa.float64(), "int64": pa.int64(), "bool": pa.bool_()}
_LEAF_TYPES = {"float32": pa.float32(), "int32": pa.int32()}


class TaskStoreError(ValueError):
    """A task, manifest or part file is not what the format allows; the message names the field or file."""

    def __init__(self, message: str, *, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field

    def __reduce__(self) -> tuple:  # keep ``field`` when Ray ships the error from a worker
        return (_store_error, (str(self), self.field))


def _store_error(message: str, field: str | None) -> TaskStoreError:
    return TaskStoreError(message, field=field)


# --------------------------------------------------------------------------------------------- paths


def _fs(uri: str) -> tuple[fsspec.AbstractFileSystem, str]:
    if not isinstance(uri, (str, PurePath)) or not str(uri):
        raise TaskStoreError(f"uri: expected a non-empty path or URL, got {uri!r}", field="uri")
    fs, root = fsspec.core.url_to_fs(str(uri))
    return fs, root.rstrip("/") or "/"


def _join(root: str, *parts: str) -> str:
    return posixpath.join(root, *parts)


def _process_local(fs: fsspec.AbstractFileSystem) -> bool:
    """True for filesystems other processes (Ray workers) cannot see."""
    protocols = (fs.protocol,) if isinstance(fs.protocol, str) else tuple(fs.protocol)
    return "memory" in protocols


# --------------------------------------------------------------------------------------------- schema


@dataclass
class _SeqSpec:
    """How one sequence column is stored: ``ndim`` dims per sequence, leaf dtype, feature width if 2-D."""

    dtype: str  # float32 | int32
    ndim: int  # 1: [L] tokens or [H] targets; 2: [L, F] steps
    width: int | None = None  # F when ndim == 2

    def arrow_type(self) -> pa.DataType:
        t = _LEAF_TYPES[self.dtype]
        for _ in range(self.ndim + 1):  # one list level per sequence dim, plus the list of sequences
            t = pa.list_(t)
        return t

    def to_json(self) -> dict:
        return {"dtype": self.dtype, "ndim": self.ndim, "width": self.width}


def _schema_from_manifest(schema: Mapping[str, Any], where: str) -> tuple[dict[str, _SeqSpec], dict[str, str]]:
    try:
        seqs = {k: _SeqSpec(v["dtype"], int(v["ndim"]), v.get("width")) for k, v in schema["sequences"].items()}
        extras = dict(schema["extras"])
    except (KeyError, TypeError, AttributeError) as e:
        raise TaskStoreError(f"{where}: schema: malformed ({e!r})", field="schema") from e
    if set(seqs) != set(SEQUENCE_COLUMNS) or any(s.dtype not in _LEAF_TYPES or s.ndim not in (1, 2)
                                                 for s in seqs.values()):
        raise TaskStoreError(f"{where}: schema.sequences: expected {SEQUENCE_COLUMNS} with dtype float32|int32 "
                             f"and ndim 1|2, got {schema['sequences']}", field="schema")
    bad = {k: v for k, v in extras.items() if v not in _SCALAR_TYPES}
    if bad:
        raise TaskStoreError(f"{where}: schema.extras: unknown types {bad}", field="schema")
    return seqs, extras


def _arrow_schema(seqs: Mapping[str, _SeqSpec], extras: Mapping[str, str]) -> pa.Schema:
    fields = [pa.field(c, pa.string(), nullable=False) for c in KEY_COLUMNS]
    fields += [pa.field(c, seqs[c].arrow_type(), nullable=False) for c in SEQUENCE_COLUMNS]
    fields += [pa.field(c, _SCALAR_TYPES[t], nullable=False) for c, t in extras.items()]
    return pa.schema(fields)


# --------------------------------------------------------------------------------------------- validation


def _check_limits(limits: Mapping[str, Any] | None) -> dict[str, int]:
    out = dict(DEFAULT_LIMITS)
    for k, v in (limits or {}).items():
        if k not in LIMIT_KEYS:
            raise TaskStoreError(f"limits.{k}: unknown limit; expected one of {', '.join(LIMIT_KEYS)}",
                                 field=f"limits.{k}")
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
            raise TaskStoreError(f"limits.{k}: expected a positive integer, got {v!r}", field=f"limits.{k}")
        out[k] = int(v)
    return out


def _seq_limit(limits: Mapping[str, int], column: str) -> int:
    side = "max_x_len" if column.endswith("_x") else "max_y_len"
    return limits.get(side, limits["max_seq_len"])


def _sequences(value: Any, where: str, column: str, limits: Mapping[str, int],
               spec: _SeqSpec | None) -> tuple[list[np.ndarray], _SeqSpec]:
    """One task's list of sequences for ``column``, as float32/int32 arrays, checked against ``spec``."""
    f = f"{where}: {column}"
    if isinstance(value, (str, bytes)) or not hasattr(value, "__len__"):
        raise TaskStoreError(f"{f}: expected a list of arrays, got {type(value).__name__}", field=column)
    if len(value) == 0:
        raise TaskStoreError(f"{f}: is empty (a task needs at least one support and one query sequence)",
                             field=column)
    cap = limits["max_support" if column.startswith("support") else "max_query"]
    if len(value) > cap:
        key = "max_support" if column.startswith("support") else "max_query"
        raise TaskStoreError(f"{f}: {len(value)} sequences exceed limits.{key} = {cap}", field=column)
    max_len = _seq_limit(limits, column)
    out = []
    for j, s in enumerate(value):
        a = np.asarray(s)
        if a.dtype.kind == "f":
            dtype = "float32"
        elif a.dtype.kind in "iu":
            dtype = "int32"
            if a.size and (a.min() < _INT32.min or a.max() > _INT32.max):
                raise TaskStoreError(f"{f}[{j}]: integer values outside the int32 range", field=column)
        else:
            raise TaskStoreError(f"{f}[{j}]: dtype {a.dtype} not allowed; expected floats or integer token ids",
                                 field=column)
        if a.ndim not in (1, 2):
            raise TaskStoreError(f"{f}[{j}]: expected shape [L] or [L, F], got {list(a.shape)}", field=column)
        if a.shape[0] == 0 or (a.ndim == 2 and a.shape[1] == 0):
            raise TaskStoreError(f"{f}[{j}]: empty sequence (shape {list(a.shape)})", field=column)
        if a.shape[0] > max_len:
            key = "max_x_len" if "max_x_len" in limits and column.endswith("_x") else (
                "max_y_len" if "max_y_len" in limits and column.endswith("_y") else "max_seq_len")
            raise TaskStoreError(f"{f}[{j}]: length {a.shape[0]} exceeds limits.{key} = {max_len}", field=column)
        a = np.ascontiguousarray(a, dtype=np.float32 if dtype == "float32" else np.int32)
        if dtype == "float32" and not np.isfinite(a).all():
            raise TaskStoreError(f"{f}[{j}]: contains NaN or inf", field=column)
        width = a.shape[1] if a.ndim == 2 else None
        if spec is None:
            spec = _SeqSpec(dtype, a.ndim, width)
        elif (dtype, a.ndim, width) != (spec.dtype, spec.ndim, spec.width):
            got = f"{dtype} {list(a.shape)}"
            want = f"{spec.dtype} [L]" if spec.ndim == 1 else f"{spec.dtype} [L, {spec.width}]"
            raise TaskStoreError(f"{f}[{j}]: got {got}, but the store's {column} is {want} (set by the first task)",
                                 field=column)
        out.append(a)
    return out, spec


def _scalar_type(value: Any) -> str | None:
    if isinstance(value, (bool, np.bool_)):
        return "bool"
    if isinstance(value, (int, np.integer)):
        return "int64"
    if isinstance(value, (float, np.floating)):
        return "float64"
    if isinstance(value, str):
        return "string"
    return None


class _Validator:
    """Checks tasks one by one; the first task fixes the store's column dtypes/shapes and extra columns."""

    def __init__(self, family: str, limits: Mapping[str, int]) -> None:
        self.family, self.limits = family, limits
        self.seqs: dict[str, _SeqSpec] = {}
        self.extras: dict[str, str] | None = None
        self.ids: set[str] = set()

    def __call__(self, task: Any, index: int) -> dict:
        where = f"task #{index}"
        if not isinstance(task, Mapping):
            raise TaskStoreError(f"{where}: expected a dict, got {type(task).__name__}", field="task")
        for key in ("task_id", "entity", "split"):
            if key not in task:
                raise TaskStoreError(f"{where}: missing required field {key!r}", field=key)
            if not isinstance(task[key], str) or not task[key]:
                raise TaskStoreError(f"{where}: {key}: expected a non-empty string, got {task[key]!r}", field=key)
        tid = task["task_id"]
        where = f"task #{index} ({tid!r})"
        if tid in self.ids:
            raise TaskStoreError(f"{where}: task_id: duplicate (task ids must be unique in a store)", field="task_id")
        if task["split"] not in SPLITS:
            raise TaskStoreError(f"{where}: split: expected one of {', '.join(SPLITS)}, got {task['split']!r}",
                                 field="split")
        if task.get("family", self.family) != self.family:
            raise TaskStoreError(f"{where}: family: {task['family']!r} but the store's family is {self.family!r}",
                                 field="family")
        row: dict[str, Any] = {"task_id": tid, "family": self.family, "entity": task["entity"],
                               "split": task["split"]}
        for column in SEQUENCE_COLUMNS:
            if column not in task:
                raise TaskStoreError(f"{where}: missing required field {column!r}", field=column)
            row[column], self.seqs[column] = _sequences(task[column], where, column, self.limits,
                                                        self.seqs.get(column))
        for side in ("support", "query"):
            nx, ny = len(row[f"{side}_x"]), len(row[f"{side}_y"])
            if nx != ny:
                raise TaskStoreError(f"{where}: {side}_y: {ny} sequences but {side}_x has {nx}", field=f"{side}_y")
        extras = {}
        for key, value in task.items():
            if key in KEY_COLUMNS or key in SEQUENCE_COLUMNS:
                continue
            if not isinstance(key, str) or not key.isidentifier():
                raise TaskStoreError(f"{where}: extra column {key!r}: names must be identifiers", field=str(key))
            kind = _scalar_type(value)
            if kind is None:
                raise TaskStoreError(f"{where}: {key}: extra columns must be scalars (str, int, float, bool), "
                                     f"got {type(value).__name__}", field=key)
            if kind == "float64" and not np.isfinite(value):
                raise TaskStoreError(f"{where}: {key}: contains NaN or inf", field=key)
            extras[key] = kind
            row[key] = value.item() if isinstance(value, np.generic) else value
        if self.extras is None:
            self.extras = extras
        elif extras != self.extras:
            want = ", ".join(f"{k}: {v}" for k, v in self.extras.items()) or "none"
            got = ", ".join(f"{k}: {v}" for k, v in extras.items()) or "none"
            diff = sorted(set(extras.items()) ^ set(self.extras.items()))
            raise TaskStoreError(f"{where}: extra columns {{{got}}} differ from the first task's {{{want}}}",
                                 field=diff[0][0])
        self.ids.add(tid)
        return row


# --------------------------------------------------------------------------------------------- arrow <-> tasks


def _offsets(lengths: list[int], where: str) -> pa.Array:
    off = np.zeros(len(lengths) + 1, np.int64)
    off[1:] = np.cumsum(lengths)
    if off[-1] > _INT32.max:
        raise TaskStoreError(f"{where}: a row group holds over 2^31 values; lower rows_per_group", field=where)
    return pa.array(off.astype(np.int32))


def _list_column(rows: list[list[np.ndarray]], spec: _SeqSpec, column: str) -> pa.Array:
    """``rows`` (each a task's sequences) as ``list<list<leaf>>`` or ``list<list<list<leaf>>>`` built from offsets."""
    flat = [a for seqs in rows for a in seqs]
    leaves = pa.array(np.concatenate([a.reshape(-1) for a in flat]), _LEAF_TYPES[spec.dtype])
    if spec.ndim == 2:
        steps = sum(a.shape[0] for a in flat)
        leaves = pa.ListArray.from_arrays(_offsets([spec.width] * steps, column), leaves)
    seqs = pa.ListArray.from_arrays(_offsets([a.shape[0] for a in flat], column), leaves)
    return pa.ListArray.from_arrays(_offsets([len(s) for s in rows], column), seqs)


def _rows_to_table(rows: list[dict], schema: pa.Schema, seqs: Mapping[str, _SeqSpec]) -> pa.Table:
    arrays = []
    for f in schema:
        if f.name in seqs:
            arrays.append(_list_column([r[f.name] for r in rows], seqs[f.name], f.name))
        else:
            arrays.append(pa.array([r[f.name] for r in rows], f.type))
    return pa.Table.from_arrays(arrays, schema=schema)


def _column_sequences(column: pa.ChunkedArray | pa.Array, name: str) -> list[list[np.ndarray]]:
    """Inverse of ``_list_column``: each row's list of numpy arrays (views into one writable buffer)."""
    arr = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    levels = []  # offset arrays, outermost first
    node = arr
    while pa.types.is_list(node.type) or pa.types.is_large_list(node.type):
        if node.null_count:
            raise TaskStoreError(f"{name}: contains nulls", field=name)
        levels.append(node.offsets.to_numpy())
        node = node.values
    if len(levels) not in (2, 3) or node.type not in (pa.float32(), pa.int32()):
        raise TaskStoreError(f"{name}: expected a list of [L] or [L, F] float32/int32 sequences, got type "
                             f"{arr.type}", field=name)
    if node.null_count:
        raise TaskStoreError(f"{name}: contains nulls", field=name)
    leaves = np.array(node.to_numpy(zero_copy_only=False))  # one copy, so callers get writable arrays
    rows, seqs = levels[0], levels[1]
    steps = levels[2] if len(levels) == 3 else None
    out = []
    for r in range(len(arr)):
        row = []
        for j in range(rows[r], rows[r + 1]):
            a, b = seqs[j], seqs[j + 1]
            if steps is None:
                row.append(leaves[a:b])
            else:
                row.append(leaves[steps[a]:steps[b]].reshape(b - a, -1))
        out.append(row)
    return out


def table_to_tasks(table: pa.Table) -> list[dict]:
    """Task dicts from a store table (or a Ray Data ``pyarrow`` batch): arrays for sequences, scalars otherwise."""
    missing = [c for c in (*KEY_COLUMNS, *SEQUENCE_COLUMNS) if c not in table.column_names]
    if missing:
        raise TaskStoreError(f"table: missing columns {missing}", field=missing[0])
    columns: dict[str, list] = {}
    for name in table.column_names:
        if name in SEQUENCE_COLUMNS:
            columns[name] = _column_sequences(table.column(name), name)
        else:
            columns[name] = table.column(name).to_pylist()
    return [{name: values[i] for name, values in columns.items()} for i in range(table.num_rows)]


# --------------------------------------------------------------------------------------------- writing


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, PurePath):
        return str(value)
    if isinstance(value, (set, tuple)):
        return list(value)
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def _jsonable(value: Any, name: str) -> Any:
    if value is not None and not isinstance(value, Mapping):
        raise TaskStoreError(f"{name}: expected a dict, got {type(value).__name__}", field=name)
    try:
        return json.loads(json.dumps(value, default=_json_default, allow_nan=False))
    except (TypeError, ValueError) as e:
        raise TaskStoreError(f"{name}: not JSON serialisable ({e})", field=name) from e


class _SplitWriter:
    """Streams one split's rows into part files of ``GROUPS_PER_FILE`` row groups."""

    def __init__(self, fs, root: str, split: str, schema: pa.Schema, seqs, rows_per_group: int) -> None:
        self.fs, self.root, self.split, self.schema, self.seqs = fs, root, split, schema, seqs
        self.rows_per_group = rows_per_group
        self.buffer: list[dict] = []
        self.files: list[dict] = []  # {"path": relative path, "split", "rows"}
        self._writer: pq.ParquetWriter | None = None
        self._handle = None
        self._groups = 0
        fs.makedirs(_join(root, split), exist_ok=True)

    def add(self, row: dict) -> None:
        self.buffer.append(row)
        if len(self.buffer) >= self.rows_per_group:
            self._flush()

    def _flush(self) -> None:
        if not self.buffer:
            return
        if self._writer is None or self._groups >= GROUPS_PER_FILE:
            self._close_file()
            rel = f"{self.split}/part-{len(self.files):05d}.parquet"
            self._handle = self.fs.open(_join(self.root, rel), "wb")
            self._writer = pq.ParquetWriter(self._handle, self.schema, compression="zstd")
            self.files.append({"path": rel, "split": self.split, "rows": 0})
            self._groups = 0
        table = _rows_to_table(self.buffer, self.schema, self.seqs)
        self._writer.write_table(table, row_group_size=len(self.buffer))
        self.files[-1]["rows"] += len(self.buffer)
        self._groups += 1
        self.buffer = []

    def _close_file(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._handle.close()
            self._writer = self._handle = None

    def close(self) -> list[dict]:
        self._flush()
        self._close_file()
        return self.files

    def abort(self) -> None:
        with contextlib.suppress(Exception):  # already failing; the files are removed next
            self._close_file()


@dataclass
class _Stats:
    """Sequence lengths and set sizes, with power-of-two histograms, for the manifest and ``inspect``."""

    values: dict[str, list[int]] = field(default_factory=dict)

    def add(self, row: dict) -> None:
        for c in SEQUENCE_COLUMNS:
            self.values.setdefault(f"{c}_len", []).extend(a.shape[0] for a in row[c])
        self.values.setdefault("support_size", []).append(len(row["support_x"]))
        self.values.setdefault("query_size", []).append(len(row["query_x"]))

    def to_json(self) -> dict:
        out = {}
        for name, vals in self.values.items():
            v = np.asarray(vals)
            buckets = np.floor(np.log2(v)).astype(int)
            hist = {f"{2 ** b}-{2 ** (b + 1) - 1}": int(n) for b, n in zip(*np.unique(buckets, return_counts=True))}
            out[name] = {"min": int(v.min()), "max": int(v.max()), "mean": round(float(v.mean()), 3), "hist": hist}
        return out


def _target_state(fs, root: str, uri: str) -> str:
    """What ``root`` holds: ``absent`` (nothing, or an empty folder), ``partial`` (the leftovers of a build
    that never finished: no manifest, only what a store holds) or ``store``; anything else is refused."""
    if not fs.exists(root):
        return "absent"
    if not fs.isdir(root):
        raise TaskStoreError(f"{uri}: exists and is not a directory", field="uri")
    entries = {posixpath.basename(p.rstrip("/")) for p in fs.ls(root, detail=False)}
    foreign = sorted(entries - {MANIFEST, MANIFEST + ".tmp", *SPLITS})
    if foreign:
        raise TaskStoreError(f"{uri}: refusing to write a task store here: it holds {foreign[:5]}, which a task "
                             f"store never has", field="uri")
    if MANIFEST in entries:
        return "store"
    return "partial" if entries else "absent"


def _check_target(fs, root: str, uri: str, overwrite: bool) -> None:
    """Fail before building when the build could not be published."""
    if _target_state(fs, root, uri) == "store" and not overwrite:
        raise TaskStoreError(f"{uri}: already holds a task store; pass overwrite=True (--overwrite) to replace it",
                             field="uri")


def _manifest_hash(fs, root: str) -> str | None:
    try:
        with fs.open(_join(root, MANIFEST), "r") as fh:
            return json.load(fh).get("content_hash")
    except (OSError, ValueError, AttributeError):
        return None


def _publish(fs, stage: str, root: str, uri: str, manifest: dict, overwrite: bool) -> dict:
    """Put the finished store at ``stage`` in place at ``root``; return the manifest of the store now there.

    A store that appeared meanwhile (a concurrent build) is kept unless ``overwrite``: if it holds the same
    tasks (same content hash) this build's result is the same store, else this build fails cleanly.
    Leftovers of an unfinished build are replaced without ``overwrite``: they never were a store.
    """
    for _ in range(_PUBLISH_TRIES):
        try:
            state = _target_state(fs, root, uri)
        except TaskStoreError:
            staging.discard(fs, stage)
            raise
        if state == "store" and not overwrite:
            staging.discard(fs, stage)
            existing = _manifest_hash(fs, root)
            if existing == manifest["content_hash"]:
                log.info("%s: a concurrent build wrote the same store first; using it", uri)
                return read_manifest(uri)
            raise TaskStoreError(f"{uri}: already holds a task store (another build finished first); pass "
                                 f"overwrite=True (--overwrite) to replace it", field="uri")
        if state == "partial":
            log.warning("%s: replacing the leftovers of a build that did not finish", uri)
        try:
            if staging.publish(fs, stage, root, replace=state != "absent", marker=MANIFEST):
                return manifest
        except BaseException:
            staging.discard(fs, stage)
            raise
    staging.discard(fs, stage)
    raise TaskStoreError(f"{uri}: kept changing while this build tried to publish it (other builds are "
                         f"writing it); try again", field="uri")


def _sha256_files(fs, root: str, files: list[dict]) -> str:
    total = hashlib.sha256()
    for f in sorted(files, key=lambda f: f["path"]):
        h = hashlib.sha256()
        with fs.open(_join(root, f["path"]), "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
                total.update(chunk)
        f["sha256"] = h.hexdigest()
        f["bytes"] = fs.size(_join(root, f["path"]))
    return "sha256:" + total.hexdigest()


def _check_write_args(family: str, model_kind: str | None, features: Any, rows_per_group: Any) -> None:
    if family not in FAMILIES:
        raise TaskStoreError(f"family: expected one of {', '.join(FAMILIES)}, got {family!r}", field="family")
    if model_kind is not None:
        from metalstm.models import MODEL_KINDS  # torch: only when a builder names the kind

        if model_kind not in MODEL_KINDS:
            raise TaskStoreError(f"model_kind: expected one of {', '.join(MODEL_KINDS)}, got {model_kind!r}",
                                 field="model_kind")
    if not isinstance(features, Mapping):
        raise TaskStoreError(f"features: expected a dict, got {type(features).__name__}", field="features")
    if isinstance(rows_per_group, bool) or not isinstance(rows_per_group, int) or rows_per_group < 1:
        raise TaskStoreError(f"rows_per_group: expected a positive integer, got {rows_per_group!r}",
                             field="rows_per_group")


def write_store(uri: str, tasks: Iterable[dict], *, family: str, features: dict, model_kind: str | None = None,
                vocab: dict | None = None, normalisation: dict | None = None, builder: dict | None = None,
                limits: dict | None = None, rows_per_group: int | None = None, overwrite: bool = False) -> dict:
    """Validate and write ``tasks`` as a store at ``uri``; return the manifest.

    ``model_kind`` (one of ``metalstm.models.MODEL_KINDS``) names the model the tasks are for; training takes
    ``model.kind`` from it and the registry checks a checkpoint against it. ``rows_per_group`` None: 256.

    Each task dict: ``task_id`` (str, unique), ``entity`` (str: client meter / text / domain), ``split``
    (train|val|test), ``support_x``, ``support_y``, ``query_x``, ``query_y`` (each a list of arrays in
    ``metalstm.data.collate``'s layout: token ids ``[L]`` int, steps ``[L, F]`` float, or targets ``[H]``),
    plus optional extra scalar columns (str/int/float/bool, same set in every task). Floats are stored as
    float32 and integers as int32. Tasks are streamed (``rows_per_group`` at a time per split).

    The store is built in a temporary sibling of ``uri`` and published whole (``pipeline.tasks.staging``):
    a failed build leaves ``uri`` as it was (with ``overwrite``, the old store survives it); leftovers of a
    build that never finished are replaced; of two concurrent builds one wins, and the other returns the
    winner's manifest if it holds the same tasks, else fails with ``TaskStoreError``.
    """
    rows_per_group = DEFAULT_ROWS_PER_GROUP if rows_per_group is None else rows_per_group
    _check_write_args(family, model_kind, features, rows_per_group)
    meta = {name: _jsonable(value, name) for name, value in
            (("features", features), ("vocab", vocab), ("normalisation", normalisation), ("builder", builder))}
    meta.update(family=family, model_kind=model_kind, limits=_check_limits(limits), rows_per_group=rows_per_group)
    fs, root = _fs(uri)
    try:
        stage = staging.sibling(root, "tmp")
    except staging.PublishError as e:
        raise TaskStoreError(f"{uri}: {e}", field="uri") from e
    staging.clean_stale(fs, root, MANIFEST)  # first: it may put back a store an interrupted replace moved aside
    _check_target(fs, root, str(uri), overwrite)
    try:
        manifest = _write_files(fs, stage, tasks, meta)
    except BaseException:
        staging.discard(fs, stage)
        raise
    manifest = _publish(fs, stage, root, str(uri), manifest, overwrite)
    log.info("wrote %s store %s: %s (%s)", family, uri, manifest["counts"], manifest["content_hash"][:19])
    return manifest


def _write_files(fs, stage: str, tasks: Iterable[dict], meta: dict) -> dict:
    """Validate ``tasks`` and write them and the manifest (last) under ``stage``; return the manifest."""
    fs.makedirs(stage, exist_ok=True)
    validate = _Validator(meta["family"], meta["limits"])
    stats = _Stats()
    writers: dict[str, _SplitWriter] = {}
    schema = None
    try:
        for i, task in enumerate(tasks):
            row = validate(task, i)
            if schema is None:
                schema = _arrow_schema(validate.seqs, validate.extras).with_metadata(
                    {"metalstm.format_version": str(FORMAT_VERSION), "metalstm.family": meta["family"]})
            if row["split"] not in writers:
                writers[row["split"]] = _SplitWriter(fs, stage, row["split"], schema, validate.seqs,
                                                     meta["rows_per_group"])
            writers[row["split"]].add(row)
            stats.add(row)
        if schema is None:
            raise TaskStoreError("tasks: no tasks to write", field="tasks")
        files = [f for split in SPLITS if split in writers for f in writers[split].close()]
    except BaseException:
        for w in writers.values():
            w.abort()
        raise
    content_hash = _sha256_files(fs, stage, files)
    manifest = {
        "format_version": FORMAT_VERSION,
        "family": meta["family"],
        "model_kind": meta["model_kind"],
        "features": meta["features"],
        "vocab": meta["vocab"],
        "normalisation": meta["normalisation"],
        "counts": {split: sum(f["rows"] for f in files if f["split"] == split) for split in SPLITS},
        "content_hash": content_hash,
        "schema": {"sequences": {c: validate.seqs[c].to_json() for c in SEQUENCE_COLUMNS},
                   "extras": validate.extras},
        "files": files,
        "stats": stats.to_json(),
        "builder": meta["builder"],
        "limits": meta["limits"],
        "rows_per_group": meta["rows_per_group"],
        "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    with fs.open(_join(stage, MANIFEST), "w") as fh:
        json.dump(manifest, fh, indent=2)
    return manifest


# --------------------------------------------------------------------------------------------- reading


def read_manifest(uri: str) -> dict:
    """The store's manifest, checked: format version readable, family known, required fields present."""
    fs, root = _fs(uri)
    path = _join(root, MANIFEST)
    if not fs.exists(path):
        aside = staging.set_aside(fs, root)
        hint = f"; an interrupted replace left the previous store at {aside}" if aside else ""
        raise TaskStoreError(f"{uri}: no {MANIFEST} (not a task store, or its build did not finish{hint})",
                             field=MANIFEST)
    try:
        with fs.open(path, "r") as fh:
            manifest = json.load(fh)
    except (ValueError, UnicodeDecodeError) as e:
        raise TaskStoreError(f"{uri}/{MANIFEST}: not valid JSON ({e})", field=MANIFEST) from e
    where = f"{uri}/{MANIFEST}"
    if not isinstance(manifest, dict):
        raise TaskStoreError(f"{where}: expected a JSON object", field=MANIFEST)
    version = manifest.get("format_version")
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise TaskStoreError(f"{where}: format_version: expected a positive integer, got {version!r}",
                             field="format_version")
    if version > FORMAT_VERSION:
        raise TaskStoreError(f"{where}: format_version {version} is newer than this metalstm reads "
                             f"({FORMAT_VERSION}); upgrade metalstm to read it", field="format_version")
    if manifest.get("family") not in FAMILIES:
        raise TaskStoreError(f"{where}: family: expected one of {', '.join(FAMILIES)}, got "
                             f"{manifest.get('family')!r}", field="family")
    for key in ("features", "counts", "content_hash", "schema", "files"):
        if key not in manifest:
            raise TaskStoreError(f"{where}: missing field {key!r}", field=key)
    _schema_from_manifest(manifest["schema"], where)
    for i, f in enumerate(manifest["files"]):
        if not isinstance(f, dict) or f.get("split") not in SPLITS or not _PART.fullmatch(str(f.get("path"))) \
                or not f["path"].startswith(f["split"] + "/"):
            raise TaskStoreError(f"{where}: files[{i}]: expected {{path, split, rows, sha256}}, got {f!r}",
                                 field="files")
    return manifest


def store_model_kind(manifest: Mapping[str, Any]) -> str:
    """The model kind a store's tasks are for: its manifest's ``model_kind``, or for a store written before
    manifests named it, the kind its family always trained (synthetic: by layout)."""
    if manifest.get("model_kind"):
        return manifest["model_kind"]
    family = manifest["family"]
    if family == "synthetic":
        return "mlp" if manifest.get("features", {}).get("layout") == "points" else "forecaster"
    return _LEGACY_MODEL_KINDS[family]


def _split_files(manifest: dict, uri: str, split: str | None) -> list[str]:
    if split is not None and split not in SPLITS:
        raise TaskStoreError(f"split: expected one of {', '.join(SPLITS)}, got {split!r}", field="split")
    return [f["path"] for f in manifest["files"] if split is None or f["split"] == split]


def _expected_schema(manifest: dict, where: str) -> pa.Schema:
    return _arrow_schema(*_schema_from_manifest(manifest["schema"], where))


def _check_file_schema(found: pa.Schema, expected: pa.Schema, where: str) -> None:
    for f in expected:
        if f.name not in found.names:
            raise TaskStoreError(f"{where}: missing column {f.name!r}", field=f.name)
        got = found.field(f.name).type
        if got != f.type:
            raise TaskStoreError(f"{where}: column {f.name!r} has type {got}, expected {f.type}", field=f.name)
    extra = [n for n in found.names if n not in expected.names]
    if extra:
        raise TaskStoreError(f"{where}: unexpected column {extra[0]!r} (not in the manifest schema)",
                             field=extra[0])


def _float_columns(manifest: dict, where: str) -> list[str]:
    """The columns whose values must be finite: float sequences and float extras."""
    seqs, extras = _schema_from_manifest(manifest["schema"], where)
    return [c for c in SEQUENCE_COLUMNS if seqs[c].dtype == "float32"] + [c for c, t in extras.items()
                                                                          if t == "float64"]


def _first_bad_row(column: pa.ChunkedArray | pa.Array) -> int | None:
    """The row holding the first NaN, inf or null of a (nested list) float column; None if all are finite.
    One vectorised pass; only a failing column is walked back up its list levels to the row."""
    arr = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    levels = [arr]
    while pa.types.is_list(levels[-1].type) or pa.types.is_large_list(levels[-1].type):
        levels.append(levels[-1].flatten())
    leaves = levels[-1]
    if not any(a.null_count for a in levels) and pc.all(pc.is_finite(leaves), min_count=0).as_py():
        return None
    for depth, level in enumerate(levels):  # outer levels first: a null list hides what is inside it
        bad = pc.is_null(level) if depth < len(levels) - 1 else pc.invert(pc.is_finite(leaves)).fill_null(True)
        hits = np.flatnonzero(bad.to_numpy(zero_copy_only=False))
        if hits.size:
            index = int(hits[0])
            for parent in reversed(levels[:depth]):
                index = int(pc.list_parent_indices(parent)[index].as_py())
            return index
    return None


def check_finite(table: pa.Table, columns: Iterable[str], where: str, first_row: int | None = 0) -> None:
    """Refuse a table with a NaN, inf or null in a float column, naming the task, its row in the file
    (``first_row``: the table's first row there; None: not known) and the column. Builds refuse such values,
    so one here means the files were changed after the build."""
    for name in columns:
        if name not in table.column_names:
            continue
        row = _first_bad_row(table.column(name))
        if row is not None:
            task = table.column("task_id")[row].as_py() if "task_id" in table.column_names else None
            at = f" (row {first_row + row})" if first_row is not None else ""
            raise TaskStoreError(f"{where}: task {task!r}{at}: {name}: contains NaN, inf or null; the store was "
                                 f"changed after it was built (rebuild it; `metalstm tasks inspect --verify` "
                                 f"checks it)", field=name)


def _check_batch(batch: pa.Table, *, columns: list[str], where: str) -> pa.Table:
    """``check_finite`` as a Ray Data ``map_batches`` step (a block's rows are not numbered in the file)."""
    check_finite(batch, columns, where, first_row=None)
    return batch


def _store_error_in(error: BaseException) -> TaskStoreError | None:
    """The ``TaskStoreError`` a Ray task raised, from the wrappers Ray puts around it."""
    seen = set()
    while error is not None and id(error) not in seen:
        inner = getattr(error, "cause", None)  # a RayTaskError's original exception
        if isinstance(error, TaskStoreError) and not isinstance(inner, TaskStoreError):
            return error
        seen.add(id(error))
        error = inner or error.__cause__
    return None


def _read_tables(uri: str, manifest: dict, split: str | None, limit: int | None = None) -> Iterator[pa.Table]:
    """The store's row groups as Arrow tables, schema-checked, stopping once ``limit`` rows were read."""
    fs, root = _fs(uri)
    expected = _expected_schema(manifest, f"{uri}/{MANIFEST}")
    floats = _float_columns(manifest, f"{uri}/{MANIFEST}")
    remaining = limit
    for rel in _split_files(manifest, uri, split):
        where = f"{uri}/{rel}"
        try:
            handle = fs.open(_join(root, rel), "rb")
        except FileNotFoundError as e:
            raise TaskStoreError(f"{where}: listed in the manifest but missing", field=rel) from e
        with handle, pq.ParquetFile(handle) as pf:
            _check_file_schema(pf.schema_arrow, expected, where)
            first_row = 0
            for g in range(pf.num_row_groups):
                if remaining is not None and remaining <= 0:
                    return
                table = pf.read_row_group(g, columns=expected.names)
                check_finite(table, floats, where, first_row)
                first_row += table.num_rows
                if remaining is not None:
                    table = table.slice(0, remaining)
                    remaining -= table.num_rows
                yield table


def read_tasks(uri: str, split: str | None = None, limit: int | None = None) -> list[dict]:
    """Tasks of one split (or all), in storage order, read with pyarrow directly (no Ray)."""
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 0):
        raise TaskStoreError(f"limit: expected a non-negative integer or None, got {limit!r}", field="limit")
    manifest = read_manifest(uri)
    return [t for table in _read_tables(uri, manifest, split, limit) for t in table_to_tasks(table)]


def read_dataset(uri: str, split: str, *, materialize: bool | None = None) -> ray.data.Dataset:
    """One split as a Ray Dataset with one row per task (iterate it with ``task_batches``).

    Local paths and remote URLs are read by Ray workers with ``read_parquet``; ``memory://`` stores are
    process-local, so they are read here in the driver and handed to Ray as Arrow tables. ``materialize``
    (default: when the split's files total at most ``MATERIALIZE_BYTES``) reads the split into the object
    store once, so later epochs skip Ray Data's per-execution start-up (seconds per epoch on a small store).
    Ray must be initialised (or it auto-starts a local instance).
    """
    import pyarrow.fs as pafs
    import ray.data

    manifest = read_manifest(uri)
    rels = _split_files(manifest, uri, split)
    if not rels:
        raise TaskStoreError(f"{uri}: split {split!r} has no tasks (counts: {manifest['counts']})", field="split")
    fs, root = _fs(uri)
    if _process_local(fs):
        return ray.data.from_arrow(list(_read_tables(uri, manifest, split)))
    protocols = (fs.protocol,) if isinstance(fs.protocol, str) else tuple(fs.protocol)
    filesystem = pafs.LocalFileSystem() if "file" in protocols else pafs.PyFileSystem(pafs.FSSpecHandler(fs))
    ds = ray.data.read_parquet([_join(root, r) for r in rels], filesystem=filesystem, partitioning=None)
    floats = _float_columns(manifest, f"{uri}/{MANIFEST}")
    ds = ds.map_batches(functools.partial(_check_batch, columns=floats, where=f"{uri} ({split})"),
                        batch_format="pyarrow", batch_size=None, zero_copy_batch=True)
    ds.context.raise_original_map_exception = True  # the TaskStoreError itself, not "UDF failed"
    if materialize is None:
        materialize = sum(int(f.get("bytes", 0)) for f in manifest["files"] if f["path"] in rels) <= MATERIALIZE_BYTES
    if not materialize:
        return ds  # a tampered value then fails the epoch that reads it, in the worker
    try:
        return ds.materialize()
    except Exception as e:
        found = _store_error_in(e)
        if found is None:
            raise
        raise TaskStoreError(str(found), field=found.field) from e


def shard_table(shard: Any) -> pa.Table | None:
    """A shard's tasks (a Ray ``DataIterator`` such as ``train.get_dataset_shard``, or a ``Dataset``) as one
    Arrow table sorted by ``task_id``; None when the shard is empty. Task stores hold thousands of small
    tasks, so a worker reads its shard once and reuses the table every epoch."""
    tables = [t for t in shard.iter_batches(batch_format="pyarrow", batch_size=4096) if t.num_rows]
    return pa.concat_tables(tables, promote_options="permissive").sort_by("task_id") if tables else None


def task_batches(shard: Any, batch_size: int, *, seed: int, epoch: int,
                 drop_last: bool = False) -> Iterator[list[dict]]:
    """One epoch of a shard (as for ``shard_table``, or the table it returned) as lists of ``batch_size``
    task dicts, ready for ``metalstm.data.collate``.

    The order is a permutation of the shard's tasks sorted by ``task_id``, drawn from ``(seed, epoch)``:
    the same seed and epoch give the same order whatever order Ray delivered the blocks in. The shard is
    held as Arrow tables for the epoch (compact; tasks are converted to arrays one batch at a time).
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size: expected a positive integer, got {batch_size!r}")
    table = shard if isinstance(shard, pa.Table) else shard_table(shard)
    if table is None or not table.num_rows:
        return
    order = np.random.default_rng([int(seed), int(epoch)]).permutation(table.num_rows)
    stop = table.num_rows - (table.num_rows % batch_size if drop_last else 0)
    for start in range(0, stop, batch_size):
        yield table_to_tasks(table.take(order[start:start + batch_size]))


# --------------------------------------------------------------------------------------------- verification


def verify_store(uri: str) -> None:
    """Check the files against the manifest: file list, per-file rows and hashes, counts per split, schema,
    finite floats and the content hash. Raises ``TaskStoreError`` naming the first mismatch."""
    manifest = read_manifest(uri)
    fs, root = _fs(uri)
    where = f"{uri}/{MANIFEST}"
    expected = _expected_schema(manifest, where)
    floats = _float_columns(manifest, where)
    listed = {f["path"] for f in manifest["files"]}
    present = set()
    for split in SPLITS:
        d = _join(root, split)
        if fs.exists(d):
            present |= {f"{split}/{posixpath.basename(p)}" for p in fs.ls(d, detail=False)
                        if p.endswith(".parquet")}
    for rel in sorted(present - listed):
        raise TaskStoreError(f"{uri}/{rel}: part file not listed in the manifest", field=rel)
    for rel in sorted(listed - present):
        raise TaskStoreError(f"{uri}/{rel}: listed in the manifest but missing", field=rel)
    rows = dict.fromkeys(SPLITS, 0)
    for f in manifest["files"]:
        path = f"{uri}/{f['path']}"
        with fs.open(_join(root, f["path"]), "rb") as fh, pq.ParquetFile(fh) as pf:
            _check_file_schema(pf.schema_arrow, expected, path)
            n = pf.metadata.num_rows
            table = pf.read(columns=["split", "task_id", *floats])  # one read for both checks
            splits = set(table.column("split").to_pylist())
            check_finite(table, floats, path)
        if n != f.get("rows"):
            raise TaskStoreError(f"{path}: holds {n} rows, manifest says {f.get('rows')}", field=f["path"])
        if splits - {f["split"]}:
            raise TaskStoreError(f"{path}: rows of split(s) {sorted(splits - {f['split']})} in a {f['split']} file",
                                 field=f["path"])
        rows[f["split"]] += n
    for split in SPLITS:
        if rows[split] != manifest["counts"].get(split, 0):
            raise TaskStoreError(f"{where}: counts.{split} = {manifest['counts'].get(split)} but the part files "
                                 f"hold {rows[split]}", field=f"counts.{split}")
    recorded = {f["path"]: f.get("sha256") for f in manifest["files"]}
    files = [dict(f) for f in manifest["files"]]
    content_hash = _sha256_files(fs, root, files)
    for f in files:
        if f["sha256"] != recorded[f["path"]]:
            raise TaskStoreError(f"{uri}/{f['path']}: sha256 {f['sha256'][:12]}… does not match the manifest's "
                                 f"{str(recorded[f['path']])[:12]}…", field=f["path"])
    if content_hash != manifest["content_hash"]:
        raise TaskStoreError(f"{where}: content_hash does not match the part files", field="content_hash")
