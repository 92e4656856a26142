"""Distributed meta-training on a real local Ray cluster (shared by the whole module)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest
import torch

from metalstm import MetaLearner, build_model, collate, load_checkpoint
from pipeline.config import apply_manifest, load_config
from pipeline.train import CHECKPOINT_FILE, split_sizes, train

pytestmark = pytest.mark.ray
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def ray_cluster():
    import ray

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> str:
    from pipeline.builders.synthetic import build_synthetic

    uri = str(tmp_path_factory.mktemp("store") / "sinusoid")
    build_synthetic(uri, layout="sequence", train_tasks=10, val_tasks=4, test_tasks=4, seed=3,
                    window=12, horizon=4, shots=3, queries=3)
    return uri


def _config(store: str, tmp_path: Path, **overrides):
    items = {"data.store": store, "tracking.enabled": "false", "dtype": "float64", "model.hidden_size": 8,
             "maml.inner_steps": 2, "maml.inner_lr": 0.05, "schedule.val_tasks": 0, "schedule.log_every": 1,
             "checkpoint.storage_path": str(tmp_path / "runs"), "scaling.max_failures": 0}
    items.update({k: str(v) for k, v in overrides.items()})
    return load_config(None, [f"{k}={v}" for k, v in items.items()])


def _final(result) -> dict:
    with result.checkpoint.as_directory() as d:
        return load_checkpoint(Path(d) / CHECKPOINT_FILE)


def test_split_sizes_uneven():
    assert split_sizes(5, 2) == [3, 2]
    assert split_sizes(2, 4) == [1, 1, 0, 0]
    assert sum(split_sizes(17, 3)) == 17


@pytest.mark.parametrize("batch", [4, 5])
def test_two_workers_equal_one_process(ray_cluster, store, tmp_path, batch):
    """Two workers' all-reduced meta-gradient and step equal one process on the same global batch."""
    from pipeline.taskstore import read_manifest, read_tasks

    cfg = _config(store, tmp_path, name=f"equiv-{batch}", **{"schedule.meta_steps": 1,
                  "schedule.meta_batch_size": batch, "scaling.num_workers": 2, "optim.grad_clip": 0})
    ckpt = _final(train(cfg))
    ids = ckpt["extra"]["batch_task_ids"]
    assert len(ids) == batch and len(set(ids)) == batch  # every task of the global batch, once

    apply_manifest(cfg, read_manifest(store))
    torch.manual_seed(cfg.schedule.seed)
    learner = MetaLearner(build_model(cfg.model), cfg.maml).double()
    by_id = {t["task_id"]: t for t in read_tasks(store, "train")}
    result = learner.meta_loss(collate([by_id[i] for i in ids]).to("cpu", torch.float64))
    (result.query.sum() / batch).backward()
    optimizer = torch.optim.Adam(learner.parameters(), lr=cfg.optim.lr)
    grads = {n: p.grad.clone() for n, p in learner.named_parameters()}
    optimizer.step()

    state = ckpt["extra"]["optimizer"]["state"]
    for i, (name, p) in enumerate(learner.named_parameters()):
        # Adam's first moment after one step is (1 - β1) g: the all-reduced meta-gradient itself
        torch.testing.assert_close(state[i]["exp_avg"] / 0.1, grads[name], rtol=1e-6, atol=1e-12)
        torch.testing.assert_close(ckpt["state_dict"][name], p.detach(), rtol=1e-6, atol=1e-12)


def _train_workers() -> list[psutil.Process]:
    """This test's Ray Train workers: descendants of this process (its local raylet), never another cluster's."""
    found = []
    for proc in psutil.Process().children(recursive=True):
        try:
            cmd = " ".join(proc.cmdline())
        except psutil.Error:
            continue
        if cmd.startswith("ray::RayTrainWorker"):
            found.append(proc)
    return found


def _wait_for_checkpoint(root: Path, timeout: float = 300.0, log_file: Path | None = None) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        # a checkpoint counts once Ray Train's snapshot (what a restarted run restores from) names it
        snapshot = root / "checkpoint_manager_snapshot.json"
        if snapshot.exists() and "step-" in snapshot.read_text(errors="ignore"):
            return
        time.sleep(0.2)
    output = log_file.read_text()[-3000:] if log_file else ""
    raise TimeoutError(f"no checkpoint under {root} after {timeout}s\n{output}")


def test_killed_worker_recovers_to_the_same_parameters(ray_cluster, store, tmp_path):
    """SIGKILL a worker mid-run: Ray Train restarts the group from the last checkpoint and finishes exactly."""
    # Deterministic config: every step uses all 10 training tasks (2 workers x 5), so the order cannot matter.
    common = {"schedule.meta_steps": 150, "schedule.meta_batch_size": 10, "schedule.val_every": 10,
              "schedule.log_every": 50, "scaling.num_workers": 2}
    reference = _final(train(_config(store, tmp_path, name="uninterrupted", **common)))

    cfg = _config(store, tmp_path, name="interrupted", **{**common, "scaling.max_failures": 2})
    outcome: dict = {}
    thread = threading.Thread(target=lambda: outcome.update(result=train(cfg)))
    thread.start()
    _wait_for_checkpoint(tmp_path / "runs" / "interrupted")
    victims = _train_workers()
    assert victims, "no Ray Train worker process found to kill"
    victims[-1].send_signal(signal.SIGKILL)
    thread.join(timeout=300)
    assert not thread.is_alive()
    final = _final(outcome["result"])
    assert final["extra"]["step"] == 150
    for key, value in reference["state_dict"].items():
        torch.testing.assert_close(final["state_dict"][key], value, rtol=1e-6, atol=1e-9)


def test_driver_restart_resumes(ray_cluster, store, tmp_path):
    """Kill the driver process; the same command with the same run name resumes from its last checkpoint."""
    address = ray_cluster.get_runtime_context().gcs_address
    args = [sys.executable, "-m", "pipeline.cli", "train", "name=resumable", f"data.store={store}",
            "tracking.enabled=false", "model.hidden_size=8", "maml.inner_steps=1", "schedule.val_tasks=0",
            "schedule.meta_steps=400", "schedule.meta_batch_size=4", "schedule.val_every=20",
            "schedule.log_every=100", "scaling.num_workers=1", f"checkpoint.storage_path={tmp_path / 'runs'}"]
    env = {**os.environ, "RAY_ADDRESS": address}
    first_log = tmp_path / "first.log"
    with open(first_log, "w") as out:  # a file, not a pipe: an unread pipe would block the driver
        first = subprocess.Popen(args, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT, text=True)
        try:
            _wait_for_checkpoint(tmp_path / "runs" / "resumable", timeout=300, log_file=first_log)
        finally:
            first.send_signal(signal.SIGKILL)
            first.wait(timeout=30)
    time.sleep(2)  # let Ray notice the driver is gone and release its workers
    second = subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=400)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    output = second.stdout + second.stderr
    assert "resumed from step" in output, output[-3000:]
    assert "'step': 400" in output


def test_bad_config_fails_before_ray(tmp_path):
    code = ("import sys; from pipeline.cli import main; rc = main(['train', 'schedule.meta_stepz=3']); "
            "print('RAY_IMPORTED' if 'ray' in sys.modules else 'NO_RAY'); sys.exit(rc)")
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120,
                         env={**os.environ, "PYTHONPATH": str(REPO)})
    assert out.returncode == 2
    assert "schedule.meta_stepz" in out.stderr
    assert "NO_RAY" in out.stdout


@pytest.mark.parametrize("override, key", [("optim.lr=-1", "optim.lr"), ("scaling.num_workers=0",
                                           "scaling.num_workers"), ("model.cell=rnn", "model.cell")])
def test_bad_values_name_the_key(override, key):
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        load_config(None, [override])


@pytest.mark.parametrize("path", sorted(p.name for p in (REPO / "configs").glob("*.yaml")
                                        if not p.name.startswith("experiment_")))
def test_shipped_train_configs_validate(path):
    cfg = load_config(REPO / "configs" / path)
    assert cfg.schedule.meta_steps >= 1


def test_warm_start_initialises_theta(ray_cluster, store, tmp_path):
    """``checkpoint.warm_start`` starts θ from another checkpoint (a tiny step keeps it there)."""
    from metalstm import MAMLConfig, save_checkpoint
    from pipeline.taskstore import read_manifest

    cfg = _config(store, tmp_path, name="warm", **{"schedule.meta_steps": 1, "schedule.meta_batch_size": 2,
                                                   "scaling.num_workers": 1, "optim.lr": 1e-12})
    apply_manifest(cfg, read_manifest(store))
    torch.manual_seed(1234)  # a different init from the run's seed
    donor = MetaLearner(build_model(cfg.model), MAMLConfig(**vars(cfg.maml))).double()
    cfg.checkpoint.warm_start = str(save_checkpoint(tmp_path / "donor.pt", donor, cfg.model))
    final = _final(train(cfg))
    for name, value in donor.state_dict().items():
        torch.testing.assert_close(final["state_dict"][name], value, rtol=0, atol=1e-9)
