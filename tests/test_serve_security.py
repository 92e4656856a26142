"""Serving security and adapters across replicas, with the faults injected for real.

A public host without a token (the CLI exits 2; the builders and the replica refuse), a request outside any
replica (503), and one adapter used through two replicas of a real Serve application deployed from
deploy/serve_config.yaml (the ``serve deploy`` path, ``app_builder``), before and after a version switch.
Every server binds 127.0.0.1 (the public-host checks use a Serve whose proxy is disabled, so nothing listens).
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import requests
import torch
import yaml
from servers import free_port

from metalstm import MAMLConfig, MetaLearner, ModelConfig, build_model, save_checkpoint
from pipeline.serving.middleware import TOKEN_ENV, UNKNOWN, _token_of, is_loopback

pytestmark = pytest.mark.ray
REPO = Path(__file__).resolve().parents[1]
H, F = 4, 5
STORE = {"family": "electricity", "features": {"input_size": F, "horizon": H, "window": 16, "stride": H,
                                               "support_windows": 4,
                                               "covariates": ["value", "hour_sin", "hour_cos", "dow_sin", "dow_cos"]},
         "normalisation": {"method": "mean"}}


def _env_without_token() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != TOKEN_ENV}
    env["RAY_AUTH_MODE"] = env.get("RAY_AUTH_MODE", "disabled")
    return env


# ----------------------------------------------------------------------------- no cluster


def test_loopback_hosts():
    for host in ("127.0.0.1", "127.8.9.10", "localhost", "::1", "[::1]", "LOCALHOST"):
        assert is_loopback(host), host
    for host in ("0.0.0.0", "::", "10.0.0.5", "192.168.1.2", "example.com", "", "metalstm-serve"):
        assert not is_loopback(host), host


def test_serve_command_refuses_a_public_host_without_a_token():
    """The real command line, in a process of its own: exit 2 and a message naming the variable, before Ray."""
    argv = [sys.executable, "-m", "pipeline.cli", "serve", "--model", "models:/nothing/1", "--host", "0.0.0.0",
            "--address", "ray://127.0.0.1:1"]  # were the check skipped, connecting there would fail differently
    for env in (_env_without_token(), {**_env_without_token(), TOKEN_ENV: "  \n"}):  # unset, or only whitespace
        out = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=120, cwd=REPO)
        assert out.returncode == 2, out
        assert TOKEN_ENV in out.stderr and "0.0.0.0" in out.stderr and "open API" in out.stderr, out.stderr


def test_serve_command_host_and_tracking_checks(monkeypatch, capsys):
    from pipeline.cli import main

    monkeypatch.delenv(TOKEN_ENV, raising=False)
    for host in ("::", "10.1.2.3", "serve.example.com"):
        assert main(["serve", "--model", "models:/nothing/1", "--host", host]) == 2
        assert TOKEN_ENV in capsys.readouterr().err
    # a password in the tracking URI would reach the dashboard through user_config
    assert main(["serve", "--model", "models:/nothing/1", "--tracking-uri", "http://me:pw@mlflow:5000"]) == 2
    assert "MLFLOW_TRACKING_PASSWORD" in capsys.readouterr().err


def test_token_states_the_guard_accepts():
    class Replica:
        token = "a-long-random-token-value"

    class Undecided:
        pass

    assert _token_of(Replica()) == "a-long-random-token-value"
    open_replica = Replica()
    open_replica.token = None  # decided at start: loopback, no token
    assert _token_of(open_replica) is None
    for server in (None, Undecided()):
        assert _token_of(server) is UNKNOWN
    for bad in ("", 0, b"bytes"):
        odd = Replica()
        odd.token = bad
        assert _token_of(odd) is UNKNOWN


def test_adapter_store_keeps_checkpoints_only_while_adapters_need_them():
    from pipeline.serving.adapter_cache import AdapterStore

    now = [0.0]
    store = AdapterStore(max_entries=2, ttl_s=10.0, max_bytes=100, clock=lambda: now[0])
    v1 = {"params": {"w": np.zeros(5, np.float32)}, "model_uri": "models:/m/1", "scale": None}
    assert store.put(v1, 20) == {"missing_model": "models:/m/1"} and store.stats()["entries"] == 0
    first = store.put(v1, 20, (b"checkpoint-1", {"model_uri": "models:/m/1"}))["id"]
    second = store.put(v1, 20)["id"]  # the store has version 1's checkpoint now
    assert store.model("models:/m/1") == (b"checkpoint-1", {"model_uri": "models:/m/1"})
    assert "error" in store.put(v1, 101) and store.stats()["entries"] == 2  # too large: refused, nothing evicted
    v2 = {**v1, "model_uri": "models:/m/2"}
    store.put(v2, 20, (b"checkpoint-2", {"model_uri": "models:/m/2"}))  # max_entries=2: the LRU (first) goes
    assert store.get(first) is None and store.get(second)["model_uri"] == "models:/m/1"
    assert store.delete(second) and not store.delete(second)
    assert store.model("models:/m/1") is None and store.stats()["model_versions"] == ["models:/m/2"]
    now[0] = 11.0  # past the TTL: the last adapter expires, and its version's checkpoint with it
    assert store.stats()["entries"] == 0 and store.model("models:/m/2") is None


def test_guard_outside_a_replica_refuses_over_http():
    """The app served by plain uvicorn (no Serve replica around it): every route answers 503, none opens."""
    import uvicorn

    from pipeline.serving.app import app

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        base, deadline = f"http://127.0.0.1:{port}", time.monotonic() + 30
        while not server.started and time.monotonic() < deadline:
            time.sleep(0.05)
        assert server.started
        for method, path in (("GET", "/healthz"), ("GET", "/v1/model"), ("GET", "/openapi.json"),
                             ("POST", "/v1/adapt"), ("DELETE", "/v1/adapters/0123")):
            r = requests.request(method, base + path, json={} if method == "POST" else None, timeout=10,
                                 headers={"Authorization": "Bearer anything"})
            assert r.status_code == 503 and "refusing" in r.json()["detail"], (path, r.status_code, r.text)
    finally:
        server.should_exit = True
        thread.join(timeout=30)
    assert not thread.is_alive()


# ----------------------------------------------------------------------------- a real cluster


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """A local Ray cluster whose processes have no METALSTM_SERVE_TOKEN, and two versions of a forecaster."""
    import ray
    from ray import serve

    from pipeline.bench.serve import _environ, register_checkpoint

    tmp = tmp_path_factory.mktemp("serve-security")
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    cfg = ModelConfig(kind="forecaster", input_size=F, hidden_size=8, horizon=H)
    versions = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        learner = MetaLearner(build_model(cfg), MAMLConfig(inner_steps=2, inner_lr=0.01))
        ckpt = save_checkpoint(tmp / f"f{seed}.pt", learner, cfg, {"store": STORE})
        (tmp / f"v{seed}").mkdir()
        versions.append(register_checkpoint(ckpt, "security-forecast", uri, tmp / f"v{seed}"))
    saved = os.environ.pop(TOKEN_ENV, None)  # the raylet and every worker inherit this environment
    try:
        with _environ(RAY_AUTH_MODE=os.environ.get("RAY_AUTH_MODE", "disabled")):
            ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
        yield {"uri": uri, "models": [f"models:/security-forecast/{v}" for v in versions]}
    finally:
        serve.shutdown()
        ray.shutdown()
        if saved is not None:
            os.environ[TOKEN_ENV] = saved


def _body(rng: np.random.Generator, n: int = 3) -> dict:
    return {"support": [{"x": rng.normal(size=(16, F)).round(4).tolist(), "y": rng.normal(size=H).round(4).tolist()}
                        for _ in range(n)]}


def _deploy_config(cluster: dict, port: int, model_uri: str, replicas: int) -> dict:
    """deploy/serve_config.yaml as `serve deploy` would send it, with this test's port, model and replica count."""
    config = yaml.safe_load((REPO / "deploy" / "serve_config.yaml").read_text())
    config["http_options"].update(host="127.0.0.1", port=port)
    (app,) = config["applications"]
    app["args"]["cache_ttl_s"] = 600
    (deployment,) = app["deployments"]
    deployment.update(num_replicas=replicas, ray_actor_options={"num_cpus": 0.25},
                      user_config={"model_uri": model_uri, "tracking_uri": cluster["uri"], "alias": None})
    return config


def _deploy(config: dict) -> None:
    from ray.serve.context import _get_global_client
    from ray.serve.schema import ServeDeploySchema

    _get_global_client().deploy_apps(ServeDeploySchema.model_validate(config), _blocking=True)


def _replica_counts(base: str, tries: int = 80) -> dict[int, int]:
    """Each replica's predict count, told apart by its model process: asked until two replicas answered."""
    seen: dict[int, int] = {}
    for _ in range(tries):
        info = requests.get(base + "/v1/model", timeout=30).json()
        seen[info["model_process"]["pid"]] = info["batching"]["predict"]["requests"]
        if len(seen) == 2:
            break
    return seen


def _kill_the_store_and_recover(base: str, query: dict) -> None:
    """The store's process dies: its adapters are gone (503 while Serve restarts it, then 404, never a 500 or a
    stale answer), and new adapters work again on the new store."""
    import ray

    from pipeline.serving.adapter_cache import STORE_DEPLOYMENT

    rng = np.random.default_rng(1)
    adapter = requests.post(base + "/v1/adapters", json=_body(rng), timeout=60).json()["id"]
    (name,) = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
               if f"#{STORE_DEPLOYMENT}#" in a["name"]]
    ray.kill(ray.get_actor(name, namespace="serve"), no_restart=True)
    seen, deadline = [], time.monotonic() + 120
    while not seen or seen[-1] != 404:
        assert time.monotonic() < deadline, seen
        seen.append(requests.post(f"{base}/v1/adapters/{adapter}/predict", json=query, timeout=90).status_code)
    assert set(seen) <= {503, 404}, seen
    again = requests.post(base + "/v1/adapters", json=_body(rng), timeout=60)
    assert again.status_code == 201, again.text
    predicted = requests.post(f"{base}/v1/adapters/{again.json()['id']}/predict", json=query, timeout=60)
    assert predicted.status_code == 200, predicted.text


def test_two_replicas_share_one_adapter_across_a_version_switch(cluster):
    """POST /v1/adapters once; predict and delete it through both replicas (the per-replica cache 404'd half)."""
    from ray import serve

    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    base = f"http://127.0.0.1:{port}"
    config = _deploy_config(cluster, port, cluster["models"][0], replicas=2)
    _deploy(config)
    try:
        rng = np.random.default_rng(0)
        query = {"query": [{"x": rng.normal(size=(16, F)).round(4).tolist()}]}
        made = requests.post(base + "/v1/adapters", json=_body(rng), timeout=60)
        assert made.status_code == 201, made.text
        adapter = made.json()["id"]
        predict = f"{base}/v1/adapters/{adapter}/predict"
        answers = [requests.post(predict, json=query, timeout=60) for _ in range(30)]
        assert [r.status_code for r in answers] == [200] * 30, [r.text for r in answers if r.status_code != 200]
        first = answers[0].json()["predictions"][0]["values"]
        assert all(r.json()["predictions"][0]["values"] == first for r in answers)
        counts = _replica_counts(base)
        assert len(counts) == 2 and all(n > 0 for n in counts.values()), counts  # both replicas predicted it
        stats = requests.get(base + "/v1/model", timeout=30).json()["cache"]
        assert stats["shared"] and stats["entries"] == 1 and stats["model_versions"] == [cluster["models"][0]]

        # switch both replicas to version 2 in place; the adapter keeps predicting with version 1's model, also on
        # a replica that never held version 1 for an adapter (it rebuilds it from the store's checkpoint)
        config["applications"][0]["deployments"][0]["user_config"]["model_uri"] = cluster["models"][1]
        _deploy(config)
        deadline = time.monotonic() + 120
        while requests.get(base + "/v1/model", timeout=30).json()["model_uri"] != cluster["models"][1]:
            assert time.monotonic() < deadline, "the switch to version 2 did not happen"
            time.sleep(0.5)
        after = [requests.post(predict, json=query, timeout=60) for _ in range(20)]
        assert [r.status_code for r in after] == [200] * 20, [r.text for r in after if r.status_code != 200]
        assert {r.json()["model"]["version"] for r in after} == {answers[0].json()["model"]["version"]}
        for r in after:
            np.testing.assert_allclose(r.json()["predictions"][0]["values"], first, rtol=1e-5, atol=1e-6)

        assert requests.delete(f"{base}/v1/adapters/{adapter}", timeout=30).status_code == 204
        gone = [requests.post(predict, json=query, timeout=60).status_code for _ in range(20)]
        assert gone == [404] * 20
        assert requests.delete(f"{base}/v1/adapters/{adapter}", timeout=30).status_code == 404
        assert requests.get(base + "/v1/model", timeout=30).json()["cache"]["model_versions"] == []
        _kill_the_store_and_recover(base, query)
    finally:
        serve.delete(config["applications"][0]["name"])
        serve.shutdown()


def test_builders_and_replicas_refuse_a_public_host_without_a_token(cluster):
    """Serve configured for 0.0.0.0 with its proxy disabled (nothing listens): no path starts without a token."""
    from ray import serve

    from pipeline.serving.app import AdaptationServer, app_builder, build_app, model_config

    serve.start(proxy_location="Disabled", http_options={"host": "0.0.0.0", "port": free_port()})
    try:
        with pytest.raises(ValueError, match=f"{TOKEN_ENV}.*open API"):
            app_builder({})
        with pytest.raises(ValueError, match=TOKEN_ENV):
            build_app(model_config(cluster["models"][0], cluster["uri"]), num_replicas=2)
        with pytest.raises(ValueError, match="TEST_ABSENT_TOKEN"):
            app_builder({"token_env": "TEST_ABSENT_TOKEN"})
        build_app(model_config(cluster["models"][0]), env_vars={TOKEN_ENV: "a-long-random-test-token"})  # builds
        # past the builders (a hand-written deployment): the replica itself refuses to start
        bare = AdaptationServer.options(name="Bare", max_constructor_retry_count=1,
                                        ray_actor_options={"num_cpus": 0.1})
        with pytest.raises(RuntimeError, match="bare failed"):
            serve.run(bare.bind(token_env="TEST_ABSENT_TOKEN"), name="bare", route_prefix="/bare")
        why = serve.status().applications["bare"].deployments["Bare"].message  # what `serve status` shows
        assert "TEST_ABSENT_TOKEN" in why and "open API" in why, why
    finally:
        serve.shutdown()


def test_serve_command_removes_a_server_whose_replicas_lack_its_token(cluster, monkeypatch, capsys):
    """The command has a token, the cluster's processes do not (they never get it in a runtime_env): the replicas
    would serve open on loopback, so the command removes the application and exits 2."""
    from ray import serve

    from pipeline.cli import main

    monkeypatch.setenv(TOKEN_ENV, "a-long-random-token-the-nodes-lack")  # after ray.init: the cluster never sees it
    port = free_port()
    try:
        rc = main(["serve", "--model", cluster["models"][0], "--tracking-uri", cluster["uri"], "--port", str(port),
                   "--num-cpus", "0.25", "--once"])
        assert rc == 2
        assert TOKEN_ENV in capsys.readouterr().err
        assert "metalstm" not in serve.status().applications
        assert requests.get(f"http://127.0.0.1:{port}/v1/model", timeout=10).status_code == 404  # the proxy only
    finally:
        serve.shutdown()


def test_two_replicas_without_the_shared_store_refuse_to_start(cluster):
    """A hand-written deployment (not from build_app/app_builder) of two replicas lacks the store: each replica
    would know only its own adapter ids, so none starts."""
    from ray import serve

    from pipeline.serving.adapter_cache import STORE_DEPLOYMENT
    from pipeline.serving.app import AdaptationServer

    serve.start(proxy_location="Disabled", http_options={"host": "127.0.0.1", "port": free_port()})
    try:
        two = AdaptationServer.options(name="Two", num_replicas=2, max_constructor_retry_count=1,
                                       ray_actor_options={"num_cpus": 0.1})
        with pytest.raises(RuntimeError, match="two failed"):
            serve.run(two.bind(), name="two", route_prefix="/two")
        why = serve.status().applications["two"].deployments["Two"].message
        assert STORE_DEPLOYMENT in why and "2 replicas" in why, why
    finally:
        serve.shutdown()
