"""Faults injected into a real service (real Ray Serve, real MLflow registry in sqlite, real HTTP on 127.0.0.1).

A model process that hangs (stopped with SIGSTOP: alive, but it never answers), a request it does not finish in
time, a decode-heavy request, and a broken version followed by a replica restart (its actor killed).
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import requests
from registered import register_version, tracking_experiment, untrained_checkpoint
from servers import free_port, process_gone

from metalstm import ModelConfig
from metalstm.vocab import Vocab
from pipeline.serving.model_process import PROBE_TIMEOUT_S
from pipeline.serving.schema import MAX_DECODE_CELLS

pytestmark = pytest.mark.ray
H, F, WINDOW = 4, 5, 16
STORE = {"family": "electricity", "features": {"input_size": F, "horizon": H, "window": WINDOW, "stride": H,
                                               "support_windows": 4,
                                               "covariates": ["value", "hour_sin", "hour_cos", "dow_sin", "dow_cos"]},
         "normalisation": {"method": "mean"}}
TEXTS = ["the cat sat on the mat", "a dog ran in the park", "the sun is hot today"]
HANG_TIMEOUT_S = 8.0  # the /hang app's request timeout: long enough for any request here on a busy machine
APP_KW = {"num_cpus": 0.25, "cache_max_entries": 16}


@pytest.fixture(scope="module")
def registry(tmp_path_factory):
    """sqlite MLflow with a forecaster: v1 and v2 load, v3's weights are broken; and a small translation model."""
    tmp = tmp_path_factory.mktemp("serve-faults")
    fc = ModelConfig(kind="forecaster", input_size=F, hidden_size=8, horizon=H)
    src, tgt = Vocab.build([t.split(" ", 1)[1] for t in TEXTS]), Vocab.build(TEXTS)
    mt = ModelConfig(kind="seq2seq", vocab_size=len(src), tgt_vocab_size=len(tgt), embedding_size=8, hidden_size=16)
    mt_store = {"family": "mt-en-de", "vocab": {"src": src.tokens, "tgt": tgt.tokens, "tokenizer": "words"}}
    with tracking_experiment(tmp, "serve-faults") as uri:
        versions = {key: register_version(tmp, untrained_checkpoint(tmp / f"{key}.pt", fc, seed, STORE, inner_steps=2),
                                          "faults-forecast", corrupt=key == "f3")
                    for seed, key in enumerate(("f1", "f2", "f3"))}
        versions["mt"] = register_version(tmp, untrained_checkpoint(tmp / "mt.pt", mt, 9, mt_store, inner_steps=2),
                                          "faults-mt")
        yield {"uri": uri, "versions": versions, "forecast": "faults-forecast"}


@pytest.fixture(scope="module")
def server(registry):
    """/hang (forecaster, request timeout HANG_TIMEOUT_S), /mt (translation) and /sw (forecaster, for switches)."""
    import ray
    from ray import serve

    from pipeline.serving.app import build_app, model_config

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    port = free_port()
    uri, v = registry["uri"], registry["versions"]
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})

        def target(app: str, model_uri: str, **kw) -> serve.RunTarget:
            return serve.RunTarget(build_app(model_config(model_uri, uri), **APP_KW, **kw), name=app,
                                   route_prefix=f"/{app}")

        forecast = f"models:/{registry['forecast']}/{v['f1']}"
        serve.run_many([target("hang", forecast, request_timeout_s=HANG_TIMEOUT_S),
                        target("mt", f"models:/faults-mt/{v['mt']}"), target("sw", forecast)])
        yield {"base": f"http://127.0.0.1:{port}", **registry}
    finally:
        serve.shutdown()
        ray.shutdown()


def _body(seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    def window() -> list:
        return rng.normal(size=(WINDOW, F)).round(4).tolist()

    return {"support": [{"x": window(), "y": rng.normal(size=H).round(4).tolist()} for _ in range(3)],
            "query": [{"x": window()}], "steps": 2}


def _info(base: str) -> dict:
    r = requests.get(base + "/v1/model", timeout=30)
    assert r.status_code == 200, r.text
    return r.json()


def _served(base: str) -> dict | None:
    """What ``GET /v1/model`` says, or None (as ``metalstm serve --follow`` asks it)."""
    with contextlib.suppress(requests.RequestException, ValueError):
        r = requests.get(base + "/v1/model", timeout=30)
        return r.json() if r.ok else None
    return None


def _healthy(base: str, timeout: float = 180.0) -> dict:
    """Until ``/healthz`` says ok (a model process replaced in the background answers its probes)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            r = requests.get(base + "/healthz", timeout=30)
            if r.status_code == 200 and r.json()["status"] == "ok":
                return r.json()
        except requests.RequestException:
            pass
        assert time.monotonic() < deadline, "the service did not become healthy again"
        time.sleep(0.5)


@contextlib.contextmanager
def _stopped(pid: int):
    """SIGSTOP ``pid`` (alive, never answering); whatever the test does, it does not outlive the block."""
    os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        with contextlib.suppress(FileNotFoundError, ProcessLookupError):
            if Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "T":  # still the one stopped
                os.kill(pid, signal.SIGKILL)


# ----------------------------------------------------------------------------- a hung model process


def test_a_hung_model_process_fails_healthz_and_is_killed_and_replaced(server):
    base = server["base"] + "/hang"
    _healthy(base)
    before = _info(base)["model_process"]
    with _stopped(before["pid"]):
        r = requests.get(base + "/healthz", timeout=60)  # no work in flight: it must answer a ping in time
        assert r.status_code == 503, r.text
        assert r.json()["status"] == "unhealthy", r.text
        assert f"did not answer a probe within {PROBE_TIMEOUT_S:g} s" in r.json()["detail"]
        assert process_gone(before["pid"])  # the probe killed it
    _healthy(base)  # a new one started by itself
    r = requests.post(base + "/v1/adapt", json=_body(), timeout=60)
    assert r.status_code == 200, r.text
    after = _info(base)["model_process"]
    assert after["pid"] not in (None, before["pid"]) and after["timeouts"] == before["timeouts"] + 1
    assert after["restarts"] == before["restarts"] + 1


def test_a_request_the_model_process_does_not_finish_gets_504_and_the_replica_keeps_serving(server):
    base = server["base"] + "/hang"
    _healthy(base)
    before = _info(base)["model_process"]
    with _stopped(before["pid"]), ThreadPoolExecutor(2) as pool:
        started = time.monotonic()
        waiting = [pool.submit(requests.post, base + "/v1/adapt", json=_body(seed), timeout=120) for seed in (1, 2)]
        time.sleep(1.0)
        assert _info(base)["version"]  # the replica itself answers while its model process hangs
        for future in waiting:
            r = future.result()
            assert r.status_code == 504, r.text
            assert f"request timeout of {HANG_TIMEOUT_S:g} s" in r.json()["detail"]
        assert time.monotonic() - started < 10 * HANG_TIMEOUT_S  # answered, not hung: no timing claim beyond
        assert process_gone(before["pid"])  # the call past its bound killed it: nobody waited for it any longer
    _healthy(base)
    r = requests.post(base + "/v1/adapt", json=_body(3), timeout=60)
    assert r.status_code == 200, r.text
    after = _info(base)["model_process"]
    assert after["timeouts"] == before["timeouts"] + 1 and after["pid"] != before["pid"]


# ----------------------------------------------------------------------------- expensive requests


def test_a_decode_heavy_request_is_a_422_naming_the_fields_and_the_limit(server):
    base = server["base"] + "/mt"
    pairs = [{"source": t.split(" ", 1)[1], "target": t} for t in TEXTS]
    heavy = {"pairs": pairs, "sources": ["cat sat on the mat"] * 64, "decode": {"beam": 8, "max_len": 1024}}
    r = requests.post(base + "/v1/adapt", json=heavy, timeout=60)
    assert r.status_code == 422, r.text
    (error,) = r.json()["detail"]
    assert error["loc"] == ["body", "decode"]
    assert "64 sources x decode.beam 8 x decode.max_len 1024 = 524288 decoding steps" in error["msg"]
    assert f"the limit is {MAX_DECODE_CELLS}" in error["msg"]
    adapter = requests.post(base + "/v1/adapters", json={"pairs": pairs}, timeout=60).json()["id"]
    r = requests.post(f"{base}/v1/adapters/{adapter}/predict", timeout=60,
                      json={"sources": ["cat sat"] * 17, "decode": {"beam": 8, "max_len": 128}})
    assert r.status_code == 422 and "17 sources x decode.beam 8 x decode.max_len 128" in r.text
    at_limit = {"sources": ["cat sat"] * 16, "decode": {"beam": 8, "max_len": 128}}  # 16384: still served
    r = requests.post(f"{base}/v1/adapters/{adapter}/predict", json=at_limit, timeout=120)
    assert r.status_code == 200, r.text
    assert all(len(p["tokens"]) <= 128 for p in r.json()["predictions"])
    assert requests.get(base + "/healthz", timeout=60).status_code == 200


# ----------------------------------------------------------------------------- a broken version, then a restart


def _replica_actor(app: str):
    import ray

    prefix = f"SERVE_REPLICA::{app}#"
    (name,) = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True) if a["name"].startswith(prefix)]
    return ray.get_actor(name, namespace="serve")


def _serving_again(base: str, old_pid: int, timeout: float = 240.0) -> dict:
    """Until a new replica (a new model process) answers ``/v1/model``."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            r = requests.get(base + "/v1/model", timeout=30)
            if r.status_code == 200 and r.json()["model_process"]["pid"] not in (None, old_pid):
                return r.json()
        except requests.RequestException:
            pass
        assert time.monotonic() < deadline, "no replica came back"
        time.sleep(1.0)


def test_a_broken_version_then_a_replica_restart_serves_the_last_good_version(server):
    import ray
    from mlflow.tracking import MlflowClient
    from ray import serve

    from pipeline.serving.app import build_app, model_config, resolve
    from pipeline.serving.command import follow_alias

    base, uri, name, v = server["base"] + "/sw", server["uri"], server["forecast"], server["versions"]
    good_uri, broken_uri = f"models:/{name}/{v['f1']}", f"models:/{name}/{v['f3']}"
    deployed: list[dict] = []

    def deploy(config: dict) -> None:
        deployed.append(config)
        serve.run(build_app(config, **APP_KW), name="sw", route_prefix="/sw")

    # 1. the alias moves to a version that does not load: --follow's loop switches with a fallback, sees the
    # switch did not take, and sets user_config back to the version that serves
    client = MlflowClient(uri, registry_uri=uri)
    client.set_registered_model_alias(name, "champion", v["f1"])
    current = resolve(f"models:/{name}@champion", uri)
    deploy(current)
    client.set_registered_model_alias(name, "champion", v["f3"])
    stop = threading.Event()
    follower = threading.Thread(target=follow_alias, args=(f"models:/{name}@champion", uri, current, deploy),
                                kwargs={"poll_s": 0.5, "stop": stop, "served": lambda: _served(base)}, daemon=True)
    follower.start()
    try:
        deadline = time.monotonic() + 180
        while len(deployed) < 3 and time.monotonic() < deadline:
            time.sleep(0.5)
    finally:
        stop.set()
        follower.join(120)
    assert [c["model_uri"] for c in deployed] == [good_uri, broken_uri, good_uri], deployed
    assert deployed[1] == model_config(broken_uri, uri, "champion", fallback=current)
    assert deployed[1]["fallback"]["model_uri"] == good_uri and "fallback" not in deployed[2]
    info = _info(base)
    assert info["version"] == v["f1"] and broken_uri in info["last_switch_error"]

    # 2. before it is set back (or a `serve deploy` config with a fallback), user_config names the broken
    # version when Serve replaces a replica: the new replica starts on the fallback and serves
    deploy(deployed[1])
    old = _info(base)
    assert old["version"] == v["f1"]
    ray.kill(_replica_actor("sw"), no_restart=True)
    info = _serving_again(base, old["model_process"]["pid"])
    assert info["version"] == v["f1"] and info["model_uri"] == good_uri
    assert broken_uri in info["last_switch_error"] and info["model_process"]["restarts"] == 0
    r = requests.post(base + "/v1/adapt", json=_body(4), timeout=60)
    assert r.status_code == 200 and r.json()["model"]["version"] == v["f1"], r.text
    assert process_gone(old["model_process"]["pid"])  # the killed replica's model process went with it
    # 3. a later good version still switches in place
    deploy(model_config(f"models:/{name}/{v['f2']}", uri, fallback=current))
    info = _info(base)
    assert info["version"] == v["f2"] and info["previous_version"] == v["f1"] and info["last_switch_error"] is None
