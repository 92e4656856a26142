"""The Parquet task store: round trips, validation errors, manifest checks, Ray Data sharding and the CLI."""

from __future__ import annotations

import json
import threading
import uuid
from pathlib import Path

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from raytrain import start_cluster

from metalstm import MAMLConfig, MetaLearner, collate
from metalstm.models import Forecaster
from pipeline.cli import main
from pipeline.tasks.builders.synthetic import build_synthetic
from pipeline.tasks.store import (
    FORMAT_VERSION,
    SEQUENCE_COLUMNS,
    TaskStoreError,
    read_dataset,
    read_manifest,
    read_tasks,
    shard_table,
    store_model_kind,
    task_batches,
    verify_store,
    write_store,
)


def _tasks(n: int, seed: int = 0, splits=("train", "val", "test")) -> list[dict]:
    """Ragged forecaster-style tasks: x [L, 2] float32 with varying L, y [3], varying set sizes, extras."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        k, q = int(rng.integers(1, 5)), int(rng.integers(1, 4))
        out.append({
            "task_id": f"t{i:04d}", "entity": f"meter-{i % 3}", "split": splits[i % len(splits)],
            "support_x": [rng.normal(size=(int(rng.integers(2, 9)), 2)).astype(np.float32) for _ in range(k)],
            "support_y": [rng.normal(size=3).astype(np.float32) for _ in range(k)],
            "query_x": [rng.normal(size=(int(rng.integers(2, 9)), 2)).astype(np.float32) for _ in range(q)],
            "query_y": [rng.normal(size=3).astype(np.float32) for _ in range(q)],
            "scale": float(rng.uniform(1, 2)), "start": f"2014-03-{i % 28 + 1:02d}", "hours": i, "weekend": i % 2 == 0,
        })
    return out


def _token_tasks(n: int) -> list[dict]:
    rng = np.random.default_rng(1)
    seqs = lambda k: [rng.integers(0, 50, size=int(rng.integers(1, 12))).astype(np.int32) for _ in range(k)]
    return [{"task_id": f"s{i}", "entity": "wsj", "split": "train", "support_x": (sx := seqs(3)),
             "support_y": [np.roll(a, -1) for a in sx], "query_x": (qx := seqs(2)),
             "query_y": [np.roll(a, -1) for a in qx]} for i in range(n)]


def _same(a: dict, b: dict) -> None:
    assert set(a) <= set(b)
    for key, value in a.items():
        if key in SEQUENCE_COLUMNS:
            assert len(value) == len(b[key]), key
            for x, y in zip(value, b[key]):
                assert x.dtype == y.dtype and x.shape == y.shape and np.array_equal(x, y), key
        else:
            assert b[key] == value and type(b[key]) is type(value), key


@pytest.fixture
def mem_uri():
    uri = f"memory://taskstore-test-{uuid.uuid4().hex}"
    yield uri
    fs, path = fsspec.core.url_to_fs(uri)
    if fs.exists(path):
        fs.rm(path, recursive=True)


@pytest.fixture(params=["local", "memory"])
def any_uri(request, tmp_path, mem_uri):
    return str(tmp_path / "store") if request.param == "local" else mem_uri


# ---------------------------------------------------------------------------------------------- round trip


def test_round_trip_identical(any_uri):
    tasks = _tasks(23)
    manifest = write_store(any_uri, tasks, family="electricity", features={"input_size": 2, "horizon": 3},
                           normalisation={"method": "mean"}, builder={"name": "test"}, rows_per_group=4)
    assert manifest["counts"] == {"train": 8, "val": 8, "test": 7}
    assert manifest["format_version"] == FORMAT_VERSION and manifest["content_hash"].startswith("sha256:")
    assert manifest["schema"]["sequences"]["support_x"] == {"dtype": "float32", "ndim": 2, "width": 2}
    assert manifest["schema"]["extras"] == {"scale": "float64", "start": "string", "hours": "int64",
                                            "weekend": "bool"}
    assert read_manifest(any_uri) == manifest
    back = read_tasks(any_uri)
    assert [t["task_id"] for t in back] == [t["task_id"] for s in ("train", "val", "test") for t in tasks
                                            if t["split"] == s]
    by_id = {t["task_id"]: t for t in back}
    for t in tasks:
        _same(t, by_id[t["task_id"]])
        assert by_id[t["task_id"]]["family"] == "electricity"
    assert [t["task_id"] for t in read_tasks(any_uri, "val", limit=3)] == ["t0001", "t0004", "t0007"]
    verify_store(any_uri)
    back[0]["support_x"][0][0, 0] = 123.0  # readers get writable arrays


def test_round_trip_tokens_and_same_bytes_everywhere(tmp_path, mem_uri):
    tasks = _token_tasks(5)
    local = write_store(str(tmp_path / "tok"), tasks, family="ptb-char", features={"vocab_size": 50},
                        vocab={"tokens": [str(i) for i in range(50)]})
    memory = write_store(mem_uri, tasks, family="ptb-char", features={"vocab_size": 50},
                         vocab={"tokens": [str(i) for i in range(50)]})
    assert local["content_hash"] == memory["content_hash"]  # deterministic bytes, whatever the filesystem
    assert local["schema"]["sequences"]["query_y"] == {"dtype": "int32", "ndim": 1, "width": None}
    for a, b in zip(tasks, read_tasks(mem_uri, "train")):
        _same(a, b)
    batch = collate(read_tasks(str(tmp_path / "tok")))
    assert batch.support.x.dtype.is_floating_point is False and batch.support.x.shape[:2] == (5, 3)


# ---------------------------------------------------------------------------------------------- bad input


def _set(key, value):
    def edit(task):
        task[key] = value
    return edit


def _seq(key, index, value):
    def edit(task):
        task[key][index] = value
    return edit


BAD = {
    "missing column": (lambda t: t.pop("support_y"), "support_y", "missing required field"),
    "task_id not a string": (_set("task_id", 7), "task_id", "non-empty string"),
    "unknown split": (_set("split", "holdout"), "split", "train, val, test"),
    "wrong dtype": (_seq("support_x", 0, np.array([[True, False]])), "support_x", "dtype bool"),
    "string values": (_seq("query_y", 0, np.array(["a", "b", "c"])), "query_y", "not allowed"),
    "wrong rank": (_seq("support_x", 0, np.zeros((2, 2, 2), np.float32)), "support_x", "[L, F]"),
    "NaN": (_seq("query_y", 0, np.array([0.0, np.nan, 1.0], np.float32)), "query_y", "NaN or inf"),
    "inf": (_seq("support_x", 0, np.full((3, 2), np.inf, np.float32)), "support_x", "NaN or inf"),
    "empty support": (lambda t: t.update(support_x=[], support_y=[]), "support_x", "empty"),
    "empty query": (lambda t: t.update(query_x=[], query_y=[]), "query_x", "empty"),
    "empty sequence": (_seq("query_x", 0, np.zeros((0, 2), np.float32)), "query_x", "empty sequence"),
    "over max_seq_len": (_seq("support_x", 0, np.zeros((11, 2), np.float32)), "support_x", "limits.max_seq_len = 10"),
    "over max_support": (lambda t: t.update(support_x=[np.zeros((2, 2), np.float32)] * 5,
                                            support_y=[np.zeros(3, np.float32)] * 5),
                         "support_x", "limits.max_support"),
    "x/y count mismatch": (lambda t: t["query_y"].append(np.zeros(3, np.float32)), "query_y", "sequences but"),
    "feature width differs": (_seq("support_x", 0, np.zeros((3, 5), np.float32)), "support_x", "[L, 2]"),
    "ints where floats": (_seq("query_y", 0, np.zeros(3, np.int32)), "query_y", "set by the first task"),
    "extra not scalar": (_set("scale", np.ones(3)), "scale", "scalars"),
    "extra NaN": (_set("scale", float("nan")), "scale", "NaN or inf"),
    "extra type differs": (_set("scale", "big"), "scale", "differ from the first task"),
    "extra missing": (lambda t: t.pop("start"), "start", "differ from the first task"),
    "duplicate task_id": (_set("task_id", "t0000"), "task_id", "duplicate"),
    "wrong family": (_set("family", "mt-en-de"), "family", "store's family"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_task_names_field_and_leaves_no_manifest(case, tmp_path):
    edit, field, words = BAD[case]
    tasks = _tasks(6)
    for t in tasks:
        t["query_x"] = t["query_x"][:1]
        t["query_y"] = t["query_y"][:1]
    edit(tasks[3])  # after the first rows were written to disk (rows_per_group=1)
    uri = str(tmp_path / "store")
    with pytest.raises(TaskStoreError) as err:
        write_store(uri, tasks, family="electricity", features={}, rows_per_group=1,
                    limits={"max_seq_len": 10, "max_support": 4})
    assert err.value.field == field and field in str(err.value) and words in str(err.value)
    assert "task #3" in str(err.value)
    assert not (tmp_path / "store" / "manifest.json").exists()
    assert not list((tmp_path / "store").rglob("*.parquet"))
    assert not list(tmp_path.iterdir())  # the build's temporary went with it
    with pytest.raises(TaskStoreError, match="no manifest.json"):
        read_manifest(uri)


def test_store_paths_need_a_parent_and_get_their_folders(tmp_path):
    with pytest.raises(TaskStoreError, match="needs a parent folder") as err:
        write_store("memory://", _tasks(2), family="electricity", features={})
    assert err.value.field == "uri"
    deep = tmp_path / "a" / "b" / "store"
    write_store(str(deep), _tasks(3), family="electricity", features={})
    assert read_manifest(str(deep))["counts"]["train"] == 1 and sorted(p.name for p in deep.parent.iterdir()) == [
        "store"]


@pytest.mark.parametrize(("kwargs", "field"), [
    ({"family": "weather"}, "family"),
    ({"limits": {"max_len": 3}}, "limits.max_len"),
    ({"limits": {"max_seq_len": 0}}, "limits.max_seq_len"),
    ({"rows_per_group": 0}, "rows_per_group"),
    ({"model_kind": "transformer"}, "model_kind"),
    ({"features": [1, 2]}, "features"),
    ({"builder": {"f": object()}}, "builder"),
])
def test_bad_store_arguments(kwargs, field, tmp_path):
    args = {"family": "electricity", "features": {}, **kwargs}
    with pytest.raises(TaskStoreError) as err:
        write_store(str(tmp_path / "s"), _tasks(2), **args)
    assert err.value.field == field and field in str(err.value)


def test_failed_build_and_overwrite(tmp_path):
    uri = str(tmp_path / "store")
    write_store(uri, _tasks(4), family="electricity", features={})
    with pytest.raises(TaskStoreError, match="already holds a task store; pass overwrite"):
        write_store(uri, _tasks(4), family="electricity", features={})

    def failing():
        yield from _tasks(5)
        raise RuntimeError("source file truncated")

    before = read_manifest(uri)
    with pytest.raises(RuntimeError, match="truncated"):  # the builder's own error, not masked
        write_store(uri, failing(), family="electricity", features={}, rows_per_group=1, overwrite=True)
    assert read_manifest(uri) == before  # the old store survives the failed overwrite, untouched
    verify_store(uri)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["store"]  # no temporary left behind
    with pytest.raises(TaskStoreError, match="no tasks"):
        write_store(str(tmp_path / "empty"), [], family="electricity", features={})
    assert not (tmp_path / "empty").exists()
    (tmp_path / "store" / "notes.txt").write_text("mine")
    with pytest.raises(TaskStoreError, match="refusing to write a task store here"):
        write_store(uri, _tasks(4), family="electricity", features={}, overwrite=True)
    assert (tmp_path / "store" / "notes.txt").exists() and read_manifest(uri) == before


# ---------------------------------------------------------------------------------------------- manifest vs files


@pytest.fixture
def built(tmp_path) -> Path:
    root = tmp_path / "store"
    write_store(str(root), _tasks(12), family="electricity", features={}, rows_per_group=2)
    return root


def _edit_manifest(root: Path, **changes) -> None:
    path = root / "manifest.json"
    manifest = json.loads(path.read_text())
    manifest.update(changes)
    path.write_text(json.dumps(manifest))


def test_newer_format_and_unknown_family(built):
    _edit_manifest(built, format_version=FORMAT_VERSION + 1)
    with pytest.raises(TaskStoreError, match="newer than this metalstm reads") as err:
        read_tasks(str(built))
    assert err.value.field == "format_version"
    _edit_manifest(built, format_version=FORMAT_VERSION, family="weather")
    with pytest.raises(TaskStoreError) as err:
        read_manifest(str(built))
    assert err.value.field == "family" and "weather" in str(err.value)
    (built / "manifest.json").write_text("{not json")
    with pytest.raises(TaskStoreError, match="not valid JSON"):
        read_manifest(str(built))


def test_the_manifest_names_the_model_kind(built, tmp_path):
    from pipeline.config import TrainConfig, apply_manifest

    m = write_store(str(tmp_path / "lm"), _tasks(3), family="electricity", model_kind="char_lm", features={})
    assert m["model_kind"] == "char_lm" and read_manifest(str(tmp_path / "lm"))["model_kind"] == "char_lm"
    cfg = TrainConfig()
    apply_manifest(cfg, m)  # the store decides, whatever the config said
    assert cfg.model.kind == "char_lm"
    # stores written before manifests named it: the kind their family always trained
    legacy = {"family": "synthetic", "features": {"layout": "points", "input_size": 1, "output_size": 1}}
    assert store_model_kind(legacy) == "mlp"
    assert store_model_kind({"family": "synthetic", "features": {"layout": "sequence"}}) == "forecaster"
    assert [store_model_kind({"family": f}) for f in ("electricity", "ptb-char", "mt-en-de")] == [
        "forecaster", "char_lm", "seq2seq"]
    assert read_manifest(str(built))["model_kind"] is None and store_model_kind(read_manifest(str(built))) == \
        "forecaster"
    apply_manifest(cfg, legacy)
    assert (cfg.model.kind, cfg.model.input_size, cfg.model.output_size) == ("mlp", 1, 1)
    with pytest.raises(ValueError, match="config key train.model.kind: .*'cnn'"):
        apply_manifest(cfg, {"family": "synthetic", "model_kind": "cnn", "features": {}}, prefix="train.")


def test_verify_counts_mismatch(built):
    manifest = json.loads((built / "manifest.json").read_text())
    _edit_manifest(built, counts={**manifest["counts"], "train": manifest["counts"]["train"] + 1})
    with pytest.raises(TaskStoreError) as err:
        verify_store(str(built))
    assert err.value.field == "counts.train"


def test_verify_content_changed(built):
    part = built / "val" / "part-00000.parquet"
    table = pq.read_table(part)
    scale = table.column("scale").to_numpy().copy()
    scale[0] += 1.0
    pq.write_table(table.set_column(table.schema.get_field_index("scale"), "scale", pa.array(scale)), part,
                   compression="zstd")
    with pytest.raises(TaskStoreError, match="sha256") as err:
        verify_store(str(built))
    assert err.value.field == "val/part-00000.parquet"


def test_verify_missing_and_unlisted_files(built):
    (built / "test" / "part-00000.parquet").rename(built / "test" / "part-00009.parquet")
    with pytest.raises(TaskStoreError, match="not listed in the manifest") as err:
        verify_store(str(built))
    assert err.value.field == "test/part-00009.parquet"
    (built / "test" / "part-00009.parquet").unlink()
    with pytest.raises(TaskStoreError, match="listed in the manifest but missing"):
        verify_store(str(built))
    with pytest.raises(TaskStoreError, match="listed in the manifest but missing"):
        read_tasks(str(built), "test")


def test_schema_mismatch_names_column(built):
    part = built / "train" / "part-00000.parquet"
    table = pq.read_table(part)
    ints = pa.array([[[1, 2]]] * table.num_rows, pa.list_(pa.list_(pa.int32())))
    pq.write_table(table.set_column(table.schema.get_field_index("support_y"), "support_y", ints), part)
    for reader in (verify_store, read_tasks):
        with pytest.raises(TaskStoreError, match="column 'support_y' has type") as err:
            reader(str(built))
        assert err.value.field == "support_y"
    pq.write_table(table.drop_columns(["query_x"]), part)
    with pytest.raises(TaskStoreError, match="missing column 'query_x'"):
        read_tasks(str(built), "train")


# ---------------------------------------------------------------------------------------------- Ray Data


@pytest.fixture(scope="module")
def ray_cluster():
    ray = start_cluster()
    ray.data.DataContext.get_current().enable_progress_bars = False
    yield ray
    ray.shutdown()


def _ids(batches) -> list[list[str]]:
    return [[t["task_id"] for t in batch] for batch in batches]


def _consume_shards(shards, batch_size: int) -> list[list[str]]:
    """Iterate streaming-split shards concurrently, as Train workers do."""
    out: list = [None] * len(shards)

    def consume(i):
        out[i] = [tid for b in _ids(task_batches(shards[i], batch_size, seed=1, epoch=0)) for tid in b]

    threads = [threading.Thread(target=consume, args=(i,)) for i in range(len(shards))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    return out


@pytest.mark.ray
def test_ray_shards_disjoint_and_cover(ray_cluster, any_uri):
    tasks = _tasks(40, splits=("train", "val"))
    write_store(any_uri, tasks, family="electricity", features={}, rows_per_group=3)
    train = {t["task_id"] for t in tasks if t["split"] == "train"}
    for materialize, equal in ((False, False), (None, True)):  # equal=True is how Ray Train splits
        ds = read_dataset(any_uri, "train", materialize=materialize)  # (False: workers re-read every epoch)
        a, b = _consume_shards(ds.streaming_split(2, equal=equal), batch_size=3)
        assert not set(a) & set(b) and set(a) | set(b) == train and len(a) + len(b) == len(train)
        if equal:
            assert len(a) == len(b) == 10
    with pytest.raises(TaskStoreError, match="split 'test' has no tasks"):
        read_dataset(any_uri, "test")


@pytest.mark.ray
def test_shuffle_per_epoch_and_collate(ray_cluster, tmp_path):
    uri = str(tmp_path / "store")
    tasks = _tasks(30, splits=("train",))
    write_store(uri, tasks, family="electricity", features={}, rows_per_group=4)
    ds = read_dataset(uri, "train")
    first = _ids(task_batches(ds, 8, seed=3, epoch=0))
    assert [len(b) for b in first] == [8, 8, 8, 6]
    assert sorted(t for b in first for t in b) == sorted(t["task_id"] for t in tasks)
    assert first == _ids(task_batches(ds, 8, seed=3, epoch=0))  # same seed and epoch: same order
    assert first != _ids(task_batches(ds, 8, seed=3, epoch=1))  # next epoch: a new order
    assert first != _ids(task_batches(ds, 8, seed=4, epoch=0))
    assert [len(b) for b in task_batches(ds, 8, seed=3, epoch=0, drop_last=True)] == [8, 8, 8]
    by_id = {t["task_id"]: t for t in tasks}
    batch = next(task_batches(ds, 8, seed=3, epoch=0))
    for t in batch:
        _same(by_id[t["task_id"]], t)
    with pytest.raises(ValueError, match="batch_size"):
        next(task_batches(ds, 0, seed=0, epoch=0))
    # a worker reads its shard once into a sorted table; epochs over the table give the same orders
    table = shard_table(ds)
    assert table.column("task_id").to_pylist() == sorted(t["task_id"] for t in tasks)
    assert _ids(task_batches(table, 8, seed=3, epoch=0)) == first
    assert _ids(task_batches(table, 8, seed=3, epoch=1)) == _ids(task_batches(ds, 8, seed=3, epoch=1))


@pytest.mark.ray
def test_synthetic_store_feeds_a_meta_step(ray_cluster, tmp_path):
    uri = str(tmp_path / "syn")
    manifest = build_synthetic(uri, train_tasks=6, val_tasks=2, test_tasks=0, shots=3, queries=2, window=12,
                               horizon=4)
    f = manifest["features"]
    assert manifest["counts"] == {"train": 6, "val": 2, "test": 0} and manifest["model_kind"] == "forecaster"
    assert (f["input_size"], f["window"], f["horizon"], f["layout"]) == (1, 12, 4, "sequence")
    batch = collate(next(task_batches(read_dataset(uri, "train"), 4, seed=0, epoch=0)))
    assert tuple(batch.support.x.shape) == (4, 3, 12, 1) and tuple(batch.query.y.shape) == (4, 2, 4)
    learner = MetaLearner(Forecaster(1, 8, 1, 4), MAMLConfig(inner_steps=1))
    learner.meta_loss(batch).query.sum().backward()
    assert all(p.grad is not None for p in learner.parameters())


@pytest.mark.ray
def test_ingest_bench_runs(ray_cluster):
    from pipeline.bench.ingest import bench

    out = bench({"tasks": "16", "batch": "4", "epochs": "1", "reps": "1", "hidden": "8", "inner_steps": "1",
                 "window": "8", "horizon": "2"})
    assert out["ingest"]["tasks_per_s"] > 0 and out["meta_step"]["tasks_per_s"] > 0 and out["ratio"] > 0
    with pytest.raises(ValueError, match="unknown option"):
        bench({"taks": "3"})


# ---------------------------------------------------------------------------------------------- synthetic builder


def test_synthetic_sequence_windows_follow_the_sinusoid(tmp_path):
    uri = str(tmp_path / "syn")
    m = build_synthetic(uri, tasks_per_split=2, val_tasks=1, shots=3, queries=2, window=10, horizon=4, noise=0.0)
    assert m["counts"] == {"train": 2, "val": 1, "test": 2} and m["features"]["stride"] == 4
    task = read_tasks(uri, "train", limit=1)[0]
    a, p, w = task["amplitude"], task["phase"], task["frequency"]
    assert 0.1 <= a <= 5 and 0 <= p <= np.pi and 0.1 <= w <= 0.5
    curve = lambda start, n: (a * np.sin(w * (start + np.arange(n)) + p)).astype(np.float32)
    for k in range(3):  # support: windows k * stride; query: the windows after them in time
        np.testing.assert_allclose(task["support_x"][k][:, 0], curve(4 * k, 10), atol=1e-5)
        np.testing.assert_allclose(task["support_y"][k], curve(4 * k + 10, 4), atol=1e-5)
    for j in range(2):
        np.testing.assert_allclose(task["query_x"][j][:, 0], curve(4 * (3 + j), 10), atol=1e-5)
    assert build_synthetic(str(tmp_path / "again"), tasks_per_split=2, val_tasks=1, shots=3, queries=2, window=10,
                           horizon=4, noise=0.0)["content_hash"] == m["content_hash"]


def test_synthetic_points_layout(tmp_path):
    m = build_synthetic(str(tmp_path / "pts"), layout="points", train_tasks=3, val_tasks=0, test_tasks=0, shots=5,
                        queries=7)
    assert m["features"]["model"] == "mlp" and m["model_kind"] == "mlp"
    batch = collate(read_tasks(str(tmp_path / "pts")))
    assert tuple(batch.support.x.shape) == (3, 5, 1) and tuple(batch.query.y.shape) == (3, 7, 1)
    with pytest.raises(ValueError, match="layout"):
        build_synthetic(str(tmp_path / "bad"), layout="grid")
    with pytest.raises(ValueError, match="frequency"):
        build_synthetic(str(tmp_path / "bad"), frequency=(0.5, 0.1))


# ---------------------------------------------------------------------------------------------- CLI


def test_cli_build_and_inspect(tmp_path, capsys):
    out = str(tmp_path / "cli")
    assert main(["tasks", "build", "synthetic", "--out", out, "--tasks-per-split", "3", "--train-tasks", "5",
                 "--window", "8", "--horizon", "2"]) == 0
    assert "train 5, val 3, test 3 tasks" in capsys.readouterr().out
    assert main(["tasks", "build", "synthetic", "--out", out]) == 2
    assert "already holds a task store; pass overwrite=True (--overwrite)" in capsys.readouterr().err
    assert main(["tasks", "build", "synthetic", "--out", out, "--overwrite", "--train-tasks", "4"]) == 0
    capsys.readouterr()
    assert main(["tasks", "inspect", out, "--verify"]) == 0
    text = capsys.readouterr().out
    for words in ("family: synthetic  model_kind: forecaster", "tasks: train 4, val 32, test 32",
                  "support_x_len: min 48 max 48", "vocabulary: none",
                  "sample task 'train-00000'", "verified: files match the manifest"):
        assert words in text
    assert main(["tasks", "inspect", out, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["counts"]["train"] == 4


def test_cli_synthetic_ignores_a_source(tmp_path, caplog):
    assert main(["tasks", "build", "synthetic", "--out", str(tmp_path / "s"), "--source", "raw.csv",
                 "--tasks-per-split", "1", "--rows-per-group", "1"]) == 0
    assert "synthetic: --source raw.csv ignored (synthetic tasks need no data)" in caplog.text
    assert read_manifest(str(tmp_path / "s"))["rows_per_group"] == 1


@pytest.mark.parametrize(("argv", "message"), [
    (["tasks", "build", "weather", "--out", "x"], "unknown family 'weather'; expected one of: synthetic, "
                                                  "electricity, ptb-char, mt-en-de"),
    (["tasks", "build", "synthetic"], "the following arguments are required: --out"),
    (["tasks", "build", "synthetic", "--out", "{tmp}/s", "--shots", "0"], "shots: expected a positive integer"),
    (["tasks", "build", "synthetic", "--out", "{tmp}/s", "--bogus"], "unrecognized arguments: --bogus"),
    (["tasks", "inspect", "{tmp}/nothing"], "no manifest.json"),
])
def test_cli_errors_are_clean(argv, message, tmp_path, capsys):
    assert main([a.replace("{tmp}", str(tmp_path)) for a in argv]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
