"""``metalstm bench serve``: bounded HTTP load against the adaptation service, batched vs one at a time.

Starts a local Ray + Serve on 127.0.0.1, registers a forecaster in a temporary MLflow (or serves ``model=``),
deploys it twice (``/batched`` with ``serve.batch``, ``/unbatched`` one request at a time) and drives each
from a SECOND process at several concurrencies, for ``POST /v1/adapt`` and for adapter predict. Every
request sends 7 days of hourly history (the raw-history form: the server windows and scales it).

Options (key=value): ``concurrency`` (``1,8,32``), ``requests`` per level (``480``: at 32 clients
and batches of 16 that is 30 batches, so the ramp at each end of a level, when batches are not yet or no
longer full, weighs less in the rate than in 12), ``hidden`` (64),
``steps`` (5), ``days`` (7), ``model`` (a ``models:/`` URI to serve instead), ``tracking_uri``, ``ingress``:
``direct`` (default: the load goes to the replicas' own ports, as ``metalstm serve --direct-ingress`` serves)
or ``proxy`` (through Serve's HTTP proxy, the default of ``metalstm serve``). Both modes of one run share the
ingress and take turns at each level, so their ratio compares batching alone, under the same machine speed.

Each level also reports the machine's CPU time per request (``cpu_ms_per_request``: server, proxy and client
together, from ``/proc/stat``) and how busy the cores were (``cpu_busy_share``), which shows whether a level
was bound by CPU or by waiting.
"""

from __future__ import annotations

import http.client
import json
import logging
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import numpy as np

log = logging.getLogger(__name__)

# The UCI electricity layout (pipeline.tasks.builders.electricity): 72 h windows, 24 h horizon, stride 12, 5 windows.
STORE = {"family": "electricity",
         "features": {"input_size": 5, "horizon": 24, "window": 72, "stride": 12, "support_windows": 5,
                      "covariates": ["value", "hour_sin", "hour_cos", "dow_sin", "dow_cos"]},
         "normalisation": {"method": "mean"}}
TARGETS = {"p50_ms_at_1": 50.0, "batched_speedup_at_32": 4.0}


def _int(options: dict[str, str], key: str, default: int, low: int = 1) -> int:
    try:
        value = int(options.get(key, default))
    except ValueError:
        raise ValueError(f"bench option {key}: expected an integer, got {options[key]!r}") from None
    if value < low:
        raise ValueError(f"bench option {key}: must be >= {low}, got {value}")
    return value


def register_checkpoint(checkpoint: Path, name: str, tracking_uri: str, workdir: Path) -> str:
    """Register a checkpoint as the registry's pyfunc model (as training does) and return the version."""
    import mlflow
    from mlflow.tracking import MlflowClient

    from pipeline.tracking.pyfunc import save_pyfunc
    from pipeline.tracking.runs import ensure_experiment

    mlflow.set_tracking_uri(tracking_uri)
    # artifacts beside a local store, as training keeps them (without a location MLflow writes ./mlruns)
    mlflow.set_experiment(experiment_id=ensure_experiment(MlflowClient(tracking_uri), "metalstm-bench", tracking_uri))
    model_dir = workdir / f"pyfunc-{name}"
    save_pyfunc(checkpoint, model_dir)
    with mlflow.start_run() as run:
        mlflow.log_artifacts(str(model_dir), "model")
    return str(mlflow.register_model(f"runs:/{run.info.run_id}/model", name).version)


def _forecaster(workdir: Path, hidden: int, steps: int) -> Path:
    import torch

    from metalstm import MAMLConfig, MetaLearner, ModelConfig, build_model, save_checkpoint

    torch.manual_seed(0)
    cfg = ModelConfig(kind="forecaster", input_size=5, hidden_size=hidden, horizon=24)
    learner = MetaLearner(build_model(cfg), MAMLConfig(inner_steps=steps, inner_lr=0.01))
    return save_checkpoint(workdir / "forecaster.pt", learner, cfg, {"store": STORE})


def history(days: int, seed: int) -> dict[str, list]:
    rng = np.random.default_rng(seed)
    n = 24 * days
    t = np.arange(n)
    values = 800 + 300 * np.sin(2 * np.pi * t / 24) + 100 * np.sin(2 * np.pi * t / 168) + rng.normal(0, 30, n)
    stamps = (np.datetime64("2014-03-24T00") + t.astype("timedelta64[h]")).astype(str)
    return {"values": values.round(2).tolist(), "timestamps": stamps.tolist()}


# ----------------------------------------------------------------------------- the load (second process)


def _cpu_seconds() -> tuple[float, float] | None:
    """Machine-wide (busy, total) CPU seconds since boot from ``/proc/stat``; None where there is none."""
    try:
        with open("/proc/stat") as f:
            ticks = [int(v) for v in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    hz = os.sysconf("SC_CLK_TCK")
    busy = sum(ticks[i] for i in (0, 1, 2, 5, 6) if i < len(ticks))  # user nice system irq softirq (not steal)
    return busy / hz, sum(ticks[:8]) / hz


def _load(spec: dict[str, Any]) -> dict[str, Any]:
    """Send ``spec["requests"]`` requests with ``spec["concurrency"]`` threads; latency percentiles, rate, errors.

    Each thread keeps one ``http.client`` connection (keep-alive) and posts bodies encoded once up front: the
    client should spend as little of the 2 cores it shares with the server as it can (``requests`` costs
    ≈ 1.9 ms of CPU per request here, this ≈ 0.7 ms, measured with the process start included).
    """
    parts = urlsplit(spec["base"])
    paths, concurrency, total = spec["path"], spec["concurrency"], spec["requests"]
    bodies = [json.dumps(b).encode() for b in spec["bodies"]]
    headers = {"Content-Type": "application/json"}
    local = threading.local()

    def one(i: int) -> tuple[float, bool]:
        start = time.perf_counter()
        try:
            conn = getattr(local, "conn", None) or http.client.HTTPConnection(parts.hostname, parts.port, timeout=120)
            local.conn = conn
            conn.request("POST", parts.path + paths[i % len(paths)], body=bodies[i % len(bodies)], headers=headers)
            response = conn.getresponse()
            response.read()
            ok = 200 <= response.status < 300
        except (OSError, http.client.HTTPException):
            local.conn = None  # reconnect on the next request
            ok = False
        return time.perf_counter() - start, ok

    with ThreadPoolExecutor(concurrency) as pool:  # warm-up: connections, first batches
        list(pool.map(one, range(min(total, 2 * concurrency))))
        cpu_before, start = _cpu_seconds(), time.perf_counter()
        results = list(pool.map(one, range(total)))
        elapsed, cpu_after = time.perf_counter() - start, _cpu_seconds()
    lat = np.array([r[0] for r in results]) * 1000
    out = {"concurrency": concurrency, "requests": total, "p50_ms": round(float(np.percentile(lat, 50)), 2),
           "p99_ms": round(float(np.percentile(lat, 99)), 2), "requests_per_s": round(total / elapsed, 2),
           "errors": int(sum(not r[1] for r in results))}
    if cpu_before and cpu_after:  # the whole machine (server, proxy, this client): what a request costs in CPU
        busy, all_cpu = cpu_after[0] - cpu_before[0], cpu_after[1] - cpu_before[1]
        out["cpu_ms_per_request"] = round(1000 * busy / total, 2)
        out["cpu_busy_share"] = round(busy / max(all_cpu, 1e-9), 3)
    return out


@contextmanager
def _environ(**values: str) -> Iterator[None]:
    """Set environment variables for what starts inside (a local Ray cluster inherits them); restore after."""
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _drive(spec: dict[str, Any]) -> dict[str, Any]:
    """Run :func:`_load` in a second Python process (the client must not share the server's CPU time slices)."""
    out = subprocess.run([sys.executable, "-m", "pipeline.bench.serve"], input=json.dumps(spec), text=True,
                         capture_output=True, timeout=1800, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"load generator failed: {out.stderr[-2000:]}")
    return json.loads(out.stdout)


# ----------------------------------------------------------------------------- the benchmark


def _levels(options: dict[str, str]) -> list[int]:
    try:
        levels = [int(c) for c in options.get("concurrency", "1,8,32").split(",")]
    except ValueError:
        raise ValueError(f"bench option concurrency: expected integers like 1,8,32, got "
                         f"{options['concurrency']!r}") from None
    if not levels or min(levels) < 1 or max(levels) > 256:
        raise ValueError(f"bench option concurrency: each level must be in [1, 256], got {levels}")
    return levels


def _deploy(model_uri: str, tracking_uri: str | None, ingress: str) -> dict[str, str]:
    """Start Serve on a free port with the two modes; each mode's base URL (its replica's own port if direct)."""
    from ray import serve

    from pipeline.serving.app import build_app, model_config
    from pipeline.serving.command import direct_ingress_urls

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    config = model_config(model_uri, tracking_uri)
    serve.run_many([serve.RunTarget(build_app(config, num_cpus=0.5, torch_threads=1, batching=b), name=mode,
                                    route_prefix=f"/{mode}") for mode, b in (("batched", True), ("unbatched", False))])
    bases = {mode: f"http://127.0.0.1:{port}" for mode in ("batched", "unbatched")}
    if ingress == "direct":
        for mode in bases:
            urls = direct_ingress_urls(mode, "127.0.0.1")
            if not urls:
                raise RuntimeError(f"ingress=direct: Serve started no direct-ingress port for /{mode}")
            bases[mode] = urls[0]
    return bases


def _measure(bases: dict[str, str], levels: list[int], total: int, steps: int, days: int,
             results: dict[str, Any]) -> None:
    """Drive both modes at every level, adapt then adapter predict, into ``results``."""
    import requests

    bodies = [{"history": history(days, seed), "steps": steps} for seed in range(16)]
    predict_bodies = [{"history": b["history"]} for b in bodies]
    predict_paths: dict[str, list[str]] = {}
    for mode, base in bases.items():  # 8 adapters per mode for the predict levels
        ids = [requests.post(f"{base}/{mode}/v1/adapters", json=b, timeout=120).json()["id"] for b in bodies[:8]]
        predict_paths[mode] = [f"/{mode}/v1/adapters/{a}/predict" for a in ids]
    # the two modes take turns at each level, so the VM's drift (±15 % within minutes here) reaches
    # both sides of a ratio alike
    for c in levels:
        for mode, base in bases.items():
            results["adapt"].setdefault(mode, []).append(_drive(
                {"base": base, "path": [f"/{mode}/v1/adapt"], "bodies": bodies, "concurrency": c,
                 "requests": max(total, 2 * c)}))
        for mode, base in bases.items():  # each request names one of 8 adapters (path and body together)
            results["predict"].setdefault(mode, []).append(_drive(
                {"base": base, "path": predict_paths[mode], "bodies": predict_bodies, "concurrency": c,
                 "requests": max(total, 2 * c)}))
    for mode, base in bases.items():
        info = requests.get(f"{base}/{mode}/v1/model", timeout=30).json()
        results.setdefault("batching", {})[mode] = info["batching"]


def bench(options: dict[str, str]) -> dict[str, Any]:
    import ray
    import requests
    from ray import serve

    from pipeline.serving.command import DIRECT_INGRESS_ENV

    known = {"concurrency", "requests", "hidden", "steps", "days", "model", "tracking_uri", "ingress"}
    unknown = sorted(set(options) - known)
    if unknown:
        raise ValueError(f"bench serve: unknown options {unknown}; expected some of {sorted(known)}")
    levels = _levels(options)
    ingress = options.get("ingress", "direct")
    if ingress not in ("direct", "proxy"):
        raise ValueError(f"bench option ingress: expected direct or proxy, got {ingress!r}")
    total = _int(options, "requests", 480)
    hidden, steps, days = _int(options, "hidden", 64), _int(options, "steps", 5, 0), _int(options, "days", 7, 5)

    with tempfile.TemporaryDirectory(prefix="metalstm-serve-bench-") as tmp:
        workdir = Path(tmp)
        if "model" in options:
            model_uri, tracking_uri = options["model"], options.get("tracking_uri")
        else:
            tracking_uri = f"sqlite:///{workdir / 'mlflow.db'}"
            version = register_checkpoint(_forecaster(workdir, hidden, steps), "bench-forecaster", tracking_uri,
                                          workdir)
            model_uri = f"models:/bench-forecaster/{version}"
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # a loopback cluster of its own
        env = {DIRECT_INGRESS_ENV: "1" if ingress == "direct" else "0",
               # nothing routes to this cluster but the bench: no 30 s drain of the replicas' ports at the end
               "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "1"}
        with _environ(**env):
            ray.init(num_cpus=os.cpu_count() or 2, include_dashboard=False, log_to_driver=False)
        try:
            bases = _deploy(model_uri, tracking_uri, ingress)
            info = requests.get(f"{bases['batched']}/batched/v1/model", timeout=30).json()
            results: dict[str, Any] = {"model": {k: info[k] for k in ("name", "version", "kind", "adapt_steps")},
                                       "hidden": hidden, "steps": steps, "history_hours": 24 * days,
                                       "cpus": os.cpu_count(), "ingress": ingress, "adapt": {}, "predict": {}}
            _measure(bases, levels, total, steps, days, results)
        finally:
            serve.shutdown()
            ray.shutdown()
    results["summary"] = _summary(results, levels)
    return results


def _summary(results: dict[str, Any], levels: list[int]) -> dict[str, Any]:
    def at(endpoint: str, mode: str, c: int) -> dict[str, Any] | None:
        return next((r for r in results[endpoint].get(mode, []) if r["concurrency"] == c), None)

    out: dict[str, Any] = {"errors": sum(r["errors"] for ep in ("adapt", "predict") for m in results[ep].values()
                                         for r in m)}
    one, top = min(levels), max(levels)
    for endpoint in ("adapt", "predict"):
        b, u = at(endpoint, "batched", top), at(endpoint, "unbatched", top)
        if b and u:
            out[f"{endpoint}_speedup_at_{top}"] = round(b["requests_per_s"] / max(u["requests_per_s"], 1e-9), 2)
        first = at(endpoint, "batched", one)
        if first:
            out[f"{endpoint}_p50_ms_at_{one}"] = first["p50_ms"]
    out["targets"] = {"adapt_p50_ms_at_1<=50": out.get("adapt_p50_ms_at_1", float("inf")) <= 50.0,
                      "adapt_speedup_at_32>=4": out.get("adapt_speedup_at_32", 0.0) >= 4.0,
                      "zero_errors": out["errors"] == 0}
    return out


if __name__ == "__main__":  # the load-generator process: a JSON spec on stdin, a JSON result on stdout
    print(json.dumps(_load(json.loads(sys.stdin.read()))))
