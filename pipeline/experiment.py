"""``metalstm experiment CONFIG``: does Meta-LSTM beat conventional LSTMs on held-out few-shot tasks?

For every seed: meta-train θ with second-order MAML and with first-order MAML, pre-train the same network
conventionally on the pooled training sequences (transfer), then on every held-out test task, with its support
set cut to K examples (the same K examples for every method), measure the query metrics of:

- ``maml`` / ``fomaml``: θ after k inner steps (k in ``steps``; k = 0 is θ itself);
- ``transfer``: the pre-trained network fine-tuned with the same inner loop (plain SGD, k steps), its rate
  chosen per (K, k) on the VAL tasks;
- ``scratch``: a freshly initialised network trained on the K support examples alone (Adam, its own budget);
- ``classical``: seasonal naive (forecasting), a Kneser-Ney character n-gram fit on the training text
  (order chosen on val), or the transfer model without fine-tuning (translation).

No number is tuned on the test tasks: model selection (meta-train/pre-train checkpoints, fine-tuning rates,
n-gram order) uses the val split only. Results (mean and 95 % t-interval over test tasks × seeds) go to
MLflow and to a markdown section + plots under ``report.dir``, which replace this experiment's block in
``report.markdown``. This module orchestrates; the maths lives in :mod:`metalstm.baselines` and
:mod:`metalstm.training`.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import os
import platform
import re
import shlex
import time
from collections import defaultdict
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import OmegaConf

from metalstm import losses
from metalstm.baselines import (
    KneserNeyLM,
    adapt_path,
    as_split,
    pooled_errors,
    pooled_sequences,
    pretrain,
    seasonal_naive,
    subsample_support,
    t_interval,
)
from metalstm.data import Split, TaskBatch, collate
from metalstm.maml import MetaLearner, NonFiniteLossError
from metalstm.models import MetaModel, build_model, model_class
from metalstm.runtime import retain_freed_memory
from metalstm.training import meta_train
from pipeline.config import TrainConfig, apply_manifest, check, load_structured
from pipeline.config import validate as validate_train
from pipeline.tasks.builders import BUILDERS, builder_module, options_from_mapping

log = logging.getLogger(__name__)

METHODS = ("maml", "maml_cold", "mamlpp", "fomaml", "transfer", "transfer_long", "scratch", "classical")
LABELS = {"maml": "Meta-LSTM (MAML)", "maml_cold": "MAML, cold start", "mamlpp": "MAML++ (learned rates, multi-step)",
          "fomaml": "first-order MAML", "transfer": "transfer (pre-train + fine-tune)",
          "transfer_long": "transfer, Meta-LSTM's compute", "scratch": "scratch (support set only)",
          "classical": "classical"}
META = {"maml": {}, "maml_cold": {}, "mamlpp": {"learn_inner_lr": True, "multi_step_loss": True},
        "fomaml": {"first_order": True}}  # the meta-learned rows: their MAML settings over train.maml
# what a row is called in the literature of a model family (``MetaModel.family``): fine-tuning a character LM on
# the text it is about to predict is dynamic evaluation (Krause et al. 2018), the anchor any adaptive LM must beat
FAMILY_LABELS = {"lm": {"transfer": "transfer + dynamic evaluation (Krause et al. 2018)",
                        "transfer_long": "transfer + dynamic evaluation, Meta-LSTM's compute"}}
ADAPTED = ("maml", "maml_cold", "mamlpp", "fomaml", "transfer", "transfer_long")  # follow the k sweep
# the classical row per model family: seasonal naive forecasts, a Kneser-Ney n-gram fit on the training text, and
# for translation (no classical system in reach) the transfer model without fine-tuning; regression has none
CLASSICAL = {"forecast": "seasonal naive", "lm": "Kneser-Ney char n-gram", "mt": "transfer, no fine-tuning"}
HIGHER_IS_BETTER = {"bleu", "chrf"}


# ----------------------------------------------------------------------------- config


@dataclass
class StoreSpec:
    uri: str = ""  # an existing task store; empty: build it with the builder below into cache_dir (once)
    family: str = "synthetic"  # builder: synthetic | electricity | ptb-char | mt-en-de
    # the builder's options dataclass fields (pipeline/tasks/builders/), e.g. {source: PATH, window: 72}
    options: dict[str, Any] = field(default_factory=dict)
    cache_dir: str = ".metalstm/data"


@dataclass
class BaselineConfig:
    pretrain_steps: int = 300  # Adam steps of conventional pre-training (transfer model)
    pretrain_batch: int = 64  # sequences per pre-training step
    pretrain_lr: float = 3e-3
    finetune_lrs: list[float] = field(default_factory=lambda: [0.003, 0.01, 0.03, 0.1])  # chosen on val
    scratch_steps: int = 100  # Adam steps on the support set alone
    scratch_lrs: list[float] = field(default_factory=lambda: [0.01])  # chosen on val
    season: int = 24  # seasonal naive: steps per season
    ngram_orders: list[int] = field(default_factory=lambda: [3, 5, 7])  # chosen on val


@dataclass
class ReportConfig:
    dir: str = "docs/results"  # section markdown, JSON and plots
    markdown: str = "docs/results.md"  # this experiment's block is replaced (or appended) here; empty: skip
    command: str = ""  # the command line to print in the report; empty: reconstructed from argv


@dataclass
class ExperimentConfig:
    name: str = "sinusoid"
    title: str = ""
    train: TrainConfig = field(default_factory=TrainConfig)  # model, maml, optim, schedule (meta_steps, batch)
    store: StoreSpec = field(default_factory=StoreSpec)
    shots: list[int] = field(default_factory=lambda: [1, 5, 10])  # K support examples kept per test task
    steps: list[int] = field(default_factory=lambda: [0, 1, 5, 10])  # inner steps k evaluated
    report_steps: int = 5  # the k of the metric-against-shots plot and the main table
    train_shots: list[int] = field(default_factory=list)  # K drawn per task during meta-training; empty: shots
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    methods: list[str] = field(default_factory=lambda: list(METHODS))
    warm_start: bool = True  # maml / mamlpp / fomaml start from the transfer model's θ (its compute counted in)
    maml_lrs: list[float] = field(default_factory=list)  # test-time α per (K, k) chosen on val; empty: train α
    mamlpp_inner_steps: int = 0  # MAML++'s trained inner steps (its rates are learned per step); 0: train.maml's
    test_tasks: int = 0  # 0: all test tasks
    val_tasks: int = 32
    val_every: int = 50  # meta-train / pre-train steps between validations (checkpoint selection)
    eval_batch: int = 32  # tasks adapted together
    device: str = "cpu"  # cpu | cuda (the GPU configs)
    threads: int = 1  # torch intra-op threads; these models are small, and 1 thread degrades best on a busy CPU
    beam: int = 1  # translation decoding
    max_len: int = 80
    baselines: BaselineConfig = field(default_factory=BaselineConfig)
    report: ReportConfig = field(default_factory=ReportConfig)


def validate(cfg: ExperimentConfig) -> ExperimentConfig:
    validate_train(cfg.train)
    check(bool(re.fullmatch(r"[A-Za-z0-9_.-]+", cfg.name)), "name", "must be letters, digits, _ . -", cfg.name)
    check(len(cfg.shots) > 0 and all(k >= 1 for k in cfg.shots), "shots", "need a non-empty list of K >= 1",
           cfg.shots)
    check(all(k >= 1 for k in cfg.train_shots), "train_shots", "need K >= 1", cfg.train_shots)
    check(len(cfg.steps) > 0 and all(k >= 0 for k in cfg.steps), "steps", "need a non-empty list of k >= 0",
           cfg.steps)
    check(cfg.device == "cpu" or cfg.device.startswith("cuda"), "device", "expected cpu or cuda[:N]", cfg.device)
    check(cfg.report_steps in cfg.steps, "report_steps", f"must be one of steps {cfg.steps}", cfg.report_steps)
    check(len(cfg.seeds) >= 1, "seeds", "need at least one seed", cfg.seeds)
    check(len(set(cfg.seeds)) == len(cfg.seeds), "seeds", "must be distinct", cfg.seeds)
    bad = sorted(set(cfg.methods) - set(METHODS))
    check(not bad and len(cfg.methods) > 0, "methods", f"expected a non-empty subset of {list(METHODS)}",
           cfg.methods)
    for key in ("test_tasks", "val_every", "threads", "mamlpp_inner_steps"):
        check(getattr(cfg, key) >= 0, key, "must be >= 0", getattr(cfg, key))
    for key in ("val_tasks", "eval_batch", "max_len", "beam"):
        check(getattr(cfg, key) >= 1, key, "must be >= 1", getattr(cfg, key))
    check(all(x > 0 for x in cfg.maml_lrs), "maml_lrs", "need rates > 0", cfg.maml_lrs)
    b = cfg.baselines
    for key in ("pretrain_steps", "scratch_steps"):
        check(getattr(b, key) >= 0, f"baselines.{key}", "must be >= 0", getattr(b, key))
    for key in ("pretrain_batch", "season"):
        check(getattr(b, key) >= 1, f"baselines.{key}", "must be >= 1", getattr(b, key))
    check(b.pretrain_lr > 0, "baselines.pretrain_lr", "must be > 0", b.pretrain_lr)
    for key in ("finetune_lrs", "scratch_lrs"):
        v = getattr(b, key)
        check(len(v) > 0 and all(x > 0 for x in v), f"baselines.{key}", "need a non-empty list of rates > 0", v)
    check(len(b.ngram_orders) > 0 and all(1 <= n <= 12 for n in b.ngram_orders), "baselines.ngram_orders",
           "need orders in [1, 12]", b.ngram_orders)
    check(bool(cfg.store.uri) or cfg.store.family in BUILDERS, "store.family", f"expected one of {list(BUILDERS)}",
          cfg.store.family)
    if not cfg.store.uri:
        options_from_mapping(cfg.store.family, cfg.store.options, "store.options")  # a typo fails now, not after hours
    return cfg


def load_experiment_config(path: str | Path | None = None, overrides: list[str] | None = None) -> ExperimentConfig:
    """Defaults ← YAML ← ``key=value`` overrides (OmegaConf structured); errors name the key."""
    return validate(load_structured(ExperimentConfig, path, overrides))


def _config_dict(cfg: ExperimentConfig) -> dict[str, Any]:
    return OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True)


# ----------------------------------------------------------------------------- data


def prepare_store(spec: StoreSpec) -> str:
    """The store URI: ``spec.uri``, else the builder's output cached under ``cache_dir`` by a hash of its options
    (every field, defaults included, so a changed default builds a new store)."""
    if spec.uri:
        return spec.uri
    options = options_from_mapping(spec.family, spec.options, "store.options")
    text = json.dumps([spec.family, asdict(options)], sort_keys=True, default=str)
    uri = str(Path(spec.cache_dir).resolve() / f"{spec.family}-{hashlib.sha256(text.encode()).hexdigest()[:12]}")
    if not (Path(uri) / "manifest.json").exists():
        log.info("building the %s task store at %s (%s)", spec.family, uri, options)
        builder_module(spec.family).build(options, uri, overwrite=True)
    return uri


def task_batches(tasks: Sequence[dict], batch_size: int, shots: Sequence[int], seed: int,
                 dtype: torch.dtype, device: str = "cpu") -> Iterator[TaskBatch]:
    """An endless stream of meta-batches drawn at random, each task's support cut to a random K from ``shots``."""
    rng = np.random.default_rng([seed, 7])
    size = min(batch_size, len(tasks))
    while True:
        idx = rng.choice(len(tasks), size=size, replace=False)
        chosen = [subsample_support(tasks[i], int(rng.choice(shots)), rng) if shots else tasks[i] for i in idx]
        yield collate(chosen).to(device, dtype)


def kshot(tasks: Sequence[dict], shots: int, seed: int) -> list[dict]:
    """Each task's support cut to K, the same draw for every method (seeded by seed, K and task id)."""
    out = []
    for t in tasks:
        digest = int(hashlib.sha256(f"{seed}/{shots}/{t['task_id']}".encode()).hexdigest()[:8], 16)
        out.append(subsample_support(t, shots, np.random.default_rng(digest)))
    return out


def chunks(items: Sequence[Any], size: int) -> Iterator[Sequence[Any]]:
    for i in range(0, len(items), size):
        yield items[i:i + size]


# ----------------------------------------------------------------------------- evaluation


def reported_metrics(model: MetaModel | type[MetaModel], pooled: bool) -> list[str]:
    """The report's metrics, headline first (lower is better except BLEU/chrF): the model's primary metric, after
    BLEU and chrF for translations (what MT reports; NLL scores no decoding) and after ND and NRMSE for forecasts
    of a store that keeps each task's scale (``pooled``: errors in original units, what load forecasting reports)."""
    if model.family == "mt":
        return ["bleu", "chrf", model.primary_metric]
    return ["nd", "nrmse", model.primary_metric] if pooled else [model.primary_metric]


class Evaluator:
    """Query metrics of fast weights per task (the model's own, plus BLEU/chrF of translations), and the forecasts
    the pooled errors need."""

    def __init__(self, cfg: ExperimentConfig, manifest: dict, model: MetaModel, dtype: torch.dtype) -> None:
        self.cfg, self.model, self.dtype = cfg, model, dtype
        self.pooled = model.family == "forecast" and "scale" in manifest["schema"]["extras"]
        self.metrics = reported_metrics(model, self.pooled)
        self.tgt_vocab = None
        if model.family == "mt":
            from metalstm.vocab import Vocab

            vocab = manifest.get("vocab") or {}
            if "tgt" not in vocab:
                raise ValueError(f"store manifest: vocab.tgt missing (keys {sorted(vocab)}); BLEU needs it")
            self.tgt_vocab = Vocab.from_dict({"tokens": vocab["tgt"]}, tokenizer=vocab.get("tokenizer", "words"))

    def batch(self, tasks: Sequence[dict]) -> TaskBatch:
        return collate(tasks).to(self.cfg.device, self.dtype)

    @torch.no_grad()
    def query_metrics(self, fast: dict[str, torch.Tensor], batch: TaskBatch) -> tuple[dict[str, list[float]], Any]:
        """Per-task metrics (lists over the batch's tasks) and, for pooled forecasts, the predictions."""
        q = batch.query
        out = {"loss": self.model.task_loss(fast, q).tolist()}
        out.update({k: v.tolist() for k, v in self.model.metrics(fast, q).items()})
        if self.tgt_vocab is not None:
            out.update(self.text_metrics(fast, q))
        return out, self.model.predict(fast, q.x, q.x_mask) if self.pooled else None

    def text_metrics(self, fast: dict[str, torch.Tensor], q: Split) -> dict[str, list[float]]:
        import sacrebleu

        hyp = self.model.predict(fast, q.x, q.x_mask, max_len=self.cfg.max_len, beam=self.cfg.beam)
        bleu, chrf = [], []
        for t in range(q.x.shape[0]):
            rows = [n for n in range(q.y.shape[1]) if q.y_mask[t, n].sum() > 0]
            hyps = [self.tgt_vocab.decode(hyp[t, n].tolist()) for n in rows]
            refs = [self.tgt_vocab.decode(q.y[t, n][q.y_mask[t, n] > 0].tolist()) for n in rows]
            bleu.append(sacrebleu.corpus_bleu(hyps, [refs]).score)
            chrf.append(sacrebleu.corpus_chrf(hyps, [refs]).score)
        return {"bleu": bleu, "chrf": chrf}

    def diverged(self, batch: TaskBatch) -> tuple[dict[str, list[float]], Any]:
        """The record of a task whose adaptation diverged: infinite errors, zero BLEU/chrF."""
        t = batch.query.x.shape[0]
        out = {m: [0.0 if m in HIGHER_IS_BETTER else float("inf")] * t for m in ["loss", *self.metrics]}
        pred = torch.full_like(batch.query.y, float("inf")) if self.pooled else None
        return out, pred

    def mean_loss(self, fast_of: Any, tasks: Sequence[dict]) -> float:
        """Mean query loss over ``tasks`` of the fast weights ``fast_of(batch)`` returns."""
        total = []
        for part in chunks(tasks, self.cfg.eval_batch):
            b = self.batch(part)
            with torch.no_grad():
                total += self.model.task_loss(fast_of(b), b.query).tolist()
        return float(np.mean(total))


def _theta(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach() for n, p in model.named_parameters()}


def _inner_lr(learner: MetaLearner) -> Any:
    return learner.rates if learner.rates is not None else learner.cfg.inner_lr


class Recorder:
    """Collects per-task rows and pooled forecasting errors; aggregates them into means and intervals."""

    def __init__(self) -> None:
        self.rows: list[dict] = []
        self.pooled: dict[tuple, dict[str, list]] = defaultdict(lambda: {"pred": [], "y": [], "mask": [],
                                                                          "offset": [], "scale": []})

    def add(self, seed: int, method: str, shots: int, steps: int | None, tasks: Sequence[dict],
            metrics: dict[str, list[float]], pred: torch.Tensor | None, batch: TaskBatch | None) -> None:
        pred = pred.detach().cpu() if pred is not None else None
        batch = batch.to("cpu") if batch is not None else None
        for i, t in enumerate(tasks):
            self.rows.append({"seed": seed, "method": method, "shots": shots, "steps": steps,
                              "task_id": t["task_id"], **{k: float(v[i]) for k, v in metrics.items()}})
        if pred is not None and batch is not None and "scale" in tasks[0]:
            p = self.pooled[(seed, method, shots, steps)]
            p["pred"].append(pred.reshape(pred.shape[0], -1))
            p["y"].append(batch.query.y.reshape(pred.shape[0], -1))
            p["mask"].append(batch.query.y_mask.reshape(pred.shape[0], -1))
            p["offset"].append(torch.tensor([float(t.get("offset", 0.0)) for t in tasks]))
            p["scale"].append(torch.tensor([float(t["scale"]) for t in tasks]))

    def pooled_rows(self) -> list[dict]:
        """Pooled ND/NRMSE (original units, all test series and steps) per (seed, method, K, k)."""
        out = []
        for (seed, method, shots, steps), p in self.pooled.items():
            width = max(x.shape[1] for x in p["pred"])
            pad = lambda xs, w=width: torch.cat([torch.nn.functional.pad(x, (0, w - x.shape[1])) for x in xs])
            errs = pooled_errors(pad(p["pred"]), pad(p["y"]), pad(p["mask"]), torch.cat(p["offset"]),
                                 torch.cat(p["scale"]))
            out.append({"seed": seed, "method": method, "shots": shots, "steps": steps, **errs})
        return out


def paired(rows: list[dict], metric: str, shots: Sequence[int], steps: int) -> list[dict]:
    """Meta-LSTM minus each other method on the same (task, seed, K): mean difference and 95 % interval.

    Pairing removes the task-difficulty spread that dominates the per-method intervals.
    """
    index: dict[tuple, float] = {}
    for r in rows:
        if metric in r:
            index[(r["method"], r["shots"], r["steps"], r["seed"], r["task_id"])] = r[metric]
    out = []
    for k in shots:
        mine = {key[3:]: v for key, v in index.items() if key[:3] == ("maml", k, steps)}
        for other in METHODS[1:]:
            theirs = {key[3:]: v for key, v in index.items() if key[0] == other and key[1] == k
                      and key[2] in (steps, None)}
            diffs = [mine[u] - theirs[u] for u in mine if u in theirs]
            if diffs:
                mean, half, n = t_interval(diffs)
                out.append({"other": other, "shots": k, "steps": steps, "metric": metric, "mean": mean,
                            "ci95": half, "n": n})
    return out


def summarize(rows: list[dict], pooled_rows: list[dict], metrics: list[str]) -> list[dict]:
    """One row per (method, shots, steps): mean, 95 % half-width and n for each metric (pooled: over seeds)."""
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for r in rows:
        groups[(r["method"], r["shots"], r["steps"])].append(r)
    pooled: dict[tuple, list[dict]] = defaultdict(list)
    for r in pooled_rows:
        pooled[(r["method"], r["shots"], r["steps"])].append(r)
    out = []
    order = lambda kv: (METHODS.index(kv[0][0]), kv[0][1], -1 if kv[0][2] is None else kv[0][2])
    for (method, shots, steps), group in sorted(groups.items(), key=order):
        row = {"method": method, "shots": shots, "steps": steps}
        for m in metrics:
            mean, half, n = t_interval(r.get(m, float("nan")) for r in group)
            row[m] = {"mean": mean, "ci95": half, "n": n}
            diverged = sum(math.isinf(r.get(m, 0.0)) for r in group)
            if diverged:  # adaptations whose support loss turned non-finite: the mean is infinite, say how many
                row[m]["diverged"] = diverged
        for m in ("nd", "nrmse"):
            if pooled.get((method, shots, steps)):
                mean, half, n = t_interval(r[m] for r in pooled[(method, shots, steps)])
                row[f"pooled_{m}"] = {"mean": mean, "ci95": half, "n": n}
        out.append(row)
    return out


def aggregate(results: dict[str, Any]) -> dict[str, Any]:
    """(Re)compute the summary and the paired comparison from the raw rows."""
    cfg = results["config"]
    results["summary"] = summarize(results["rows"], results["pooled_rows"], ["loss", *results["metrics"]])
    results["paired"] = paired(results["rows"], results["metrics"][0], cfg["shots"], cfg["report_steps"])
    return results


def merge_results(parts: list[dict[str, Any]]) -> dict[str, Any]:
    """One result from runs of the same experiment on disjoint seeds (e.g. one process per seed)."""
    if not parts:
        raise ValueError("merge: no result files given")
    first = parts[0]
    for p in parts[1:]:
        for key in ("name", "family"):
            if p[key] != first[key]:
                raise ValueError(f"merge: {key} differs ({first[key]!r} vs {p[key]!r})")
        if p["store"]["content_hash"] != first["store"]["content_hash"]:
            raise ValueError("merge: the runs used different task stores")
    seeds = [s for p in parts for s in p["config"]["seeds"]]
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"merge: seeds overlap between the runs: {seeds}")
    out = dict(first)
    out["config"] = {**first["config"], "seeds": seeds}
    for key in ("rows", "pooled_rows", "compute", "selected"):
        out[key] = [x for p in parts for x in p[key]]
    out["curves"] = {k: v for p in parts for k, v in p["curves"].items()}
    out["total_wall_s"] = max(p.get("total_wall_s", 0.0) for p in parts)
    out["parallel_runs"] = len(parts)
    return aggregate(out)


# ----------------------------------------------------------------------------- the experiment


class Experiment:
    """One experiment: the store, the training tasks in memory, and every method's per-task test results."""

    def __init__(self, cfg: ExperimentConfig) -> None:
        self.cfg = cfg
        from pipeline.tasks.store import read_manifest, read_tasks

        self.uri = prepare_store(cfg.store)
        self.manifest = read_manifest(self.uri)
        self.family = self.manifest["family"]
        apply_manifest(cfg.train, self.manifest, prefix="train.")
        self.dtype = getattr(torch, cfg.train.dtype)
        t0 = time.perf_counter()
        self.train_tasks = read_tasks(self.uri, cfg.train.data.train_split)
        self.val_tasks = read_tasks(self.uri, cfg.train.data.val_split, limit=cfg.val_tasks)
        self.test_tasks = read_tasks(self.uri, "test", limit=cfg.test_tasks or None)
        for split, tasks in (("train", self.train_tasks), ("val", self.val_tasks), ("test", self.test_tasks)):
            if not tasks:
                raise ValueError(f"store {self.uri}: split {split!r} has no tasks (counts: {self.manifest['counts']})")
        log.info("store %s (%s): %d train, %d val, %d test tasks (read in %.1fs)", self.uri, self.family,
                 len(self.train_tasks), len(self.val_tasks), len(self.test_tasks), time.perf_counter() - t0)
        self.train_shots = list(cfg.train_shots or cfg.shots)
        self.rec = Recorder()
        self.compute: list[dict] = []
        self.selected: list[dict] = []
        self.curves: dict[str, list[dict]] = {}
        self.model = build_model(cfg.train.model).to(cfg.device, self.dtype)
        if "classical" in cfg.methods and self.model.family not in CLASSICAL:
            raise ValueError(f"config key methods: no classical baseline for a {self.model.kind} model; drop "
                             f"'classical'")
        self.ev = Evaluator(cfg, self.manifest, self.model, self.dtype)
        self.metrics = self.ev.metrics

    # -- training

    def _val_post_loss(self, learner: MetaLearner) -> float:
        steps, shots = learner.cfg.adapt_steps, max(self.train_shots)  # the steps this learner trains
        tasks = kshot(self.val_tasks, shots, seed=0)

        def fast_of(b: TaskBatch) -> dict[str, torch.Tensor]:
            return adapt_path(learner.model, _theta(learner.model), b.support, [steps], _inner_lr(learner))[steps]
        return self.ev.mean_loss(fast_of, tasks)

    def meta_train(self, seed: int, name: str, init: dict[str, torch.Tensor] | None) -> MetaLearner:
        """Meta-train one of the META rows from ``init`` (the transfer model's θ: warm start) or from scratch.

        A warm start is validated before the first meta-step too, so selection on val can keep it.
        """
        c = self.cfg.train
        maml_cfg = type(c.maml)(**{**vars(c.maml), **META[name]})
        if name == "mamlpp" and self.cfg.mamlpp_inner_steps:
            maml_cfg.inner_steps = self.cfg.mamlpp_inner_steps
        torch.manual_seed(seed)
        learner = MetaLearner(build_model(c.model), maml_cfg).to(self.cfg.device, self.dtype)
        if init is not None:
            learner.model.load_state_dict(init)
        opt = torch.optim.Adam(learner.parameters(), lr=c.optim.lr, weight_decay=c.optim.weight_decay)
        batches = task_batches(self.train_tasks, c.schedule.meta_batch_size, self.train_shots, seed, self.dtype,
                               self.cfg.device)
        result = meta_train(learner, batches, c.schedule.meta_steps, opt, grad_clip=c.optim.grad_clip,
                            validate=lambda: self._val_post_loss(learner), val_every=self.cfg.val_every,
                            validate_start=init is not None,
                            log=lambda r: log.info("%s seed %d step %d: query loss %.4f%s", name, seed, r["step"],
                                                   r["query_loss"], f"  val {r['val']:.4f}" if "val" in r else ""),
                            log_every=max(1, c.schedule.log_every))
        self._note_compute(name, seed, result, params=sum(p.numel() for p in learner.parameters()),
                           unit=f"{c.schedule.meta_steps} meta-steps x {c.schedule.meta_batch_size} tasks, "
                                f"{maml_cfg.inner_steps} inner steps" + (", warm start" if init is not None else ""))
        self.curves[f"{name}-seed{seed}"] = result["history"]
        return learner

    def pretrain(self, seed: int, steps: int, name: str = "transfer") -> torch.nn.Module:
        b, c = self.cfg.baselines, self.cfg.train
        torch.manual_seed(seed)
        model = build_model(c.model).to(self.cfg.device, self.dtype)
        pairs = pooled_sequences(self.train_tasks)
        val_split = as_split(pooled_sequences(self.val_tasks)).to(self.cfg.device, self.dtype)

        def val_loss() -> float:
            with torch.no_grad():
                return float(model.task_loss({n: p.unsqueeze(0) for n, p in _theta(model).items()}, val_split).mean())
        result = pretrain(model, pairs, steps=steps, batch_size=b.pretrain_batch, lr=b.pretrain_lr,
                          seed=seed, grad_clip=c.optim.grad_clip, dtype=self.dtype, device=self.cfg.device,
                          validate=val_loss,
                          val_every=self.cfg.val_every,
                          log=lambda r: log.info("%s seed %d step %d: loss %.4f%s", name, seed, r["step"], r["loss"],
                                                 f"  val {r['val']:.4f}" if "val" in r else ""),
                          log_every=max(1, c.schedule.log_every))
        self._note_compute(name, seed, result, params=sum(p.numel() for p in model.parameters()),
                           unit=f"{steps} Adam steps x {b.pretrain_batch} sequences (pool of {len(pairs)})")
        self.curves[f"{name}-seed{seed}"] = result["history"]
        return model

    def _note_compute(self, method: str, seed: int, result: dict, params: int, unit: str) -> None:
        self.compute.append({"method": method, "seed": seed, "phase": "train", "wall_s": result["wall_s"],
                             "cpu_s": result["cpu_s"], "params": params, "budget": unit,
                             "best_val": result.get("best_val")})

    def select_rate(self, name: str, start: dict[str, torch.Tensor], rates: list[float], optimizer: str,
                    steps: list[int], seed: int) -> dict[tuple[int, int], float]:
        """Per (K, k), the rate with the lowest mean val query loss (val tasks only)."""
        chosen = {}
        for shots in self.cfg.shots:
            tasks = kshot(self.val_tasks, shots, seed)
            scores: dict[int, dict[float, float]] = defaultdict(dict)
            for lr in rates:
                per_k: dict[int, list[float]] = defaultdict(list)
                try:
                    for part in chunks(tasks, self.cfg.eval_batch):
                        b = self.ev.batch(part)
                        path = adapt_path(self.model, start, b.support, steps, lr, optimizer)
                        with torch.no_grad():
                            for k, fast in path.items():
                                per_k[k] += self.model.task_loss(fast, b.query).tolist()
                except FloatingPointError:
                    per_k = {k: [float("inf")] for k in steps}
                for k, vals in per_k.items():
                    v = float(np.mean(vals))
                    scores[k][lr] = v if math.isfinite(v) else float("inf")
            for k, by_lr in scores.items():
                best = min(by_lr, key=by_lr.get)
                chosen[(shots, k)] = best
                self.selected.append({"method": name, "seed": seed, "shots": shots, "steps": k, "lr": best,
                                      "val_loss": by_lr[best]})
        return chosen

    # -- evaluation

    def evaluate_path(self, name: str, seed: int, start: dict[str, torch.Tensor], lr: Any, optimizer: str,
                      steps: list[int], rates: dict[tuple[int, int], float] | None = None,
                      own_budget: bool = False) -> None:
        """Adapt from ``start`` on each test task's K-shot support and record the query metrics at each k.

        ``own_budget`` (scratch, classical): recorded without k, since the method does not follow the k sweep.
        """
        t0, c0 = time.perf_counter(), time.process_time()
        for shots in self.cfg.shots:
            tasks = kshot(self.test_tasks, shots, seed)
            groups = {None: steps} if rates is None else defaultdict(list)
            if rates is not None:  # one adaptation run per distinct chosen rate
                for k in steps:
                    groups[rates[(shots, k)]].append(k)
            for rate, ks in groups.items():
                for part in chunks(tasks, self.cfg.eval_batch):
                    path_lr = lr if rate is None else rate
                    for one, b, path in self._paths(part, start, ks, path_lr, optimizer):
                        for k, fast in path.items():
                            metrics, pred = self.ev.query_metrics(fast, b) if fast is not None else self.ev.diverged(b)
                            self.rec.add(seed, name, shots, None if own_budget else k, one, metrics, pred, b)
        self.compute.append({"method": name, "seed": seed, "phase": "test adaptation + metrics",
                             "wall_s": time.perf_counter() - t0, "cpu_s": time.process_time() - c0})

    def _paths(self, part: Sequence[dict], start: dict[str, torch.Tensor], ks: list[int], lr: Any,
               optimizer: str) -> Iterator[tuple[Sequence[dict], TaskBatch, dict[int, Any]]]:
        """``(tasks, batch, {k: fast weights})`` for a chunk of tasks; where adaptation diverges on a task (its
        support loss turns non-finite), that task is isolated and its fast weights at the failing k are None."""
        b = self.ev.batch(part)
        try:
            yield part, b, adapt_path(self.model, start, b.support, ks, lr, optimizer)
            return
        except NonFiniteLossError:
            pass
        if len(part) > 1:  # find the diverging task(s): adapt one task at a time
            for one in chunks(part, 1):
                yield from self._paths(one, start, ks, lr, optimizer)
            return
        path: dict[int, Any] = {}
        for k in ks:
            try:
                path.update(adapt_path(self.model, start, b.support, [k], lr, optimizer))
            except NonFiniteLossError:
                path[k] = None
        log.warning("task %s: adaptation diverged at k in %s (recorded as diverged)", part[0]["task_id"],
                    [k for k, f in path.items() if f is None])
        yield part, b, path

    def classical(self, seed: int) -> None:
        """The classical row of forecasts (seasonal naive) and character LMs (a Kneser-Ney n-gram); translation's
        is the transfer model without fine-tuning, recorded with the transfer row (see :meth:`_run`)."""
        t0, c0 = time.perf_counter(), time.process_time()
        if self.model.family == "forecast":
            self._seasonal_naive(seed)
        else:
            if seed == self.cfg.seeds[0]:
                self._fit_ngram()
            for shots in self.cfg.shots:
                for t in self.test_tasks:
                    bpc = self.ngram.bits_per_token(zip(t["query_x"], t["query_y"]))
                    self.rec.add(seed, "classical", shots, None, [t], {"bpc": [bpc], "loss": [bpc * math.log(2)]},
                                 None, None)
        self.compute.append({"method": "classical", "seed": seed, "phase": "fit + test metrics",
                             "wall_s": time.perf_counter() - t0, "cpu_s": time.process_time() - c0})

    def _seasonal_naive(self, seed: int) -> None:
        season = self.cfg.baselines.season
        for shots in self.cfg.shots:  # the naive forecast ignores the support set: same for every K
            tasks = kshot(self.test_tasks, shots, seed)
            for part in chunks(tasks, self.cfg.eval_batch):
                b = self.ev.batch(part)
                q = b.query
                pred = seasonal_naive(q.x, q.x_mask, q.y.shape[-1], season)
                metrics = {"loss": losses.masked_mse(pred, q.y, q.y_mask).tolist(),
                           "mse": losses.masked_mse(pred, q.y, q.y_mask).tolist(),
                           "nd": losses.normalized_deviation(pred, q.y, q.y_mask).tolist(),
                           "nrmse": losses.nrmse(pred, q.y, q.y_mask).tolist()}
                self.rec.add(seed, "classical", shots, None, part, metrics, pred, b)

    def _fit_ngram(self) -> None:
        vocab = int(self.cfg.train.model.vocab_size)
        pairs = pooled_sequences(self.train_tasks)
        val_pairs = [(x, y) for t in self.val_tasks for x, y in zip(t["query_x"], t["query_y"])]
        best = None
        for order in self.cfg.baselines.ngram_orders:
            lm = KneserNeyLM(order, vocab).fit(pairs)
            bpc = lm.bits_per_token(val_pairs)
            log.info("n-gram order %d: val %.4f bpc", order, bpc)
            self.selected.append({"method": "classical", "seed": None, "shots": None, "steps": None,
                                  "ngram_order": order, "val_bpc": bpc})
            if best is None or bpc < best[0]:
                best = (bpc, order, lm)
        self.ngram, self.ngram_order = best[2], best[1]
        log.info("n-gram: order %d chosen on val (%.4f bpc)", best[1], best[0])

    def run(self) -> dict[str, Any]:
        threads = torch.get_num_threads()
        if self.cfg.threads > 0:
            torch.set_num_threads(self.cfg.threads)
        try:
            return self._run()
        finally:
            torch.set_num_threads(threads)

    def _spent(self, method: str, seed: int, phase: str = "train", key: str = "cpu_s") -> float:
        """Seconds (``cpu_s`` or ``wall_s``) a method spent in one phase of one seed."""
        return sum(c[key] for c in self.compute if c["method"] == method and c["seed"] == seed
                   and c["phase"] == phase)

    def _adapted(self, name: str, seed: int, theta: dict[str, torch.Tensor], steps: list[int],
                 rates: list[float]) -> None:
        """Fine-tune ``theta`` with SGD on each test task, the rate per (K, k) chosen on val from ``rates``."""
        chosen = self.select_rate(name, theta, rates, "sgd", steps, seed) if len(rates) > 1 else None
        self.evaluate_path(name, seed, theta, rates[0], "sgd", steps, chosen)

    def _meta_rows(self, seed: int, steps: list[int], pre: torch.nn.Module | None) -> None:
        cfg = self.cfg
        for name in ("maml", "maml_cold", "mamlpp", "fomaml"):
            if name not in cfg.methods:
                continue
            warm = cfg.warm_start and name != "maml_cold"
            learner = self.meta_train(seed, name, pre.state_dict() if warm else None)
            if warm:  # the pre-training this row started from is part of its compute
                self.compute.append({"method": name, "seed": seed, "phase": "pre-train (warm start)", "shared": True,
                                     "wall_s": self._spent("transfer", seed, key="wall_s"),
                                     "cpu_s": self._spent("transfer", seed)})
            theta = _theta(learner.model)
            if learner.rates is not None:  # learned rates: nothing to choose
                self.evaluate_path(name, seed, theta, learner.rates, "sgd", steps)
            else:
                alpha = float(cfg.train.maml.inner_lr)
                self._adapted(name, seed, theta, steps, [alpha, *sorted(set(cfg.maml_lrs) - {alpha})])

    def _run(self) -> dict[str, Any]:
        cfg, methods = self.cfg, self.cfg.methods
        steps = sorted(set(cfg.steps))
        warm = cfg.warm_start and any(m in methods for m in ("maml", "mamlpp", "fomaml"))
        classical_is_transfer = "classical" in methods and self.model.family == "mt"  # see CLASSICAL
        need_pre = warm or bool({"transfer", "transfer_long"} & set(methods)) or classical_is_transfer
        for seed in cfg.seeds:
            log.info("=== seed %d ===", seed)
            pre = self.pretrain(seed, cfg.baselines.pretrain_steps) if need_pre else None
            if "transfer" in methods:
                self._adapted("transfer", seed, _theta(pre), steps, list(cfg.baselines.finetune_lrs))
            if classical_is_transfer:
                self.evaluate_path("classical", seed, _theta(pre), 0.0, "sgd", [0], own_budget=True)
            self._meta_rows(seed, steps, pre)
            if "transfer_long" in methods:  # the same CPU time as Meta-LSTM's pre-training + meta-training
                budget = self._spent("maml", seed) + (self._spent("transfer", seed) if cfg.warm_start else 0.0)
                per_step = self._spent("transfer", seed) / max(1, cfg.baselines.pretrain_steps)
                long = self.pretrain(seed, max(1, math.ceil(budget / max(per_step, 1e-9))), "transfer_long")
                self._adapted("transfer_long", seed, _theta(long), steps, list(cfg.baselines.finetune_lrs))
            if "scratch" in methods:
                torch.manual_seed(1000 + seed)
                init = _theta(build_model(cfg.train.model).to(cfg.device, self.dtype))
                n = cfg.baselines.scratch_steps
                rates = self.select_rate("scratch", init, list(cfg.baselines.scratch_lrs), "adam", [n], seed)
                self.evaluate_path("scratch", seed, init, None, "adam", [n], rates, own_budget=True)
            if "classical" in methods and not classical_is_transfer:
                self.classical(seed)
        return self.results()

    def _classical_label(self) -> str:
        """The classical row's name in the report, with what makes it concrete (the season, the n-gram order)."""
        label = CLASSICAL.get(self.model.family, "classical")
        step = self.manifest["features"].get("frequency_seconds")
        if self.model.family == "forecast" and step and step * self.cfg.baselines.season == 86400:
            label += " (previous day)"
        if hasattr(self, "ngram_order"):
            label += f" (order {self.ngram_order}, chosen on val)"
        return label

    def results(self) -> dict[str, Any]:
        return aggregate({"name": self.cfg.name, "title": self.cfg.title or self.cfg.name, "family": self.family,
                "store": {"uri": self.uri, "content_hash": self.manifest.get("content_hash"),
                          "counts": self.manifest.get("counts"), "used": {"train": len(self.train_tasks),
                                                                           "val": len(self.val_tasks),
                                                                           "test": len(self.test_tasks)}},
                "metrics": self.metrics, "rows": self.rec.rows, "pooled_rows": self.rec.pooled_rows(),
                "compute": self.compute, "selected": self.selected,
                "classical": self._classical_label(),
                "machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                            "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                            "device": self.cfg.device if self.cfg.device == "cpu" else torch.cuda.get_device_name()},
                "config": _config_dict(self.cfg), "curves": self.curves})


# ----------------------------------------------------------------------------- report


def label_of(results: dict[str, Any], method: str) -> str:
    if method == "classical":
        return results["classical"]
    family = model_class(results["config"]["train"]["model"]["kind"]).family
    return FAMILY_LABELS.get(family, {}).get(method) or LABELS.get(method, method)


def pooled_columns(results: dict[str, Any]) -> list[str]:
    """The pooled errors (original units, over seeds) the report shows: those of its ND and NRMSE metrics."""
    return [f"pooled_{m}" for m in ("nd", "nrmse") if m in results["metrics"]]


def _fmt(cell: dict | None, digits: int = 3) -> str:
    if cell and cell.get("mean") in (float("inf"), float("-inf")):
        return f"diverged on {cell.get('diverged', '?')} of {cell.get('n', '?')}"
    if not cell or not math.isfinite(cell.get("mean", float("nan"))):
        return "–"
    half = cell.get("ci95", float("nan"))
    return f"{cell['mean']:.{digits}f} ± {half:.{digits}f}" if math.isfinite(half) else f"{cell['mean']:.{digits}f}"


def _lookup(summary: list[dict], method: str, shots: int, steps: int | None) -> dict | None:
    for r in summary:
        if r["method"] == method and r["shots"] == shots and r["steps"] == steps:
            return r
    return None


def _row_for(summary: list[dict], method: str, shots: int, steps: int) -> dict | None:
    """A method's row at (K, k); scratch and classical have no k (their own budget)."""
    return _lookup(summary, method, shots, steps) or _lookup(summary, method, shots, None)


def plots(results: dict[str, Any], out_dir: Path) -> list[Path]:
    """Headline metric against shots (at ``report_steps``) and against inner steps (at the largest K)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    cfg, summary, metric = results["config"], results["summary"], results["metrics"][0]
    key = (pooled_columns(results) or [metric])[0]
    methods = [m for m in METHODS if any(r["method"] == m for r in summary)]
    paths = []
    for kind in ("shots", "steps"):
        fig = Figure(figsize=(6.5, 4.2), dpi=110)
        FigureCanvasAgg(fig)
        ax = fig.add_subplot(1, 1, 1)
        xs = sorted(set(cfg["shots"])) if kind == "shots" else sorted(set(cfg["steps"]))
        for m in methods:
            label = label_of(results, m)
            pts = []
            for x in xs:
                r = (_row_for(summary, m, x, cfg["report_steps"]) if kind == "shots"
                     else _row_for(summary, m, max(cfg["shots"]), x))
                if r and key in r and math.isfinite(r[key]["mean"]):
                    pts.append((x, r[key]["mean"], r[key]["ci95"] if math.isfinite(r[key]["ci95"]) else 0.0))
            if not pts:
                continue
            x, y, e = zip(*pts)
            flat = m in ("scratch", "classical") and kind == "steps"
            ax.errorbar(x, y, yerr=e, marker="o", capsize=3, linestyle="--" if flat else "-", label=label)
        ax.set_xlabel("support examples K" if kind == "shots" else "inner steps k")
        ax.set_ylabel(key.replace("_", " ") + (" (higher is better)" if metric in HIGHER_IS_BETTER else ""))
        where = f"k = {cfg['report_steps']} inner steps" if kind == "shots" else f"K = {max(cfg['shots'])}"
        ax.set_title(f"{results['name']}: {key} vs {'shots' if kind == 'shots' else 'inner steps'} ({where})",
                     fontsize=9)
        ax.set_xticks(xs, [str(v) for v in xs])
        if kind == "shots" and len(xs) > 1:
            ax.set_xscale("log")
            ax.set_xticks(xs, [str(v) for v in xs])
            ax.minorticks_off()
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        fig.tight_layout()
        path = out_dir / f"{results['name']}_{kind}.png"
        fig.savefig(path)
        paths.append(path)
    return paths


def _model_text(m: dict[str, Any]) -> str:
    if m["kind"] == "mlp":
        return f"mlp (hidden {m['mlp_hidden']})"
    extra = ""
    if m["kind"] == "forecaster" and m.get("base_season"):
        extra = f", a correction to seasonal naive (period {m['base_season']}), {m.get('loss', 'mse')} loss"
    return f"{m['kind']} ({m['cell']}, hidden {m['hidden_size']}, {m['num_layers']} layer(s){extra})"


def _alpha_grid(cfg: dict[str, Any]) -> str:
    grid = sorted({cfg["train"]["maml"]["inner_lr"], *cfg.get("maml_lrs", [])})
    return f" (test-time α per (K, k) from {grid} on val)" if len(grid) > 1 else ""


def markdown_section(results: dict[str, Any], command: str, plot_paths: list[Path], md_dir: Path) -> str:
    cfg, summary = results["config"], results["summary"]
    metrics = results["metrics"]
    cols = pooled_columns(results) + metrics
    b, t = cfg["baselines"], cfg["train"]
    lines = [f"### {results['title']}", "",
             f"Command: `{command}`", "",
             f"Store `{results['store']['uri']}` (hash `{str(results['store']['content_hash'])[:12]}`), tasks used: "
             f"{results['store']['used']}. Seeds {cfg['seeds']}; K ∈ {cfg['shots']}; k ∈ {cfg['steps']}. "
             f"Meta-training: {t['schedule']['meta_steps']} meta-steps × {t['schedule']['meta_batch_size']} tasks, "
             f"{t['maml']['inner_steps']} inner steps at α = {t['maml']['inner_lr']}"
             f"{_alpha_grid(cfg)}"
             f", {'warm-started from the transfer model' if cfg.get('warm_start') else 'cold start'}; model "
             f"{_model_text(t['model'])}. Transfer: "
             f"{b['pretrain_steps']} Adam steps × {b['pretrain_batch']} sequences, fine-tuning rate per (K, k) "
             f"from {b['finetune_lrs']} on val. Scratch: {b['scratch_steps']} Adam steps, rate from "
             f"{b['scratch_lrs']} on val. Classical: {results['classical']}.", "",
             f"Mean ± 95 % t-interval over test tasks × seeds (pooled metrics: over seeds). Lower is better"
             f"{' except BLEU/chrF' if any(m in HIGHER_IS_BETTER for m in metrics) else ''}.", "",
             f"**Against shots, k = {cfg['report_steps']}** (scratch: its own {b['scratch_steps']} steps; "
             f"classical: no adaptation)", "",
             "| method | K | " + " | ".join(cols) + " |", "|---|---|" + "---|" * len(cols)]
    for m in METHODS:
        for k in cfg["shots"]:
            r = _row_for(summary, m, k, cfg["report_steps"])
            if r:
                label = label_of(results, m)
                lines.append(f"| {label} | {k} | " + " | ".join(_fmt(r.get(c)) for c in cols) + " |")
    kmax = max(cfg["shots"])
    lines += ["", f"**Against inner steps, K = {kmax}**", "",
              "| method | k | " + " | ".join(cols) + " |", "|---|---|" + "---|" * len(cols)]
    for m in ADAPTED:
        for k in sorted(set(cfg["steps"])):
            r = _lookup(summary, m, kmax, k)
            if r:
                lines.append(f"| {label_of(results, m)} | {k} | " + " | ".join(_fmt(r.get(c)) for c in cols) + " |")
    mach = results["machine"]
    where = (f"{results.get('parallel_runs', 1)} processes in parallel, one per seed, " if
             results.get("parallel_runs", 1) > 1 else "")
    lines += ["", f"Compute ({where}{mach['processor']} with {mach.get('cpus', '?')} CPUs, "
              f"{mach['torch_threads']} torch thread(s) per process, device {mach.get('device', 'cpu')}):", "",
              "| method | phase | budget | params | wall s (mean over seeds) | CPU s |", "|---|---|---|---|---|---|"]
    comp: dict[tuple, list[dict]] = defaultdict(list)
    for c in results["compute"]:
        comp[(c["method"], c["phase"])].append(c)
    for (m, phase), cs in comp.items():
        lines.append(f"| {m} | {phase} | {cs[0].get('budget', '')} | {cs[0].get('params', '')} | "
                     f"{np.mean([c['wall_s'] for c in cs]):.1f} | {np.mean([c['cpu_s'] for c in cs]):.1f} |")
    total = sum(c["wall_s"] for c in results["compute"] if not c.get("shared"))
    seeds = max(1, len(cfg["seeds"]))
    per_method = defaultdict(float)
    for c in results["compute"]:
        per_method[c["method"]] += c["cpu_s"] / seeds
    lines += ["", "CPU seconds per seed, every phase of the method (a warm start's pre-training included): "
              + ", ".join(f"{label_of(results, m)} {v:.0f}"
                          for m, v in per_method.items()) + ".", "",
              f"Total wall time of the measured phases: {total / 60:.1f} min.", ""]
    for p in plot_paths:
        rel = Path(p).resolve().relative_to(md_dir.resolve()) if md_dir else Path(p).name
        lines.append(f"![{p.stem}]({rel.as_posix()})")
    verdict = verdict_lines(results)
    if verdict:
        lines += ["", f"Paired comparison at k = {cfg['report_steps']} (Meta-LSTM minus the other method on the same "
                  f"test task, seed and K support examples; 95 % interval; a tie when it contains 0):", "", *verdict]
    return "\n".join(lines) + "\n"


def verdict_lines(results: dict[str, Any]) -> list[str]:
    """Meta-LSTM vs each baseline per K on the headline per-task metric, paired over (task, seed).

    Says plainly where Meta-LSTM does not win: a difference whose 95 % interval contains 0 is a tie.
    """
    higher = results["metrics"][0] in HIGHER_IS_BETTER
    by_k: dict[int, list[str]] = defaultdict(list)
    for p in results.get("paired", []):
        mean, half = p["mean"], p["ci95"] if math.isfinite(p["ci95"]) else float("inf")
        better = mean > 0 if higher else mean < 0
        word = ("wins" if better else "loses") if abs(mean) > half else "tie"
        if math.isinf(mean):  # only lower-is-better metrics become infinite when an adaptation diverges
            word = "loses (Meta-LSTM diverged)" if mean > 0 else "wins (the other diverged)"
        by_k[p["shots"]].append(f"vs {p['other']}: {word} (Δ{p['metric']} = {mean:+.3f} ± {half:.3f})")
    return [f"- K = {k}: Meta-LSTM " + "; ".join(parts) for k, parts in by_k.items()]


BEGIN, END = "<!-- experiment:{}:begin -->", "<!-- experiment:{}:end -->"


def update_markdown(path: Path, name: str, section: str) -> None:
    """Replace this experiment's marked block in ``path`` (or append it); text outside the markers is kept."""
    begin, end = BEGIN.format(name), END.format(name)
    block = f"{begin}\n{section}{end}"
    text = path.read_text() if path.exists() else "# Results\n"
    if begin in text and end in text:
        head, rest = text.split(begin, 1)
        text = head + block + rest.split(end, 1)[1]
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def write_report(results: dict[str, Any], cfg: ExperimentConfig, command: str) -> dict[str, Path]:
    out_dir = Path(cfg.report.dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    plot_paths = plots(results, out_dir)
    md_path = Path(cfg.report.markdown) if cfg.report.markdown else None
    section = markdown_section(results, command, plot_paths, md_path.parent if md_path else out_dir)
    files = {"json": out_dir / f"{cfg.name}.json", "section": out_dir / f"{cfg.name}.md"}
    compact = {k: v for k, v in results.items() if k not in ("rows", "curves")}  # raw rows: --results-json
    files["json"].write_text(json.dumps(compact, indent=1, default=str))
    files["section"].write_text(markdown_section(results, command, plot_paths, out_dir))
    if md_path:
        update_markdown(md_path, cfg.name, section)
        files["markdown"] = md_path
    for p in plot_paths:
        files[p.stem] = p
    return files


def log_to_mlflow(cfg: ExperimentConfig, results: dict[str, Any], files: dict[str, Path]) -> str | None:
    """One MLflow run: the config as params, every summary cell as a metric, the report files as artifacts."""
    if not cfg.train.tracking.enabled:
        return None
    from pipeline.tracking.runs import Tracker

    tracker = Tracker(cfg.train.tracking.uri or None, cfg.train.tracking.experiment,
                      run_name=cfg.train.tracking.run_name or f"experiment-{cfg.name}")
    tracker.start(_config_dict(cfg), {"metalstm.kind": "experiment", "metalstm.family": results["family"],
                                      "metalstm.task_store": results["store"]["uri"],
                                      "metalstm.task_store_hash": str(results["store"]["content_hash"])})
    try:
        for r in results["summary"]:
            steps = "na" if r["steps"] is None else r["steps"]
            metrics = {f"test.{r['method']}.K{r['shots']}.k{steps}.{m}": v["mean"] for m, v in r.items()
                       if isinstance(v, dict) and math.isfinite(v["mean"])}
            metrics.update({f"test.{r['method']}.K{r['shots']}.k{steps}.{m}_ci95": v["ci95"] for m, v in r.items()
                            if isinstance(v, dict) and math.isfinite(v["ci95"])})
            tracker.log_metrics(metrics, step=0)
        for c in results["compute"]:
            tracker.log_metrics({f"compute.{c['method']}.{c['phase'].split()[0]}.wall_s": c["wall_s"],
                                 f"compute.{c['method']}.{c['phase'].split()[0]}.cpu_s": c["cpu_s"]},
                                step=int(c["seed"]))
        for p in files.values():
            if p.suffix in (".json", ".md", ".png"):
                tracker.client.log_artifact(tracker.run_id, str(p), "report")
    finally:
        tracker.finish()
    return tracker.run_id


# ----------------------------------------------------------------------------- CLI


def add_arguments(parser: argparse.ArgumentParser, command: str) -> None:
    parser.add_argument("config", help="an experiment YAML (configs/experiment_*.yaml)")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="config overrides, e.g. seeds=[0] train.schedule.meta_steps=50")
    parser.add_argument("--store", help="use this task store instead of building the configured one")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    parser.add_argument("--results-json", metavar="PATH", help="also write the raw results JSON here")
    parser.add_argument("--merge", nargs="+", metavar="JSON",
                        help="do not run: merge result JSONs of the same experiment on disjoint seeds (one process "
                             "per seed), then write the report and log to MLflow")


def run(args: argparse.Namespace) -> int:
    cfg = load_experiment_config(args.config, args.overrides)
    if args.store:
        cfg.store.uri = args.store
    if args.print_config:
        print(OmegaConf.to_yaml(OmegaConf.structured(cfg)))
        return 0
    retain_freed_memory()  # this process meta-trains and adapts: reuse the layers' large buffers in place
    command = cfg.report.command or "metalstm experiment " + " ".join(
        shlex.quote(a) for a in [args.config, *args.overrides, *(["--store", args.store] if args.store else [])])
    if args.merge:
        results = merge_results([json.loads(Path(p).read_text()) for p in args.merge])
    else:
        t0 = time.perf_counter()
        results = Experiment(cfg).run()
        results["total_wall_s"] = time.perf_counter() - t0
    if args.results_json:
        Path(args.results_json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.results_json).write_text(json.dumps(results, default=str))
    files = write_report(results, cfg, command)
    run_id = log_to_mlflow(cfg, results, files)
    print(f"experiment {cfg.name}: {results['total_wall_s'] / 60:.1f} min; report {files.get('markdown') or ''} "
          f"{files['section']}; MLflow run {run_id}")
    for line in verdict_lines(results):
        print(line)
    return 0
