"""The canonical MAML check (Finn et al. 2017, §5.1): sinusoid regression with K = 10 shots.

Meta-training must beat the conventional alternative, a network pre-trained on the same tasks and
fine-tuned with the same steps, by at least 3x in post-adaptation MSE. The budget is kept small here
(2,000 meta-steps); `metalstm bench` is the place for longer runs.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from metalstm import MLP, MAMLConfig, MetaLearner, TaskBatch, collate
from metalstm.models import batched
from metalstm.sinusoid import sinusoid_tasks

ITERATIONS, META_BATCH, SHOTS, POOL = 2000, 25, 10, 4000


@pytest.fixture
def one_thread():
    """These tensors are tiny: one thread avoids paying OpenMP's overhead on every op (CPU time, not results)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_sinusoid_tasks_follow_the_paper():
    tasks = sinusoid_tasks(200, SHOTS, 5, seed=3)
    amplitude = np.array([t["amplitude"] for t in tasks])
    phase = np.array([t["phase"] for t in tasks])
    x = np.concatenate([t["support_x"] for t in tasks])
    assert amplitude.min() >= 0.1 and amplitude.max() <= 5.0 and phase.min() >= 0 and phase.max() <= np.pi
    assert x.min() >= -5 and x.max() <= 5 and tasks[0]["support_x"].shape == (SHOTS, 1)
    t = tasks[7]
    np.testing.assert_allclose(t["query_y"], t["amplitude"] * np.sin(t["query_x"] - t["phase"]), rtol=1e-5, atol=1e-6)
    assert tasks[0]["task_id"] != tasks[1]["task_id"]
    assert sinusoid_tasks(3, SHOTS, 5, seed=3)[2]["amplitude"] == tasks[2]["amplitude"]  # reproducible


def _train(learner: MetaLearner, pool: TaskBatch, batches: list[torch.Tensor], maml: bool) -> None:
    opt = torch.optim.Adam(learner.parameters(), lr=1e-3)
    for index in batches:
        batch = pool.select(index)
        opt.zero_grad()
        if maml:
            loss = learner.meta_loss(batch).query.mean()
        else:  # conventional pre-training: regress every point of the same tasks with one network
            params = batched(learner.model, batch.num_tasks)
            model = learner.model
            loss = (model.task_loss(params, batch.support) + model.task_loss(params, batch.query)).mean()
        loss.backward()
        opt.step()


def test_maml_beats_pretraining_plus_fine_tuning_by_3x(one_thread):
    pool = collate(sinusoid_tasks(POOL, SHOTS, SHOTS, seed=1))
    g = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, POOL, (META_BATCH,), generator=g) for _ in range(ITERATIONS)]
    cfg = MAMLConfig(inner_steps=1, inner_lr=0.01, eval_inner_steps=10)  # the paper's α, 10 steps at test time
    learners = {}
    for name in ("maml", "pretrained"):
        torch.manual_seed(0)  # same initial network for both
        learners[name] = MetaLearner(MLP([1, 40, 40, 1]), cfg)
        _train(learners[name], pool, batches, maml=name == "maml")

    test = collate(sinusoid_tasks(100, SHOTS, 50, seed=10**6))  # unseen tasks
    results = {name: learner.evaluate(test) for name, learner in learners.items()}
    maml, pre = results["maml"]["post_mse"].mean().item(), results["pretrained"]["post_mse"].mean().item()
    assert maml < results["maml"]["pre_mse"].mean().item() / 3, "adaptation itself must matter for MAML"
    assert pre >= 3 * maml, f"post-adaptation MSE: MAML {maml:.3f}, pre-trained + fine-tuned {pre:.3f}"
