"""Faults in training, injected: divergence (a rate too high, a NaN on one worker), resume and the best model after
a killed worker. The Ray tests share one local cluster per module; the others need no Ray."""

from __future__ import annotations

import os
import random
import subprocess
import sys
from itertools import islice
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from raytrain import final_checkpoint, overrides, small_store, start_cluster, train_config, train_killing_a_worker

from metalstm import MetaLearner, build_model, load_checkpoint, save_checkpoint
from metalstm.maml import NonFiniteLossError
from pipeline.config import load_config
from pipeline.training.divergence import StepGuard, TrainingDiverged, explosion_warning, meta_hint, validation_hint
from pipeline.training.reporting import UNSCORED, score
from pipeline.training.shards import task_stream
from pipeline.training.state import CHECKPOINT_FILE, RunState, load_run, rng_state, set_rng_state
from pipeline.training.worker import FAULT_ENV

REPO = Path(__file__).resolve().parents[1]
# the test-only hook (pipeline/training/worker.py ``poison``): NaN query targets on <run name>:<rank>:<meta-step>
POISON = "fault-nan-skip:1:3,fault-nan-stop:1:5"


@pytest.fixture(scope="module")
def ray_cluster():
    """One local cluster for the module, with the fault hook in the environment every worker inherits."""
    ray = start_cluster({FAULT_ENV: POISON})
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> str:
    return small_store(tmp_path_factory.mktemp("store"))


def _train_table(store: str):
    """The train split as one worker's shard table (sorted by task id), read without Ray."""
    return pq.read_table(Path(store) / "train").sort_by("task_id")


# ----------------------------------------------------------------------------------------------- no Ray needed


@pytest.mark.parametrize("override, key", [("divergence.on_nonfinite=ignore", "divergence.on_nonfinite"),
                                           ("divergence.max_skipped_steps=0", "divergence.max_skipped_steps"),
                                           ("divergence.val_explode_factor=0.5", "divergence.val_explode_factor")])
def test_divergence_keys_are_validated(override, key):
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        load_config(None, [override])


def test_guard_skips_then_stops_after_the_limit_and_stop_stops_at_once():
    cfg = load_config(None, ["divergence.max_skipped_steps=2"])
    guard, bad = StepGuard(cfg, "meta-step", "query loss"), {"skipped": 1.0, "query_loss": float("nan"),
                                                             "nonfinite_workers": 1.0}
    assert guard.after(bad, 4, "hint", rank=0, world=2) is None
    assert guard.after({"skipped": 0.0}, 5, "hint", rank=0, world=2) is None  # a taken step resets the count
    assert guard.after(bad, 6, "hint", rank=0, world=2) is None
    message = guard.after(bad, 7, "HINT", rank=0, world=2)
    assert message and "meta-step 7" in message and "query loss nan" in message and "1 of 2 workers" in message
    assert "divergence.max_skipped_steps=2" in message and "HINT" in message
    assert guard.state == {"skipped": [4, 6, 7], "consecutive": 2}
    stop = StepGuard(load_config(None, ["divergence.on_nonfinite=stop"]), "meta-step", "query loss")
    assert "divergence.on_nonfinite=stop" in stop.after(bad, 1, "h", rank=1, world=2)


def test_hints_name_the_rate_that_diverged():
    cfg = load_config(None, ["optim.lr=1e30", "maml.inner_lr=0.05", "maml.inner_steps=2", "maml.eval_inner_steps=9"])
    theta = validation_hint(cfg, NonFiniteLossError("x", inner_step=0))
    assert "optim.lr (now 1e+30)" in theta and "maml.inner_lr" not in theta
    inner = validation_hint(cfg, NonFiniteLossError("x", inner_step=5))
    assert "maml.inner_lr (now 0.05)" in inner and "maml.eval_inner_steps" in inner and "optim.lr" not in inner
    assert "optim.lr" in meta_hint(cfg, {"nonfinite_at_theta": 1.0}, theta_updated=True)
    assert "optim.lr" not in meta_hint(cfg, {"nonfinite_at_theta": 1.0}, theta_updated=False)  # the data
    both = meta_hint(cfg, {"nonfinite_at_theta": 0.0}, theta_updated=True)
    assert "maml.inner_lr" in both and "optim.lr" in both


def test_exploding_validation_loss_warns_over_the_factor():
    cfg = load_config(None, ["optim.lr=1e8"])
    warning = explosion_warning(cfg, 30, 8e15, 0.5)
    assert warning and "step 30" in warning and "optim.lr (now 1e+08)" in warning
    assert explosion_warning(cfg, 30, 4e5, 0.5) is None  # under 1e6 x the reference
    assert explosion_warning(load_config(None, ["divergence.val_explode_factor=0"]), 30, 8e15, 0.5) is None


def test_checkpoint_scores_are_always_finite():
    """Ray's snapshot writes NaN and inf as null, which it cannot compare after a resume."""
    assert score(0.25) == 0.25 and score(float("nan")) == score(float("inf")) == score(None) == UNSCORED


def _checkpoint(tmp_path: Path, cfg) -> Path:
    torch.manual_seed(0)
    learner = MetaLearner(build_model(cfg.model), cfg.maml).double()
    optimizer = torch.optim.Adam(learner.parameters(), lr=0.5)
    for p in learner.parameters():
        p.grad = torch.ones_like(p)
    optimizer.step()
    extra = RunState(step=3, stage="meta").meta_extra(optimizer, {"train": {}, "store": {}}, [], 0.5)
    extra["rng"]["cuda"] = torch.get_rng_state()  # as a GPU worker saves it (any ByteTensor stands in)
    return save_checkpoint(tmp_path / CHECKPOINT_FILE, learner, cfg.model, extra)


@pytest.mark.parametrize("device", ["cpu", "meta", *(["cuda"] if torch.cuda.is_available() else [])])
def test_resume_hands_torch_cpu_byte_rng_states(tmp_path, monkeypatch, device):
    """The resume path a worker on ``device`` takes: torch's set_rng_state accepts only CPU ByteTensors, so the
    checkpoint must not be mapped to the device (``meta`` stands in for an accelerator on a CPU-only machine:
    mapped there, as before the fix, nothing would load). The config's rate replaces the checkpoint's."""
    cfg = load_config(None, ["model.hidden_size=4", "optim.lr=0.001"])
    path = _checkpoint(tmp_path, cfg)
    given: dict[str, torch.Tensor] = {}
    monkeypatch.setattr(torch, "set_rng_state", lambda t: given.__setitem__("torch", t))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda t, device="cuda": given.__setitem__("cuda", t))
    learner = MetaLearner(build_model(cfg.model), cfg.maml).double()
    optimizer = torch.optim.Adam(learner.parameters(), lr=cfg.optim.lr)
    run = load_run(path, learner, optimizer, cfg, torch.device(device), rank=0)
    assert set(given) == {"torch", "cuda"}
    for tensor in given.values():
        assert tensor.device.type == "cpu" and tensor.dtype == torch.uint8
    assert run.step == 3 and run.resumed_at == [3]
    assert optimizer.param_groups[0]["lr"] == 0.001 and optimizer.state  # the config's rate, the saved moments
    saved = load_checkpoint(path)["state_dict"]
    assert all(torch.equal(v, learner.state_dict()[k]) for k, v in saved.items())


def test_numpy_and_python_rngs_come_back(tmp_path):
    np.random.seed(5)
    np.random.rand(3)
    random.seed(5)
    torch.save(rng_state(), tmp_path / "rng.pt")
    expected = (np.random.rand(4).tolist(), np.random.randn(), random.random(), torch.rand(2))
    np.random.seed(0)
    random.seed(0)
    torch.manual_seed(0)
    set_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True))
    got = (np.random.rand(4).tolist(), np.random.randn(), random.random(), torch.rand(2))
    assert got[:3] == expected[:3] and torch.equal(got[3], expected[3])


def test_task_stream_resumes_at_the_batch_it_reached(store):
    """A stream started at step k draws what an uninterrupted one draws from its k-th batch, mid-epoch included
    (10 tasks in batches of 3: epochs of 4 batches, the last one short)."""
    table = _train_table(store)

    def ids(start: int, n: int) -> list[list[str]]:
        return [[t["task_id"] for t in b] for b in islice(task_stream(table, 3, seed=7, start=start), n)]

    whole = ids(0, 13)
    assert len({tuple(sorted(sum(whole[e * 4:e * 4 + 4], []))) for e in range(3)}) == 1  # every epoch: every task
    for start in (1, 4, 5, 10):
        assert ids(start, 13 - start) == whole[start:], start


# ----------------------------------------------------------------------------------------------- on Ray


@pytest.mark.ray
def test_nan_on_one_worker_is_skipped_by_every_worker(ray_cluster, store, tmp_path):
    """Rank 1's loss is NaN at meta-step 3: both workers skip it (θ checked identical at every validation), no
    optimiser step is taken with it, and the run goes on to the end."""
    from pipeline.training.train import train

    cfg = train_config(store, tmp_path, name="fault-nan-skip", **{
        "schedule.meta_steps": 6, "schedule.meta_batch_size": 4, "schedule.val_every": 3, "schedule.val_tasks": 2,
        "scaling.num_workers": 2})
    result = train(cfg)
    final = final_checkpoint(result)
    assert final["extra"]["step"] == 6 and final["extra"]["divergence"]["skipped"] == [3]
    assert final["extra"]["optimizer"]["state"][0]["step"] == 5  # five updates in six steps
    assert all(torch.isfinite(v).all() for v in final["state_dict"].values())
    rows = {r["step"]: r for r in final["extra"]["history"]}
    assert rows[3]["skipped_steps"] == 1 and rows[4]["skipped_steps"] == 0
    assert result.metrics["skipped_steps"] == 1


@pytest.mark.ray
def test_stop_exits_non_zero_with_one_line_and_keeps_the_best(ray_cluster, store, tmp_path):
    """``divergence.on_nonfinite=stop``, NaN on rank 1 at step 5 after validations at 2 and 4, one checkpoint kept:
    the CLI exits 2 with one line naming the step, the loss and the rates, no traceback; Ray kept the best
    validated checkpoint besides the stopped one, and the message says where it is."""
    args = [sys.executable, "-m", "pipeline.cli", "train", *overrides(store, tmp_path, **{
        "name": "fault-nan-stop", "schedule.meta_steps": 8, "schedule.meta_batch_size": 4, "schedule.val_every": 2,
        "schedule.val_tasks": 2, "scaling.num_workers": 2, "checkpoint.num_to_keep": 1,
        "divergence.on_nonfinite": "stop"})]
    env = {**os.environ, "RAY_ADDRESS": ray_cluster.get_runtime_context().gcs_address}
    out = subprocess.run(args, cwd=tmp_path, env={**env, "PYTHONPATH": str(REPO)}, capture_output=True, text=True,
                         timeout=400)
    output = out.stdout + out.stderr
    assert out.returncode == 2, output[-3000:]
    assert "Traceback" not in output, output[-3000:]
    errors = [line for line in out.stderr.splitlines() if line.startswith("metalstm train: error:")]
    assert len(errors) == 1, output[-3000:]
    line = errors[0]
    assert "meta-step 5 diverged: query loss nan (not finite on 1 of 2 workers)" in line, line
    assert "maml.inner_lr (now 0.05)" in line and "optim.lr (now 0.001)" in line, line
    best_path = Path(line.split("is kept: ")[1].strip())
    best = load_checkpoint(best_path)
    stopped = load_checkpoint(tmp_path / "runs" / "fault-nan-stop" / "stopped-0000005" / CHECKPOINT_FILE)
    assert stopped["extra"]["diverged"] and stopped["extra"]["divergence"]["skipped"] == [5]
    assert stopped["extra"]["best"]["step"] == best["extra"]["step"] in (2, 4)
    assert best["extra"]["val_loss"] == stopped["extra"]["best"]["val_loss"]
    kept = {p.name for p in (tmp_path / "runs" / "fault-nan-stop").iterdir() if p.name.startswith(("step-", "stop"))}
    assert kept == {best_path.parent.name, "stopped-0000005"}  # the best and the newest, nothing else


@pytest.mark.ray
def test_a_meta_rate_too_high_is_named_not_the_inner_rate(ray_cluster, store, tmp_path):
    """``optim.lr=1e30``: θ blows up after the first step; the validation that follows fails at θ's own support
    loss, which the run reports as optim.lr's doing (it used to blame maml.inner_lr), and stops cleanly."""
    from pipeline.training.train import train

    cfg = train_config(store, tmp_path, name="fault-lr", **{
        "dtype": "float32", "optim.lr": 1e30, "schedule.meta_steps": 4, "schedule.meta_batch_size": 4,
        "schedule.val_every": 1, "schedule.val_tasks": 2, "scaling.num_workers": 2})
    with pytest.raises(TrainingDiverged) as info:
        train(cfg)
    message = str(info.value)
    assert "validation at meta-step 1 diverged" in message and "lower optim.lr (now 1e+30)" in message, message
    assert "maml.inner_lr" not in message, message


@pytest.mark.ray
def test_a_killed_worker_resumes_the_data_stream_and_registers_the_best_from_before(ray_cluster, store, tmp_path):
    """One worker, batches of 3 of 10 tasks (the order matters; checkpoints at steps 35, 70, 105, mid-epoch),
    SIGKILLed after the first checkpoint. The restarted worker draws exactly the batches an uninterrupted stream
    draws, and the best model, validated before the kill (θ barely moves at optim.lr=1e-300, so the first
    validation stays the best), is recovered from the run's storage and registered, not the final one."""
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cfg = train_config(store, tmp_path, name="fault-resume", **{
        "optim.lr": 1e-300, "schedule.meta_steps": 105, "schedule.meta_batch_size": 3, "schedule.val_every": 35,
        "schedule.val_tasks": 2, "schedule.log_every": 35, "scaling.num_workers": 1, "scaling.max_failures": 1,
        "tracking.enabled": "true", "tracking.uri": uri, "tracking.experiment": "faults",
        "tracking.registered_model": "fault-best-model"})
    final = train_killing_a_worker(cfg, tmp_path / "runs" / "fault-resume")
    assert final["extra"]["step"] == 105 and len(final["extra"]["resumed_at"]) == 1
    assert final["extra"]["best"]["step"] == 35

    uninterrupted = [[t["task_id"] for t in b] for b in islice(task_stream(_train_table(store), 3, cfg.schedule.seed),
                                                               105)]
    for step in (70, 105):  # each checkpoint records its step's meta-batch
        ckpt = load_checkpoint(tmp_path / "runs" / "fault-resume" / f"step-{step:07d}" / CHECKPOINT_FILE)
        assert ckpt["extra"]["batch_task_ids"] == uninterrupted[step - 1], step
    versions = MlflowClient(uri).search_model_versions("name = 'fault-best-model'")
    assert [(v.tags.get("metalstm.tag"), v.tags.get("metalstm.step")) for v in versions] == [("best", "35")]
