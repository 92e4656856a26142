"""``metalstm demo``: the whole system on one machine, with nothing configured.

Builds the synthetic task store, meta-trains with 2 Ray Train workers on a local Ray cluster, logs and
registers the model in a local MLflow, promotes it, serves it with Ray Serve, adapts it to one held-out task
over HTTP, says what the numbers mean, and stops what it started (or keeps serving with ``--keep-serving``).
The training run is configs/demo.yaml; only what run time decides (the run's name, the stores under
``--workdir``) is set here.

The console is for a newcomer: one line per step, progress bars for the long ones, and a last screen that
explains the result and where to go next. Everything Ray, Serve and Ray Data print goes to ``demo.log`` in the
demo's ``--workdir`` (``--verbose`` shows it instead), so nothing on screen looks like an error when all went well.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from pipeline.demo.console import Console

if TYPE_CHECKING:
    from pipeline.config import TrainConfig

log = logging.getLogger("metalstm.demo")

# In the checkout, as every configs/ file: the README installs the project editable (`pip install -e .`)
CONFIG = Path(__file__).resolve().parents[2] / "configs" / "demo.yaml"
TOTAL = 6  # steps on the console
DOCS = "README.md (Serving: curl examples), docs/serving.md (the API), docs/results.md (how it compares)"


def add_arguments(parser: argparse.ArgumentParser, command: str) -> None:
    parser.add_argument("--workdir", default=".metalstm/demo",
                        help="where the task store, runs, MLflow store and demo.log live (default .metalstm/demo)")
    parser.add_argument("--port", type=int, default=8000, help="Serve's HTTP port on 127.0.0.1 (default 8000)")
    parser.add_argument("--keep-serving", action="store_true",
                        help="leave the endpoint up until Ctrl-C or SIGTERM (for the README's curl examples)")
    parser.add_argument("-v", "--verbose", dest="show_internals", action="store_true",
                        help="show Ray, Serve and Ray Data output here instead of in WORKDIR/demo.log")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="training config overrides on configs/demo.yaml, e.g. schedule.meta_steps=50")


def run(args: argparse.Namespace) -> int:
    if not 0 < args.port < 65536:
        raise ValueError(f"--port: expected 1-65535, got {args.port}")
    workdir = Path(args.workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    verbose = args.show_internals or getattr(args, "verbose", False)
    log_path = workdir / "demo.log"
    previous = signal.signal(signal.SIGTERM, _interrupt)
    with Console(None if verbose else log_path) as console:
        console.line("metalstm demo: a Meta-LSTM meta-trained, registered, served and adapted on this machine "
                     "(1-3 minutes on 2 cores)")
        if not verbose:
            console.line(f"  Ray, Serve and Ray Data output goes to {_show(log_path)} (--verbose shows it here)")
        console.line()
        try:
            return _run(args, workdir, console)
        except KeyboardInterrupt:
            console.line("\ninterrupted; stopped Serve and Ray")
            raise
        except BaseException as e:
            console.line(f"\nThe demo stopped: {type(e).__name__}: {e}")
            tail = console.log_tail()
            if tail:
                console.line(f"Last lines of {_show(log_path)}:")
                for text in tail:
                    console.line("  " + text)
            raise
        finally:
            signal.signal(signal.SIGTERM, previous)


def _run(args: argparse.Namespace, workdir: Path, console: Console) -> int:
    """The steps, top to bottom; Serve and Ray stop on the way out, however it goes (``--keep-serving``: at
    Ctrl-C or SIGTERM)."""
    started = time.perf_counter()
    cwd = os.getcwd()
    try:
        cfg = _build_store(console, args, workdir)
        _start_ray(console)
        _train(console, cfg)
        model_uri = _register(console, cfg)
        url = _serve(console, model_uri, cfg.tracking.uri, args.port)
        os.chdir(cwd)
        result = _adapt(console, cfg.data.store, url)
        if not args.keep_serving:
            _stop(console)
        _summary(console, args, result, cfg.tracking.uri, url)
        console.line(f"done in {time.perf_counter() - started:.0f} s" +
                     (f"; serving at {url} until Ctrl-C" if args.keep_serving else ""))
        if args.keep_serving:
            _serve_until_stopped(console)
        return 0
    finally:
        os.chdir(cwd)
        _shutdown()


# ----------------------------------------------------------------------------- the steps


def _build_store(console: Console, args: argparse.Namespace, workdir: Path) -> TrainConfig:
    """Step 1: import the libraries, load the config, build the built-in task store; the working directory is
    then ``workdir`` (until serving has started), so the store and any relative paths live there."""
    with console.progress(_step(1, "task store"), note="importing Ray and MLflow") as bar:
        _import_libraries()
        from mlflow.tracking import MlflowClient

        from pipeline.tasks.store import read_manifest
        from pipeline.training.train import prepare_store

        cfg = _config(args.overrides, workdir)
        os.chdir(workdir)
        bar.update(note="building the synthetic sinusoid store")
        cfg.data.store = prepare_store(cfg)
        manifest = read_manifest(cfg.data.store)
        features, counts = manifest["features"], manifest["counts"]
        MlflowClient(cfg.tracking.uri).search_experiments(max_results=1)  # create the store before anyone polls it
        bar.done(f"{bar.label} {counts['train']} training, {counts['val']} validation, {counts['test']} test "
                 f"sinusoid tasks (windows of {features.get('window')} steps -> the next "
                 f"{features.get('horizon')})")
    return cfg


def _import_libraries() -> None:
    """The slow imports (Ray, Serve, MLflow, the trainer), under the first step's note: later steps time their work."""
    import ray.serve  # noqa: F401

    import pipeline.serving.app  # noqa: F401
    import pipeline.tracking.registry  # noqa: F401
    import pipeline.training.train  # noqa: F401


def _config(overrides: list[str], workdir: Path) -> TrainConfig:
    """configs/demo.yaml, then what only run time knows, then the user's ``key=value`` overrides."""
    from pipeline.config import load_config

    if not CONFIG.is_file():  # a wheel install carries the code, not the checkout's configs/
        raise FileNotFoundError(f"{CONFIG}: the demo reads configs/demo.yaml from a source checkout; clone the "
                                "repository and `pip install -e .` there (the README's quick start)")
    cfg = load_config(CONFIG, [
        f"name=demo-{time.strftime('%Y%m%d-%H%M%S')}",  # a new run each time: the same name would resume one
        f"tracking.uri=sqlite:///{workdir / 'mlflow.db'}",  # a local MLflow in --workdir, wherever that is
        f"checkpoint.storage_path={workdir / 'runs'}",
        *overrides])
    if not cfg.tracking.registered_model:
        raise ValueError("config key tracking.registered_model: the demo serves the model it registers, so it "
                         "must name one")
    return cfg


def _start_ray(console: Console) -> None:
    """Step 2: the fused LSTM kernels (built on a first run), then a local Ray cluster of the demo's own."""
    import ray

    from metalstm import kernels

    with console.progress(_step(2, "Ray"), note="loading the fused LSTM kernels (a first run builds them)") as bar:
        fused = kernels.warm_up()
        bar.update(note="starting a local Ray cluster")
        ray.init(address="local", include_dashboard=False, log_to_driver=True)  # always its own cluster
        # Ray's core worker treats SIGTERM as a crash (a stack dump, then the process dies without stopping
        # Serve or Ray): take it back, so that SIGTERM stops the demo as Ctrl-C does
        signal.signal(signal.SIGTERM, _interrupt)
        cpus = int(ray.cluster_resources().get("CPU", 0))
        bar.done(f"{bar.label} a local cluster with {cpus} CPUs; fused LSTM kernels "
                 f"{'ready' if fused else 'unavailable (PyTorch ops instead)'}")


def _train(console: Console, cfg: TrainConfig) -> None:
    """Step 3: meta-training on Ray Train, which logs the run and registers the model in MLflow."""
    from pipeline.training.train import train

    poll = _TrainingProgress(cfg.tracking.uri, cfg.tracking.experiment, cfg.tracking.run_name or cfg.name)
    with console.progress(_step(3, "meta-training"), total=cfg.schedule.meta_steps, poll=poll) as bar:
        result = train(cfg)
        if result.error:
            raise RuntimeError(f"training failed: {result.error}")
        m = result.metrics
        bar.done(f"{bar.label} {m.get('step')} meta-steps of {cfg.schedule.meta_batch_size} tasks on "
                 f"{cfg.scaling.num_workers} workers; validation query MSE {m.get('val_pre_mse', float('nan')):.3f}"
                 f" before adaptation -> {m.get('val_post_mse', float('nan')):.3f} after")


def _register(console: Console, cfg: TrainConfig) -> str:
    """Step 4: promote the newest registered version to @champion if it evaluates better; the model URI to serve."""
    from mlflow.tracking import MlflowClient

    from pipeline.tracking import registry

    name, uri = cfg.tracking.registered_model, cfg.tracking.uri
    with console.progress(_step(4, "registry"), note="evaluating the new version on held-out tasks") as bar:
        versions = MlflowClient(uri, registry_uri=uri).search_model_versions(f"name='{name}'")
        if not versions:
            raise RuntimeError(f"no version of {name} was registered (training's log has why)")
        version = str(max(int(v.version) for v in versions))
        code, cmp = registry.promote(name, version, alias="champion", tasks_uri=cfg.data.store, split="test",
                                     tracking_uri=uri)
        if code == registry.EXIT_PROMOTED:
            model_uri = f"models:/{name}@champion"
            text = f"{name} version {version} -> @champion"
            if "candidate" in cmp:
                text += f" (test query MSE {cmp['candidate']:.3f} after adaptation, {cmp['num_tasks']} tasks"
                text += (f"; beat version {cmp['holder_version']}: {cmp['holder']:.3f})"
                         if cmp.get("holder_version") else ")")
        else:
            model_uri = f"models:/{name}/{version}"
            text = (f"{name} version {version} registered; @champion stays on version {cmp.get('holder_version')}"
                    f" (test query MSE {cmp.get('holder', float('nan')):.3f} vs {cmp['candidate']:.3f})")
        bar.done(f"{bar.label} {text}")
    return model_uri


def _serve(console: Console, model_uri: str, tracking_uri: str, port: int) -> str:
    """Step 5: Ray Serve on 127.0.0.1 with the model; its URL."""
    from ray import serve

    from pipeline.serving import app as serving

    url = f"http://127.0.0.1:{port}"
    with console.progress(_step(5, "serving"), note="starting Ray Serve and loading the model") as bar:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(serving.build_app(serving.resolve(model_uri, tracking_uri)), name=serving.APP_NAME,
                  route_prefix="/")
        bar.done(f"{bar.label} {model_uri} at {url} (OpenAPI at {url}/docs)")
    return url


@dataclass
class _Adaptation:
    """A held-out task's query windows and the endpoint's answers for them, adapted and not."""

    answer: dict[str, Any]  # POST /v1/adapt's reply
    unadapted: dict[str, Any]  # the same with "steps": 0
    query_x: np.ndarray
    query_y: np.ndarray


def _adapt(console: Console, store: str, url: str) -> _Adaptation:
    """Step 6: adapt the served model to the first held-out test task over HTTP (and once without adapting)."""
    import requests

    with console.progress(_step(6, "adaptation"), note="POST /v1/adapt") as bar:
        body, query_x, query_y = _demo_request(store)
        adapted = requests.post(f"{url}/v1/adapt", json=body, timeout=120)
        adapted.raise_for_status()
        unadapted = requests.post(f"{url}/v1/adapt", json={**body, "steps": 0}, timeout=120)
        unadapted.raise_for_status()
        bar.done(f"{bar.label} POST /v1/adapt with a held-out task: {len(body['support'])} support windows, "
                 f"{len(body['query'])} query windows")
    answer = adapted.json()
    log.info("the adaptation answer: %s", answer)
    return _Adaptation(answer, unadapted.json(), query_x, query_y)


def _stop(console: Console) -> None:
    """Stop Serve and Ray before the last screen, as a step of its own (unnumbered: it is not the demo's point)."""
    with console.progress(" " * 6 + f"{'shutdown':<14}", note="stopping Serve and Ray") as bar:
        _shutdown()
        bar.done(f"{bar.label} stopped Serve and Ray")


def _serve_until_stopped(console: Console) -> None:
    """``--keep-serving``: wait for Ctrl-C or SIGTERM (its normal end), then stop Serve and Ray."""
    try:
        while True:  # short sleeps: a signal's handler runs only when the main thread wakes
            time.sleep(0.5)
    except KeyboardInterrupt:
        pass
    _shutdown()
    console.line("stopped Serve and Ray")


def _interrupt(signum: int, frame: Any) -> None:
    """SIGTERM as Ctrl-C: the demo then stops Serve and Ray on its way out instead of leaving them running."""
    raise KeyboardInterrupt


def _shutdown() -> None:
    """Stop Serve, then Ray, if this process started them (a no-op otherwise, or when already stopped)."""
    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        from ray import serve

        try:
            serve.shutdown()
        finally:
            ray.shutdown()


# ----------------------------------------------------------------------------- helpers of the steps


def _show(path: Path) -> str:
    """``path`` relative to the working directory when it is inside it: shorter, and what a user types."""
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def _step(n: int, label: str) -> str:
    """A step's label, padded so that the steps' results line up."""
    return f"[{n}/{TOTAL}] {label:<14}"


def _demo_request(store: str) -> tuple[dict[str, Any], np.ndarray, np.ndarray]:
    """An adaptation request for the first held-out test task, in the task layout; its query inputs and targets."""
    from pipeline.tasks.store import read_tasks

    task = read_tasks(store, "test", limit=1)[0]
    support = [{"x": x.tolist(), "y": y.tolist()} for x, y in zip(task["support_x"], task["support_y"])]
    query = [{"x": x.tolist()} for x in task["query_x"]]
    return ({"support": support, "query": query}, np.stack([np.asarray(x, np.float32) for x in task["query_x"]]),
            np.stack([np.asarray(y, np.float32) for y in task["query_y"]]))


def _seasonal_naive(query_x: np.ndarray, horizon: int) -> tuple[np.ndarray, int]:
    """The classical baseline ``metalstm experiment`` reports: the window's last ``season`` values repeated."""
    import torch

    from metalstm.models import seasonal_naive

    x = torch.as_tensor(query_x).reshape(1, query_x.shape[0], query_x.shape[1], -1)
    season = min(horizon, x.shape[2])
    pred = seasonal_naive(x, torch.ones(x.shape[:3], dtype=torch.bool), horizon, season)
    return pred[0].numpy(), season


class _TrainingProgress:
    """Meta-steps done and the latest losses, read from the run's MLflow metrics (rank 0 logs them every
    ``schedule.log_every`` steps): the driver has no other view of its workers' progress."""

    def __init__(self, tracking_uri: str, experiment: str, run_name: str) -> None:
        self.uri, self.experiment, self.run_name = tracking_uri, experiment, run_name
        self.client: Any = None
        self.run_id: str | None = None

    def __call__(self) -> tuple[int | None, str]:
        from mlflow.tracking import MlflowClient

        if self.client is None:
            self.client = MlflowClient(self.uri)
        if self.run_id is None:
            exp = self.client.get_experiment_by_name(self.experiment)
            runs = self.client.search_runs([exp.experiment_id], f"attributes.run_name = '{self.run_name}'",
                                           max_results=1) if exp else []
            if not runs:
                return None, "starting the workers"
            self.run_id = runs[0].info.run_id
        history = self.client.get_metric_history(self.run_id, "train_loss")
        if not history:
            return 0, "starting the workers"
        last = max(history, key=lambda m: m.step)
        note = f"meta-train query MSE {last.value:.3f}"
        val = self.client.get_metric_history(self.run_id, "val_post_mse")
        if val:
            note += f", validation {max(val, key=lambda m: m.step).value:.3f}"
        return last.step, note


# ----------------------------------------------------------------------------- the last screen


def _summary(console: Console, args: argparse.Namespace, result: _Adaptation, tracking_uri: str, url: str) -> None:
    """The last screen: what the numbers mean, and where to go next."""
    for text in ["", *_what_the_numbers_mean(result), "", *_where_next(console, args, tracking_uri, url)]:
        console.line(text)


def _what_the_numbers_mean(result: _Adaptation) -> list[str]:
    """The adapted forecast's query MSE next to no adaptation and seasonal naive, and one query window."""
    answer, query_y = result.answer, result.query_y
    adapted = np.asarray([p["values"] for p in answer["predictions"]], np.float32)
    plain = np.asarray([p["values"] for p in result.unadapted["predictions"]], np.float32)
    naive, season = _seasonal_naive(result.query_x, query_y.shape[-1])
    mse = {k: float(np.mean((v - query_y) ** 2)) for k, v in (("adapted", adapted), ("plain", plain),
                                                               ("naive", naive))}
    if mse["adapted"] < mse["naive"]:
        verdict = f"the adapted forecast's MSE is {mse['naive'] / max(mse['adapted'], 1e-12):.1f}x lower than " \
                  "seasonal naive's"
    else:
        verdict = f"seasonal naive does better on this task ({mse['adapted'] / max(mse['naive'], 1e-12):.1f}x " \
                  "lower MSE): the demo's training is short; docs/results.md has full runs"
    n_query, horizon = len(query_y), query_y.shape[-1]
    first = min(8, horizon)
    return [
        f"What the numbers mean: a sinusoid the model never saw, adapted in {answer['steps']} gradient steps",
        f"  support loss  {answer['support_loss_before']:.3f} -> {answer['support_loss_after']:.3f}   "
        "MSE on the task's own support windows, before -> after adaptation",
        f"  query MSE     {mse['adapted']:.3f} adapted, on {n_query} windows of {horizon} steps it was not adapted on;",
        f"                {mse['plain']:.3f} without adaptation; {mse['naive']:.3f} seasonal naive (the window's last "
        f"{season} steps repeated)",
        f"                -> {verdict}",
        f"  query 0       predicted {' '.join(f'{v:5.2f}' for v in adapted[0][:first])}  (first {first} of {horizon})",
        f"                actual    {' '.join(f'{v:5.2f}' for v in query_y[0][:first])}",
    ]


def _where_next(console: Console, args: argparse.Namespace, tracking_uri: str, url: str) -> list[str]:
    """The MLflow UI command that opens this store, the endpoint, the docs and the log."""
    from pipeline.tracking.runs import local_stores

    # plain `metalstm ui` opens the most recently written local store: this one, unless told otherwise
    ui = "metalstm ui" if (local_stores()[:1] == [tracking_uri] and not os.environ.get("MLFLOW_TRACKING_URI")) \
        else f"metalstm ui --tracking-uri {tracking_uri}"
    lines = [
        "Where next:",
        f"  MLflow UI     {ui}   (the run's metrics and plots, the registered model)",
        (f"  endpoint      {url}  (OpenAPI at /docs); README.md, Serving, has curl examples" if args.keep_serving
         else "  endpoint      stopped; `metalstm demo --keep-serving` keeps it up for the README's curl examples"),
        f"  docs          {DOCS}",
    ]
    if console.log_path is not None:
        lines.append(f"  log           {_show(console.log_path)}")
    return lines
