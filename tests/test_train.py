"""Distributed meta-training on a real local Ray cluster (shared by the whole module)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from raytrain import (
    final_checkpoint,
    small_store,
    start_cluster,
    thread_workers,
    train_config,
    train_killing_a_worker,
    wait_for_checkpoint,
)

from metalstm import MetaLearner, build_model, collate, load_checkpoint
from pipeline.config import apply_manifest, load_config
from pipeline.training.collective import split_sizes
from pipeline.training.state import CHECKPOINT_FILE
from pipeline.training.train import train

pytestmark = pytest.mark.ray
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def ray_cluster():
    ray = start_cluster()
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> str:
    return small_store(tmp_path_factory.mktemp("store"))


def test_split_sizes_uneven():
    assert split_sizes(5, 2) == [3, 2]
    assert split_sizes(2, 4) == [1, 1, 0, 0]
    assert sum(split_sizes(17, 3)) == 17


@pytest.mark.parametrize("batch", [4, 5])
def test_two_workers_equal_one_process(ray_cluster, store, tmp_path, batch):
    """Two workers' all-reduced meta-gradient and step equal one process on the same global batch."""
    from pipeline.tasks.store import read_manifest, read_tasks

    cfg = train_config(store, tmp_path, name=f"equiv-{batch}", **{"schedule.meta_steps": 1,
                  "schedule.meta_batch_size": batch, "scaling.num_workers": 2, "optim.grad_clip": 0})
    ckpt = final_checkpoint(train(cfg))
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


def test_killed_worker_recovers_to_the_same_parameters(ray_cluster, store, tmp_path):
    """SIGKILL a worker mid-run: Ray Train restarts the group from the last checkpoint and finishes exactly."""
    # Deterministic config: every step uses all 10 training tasks (2 workers x 5), so the order cannot matter.
    # The reference is one process on the same full batches (two workers equal one process: tested above).
    from metalstm.training import meta_step
    from pipeline.tasks.store import read_manifest, read_tasks

    cfg = train_config(store, tmp_path, name="interrupted", **{
        "schedule.meta_steps": 60, "schedule.meta_batch_size": 10, "schedule.val_every": 20,
        "schedule.log_every": 20, "scaling.num_workers": 2, "scaling.max_failures": 2})
    final = train_killing_a_worker(cfg, tmp_path / "runs" / "interrupted")
    assert final["extra"]["step"] == 60 and final["extra"]["resumed_at"]

    apply_manifest(cfg, read_manifest(store))
    torch.manual_seed(cfg.schedule.seed)
    learner = MetaLearner(build_model(cfg.model), cfg.maml).double()
    optimizer = torch.optim.Adam(learner.parameters(), lr=cfg.optim.lr)
    batch = collate(read_tasks(store, "train")).to("cpu", torch.float64)
    for step in range(1, 61):
        meta_step(learner, batch, optimizer, step=step, grad_clip=cfg.optim.grad_clip)
    for key, value in learner.state_dict().items():
        torch.testing.assert_close(final["state_dict"][key], value, rtol=1e-6, atol=1e-9)


def test_driver_restart_resumes(ray_cluster, store, tmp_path):
    """Kill the driver process; the same command with the same run name resumes from its last checkpoint."""
    address = ray_cluster.get_runtime_context().gcs_address
    args = [sys.executable, "-m", "pipeline.cli", "train", "name=resumable", f"data.store={store}",
            "tracking.enabled=false", "model.hidden_size=8", "maml.inner_steps=1", "schedule.val_tasks=0",
            "schedule.meta_steps=120", "schedule.meta_batch_size=4", "schedule.val_every=20",
            "schedule.log_every=100", "scaling.num_workers=1", f"checkpoint.storage_path={tmp_path / 'runs'}"]
    env = {**os.environ, "RAY_ADDRESS": address}
    first_log = tmp_path / "first.log"
    with open(first_log, "w") as out:  # a file, not a pipe: an unread pipe would block the driver
        first = subprocess.Popen(args, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT, text=True)
        try:
            wait_for_checkpoint(tmp_path / "runs" / "resumable", timeout=300, log_file=first_log)
        finally:
            first.send_signal(signal.SIGKILL)
            first.wait(timeout=30)
    time.sleep(2)  # let Ray notice the driver is gone and release its workers
    second = subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=400)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    output = second.stdout + second.stderr
    assert "resumed from step" in output, output[-3000:]
    assert "'step': 120" in output


def test_bad_config_fails_before_ray(tmp_path):
    code = ("import sys; from pipeline.cli import main; rc = main(['train', 'schedule.meta_stepz=3']); "
            "print('RAY_IMPORTED' if 'ray' in sys.modules else 'NO_RAY'); sys.exit(rc)")
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120,
                         env={**os.environ, "PYTHONPATH": str(REPO)})
    assert out.returncode == 2
    assert "schedule.meta_stepz" in out.stderr
    assert "NO_RAY" in out.stdout


@pytest.mark.parametrize("override, key", [("optim.lr=-1", "optim.lr"), ("scaling.num_workers=0",
                                           "scaling.num_workers"), ("model.cell=rnn", "model.cell"),
                                           ("model.loss=huber", "model.loss"),
                                           ("model.base_season=-1", "model.base_season")])
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
    from pipeline.tasks.store import read_manifest

    cfg = train_config(store, tmp_path, name="warm", **{"schedule.meta_steps": 1, "schedule.meta_batch_size": 2,
                                                   "scaling.num_workers": 1, "optim.lr": 1e-12})
    apply_manifest(cfg, read_manifest(store))
    torch.manual_seed(1234)  # a different init from the run's seed
    donor = MetaLearner(build_model(cfg.model), MAMLConfig(**vars(cfg.maml))).double()
    cfg.checkpoint.warm_start = str(save_checkpoint(tmp_path / "donor.pt", donor, cfg.model))
    final = final_checkpoint(train(cfg))
    for name, value in donor.state_dict().items():
        torch.testing.assert_close(final["state_dict"][name], value, rtol=0, atol=1e-9)


# ----------------------------------------------------------------------------- pre-train, then meta-train


def test_pretrain_step_data_parallel_equals_one_process(store):
    """Three "workers" (threads: 4, 3 and no sequences) summing with an all-reduce take one process's step."""
    import copy

    from metalstm.baselines import as_split, pooled_sequences
    from metalstm.models import batched
    from metalstm.training import pretrain_step
    from pipeline.tasks.store import read_manifest, read_tasks

    cfg = load_config(None, [f"data.store={store}", "model.hidden_size=8"])
    apply_manifest(cfg, read_manifest(store))
    torch.manual_seed(0)
    base = build_model(cfg.model).double()
    pool = pooled_sequences(read_tasks(store, "train"))[:7]
    parts = [pool[:4], pool[4:], []]

    # one process: exactly metalstm.baselines.pretrain's step (task_loss on the pool as ONE task, clip, Adam)
    ref = copy.deepcopy(base)
    ref_opt = torch.optim.Adam(ref.parameters(), lr=0.01)
    loss = ref.task_loss(batched(ref, 1), as_split(pool).to("cpu", torch.float64)).sum()
    loss.backward()
    for p in ref.parameters():  # a fresh backward can hand bias_ih and bias_hh ONE shared grad tensor, which an
        p.grad = p.grad.clone()  # in-place clip would then scale twice
    torch.nn.utils.clip_grad_norm_(ref.parameters(), 0.05)
    ref_opt.step()

    models = [copy.deepcopy(base) for _ in parts]

    def step(rank: int, part: list, all_reduce) -> dict:
        split = as_split(part).to("cpu", torch.float64) if part else None
        opt = torch.optim.Adam(models[rank].parameters(), lr=0.01)
        return pretrain_step(models[rank], split, opt, grad_clip=0.05, all_reduce=all_reduce)

    outs = thread_workers(parts, step)
    for rank, model in enumerate(models):
        assert outs[rank]["loss"] == pytest.approx(loss.item(), rel=1e-12)
        for (name, p), q in zip(model.named_parameters(), ref.parameters()):
            torch.testing.assert_close(p, q, rtol=1e-10, atol=1e-12, msg=lambda m, r=rank, n=name: f"{r} {n}: {m}")
    assert any((p - q).abs().max() > 1e-4 for p, q in zip(ref.parameters(), base.parameters()))  # it did move


def test_pretrain_step_raises_on_non_finite_loss(store):
    from metalstm import NonFiniteLossError
    from metalstm.baselines import as_split, pooled_sequences
    from metalstm.training import pretrain_step
    from pipeline.tasks.store import read_manifest, read_tasks

    cfg = load_config(None, [f"data.store={store}", "model.hidden_size=8"])
    apply_manifest(cfg, read_manifest(store))
    model = build_model(cfg.model)
    with torch.no_grad():
        next(model.parameters()).fill_(float("nan"))
    split = as_split(pooled_sequences(read_tasks(store, "train"))[:3])
    with pytest.raises(NonFiniteLossError, match="pretrain step 7"):
        pretrain_step(model, split, torch.optim.Adam(model.parameters()), step=7)


def _checkpoint_at(tmp_path: Path, name: str, dir_name: str) -> dict:
    return load_checkpoint(tmp_path / "runs" / name / dir_name / CHECKPOINT_FILE)


def test_pretrain_then_meta_train(ray_cluster, store, tmp_path):
    """2 workers pre-train (loss falls, checkpoints marked stage pretrain), then meta-train from that θ; running
    the finished run again with more meta-steps resumes meta-training and never repeats pre-training."""
    from pipeline.tasks.store import read_manifest

    common = {"pretrain.steps": 30, "pretrain.batch_size": 16, "pretrain.lr": 0.02, "pretrain.val_every": 15,
              "schedule.val_tasks": 2, "schedule.meta_batch_size": 2, "scaling.num_workers": 2, "optim.lr": 1e-12}
    tracking_uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cfg = train_config(store, tmp_path, name="pretrained", **{**common, "schedule.meta_steps": 1,
                                                         "tracking.enabled": "true", "tracking.uri": tracking_uri,
                                                         "tracking.experiment": "pretrain-test"})
    final = final_checkpoint(train(cfg))
    extra, pre = final["extra"], final["extra"]["pretrain"]
    assert extra["stage"] == "meta" and extra["step"] == 1 and pre["step"] == 30 and "optimizer" not in pre
    losses = [row["loss"] for row in pre["history"]]
    assert [row["step"] for row in pre["history"]] == list(range(1, 31))
    assert sum(losses[-5:]) / 5 < 0.8 * sum(losses[:5]) / 5, losses
    assert [row["step"] for row in pre["history"] if "val_loss" in row] == [15, 30]
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri)
    run = client.search_runs([client.get_experiment_by_name("pretrain-test").experiment_id])[0]
    logged = client.get_metric_history(run.info.run_id, "pretrain/loss")
    assert sorted(m.step for m in logged) == list(range(1, 31))
    assert [m.step for m in client.get_metric_history(run.info.run_id, "pretrain/val_loss")] in ([15, 30], [30, 15])

    mid, end = _checkpoint_at(tmp_path, "pretrained", "pretrain-0000015"), \
        _checkpoint_at(tmp_path, "pretrained", "pretrain-0000030")
    assert mid["extra"]["stage"] == end["extra"]["stage"] == "pretrain"
    assert end["extra"]["pretrain"]["optimizer"]["state"][0]["step"] == 30  # pre-training's own Adam
    assert final["extra"]["optimizer"]["state"][0]["step"] == 1  # a fresh meta optimiser
    apply_manifest(cfg, read_manifest(store))
    torch.manual_seed(cfg.schedule.seed)
    cold = MetaLearner(build_model(cfg.model), cfg.maml).double().state_dict()
    for name, value in end["state_dict"].items():  # meta-training (a 1e-12 step) started from the pre-trained θ
        torch.testing.assert_close(final["state_dict"][name], value, rtol=0, atol=1e-9)
    assert max(float((end["state_dict"][n] - v).abs().max()) for n, v in cold.items()) > 1e-2

    again_cfg = train_config(store, tmp_path, name="pretrained", **{**common, "schedule.meta_steps": 3})
    again = final_checkpoint(train(again_cfg))
    assert again["extra"]["step"] == 3
    assert again["extra"]["pretrain"] == pre  # the same stage record: not re-run, not resumed
    assert again["extra"]["optimizer"]["state"][0]["step"] == 3  # meta optimiser continued from its checkpoint


def test_killed_worker_resumes_pretraining(ray_cluster, store, tmp_path):
    """SIGKILL the worker mid pre-training: the restarted group continues from the last pre-training checkpoint
    (not from step 0) and ends exactly where one process pre-training on the same draws does."""
    from metalstm.baselines import as_split
    from metalstm.training import pretrain_step
    from pipeline.tasks.store import read_dataset, read_manifest, shard_table
    from pipeline.training.shards import pretrain_batch, sequence_pool

    cfg = train_config(store, tmp_path, name="pre-interrupted", **{
        "pretrain.steps": 90, "pretrain.batch_size": 16, "pretrain.val_every": 30, "schedule.log_every": 10,
        "schedule.meta_steps": 1, "schedule.meta_batch_size": 2, "scaling.num_workers": 1,
        "scaling.max_failures": 1})
    final = train_killing_a_worker(cfg, tmp_path / "runs" / "pre-interrupted", marker="pretrain-")
    pre = final["extra"]["pretrain"]
    assert pre.get("resumed_at") in ([30], [60]), pre.get("resumed_at")  # resumed mid-stage, from a checkpoint
    assert pre["step"] == 90 and [r["step"] for r in pre["history"]] == list(range(10, 91, 10))

    # one process, the same draws (one worker: its pool is every training sequence), uninterrupted
    apply_manifest(cfg, read_manifest(store))
    torch.manual_seed(cfg.schedule.seed)
    model = MetaLearner(build_model(cfg.model), cfg.maml).double().model
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.pretrain.lr)
    pool = sequence_pool(shard_table(read_dataset(store, "train")))
    for step in range(cfg.pretrain.steps):
        split = as_split(pretrain_batch(pool, cfg.pretrain.batch_size, cfg.schedule.seed, 0, step))
        pretrain_step(model, split.to("cpu", torch.float64), optimizer, grad_clip=cfg.optim.grad_clip)
    end = _checkpoint_at(tmp_path, "pre-interrupted", "pretrain-0000090")
    for name, value in model.state_dict().items():
        torch.testing.assert_close(end["state_dict"][f"model.{name}"], value, rtol=1e-6, atol=1e-9)
    assert end["extra"]["pretrain"]["optimizer"]["state"][0]["step"] == 90  # Adam's state survived the restart


@pytest.mark.parametrize("override, key", [("pretrain.steps=-1", "pretrain.steps"),
                                           ("pretrain.batch_size=0", "pretrain.batch_size"),
                                           ("pretrain.lr=0", "pretrain.lr"),
                                           ("pretrain.val_every=-5", "pretrain.val_every"),
                                           ("pretrain.stepz=3", "pretrain.stepz"),
                                           ("pretrain.steps=many", "pretrain.steps")])
def test_bad_pretrain_values_name_the_key(override, key):
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        load_config(None, [override])


def test_pretraining_is_off_by_default():
    cfg = load_config(None, ["pretrain.batch_size=8"])
    assert cfg.pretrain.steps == 0 and cfg.pretrain.batch_size == 8


def test_print_config_leaves_out_the_dimensions_the_store_sets(capsys):
    from pipeline.cli import main

    assert main(["train", "--config", str(REPO / "configs" / "tiny.yaml"), "--print-config"]) == 0
    out = capsys.readouterr().out
    body, comment = out.rsplit("# ", 1)
    assert "hidden_size:" in body and "vocab_size" not in body and "input_size" not in body
    assert "model.vocab_size" in comment and "task store" in comment
