"""Task-store faults, injected for real: bad CSV cells, builds that crash or are killed mid-write, stores
tampered with after the build, leftovers of unfinished builds, and concurrent builds of one store.

Each test checks what the user sees (the error names the file / task / column) and what is kept (an old
store survives a failed ``--overwrite``, a partial store is never read as a store and never blocks a build).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from raytrain import start_cluster

from pipeline.cli import main
from pipeline.tasks import staging
from pipeline.tasks.builders import synthetic
from pipeline.tasks.builders.synthetic import build_synthetic
from pipeline.tasks.store import TaskStoreError, read_dataset, read_manifest, read_tasks, verify_store, write_store

REPO = Path(__file__).resolve().parents[1]
SMALL = {"train_tasks": 12, "val_tasks": 4, "test_tasks": 4, "window": 8, "horizon": 4, "shots": 3, "queries": 3}
T0 = np.datetime64("2014-03-24T00:00:00", "s")


def _siblings(path: Path) -> list[str]:
    return sorted(p.name for p in path.parent.iterdir())


def _same_store(uri: str, manifest: dict, tasks: list[dict]) -> None:
    """``uri`` still holds exactly the store of ``manifest`` and ``tasks``, and its files verify."""
    assert read_manifest(uri) == manifest
    verify_store(uri)
    again = read_tasks(uri)
    assert [t["task_id"] for t in again] == [t["task_id"] for t in tasks]
    assert all(np.array_equal(a["query_y"][0], b["query_y"][0]) for a, b in zip(again, tasks))


# ---------------------------------------------------------------------------------------------- bad CSV cells


def _series_csv(tmp_path: Path, layout: str, bad: str | None) -> tuple[Path, int]:
    """A 3-series hourly CSV (a blank line after the header); ``bad`` replaces series b's value at hour 100.
    Returns the file and the line the bad cell is on."""
    hours = 400
    stamps = [str(T0 + np.timedelta64(3600 * i, "s")).replace("T", " ") for i in range(hours)]
    values = 100.0 * np.arange(1, 4)[None, :] + np.arange(hours)[:, None]
    cells = [[f"{v:g}" for v in row] for row in values]
    if bad is not None:
        cells[100][1] = bad
    if layout == "csv-wide":
        lines = ["time,a,b,c", ""] + [f"{s},{','.join(r)}" for s, r in zip(stamps, cells)]
        bad_line = 3 + 100
    else:
        lines = ["series_id,timestamp,value", ""] + [f"{name},{s},{r[j]}" for j, name in enumerate("abc")
                                                     for s, r in zip(stamps, cells)]
        bad_line = 3 + hours + 100
    path = tmp_path / f"{layout}-{bad is not None}.csv"
    path.write_text("\n".join(lines) + "\n")
    return path, bad_line


ELEC = ["--window", "48", "--horizon", "24", "--stride", "24", "--support-windows", "2", "--query-windows", "2"]


@pytest.mark.parametrize("layout", ["csv-wide", "csv-long"])
def test_bad_csv_cell_names_file_line_column_and_value_and_keeps_the_old_store(layout, tmp_path, capsys):
    good, _ = _series_csv(tmp_path, layout, None)
    out = str(tmp_path / "store")
    assert main(["tasks", "build", "electricity", "--source", str(good), "--layout", layout, "--out", out, *ELEC]) == 0
    before, tasks = read_manifest(out), read_tasks(out)
    capsys.readouterr()

    bad, line = _series_csv(tmp_path, layout, "oops")
    assert main(["tasks", "build", "electricity", "--source", str(bad), "--layout", layout, "--out", out,
                 "--overwrite", *ELEC]) == 2
    column = "b" if layout == "csv-wide" else "value"
    assert f"{bad}: line {line}, column '{column}': 'oops' is not a finite number" in capsys.readouterr().err
    assert "oops" in bad.read_text().splitlines()[line - 1]
    _same_store(out, before, tasks)
    assert _siblings(Path(out)) == sorted([bad.name, good.name, "store"])  # no temporary left

    inf, line = _series_csv(tmp_path, layout, "inf")
    assert main(["tasks", "build", "electricity", "--source", str(inf), "--layout", layout, "--out", out,
                 "--overwrite", *ELEC]) == 2
    assert f"line {line}, column '{column}': 'inf' is not a finite number" in capsys.readouterr().err


def test_bad_timestamp_cell_names_its_line(tmp_path, capsys):
    path, line = _series_csv(tmp_path, "csv-wide", None)
    lines = path.read_text().splitlines()
    lines[line - 1] = "later" + lines[line - 1][len("2014-03-28 04:00:00"):]  # hour 100
    path.write_text("\n".join(lines) + "\n")
    assert main(["tasks", "build", "electricity", "--source", str(path), "--out", str(tmp_path / "s"), *ELEC]) == 2
    assert f"{path}: line {line}, column 'time': 'later' is not a timestamp" in capsys.readouterr().err
    assert not (tmp_path / "s").exists()


# ---------------------------------------------------------------------------------------------- crashes mid-build


def _crash_after(monkeypatch, tasks: int) -> None:
    """Make the synthetic builder raise after ``tasks`` tasks (row groups of 1 task are on disk by then)."""
    make = synthetic._sequence_tasks

    def crashing(split, n, o):
        for i, task in enumerate(make(split, n, o)):
            if split == "val" and i == tasks:
                raise OSError("disk full (injected)")
            yield task

    monkeypatch.setattr(synthetic, "_sequence_tasks", crashing)


def test_crash_mid_build_keeps_the_old_store_and_a_later_build_works(tmp_path, monkeypatch):
    uri = str(tmp_path / "store")
    before = build_synthetic(uri, seed=0, **SMALL)
    tasks = read_tasks(uri)
    _crash_after(monkeypatch, 2)
    with pytest.raises(OSError, match="disk full"):  # the builder's own error, not masked
        build_synthetic(uri, seed=1, overwrite=True, rows_per_group=1, **SMALL)
    _same_store(uri, before, tasks)
    assert _siblings(Path(uri)) == ["store"]
    with pytest.raises(OSError, match="disk full"):  # a first build that crashes leaves nothing at all
        build_synthetic(str(tmp_path / "new"), rows_per_group=1, **SMALL)
    assert _siblings(Path(uri)) == ["store"]
    with pytest.raises(TaskStoreError, match="no manifest.json"):
        read_manifest(str(tmp_path / "new"))
    monkeypatch.undo()
    after = build_synthetic(uri, seed=1, overwrite=True, rows_per_group=1, **SMALL)
    assert read_manifest(uri) == after and after["content_hash"] != before["content_hash"]
    assert build_synthetic(str(tmp_path / "new"), **SMALL)["counts"] == before["counts"]


def test_crash_mid_build_on_an_object_store(monkeypatch):
    """memory:// has no directory rename: the files are moved in, manifest last; a failure before that
    leaves the old store as it was, and leftovers without a manifest are replaced, never read."""
    uri = f"memory://faults-{uuid.uuid4().hex}/store"
    fs, root = fsspec.core.url_to_fs(uri)
    try:
        before = build_synthetic(uri, seed=0, **SMALL)
        tasks = read_tasks(uri)
        _crash_after(monkeypatch, 2)
        with pytest.raises(OSError, match="disk full"):
            build_synthetic(uri, seed=1, overwrite=True, rows_per_group=1, **SMALL)
        _same_store(uri, before, tasks)
        assert [p.rsplit("/", 1)[1] for p in fs.ls(root.rsplit("/", 1)[0], detail=False)] == ["store"]
        monkeypatch.undo()
        fs.rm(f"{root}/manifest.json")  # what a publish cut short leaves: part files, no manifest
        with pytest.raises(TaskStoreError, match="no manifest.json"):
            read_tasks(uri)
        again = build_synthetic(uri, seed=0, **SMALL)  # no --overwrite needed: it never was a store
        assert again["content_hash"] == before["content_hash"]
        verify_store(uri)
    finally:
        fs.rm(root.rsplit("/", 1)[0], recursive=True)


# ---------------------------------------------------------------------------------------------- killed builds

CHILD = r"""
import json, os, signal, sys, time
from pathlib import Path
from pipeline.tasks import staging, store
from pipeline.tasks.builders.synthetic import build_synthetic

mode, uri, seed, overwrite, barrier = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4] == "1", sys.argv[5]
if mode == "kill":  # die without any cleanup once some row groups are on disk
    flush, calls = store._SplitWriter._flush, []
    def dying(self):
        calls.append(1)
        if len(calls) > 3:
            os.kill(os.getpid(), signal.SIGKILL)
        flush(self)
    store._SplitWriter._flush = dying
else:  # race: both builds reach their publish step before either goes on
    publish = staging.publish
    def together(*args, **kwargs):
        Path(barrier, f"ready-{os.getpid()}").touch()
        deadline = time.monotonic() + 300
        while len(list(Path(barrier).glob("ready-*"))) < 2 and time.monotonic() < deadline:
            time.sleep(0.005)
        return publish(*args, **kwargs)
    staging.publish = together
try:
    m = build_synthetic(uri, overwrite=overwrite, rows_per_group=2, seed=seed, **json.loads(sys.argv[6]))
    print(json.dumps({"hash": m["content_hash"]}))
except store.TaskStoreError as e:
    print(json.dumps({"error": str(e)}))
"""


def _child(mode: str, uri: str, seed: int, overwrite: bool = False, barrier: Path | None = None) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.Popen([sys.executable, "-c", CHILD, mode, uri, str(seed), str(int(overwrite)),
                             str(barrier or ""), json.dumps(SMALL)], cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _result(proc: subprocess.Popen) -> dict:
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    return json.loads(out.strip().splitlines()[-1])


def test_killed_overwrite_keeps_the_old_store_and_its_leftovers_are_cleaned(tmp_path):
    uri = str(tmp_path / "store")
    before = build_synthetic(uri, seed=0, **SMALL)
    tasks = read_tasks(uri)
    proc = _child("kill", uri, seed=1, overwrite=True)
    proc.communicate(timeout=300)
    assert proc.returncode == -signal.SIGKILL
    _same_store(uri, before, tasks)
    left = [p for p in tmp_path.iterdir() if p.name.startswith("store.tmp-")]
    assert len(left) == 1 and list(left[0].rglob("*.parquet")) and not (left[0] / "manifest.json").exists()
    after = build_synthetic(uri, seed=1, overwrite=True, **SMALL)  # cleans the dead build's temporary
    assert _siblings(Path(uri)) == ["store"] and read_manifest(uri) == after
    assert after["content_hash"] != before["content_hash"]


def _train_style_store(uri: str) -> str:
    """What ``train`` does with the built-in store (pipeline.training.train.prepare_store): build it unless
    its manifest exists, without --overwrite."""
    if not (Path(uri) / "manifest.json").exists():
        build_synthetic(uri, **SMALL)
    return uri


def test_killed_first_build_of_the_default_store_blocks_no_later_train(tmp_path):
    uri = str(tmp_path / "data" / "synthetic-sequence-12-4-4-seed0")
    proc = _child("kill", uri, seed=0)
    proc.communicate(timeout=300)
    assert proc.returncode == -signal.SIGKILL
    assert not Path(uri).exists()  # nothing was published: a reader finds no store, not a partial one
    # the leftovers of a build from before builds were staged: part files in place, no manifest
    (Path(uri) / "train").mkdir(parents=True)
    (Path(uri) / "train" / "part-00000.parquet").write_bytes(b"PAR1 cut short")
    with pytest.raises(TaskStoreError, match="no manifest.json"):
        read_tasks(uri)
    store = _train_style_store(uri)
    assert len(read_tasks(store, "train")) == SMALL["train_tasks"]
    verify_store(store)
    assert _siblings(Path(uri)) == [Path(uri).name]  # the dead build's temporary is gone too


def test_cleanup_spares_live_builds_and_restores_an_interrupted_replace(tmp_path):
    uri = str(tmp_path / "store")
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    live = tmp_path / f"store.tmp-{staging.HOST}-{os.getpid()}-{'a' * 12}"
    gone = tmp_path / f"store.tmp-{staging.HOST}-{dead.pid}-{'b' * 12}"
    fresh_remote = tmp_path / f"store.tmp-0badc0de-1-{'c' * 12}"
    old_remote = tmp_path / f"store.tmp-0badc0de-2-{'d' * 12}"
    for p in (live, gone, fresh_remote, old_remote):
        (p / "train").mkdir(parents=True)
    week_ago = time.time() - 7 * 24 * 3600
    os.utime(old_remote, (week_ago, week_ago))
    # a replace killed between its two renames: the old store sits aside, nothing at the store's path
    build_synthetic(uri, seed=0, **SMALL)
    aside = tmp_path / f"store.old-{staging.HOST}-{dead.pid}-{'e' * 12}"
    os.rename(uri, aside)
    with pytest.raises(TaskStoreError, match=f"left the previous store at {aside}"):
        read_manifest(uri)
    with pytest.raises(TaskStoreError, match="already holds a task store"):  # put back, so not replaced silently
        build_synthetic(uri, seed=1, **SMALL)
    assert read_manifest(uri)["builder"]["options"]["seed"] == 0
    assert _siblings(Path(uri)) == sorted(["store", live.name, fresh_remote.name])


# ---------------------------------------------------------------------------------------------- concurrent builds


@pytest.mark.parametrize(("seeds", "overwrite"), [((0, 0), False), ((0, 1), False), ((0, 1), True)])
def test_concurrent_builds_leave_one_complete_store(seeds, overwrite, tmp_path):
    uri = str(tmp_path / "store")
    barrier = tmp_path / "barrier"
    barrier.mkdir()
    procs = [_child("race", uri, seed=s, overwrite=overwrite, barrier=barrier) for s in seeds]
    results = [_result(p) for p in procs]
    verify_store(uri)
    final = read_manifest(uri)["content_hash"]
    assert final in {r.get("hash") for r in results}
    assert _siblings(Path(uri)) == ["barrier", "store"]  # neither build left a temporary
    if seeds[0] == seeds[1] or overwrite:  # same tasks: both end with that store; overwrite: last one wins
        assert all("hash" in r for r in results)
    else:  # different tasks, no overwrite: the loser fails cleanly, naming the reason
        errors = [r["error"] for r in results if "error" in r]
        assert len(errors) == 1 and "already holds a task store" in errors[0]
    assert len(read_tasks(uri)) == sum(SMALL[f"{s}_tasks"] for s in ("train", "val", "test"))


# ---------------------------------------------------------------------------------------------- tampered stores


def _inject(uri: str, column: str, row: int, value: float) -> str:
    """Write ``value`` into the first number of ``column`` at ``row`` of the first train part file, keeping
    the file's schema and row groups (as a tool editing the Parquet file would). Returns the file."""
    path = Path(uri) / "train" / "part-00000.parquet"
    table = pq.read_table(path)
    field = table.schema.field(column)
    cells = table.column(column).to_pylist()
    if isinstance(cells[row], list):
        leaf = cells[row]
        while isinstance(leaf[0], list):
            leaf = leaf[0]
        leaf[0] = value
    else:
        cells[row] = value
    table = table.set_column(table.schema.get_field_index(column), field, pa.array(cells, field.type))
    pq.write_table(table, path, row_group_size=2, compression="zstd")
    return str(path)


@pytest.mark.parametrize(("column", "value"), [("support_x", float("nan")), ("query_y", float("-inf")),
                                               ("amplitude", float("nan"))])
def test_nan_written_into_a_built_store_is_refused_on_read(column, value, tmp_path):
    uri = str(tmp_path / "store")
    build_synthetic(uri, rows_per_group=2, **SMALL)
    path = _inject(uri, column, 3, value)
    with pytest.raises(TaskStoreError) as err:
        read_tasks(uri, "train")
    assert err.value.field == column
    assert f"{path}: task 'train-00003' (row 3): {column}: contains NaN, inf or null" in str(err.value)
    assert len(read_tasks(uri, "train", limit=2)) == 2  # the rows before it are fine
    assert len(read_tasks(uri, "val")) == SMALL["val_tasks"]
    with pytest.raises(TaskStoreError, match=f"{column}: contains NaN"):
        verify_store(uri)


@pytest.fixture(scope="module")
def ray_cluster():
    ray = start_cluster()
    ray.data.DataContext.get_current().enable_progress_bars = False
    yield ray
    ray.shutdown()


def test_nan_written_into_a_built_store_is_refused_by_ray_data(ray_cluster, tmp_path):
    uri = str(tmp_path / "store")
    build_synthetic(uri, rows_per_group=2, **SMALL)
    assert read_dataset(uri, "train").count() == SMALL["train_tasks"]
    _inject(uri, "query_x", 5, float("nan"))
    with pytest.raises(TaskStoreError) as err:
        read_dataset(uri, "train")
    assert err.value.field == "query_x"
    assert f"{uri} (train): task 'train-00005': query_x: contains NaN" in str(err.value)
    lazy = read_dataset(uri, "train", materialize=False)  # read later, by whoever iterates it
    with pytest.raises(Exception, match="train-00005"):
        lazy.take_all()
    assert read_dataset(uri, "val").count() == SMALL["val_tasks"]


def test_finite_check_passes_clean_stores_across_row_groups(tmp_path):
    """No false alarm: a clean store with float extras and uneven row groups reads and verifies whole."""
    uri = str(tmp_path / "store")
    tasks = [{"task_id": f"t{i}", "entity": "e", "split": "train",
              "support_x": [np.ones((3, 2), np.float32)], "support_y": [np.ones(2, np.float32)],
              "query_x": [np.ones((3, 2), np.float32)], "query_y": [np.ones(2, np.float32)], "scale": 1.0}
             for i in range(50)]
    write_store(uri, tasks, family="electricity", features={}, rows_per_group=7)
    assert [t["task_id"] for t in read_tasks(uri)] == [f"t{i}" for i in range(50)]
    verify_store(uri)
