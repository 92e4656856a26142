"""The replica's model process on its own (no Ray): same answers as in-process, survives its child dying or
hanging (a job that never ends, a child stopped with SIGSTOP: alive, but never answering)."""

from __future__ import annotations

import dataclasses
import os
import signal
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from servers import process_gone

from metalstm import MAMLConfig, MetaLearner, ModelConfig, build_model, save_checkpoint
from pipeline.serving.jobs import Job, adapt_and_predict, predict_jobs, served_model
from pipeline.serving.model_process import MAX_MODELS, ModelProcess, ModelProcessError, ModelProcessTimeout

F, H = 3, 4

pytestmark = pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads process states from /proc")


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """Five versions of a small forecaster (distinct weights), as the registry would hand them to a replica."""
    out = []
    for k in range(MAX_MODELS + 1):
        torch.manual_seed(k)
        cfg = ModelConfig(kind="forecaster", input_size=F, hidden_size=8, horizon=H)
        learner = MetaLearner(build_model(cfg), MAMLConfig(inner_steps=2, inner_lr=0.05))
        path = save_checkpoint(tmp_path_factory.mktemp("ckpt") / "model.pt", learner, cfg)
        out.append(served_model(path.read_bytes(), name="f", version=str(k + 1), alias=None, config_digest=None,
                                model_uri=f"models:/f/{k + 1}", run_id=None))
    return out


@pytest.fixture()
def process():
    proc = ModelProcess(torch_threads=1)
    yield proc
    proc.close()


def _jobs(served, n: int = 3, steps: int = 2, query: bool = True, seed: int = 0, support: int = 4) -> list[Job]:
    rng = np.random.default_rng(seed)
    return [Job(served, support_x=[rng.normal(size=(12, F)) for _ in range(support)],
                support_y=[rng.normal(size=H) for _ in range(support)], steps=steps,
                query_x=[rng.normal(size=(10, F))] if query else None) for _ in range(n)]


def test_same_answers_as_in_process_and_adapters_round_trip(models, process):
    jobs = _jobs(models[0])
    process.load(models[0])
    child, here = process.adapt_and_predict(jobs), adapt_and_predict(jobs)
    assert process.pid not in (None, os.getpid())
    for (a, p), (b, q) in zip(child, here):
        assert a[0] is None  # /v1/adapt needs no fast weights back
        assert a[1:] == pytest.approx(b[1:], rel=1e-5)
        np.testing.assert_allclose(p[0].values, q[0].values, rtol=1e-5, atol=1e-6)
    # an adapter: fast weights come back as tensors, and predicting with them matches in-process
    adapters = process.adapt_and_predict(_jobs(models[0], query=False))
    params = [a[0] for a, _ in adapters]
    assert all(isinstance(t, torch.Tensor) and t.shape[0] == 1 for p in params for t in p.values())
    queries = [Job(models[0], query_x=j.query_x, params=p) for j, p in zip(jobs, params)]
    for p, q in zip(process.predict(queries), predict_jobs(queries, params)):
        np.testing.assert_allclose(p[0].values, q[0].values, rtol=1e-5, atol=1e-6)


def test_a_killed_child_is_replaced_and_work_in_flight_fails_clearly(models, process):
    process.load(models[0])
    first = process.pid
    os.kill(first, signal.SIGKILL)
    assert process_gone(first)
    time.sleep(0.5)  # the executor has seen it die: the next call starts a new child and loses nothing
    (adapted, preds), = process.adapt_and_predict(_jobs(models[0], n=1))
    assert len(preds[0].values) == H and process.restarts == 1 and process.pid not in (None, first)
    # killed while it holds a batch: that batch fails with ModelProcessError, the next call works again
    errors: list[BaseException] = []
    slow = _jobs(models[0], n=16, steps=1000, support=64)  # about 5 s of work

    def run() -> None:
        try:
            process.adapt_and_predict(slow)
        except BaseException as e:  # noqa: BLE001 - recorded for the assertion below
            errors.append(e)

    worker = threading.Thread(target=run)
    worker.start()
    time.sleep(1.0)
    os.kill(process.pid, signal.SIGKILL)
    worker.join(60)
    assert len(errors) == 1 and isinstance(errors[0], ModelProcessError), errors
    assert "stopped" in str(errors[0]) and process.restarts == 2
    assert process.adapt_and_predict(_jobs(models[0], n=1))[0][1] is not None


def test_older_versions_are_sent_again_when_needed_and_a_bad_one_changes_nothing(models, process):
    for served in models:  # one more version than the child keeps
        process.load(served)
    assert process.stats()["models"] == [s.model_uri for s in models[-MAX_MODELS:]]
    oldest = _jobs(models[0], n=2)  # e.g. an adapter cached before the switches: its version comes back
    assert all(p is not None for _, p in process.adapt_and_predict(oldest))
    assert process.stats()["models"][-1] == models[0].model_uri and len(process.stats()["models"]) == MAX_MODELS
    mixed = [job for served in models for job in _jobs(served, n=1, seed=7)]  # more versions than it holds
    alone = [process.adapt_and_predict([job])[0] for job in mixed]
    for (a, p), (b, q) in zip(process.adapt_and_predict(mixed), alone):
        assert a[1:] == pytest.approx(b[1:], rel=1e-5) and p[0].values == pytest.approx(q[0].values, rel=1e-5)
    bad = dataclasses.replace(models[0], checkpoint=b"not a checkpoint", model_uri="models:/f/99")
    with pytest.raises(Exception, match="checkpoint|pickle|zip|load"):
        process.load(bad)
    assert "models:/f/99" not in process.stats()["models"] and process.restarts == 0
    assert all(p is not None for _, p in process.adapt_and_predict(_jobs(models[-1], n=1)))


def test_close_stops_the_child_even_a_hung_one(models):
    process = ModelProcess(torch_threads=1)
    process.load(models[0])
    pid = process.pid
    process.close()
    assert process_gone(pid) and process.stats()["pid"] is None
    hung = ModelProcess(torch_threads=1)
    hung.load(models[0])
    pid = hung.pid
    os.kill(pid, signal.SIGSTOP)  # would never take the executor's stop sentinel: close kills it
    hung.close()
    assert process_gone(pid)
    assert hung.probe() is not None  # a closed process starts no new child
    with pytest.raises(ModelProcessError, match="closed"):
        hung.load(models[0])


def _wait_until_ready(process: ModelProcess, timeout: float = 120.0) -> None:
    """Until the child started in the background after a stop answers a probe."""
    deadline = time.monotonic() + timeout
    while process.probe() is not None:
        assert time.monotonic() < deadline, "no new model process answered"
        time.sleep(0.2)


def test_a_job_that_never_ends_is_killed_and_the_calls_behind_it_fail_clearly(models):
    process = ModelProcess(torch_threads=1, call_timeout_s=2.0)
    try:
        process.load(models[0])
        first = process.pid
        behind: list[BaseException | list] = []

        def queued() -> None:  # a call that waits behind the stuck one: it must not wait forever either
            time.sleep(0.5)
            try:
                behind.append(process.adapt_and_predict(_jobs(models[0], n=1)))
            except BaseException as e:  # noqa: BLE001 - recorded for the assertion below
                behind.append(e)

        worker = threading.Thread(target=queued)
        worker.start()
        with pytest.raises(ModelProcessTimeout, match="did not finish adapting or predicting within 2 s"):
            process.adapt_and_predict(_jobs(models[0], n=1, steps=10**7))  # blocks in the child far past 2 s
        worker.join(60)
        assert len(behind) == 1 and isinstance(behind[0], ModelProcessError), behind
        assert process_gone(first) and process.stats()["timeouts"] == 1 and process.restarts == 1
        process.call_timeout_s = 120.0
        _wait_until_ready(process)
        assert process.pid not in (None, first)
        assert process.adapt_and_predict(_jobs(models[0], n=1))[0][1] is not None  # its model is sent again
    finally:
        process.close()


def test_a_stopped_child_fails_the_probe_and_is_replaced_but_a_busy_one_passes(models, process):
    process.load(models[0])
    assert process.probe(timeout_s=10.0) is None
    results: list = []
    worker = threading.Thread(target=lambda: results.append(
        process.adapt_and_predict(_jobs(models[0], n=16, steps=1000, support=64))))  # seconds of real work
    worker.start()
    time.sleep(0.5)
    assert process.probe(timeout_s=0.1) is None  # busy within its bound is healthy: nothing is killed
    worker.join(120)
    assert len(results) == 1 and process.stats()["timeouts"] == 0
    first = process.pid
    os.kill(first, signal.SIGSTOP)  # alive, but never answers
    why = process.probe(timeout_s=1.0)
    assert why is not None and "did not answer a probe within 1 s" in why
    assert process_gone(first) and process.stats()["timeouts"] == 1
    _wait_until_ready(process)
    assert process.pid not in (None, first)
    assert process.adapt_and_predict(_jobs(models[0], n=1))[0][1] is not None


def test_a_load_into_a_hung_child_times_out_and_frees_the_process(models):
    process = ModelProcess(torch_threads=1, load_timeout_s=1.0)
    try:
        process.load(models[0])
        first = process.pid
        os.kill(first, signal.SIGSTOP)
        with pytest.raises(ModelProcessTimeout, match=f"loading {models[1].model_uri} within 1 s"):
            process.load(models[1])  # a version switch into a hung child: bounded, and the lock is free again
        assert process_gone(first)
        process.load_timeout_s = 120.0
        for served in models[:2]:  # both versions come back in the new child
            assert process.adapt_and_predict(_jobs(served, n=1))[0][1] is not None
        assert process.pid not in (None, first) and process.stats()["models"] == [m.model_uri for m in models[:2]]
    finally:
        process.close()
