"""``metalstm serve --direct-ingress`` on a real local cluster: clients reach the replica's own port over real HTTP.

Direct ingress is a Serve mode chosen where the cluster starts, so this module starts its own cluster with it
on; the Serve proxy keeps serving beside it, which lets each test compare the two paths on one replica.
"""

from __future__ import annotations

import contextlib
import http.client
import io
import json
import os
import re
import socket
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import requests
import torch
from servers import free_port

from metalstm import MAMLConfig, MetaLearner, ModelConfig, build_model, save_checkpoint
from pipeline.serving.schema import MAX_BODY_BYTES

pytestmark = pytest.mark.ray
TOKEN = "direct-s3cret"
H, F = 4, 5
STORE = {"family": "electricity", "features": {"input_size": F, "horizon": H, "window": 16, "stride": H,
                                               "support_windows": 4,
                                               "covariates": ["value", "hour_sin", "hour_cos", "dow_sin", "dow_cos"]},
         "normalisation": {"method": "mean"}}


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """A forecaster registered in sqlite MLflow, deployed by ``metalstm serve --direct-ingress --once``."""
    import ray
    from ray import serve

    from pipeline.bench.serve import _environ, register_checkpoint
    from pipeline.cli import main
    from pipeline.serving.app import TOKEN_ENV
    from pipeline.serving.command import DIRECT_INGRESS_ENV

    tmp = tmp_path_factory.mktemp("serve-direct")
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    torch.manual_seed(0)
    cfg = ModelConfig(kind="forecaster", input_size=F, hidden_size=8, horizon=H)
    ckpt = save_checkpoint(tmp / "f.pt", MetaLearner(build_model(cfg), MAMLConfig(inner_steps=2, inner_lr=0.01)),
                           cfg, {"store": STORE})
    version = register_checkpoint(ckpt, "direct-forecast", uri, tmp)
    env = {DIRECT_INGRESS_ENV: "1", TOKEN_ENV: TOKEN, "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "1",
           "RAY_AUTH_MODE": os.environ.get("RAY_AUTH_MODE", "disabled")}
    with _environ(**env):
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
        port, out = free_port(), io.StringIO()
        try:
            with contextlib.redirect_stdout(out):
                rc = main(["serve", "--model", f"models:/direct-forecast/{version}", "--tracking-uri", uri,
                           "--port", str(port), "--num-cpus", "0.25", "--direct-ingress", "--once"])
            assert rc == 0, out.getvalue()
            found = re.search(r"direct ingress \(no proxy hop\): (http://\S+)", out.getvalue())
            assert found, out.getvalue()
            yield {"proxy": f"http://127.0.0.1:{port}", "direct": found.group(1), "port": port}
        finally:
            serve.shutdown()
            ray.shutdown()


AUTH = {"Authorization": f"Bearer {TOKEN}"}


def _body(rng: np.random.Generator, n: int = 3, steps: int = 2) -> dict:
    return {"support": [{"x": rng.normal(size=(16, F)).round(4).tolist(), "y": rng.normal(size=H).round(4).tolist()}
                        for _ in range(n)],
            "query": [{"x": rng.normal(size=(16, F)).round(4).tolist()}], "steps": steps}


def test_direct_port_answers_as_the_proxy_does(served):
    assert served["direct"].startswith("http://127.0.0.1:") and not served["direct"].endswith(f":{served['port']}")
    body = _body(np.random.default_rng(0))
    via_proxy = requests.post(served["proxy"] + "/v1/adapt", json=body, headers=AUTH, timeout=60)
    direct = requests.post(served["direct"] + "/v1/adapt", json=body, headers=AUTH, timeout=60)
    assert via_proxy.status_code == direct.status_code == 200, (via_proxy.text, direct.text)
    np.testing.assert_allclose(direct.json()["predictions"][0]["values"],
                               via_proxy.json()["predictions"][0]["values"], rtol=1e-5, atol=1e-6)
    info = requests.get(served["direct"] + "/v1/model", headers=AUTH, timeout=10).json()
    assert info["name"] == "direct-forecast" and info["family"] == "forecast"


def test_direct_port_keeps_the_token_and_the_input_checks(served):
    base = served["direct"]
    assert requests.get(base + "/healthz", timeout=10).status_code == 200  # the only open route
    assert requests.get(base + "/v1/model", timeout=10).status_code == 401
    body = _body(np.random.default_rng(1))
    assert requests.post(base + "/v1/adapt", json=body, timeout=30).status_code == 401
    bad = json.dumps(body).replace(str(body["support"][0]["y"][0]), "NaN", 1)
    r = requests.post(base + "/v1/adapt", data=bad, headers={**AUTH, "Content-Type": "application/json"}, timeout=30)
    assert r.status_code == 422 and "finite number" in r.text and "support" in r.text, r.text
    host, port = base.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    conn.putrequest("POST", "/v1/adapt")  # declare a huge body, send none: the answer must not wait for it
    for name, value in {**AUTH, "Content-Type": "application/json", "Content-Length": str(MAX_BODY_BYTES + 1)}.items():
        conn.putheader(name, value)
    conn.endheaders()
    answer = conn.getresponse()
    assert answer.status == 413 and str(MAX_BODY_BYTES) in answer.read().decode()
    conn.close()
    assert requests.get(base + "/healthz", timeout=10).status_code == 200  # the replica survived all of it


def test_direct_port_batches_concurrent_requests(served):
    rng = np.random.default_rng(2)
    bodies = [_body(rng, int(rng.integers(1, 5))) for _ in range(12)]
    base = served["direct"]
    before = requests.get(base + "/v1/model", headers=AUTH, timeout=10).json()["batching"]["adapt"]
    with ThreadPoolExecutor(12) as pool:
        answers = list(pool.map(lambda b: requests.post(base + "/v1/adapt", json=b, headers=AUTH, timeout=60), bodies))
    after = requests.get(base + "/v1/model", headers=AUTH, timeout=10).json()["batching"]["adapt"]
    assert all(r.status_code == 200 for r in answers), [r.text for r in answers if r.status_code != 200]
    assert after["requests"] - before["requests"] == 12
    assert after["batches"] - before["batches"] < 12 and after["largest"] > 1


def test_direct_port_listens_on_loopback_only(served):
    import ray

    node_ip = ray.util.get_node_ip_address()
    if node_ip.startswith("127."):
        pytest.skip("this machine's only address is the loopback one")
    port = int(served["direct"].rsplit(":", 1)[1])
    with pytest.raises(OSError), socket.create_connection((node_ip, port), timeout=5):
        pass


def test_bench_serve_rejects_an_unknown_ingress():
    from pipeline.bench.serve import bench

    with pytest.raises(ValueError, match="bench option ingress: expected direct or proxy, got 'haproxy'"):
        bench({"ingress": "haproxy"})
