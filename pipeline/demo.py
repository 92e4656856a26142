"""``metalstm demo``: the whole system on one machine, with nothing configured.

Builds the synthetic task store, meta-trains with 2 Ray Train workers on a local Ray cluster, logs and
registers the model in a local MLflow, promotes it, serves it with Ray Serve, sends one adaptation request,
shows the answer, and stops what it started (or keeps serving with ``--keep-serving``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import signal
import threading
import time
from pathlib import Path

log = logging.getLogger("metalstm.demo")


def add_arguments(parser: argparse.ArgumentParser, command: str) -> None:
    parser.add_argument("--workdir", default=".metalstm/demo", help="where the store, runs and MLflow live")
    parser.add_argument("--port", type=int, default=8000, help="Serve's HTTP port on 127.0.0.1")
    parser.add_argument("--keep-serving", action="store_true", help="leave the endpoint up until Ctrl-C")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="training config overrides")


def _say(step: int, total: int, text: str) -> None:
    print(f"[{step}/{total}] {text}", flush=True)


def _demo_request(store: str) -> tuple[dict, list]:
    """An adaptation request for one held-out test task, in the task layout, and the true query targets."""
    from pipeline.taskstore import read_tasks

    task = read_tasks(store, "test", limit=1)[0]
    support = [{"x": x.tolist(), "y": y.tolist()} for x, y in zip(task["support_x"], task["support_y"])]
    query = [{"x": x.tolist()} for x in task["query_x"][:2]]
    return {"support": support, "query": query}, [y.tolist() for y in task["query_y"][:2]]


def run(args: argparse.Namespace) -> int:
    import ray
    import requests
    from ray import serve

    from pipeline import registry
    from pipeline import serve as serving
    from pipeline.config import load_config
    from pipeline.train import prepare_store, train

    workdir = Path(args.workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    tracking_uri = f"sqlite:///{workdir / 'mlflow.db'}"
    name = "metalstm-demo"
    total = 6
    started = time.perf_counter()
    cfg = load_config(None, [
        f"name=demo-{time.strftime('%Y%m%d-%H%M%S')}", "model.hidden_size=32", "maml.inner_steps=3",
        "maml.inner_lr=0.05", "optim.lr=0.003", "schedule.meta_steps=150", "schedule.meta_batch_size=16",
        "schedule.val_every=50", "schedule.val_tasks=16", "schedule.log_every=10", "scaling.num_workers=2",
        "data.synthetic.train_tasks=256", "data.synthetic.val_tasks=16", "data.synthetic.test_tasks=16",
        f"tracking.uri={tracking_uri}", f"tracking.registered_model={name}",
        f"checkpoint.storage_path={workdir / 'runs'}", *args.overrides])
    cwd = os.getcwd()
    os.chdir(workdir)  # the built-in store and any relative paths live under the demo's folder
    try:
        _say(1, total, "building the synthetic sinusoid task store")
        store = prepare_store(cfg)
        cfg.data.store = store

        _say(2, total, f"starting a local Ray cluster and meta-training with {cfg.scaling.num_workers} workers")
        ray.init(address="local", include_dashboard=False, log_to_driver=True)  # always its own cluster
        result = train(cfg)
        if result.error:
            raise RuntimeError(f"training failed: {result.error}")
        _say(3, total, f"trained to step {result.metrics.get('step')}: validation query loss "
                       f"{result.metrics.get('val_pre_mse', float('nan')):.4f} before adaptation -> "
                       f"{result.metrics.get('val_post_mse', float('nan')):.4f} after")

        from mlflow.tracking import MlflowClient

        versions = MlflowClient(tracking_uri, registry_uri=tracking_uri).search_model_versions(f"name='{name}'")
        if not versions:
            raise RuntimeError(f"no version of {name} was registered; see the training log above")
        version = str(max(int(v.version) for v in versions))
        code, comparison = registry.promote(name, version, alias="champion", tasks_uri=store, split="test",
                                            tracking_uri=tracking_uri)
        _say(4, total, f"registered {name} version {version}; promote -> "
                       f"{'champion' if code == 0 else 'not promoted'} ({json.dumps(comparison, default=str)[:200]})")
        model_uri = f"models:/{name}@champion" if code == 0 else f"models:/{name}/{version}"

        serve.start(http_options={"host": "127.0.0.1", "port": args.port})
        serve.run(serving.build_app(serving.resolve(model_uri, tracking_uri)), name=serving.APP_NAME,
                  route_prefix="/")
        url = f"http://127.0.0.1:{args.port}"
        _say(5, total, f"serving {model_uri} at {url} (OpenAPI at {url}/docs)")

        body, truth = _demo_request(store)
        reply = requests.post(f"{url}/v1/adapt", json=body, timeout=60)
        reply.raise_for_status()
        answer = reply.json()
        _say(6, total, "adapted on a new task's support set; the answer:")
        print(json.dumps({k: v for k, v in answer.items() if k != "predictions"}, indent=2))
        for i, (pred, actual) in enumerate(zip(answer.get("predictions", []), truth)):
            values = pred.get("values", pred) if isinstance(pred, dict) else pred
            print(f"  query {i}: predicted {[round(v, 2) for v in values][:8]}")
            print(f"           actual    {[round(v, 2) for v in actual][:8]}")
        print(f"\ndone in {time.perf_counter() - started:.0f} s.\n"
              f"  MLflow UI:  mlflow ui --backend-store-uri {tracking_uri} --host 127.0.0.1  (then open "
              "http://127.0.0.1:5000)\n"
              f"  endpoint:   curl {url}/v1/model" + ("" if args.keep_serving else "   (stopped; rerun with "
                                                         "--keep-serving to keep it up)"), flush=True)
        if args.keep_serving:
            stop = threading.Event()
            signal.signal(signal.SIGTERM, lambda *_: stop.set())
            with contextlib.suppress(KeyboardInterrupt):
                stop.wait()
        return 0
    finally:
        os.chdir(cwd)
        if ray.is_initialized():
            try:
                serve.shutdown()
            finally:
                ray.shutdown()
