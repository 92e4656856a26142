"""``metalstm serve``: deploy a registered version on Ray Serve, and with ``--follow`` track a registry alias.

The alias is resolved to a concrete version first, and that version is loaded once here, so a broken model
fails in the command with a clear message rather than in a replica. Moving an alias changes nothing by itself:
``--follow`` re-resolves it every ``--poll-s`` seconds and redeploys with the new ``user_config``, which the
running replicas apply in place (``AdaptationServer.reconfigure``). Serving on an address other than a loopback
one needs ``METALSTM_SERVE_TOKEN`` in the environment: checked here before anything starts, and by each replica.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import threading
import time
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

import ray
import requests
from ray import serve

from pipeline.errors import UserError
from pipeline.serving.app import APP_NAME, REQUEST_TIMEOUT_S, TOKEN_ENV, build_app, model_config, resolve
from pipeline.serving.jobs import load_model
from pipeline.serving.middleware import read_token, require_token
from pipeline.serving.schema import MAX_BODY_BYTES
from pipeline.tracking.runs import resolve_tracking_uri

log = logging.getLogger(__name__)

DIRECT_INGRESS_ENV = "RAY_SERVE_ENABLE_DIRECT_INGRESS"  # read by Serve's controller and replicas at start


def add_arguments(parser: argparse.ArgumentParser, command: str) -> None:
    parser.add_argument("--model", required=True, help="models:/NAME@ALIAS or models:/NAME/VERSION")
    parser.add_argument("--tracking-uri", default=None,
                        help="MLflow tracking URI (default: MLFLOW_TRACKING_URI, else ./mlflow.db); prefer the "
                             "environment variable, since a command line is visible to every user of the machine")
    parser.add_argument("--host", default="127.0.0.1",
                        help=f"HTTP host (default 127.0.0.1); any other than a loopback address needs {TOKEN_ENV}")
    parser.add_argument("--port", type=int, default=8000, help="HTTP port (default 8000)")
    parser.add_argument("--follow", action="store_true", help="re-resolve the alias and switch when it moves")
    parser.add_argument("--poll-s", type=float, default=30.0, help="--follow: seconds between alias look-ups")
    parser.add_argument("--replicas", type=int, default=1,
                        help="replicas (default 1); with more, adapters live in one store they all share")
    parser.add_argument("--num-cpus", type=float, default=1.0, help="CPUs per replica")
    parser.add_argument("--address", default=None, help="Ray address (default: RAY_ADDRESS or a local cluster)")
    parser.add_argument("--cache-max-entries", type=int, default=1024,
                        help="adapters (POST /v1/adapters) kept, least recently used evicted first "
                             "(default 1024)")
    parser.add_argument("--cache-ttl-s", type=float, default=3600.0,
                        help="seconds an unused adapter is kept (default 3600)")
    parser.add_argument("--cache-max-mb", type=float, default=256.0,
                        help="memory cap of the adapters' fast weights, in MiB (default 256)")
    parser.add_argument("--max-body-mb", type=float, default=MAX_BODY_BYTES / (1 << 20),
                        help=f"largest request body, in MiB; larger ones get 413 before parsing "
                             f"(default {MAX_BODY_BYTES / (1 << 20):g})")
    parser.add_argument("--direct-ingress", action="store_true",
                        help="off by default: replicas also answer on ports of their own (printed at start), "
                             "skipping the proxy's hop; a local cluster gets it, a running one must have been "
                             f"started with {DIRECT_INGRESS_ENV}=1")
    parser.add_argument("--request-timeout-s", type=float, default=REQUEST_TIMEOUT_S,
                        help=f"seconds a request may take; a slower one gets 504, and the model process work it "
                             f"left behind is stopped (default {REQUEST_TIMEOUT_S:g})")
    parser.add_argument("--once", action="store_true", help="deploy and return (leave Serve running)")


def _check_args(args: argparse.Namespace) -> None:
    if not args.model.startswith("models:/"):
        raise ValueError(f"--model: expected models:/NAME@ALIAS or models:/NAME/VERSION, got {args.model!r}")
    for name, value, low in (("--port", args.port, 1), ("--replicas", args.replicas, 1),
                             ("--cache-max-entries", args.cache_max_entries, 1)):
        if value < low:
            raise ValueError(f"{name}: must be >= {low}, got {value}")
    for name, value in (("--poll-s", args.poll_s), ("--num-cpus", args.num_cpus), ("--cache-ttl-s", args.cache_ttl_s),
                        ("--cache-max-mb", args.cache_max_mb), ("--max-body-mb", args.max_body_mb),
                        ("--request-timeout-s", args.request_timeout_s)):
        if not value > 0:
            raise ValueError(f"{name}: must be > 0, got {value}")


# ----------------------------------------------------------------------------- following an alias


def _wait(stop: threading.Event, seconds: float) -> bool:
    """Wait in short slices: a signal delivered to another thread only runs its handler when the main thread wakes."""
    deadline = time.monotonic() + seconds
    while not stop.is_set() and (left := deadline - time.monotonic()) > 0:
        stop.wait(min(left, 0.5))
    return stop.is_set()


def _served_version(host: str, port: int, token: str | None) -> dict[str, Any] | None:
    """What ``GET /v1/model`` says is served, or None when it does not answer."""
    try:
        r = requests.get(f"{_base_url(host, port)}/v1/model", timeout=10,
                         headers={"Authorization": f"Bearer {token}"} if token else {})
        return r.json() if r.ok else None
    except requests.RequestException:
        return None


def follow_alias(model_uri: str, tracking_uri: str, current: dict[str, Any], deploy: Callable[[dict], None], *,
                 poll_s: float, stop: threading.Event, served: Callable[[], dict | None] | None = None) -> None:
    """Re-resolve ``model_uri`` every ``poll_s`` and redeploy with the new user_config when the alias moves.

    Only a changed user_config reaches the replicas (``reconfigure``); moving an alias alone changes nothing
    until this loop sees it. A switch names the version served until then as its ``fallback``: a replica that
    (re)starts while the new version does not load serves that one. ``served`` (optional) reports what the
    replicas serve after a switch; when it did not take (they keep the previous version), the user_config is
    set back to the version they serve, so that it never names a broken version for long.
    """
    good = current  # the last version known to serve
    while not _wait(stop, poll_s):
        try:
            latest = resolve(model_uri, tracking_uri)
        except Exception as e:  # a registry hiccup must not stop the server
            log.warning("could not re-resolve %s: %s", model_uri, e)
            continue
        if latest["model_uri"] == current["model_uri"]:
            continue
        current = latest  # a broken version is not retried every poll; the next move of the alias is
        log.info("%s moved to %s; reconfiguring", model_uri, latest["model_uri"])
        if _switch(latest, good, deploy, served):
            good = latest


def _switch(latest: dict[str, Any], good: dict[str, Any], deploy: Callable[[dict], None],
            served: Callable[[], dict | None] | None) -> bool:
    """Deploy ``latest`` with ``good`` as its fallback; whether it took. One that did not is reverted to ``good``."""
    try:
        deploy(model_config(latest["model_uri"], latest.get("tracking_uri"), latest.get("alias"), fallback=good))
    except Exception as e:
        log.error("redeploying with %s failed: %s", latest["model_uri"], e)
        return False
    info = served() if served else None
    if info is None:  # not asked, or no answer: what serves is unknown, so nothing is set back
        return served is None
    if f"models:/{info['name']}/{info['version']}" == latest["model_uri"]:
        return True
    log.error("switch to %s did not take; still serving version %s (%s); setting user_config back to %s",
              latest["model_uri"], info.get("version"), info.get("last_switch_error"), good["model_uri"])
    try:
        deploy(good)
    except Exception as e:
        log.error("setting user_config back to %s failed: %s", good["model_uri"], e)
    return False


# ----------------------------------------------------------------------------- direct ingress


def direct_ingress_urls(app_name: str, host: str, wait_s: float = 10.0) -> list[str]:
    """The HTTP addresses of ``app_name``'s replicas themselves, when Serve runs with direct ingress; else ``[]``.

    With ``RAY_SERVE_ENABLE_DIRECT_INGRESS=1`` (set where Serve's controller and replicas start) every ingress
    replica also serves HTTP on a port of its own (30000 and up), under the same route prefix, and a client
    there skips the proxy's hop: on a small node the proxy's per-request CPU is what bounds batched throughput
    (docs/serving.md). The proxy keeps serving either way. Ray has no public call for these addresses; the
    controller's target groups (what its load-balancer integration reads) are asked: with direct ingress off
    they name only the proxies, in groups of no application.
    """
    from ray.serve.context import _get_global_client  # private: imported only where it is needed

    deadline = time.monotonic() + wait_s
    while True:  # a replica registers its port just after it starts
        try:
            groups = ray.get(_get_global_client()._controller.get_target_groups.remote(app_name), timeout=10)
        except Exception as e:  # an older or newer Serve without this call: fall back to the proxy
            log.warning("could not look up direct-ingress addresses: %s", e)
            return []
        urls = [_base_url(host if host not in ("0.0.0.0", "::") else target.ip, target.port)
                for group in groups if group.app_name == app_name and str(group.protocol).upper().endswith("HTTP")
                for target in group.targets]
        if urls or time.monotonic() > deadline:
            return sorted(set(urls))
        time.sleep(0.5)


def _announce_direct_ingress(app_name: str, host: str) -> None:
    urls = direct_ingress_urls(app_name, host)
    if urls:
        print(f"direct ingress (no proxy hop): {' '.join(urls)}", flush=True)
    else:
        log.warning("--direct-ingress: this cluster's Serve runs without direct ingress (start the cluster with "
                    "%s=1); serving through the proxy only", DIRECT_INGRESS_ENV)


# ----------------------------------------------------------------------------- the command


def _start_ray(args: argparse.Namespace) -> None:
    """Connect to ``--address`` (or RAY_ADDRESS), else start a local cluster; then start Serve's HTTP proxy."""
    if not ray.is_initialized():
        address = args.address or os.environ.get("RAY_ADDRESS")
        if args.direct_ingress and not address:  # the local cluster's Serve processes inherit this environment
            os.environ[DIRECT_INGRESS_ENV] = "1"
        ray.init(address=address)
    serve.start(http_options={"host": args.host, "port": args.port})


def _check_tracking_uri(uri: str) -> None:
    """A password in the URI would travel in the replicas' user_config, which Serve's dashboard shows."""
    if urlsplit(uri).password:
        raise UserError("--tracking-uri / MLFLOW_TRACKING_URI: the URI holds a password, which the deployment's "
                        "user_config (shown by the Ray dashboard) would carry; pass the credentials as "
                        "MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD instead")


def _base_url(host: str, port: int) -> str:
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def _require_replicas_token(host: str, port: int, token: str | None) -> None:
    """With a token here, the replicas must require it too. They read it from their own environment (a running
    cluster's nodes may lack it, and it is never sent in a runtime_env): a server that answers without it is
    removed again."""
    if token is None:
        return
    try:
        status = requests.get(f"{_base_url(host, port)}/v1/model", timeout=10).status_code
    except requests.RequestException as e:
        log.warning("could not check that the server requires %s: %s", TOKEN_ENV, e)
        return
    if 200 <= status < 300:
        serve.delete(APP_NAME)
        raise UserError(f"the replicas answered without the bearer token, so they do not see {TOKEN_ENV}: set it "
                        f"in the environment of every Ray node (where `ray start` runs) and deploy again; the "
                        f"application was removed")


def run(args: argparse.Namespace) -> int:
    _check_args(args)
    token = read_token(TOKEN_ENV)
    require_token(args.host, token, TOKEN_ENV, f"--host {args.host}")  # before anything starts
    tracking_uri = resolve_tracking_uri(args.tracking_uri)
    _check_tracking_uri(tracking_uri)
    config = resolve(args.model, tracking_uri)
    load_model(config["model_uri"], tracking_uri)  # fail here, with a clear message, rather than in a replica

    def deploy(cfg: dict[str, Any]) -> None:  # the replicas read the token from their environment, not from here
        serve.run(build_app(cfg, num_replicas=args.replicas, num_cpus=args.num_cpus,
                            cache_max_entries=args.cache_max_entries, cache_ttl_s=args.cache_ttl_s,
                            cache_max_bytes=int(args.cache_max_mb * (1 << 20)),
                            max_body_bytes=int(args.max_body_mb * (1 << 20)),
                            request_timeout_s=args.request_timeout_s),
                  name=APP_NAME, route_prefix="/")

    _start_ray(args)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):  # also when started in the background (SIGINT ignored there)
        signal.signal(sig, lambda *_: stop.set())
    deploy(config)
    _require_replicas_token(args.host, args.port, token)
    print(f"serving {config['model_uri']} at {_base_url(args.host, args.port)} (OpenAPI at /docs)", flush=True)
    if args.direct_ingress:
        _announce_direct_ingress(APP_NAME, args.host)
    if args.once:
        return 0
    try:
        if args.follow:
            follow_alias(args.model, tracking_uri, config, deploy, poll_s=args.poll_s, stop=stop,
                         served=lambda: _served_version(args.host, args.port, token))
        else:
            while not _wait(stop, 3600):
                pass
    except KeyboardInterrupt:
        pass
    finally:
        serve.shutdown()
    return 0
