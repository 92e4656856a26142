"""The adaptation service over real HTTP on 127.0.0.1: real Ray Serve, real MLflow registry (sqlite)."""

from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import requests
import yaml
from registered import register_version, tracking_experiment, untrained_checkpoint
from servers import process_gone

from metalstm import ModelConfig
from metalstm.data import EOS
from metalstm.vocab import Vocab
from pipeline.serving.adapter_cache import AdapterCache, AdapterTooLargeError
from pipeline.serving.schema import MAX_BODY_BYTES, MAX_LENGTH, MAX_STEPS, MAX_SUPPORT, MAX_SUPPORT_CELLS

pytestmark = pytest.mark.ray
REPO = Path(__file__).resolve().parents[1]
TOKEN = "s3cret-token"
H, F, WINDOW = 6, 5, 24  # forecaster horizon, input features (value + 4 calendar covariates), window
COVARIATES = ["value", "hour_sin", "hour_cos", "dow_sin", "dow_cos"]
TEXTS = ["the cat sat on the mat", "a dog ran in the park", "the sun is hot today", "we like tea and cake"]


# ----------------------------------------------------------------------------- the adapter cache alone


def test_cache_lru_bytes_and_ttl_without_sleeping():
    now = [0.0]
    cache = AdapterCache(max_entries=3, ttl_s=10.0, max_bytes=100, clock=lambda: now[0])
    a, b = cache.put("a", 40), cache.put("b", 40)
    assert cache.get(a).value == "a"  # a is now the most recently used
    c = cache.put("c", 40)  # 120 > 100 bytes: the least recently used (b) goes
    assert cache.get(b) is None and cache.get(a) is not None and cache.get(c) is not None
    assert cache.stats()["evictions"]["bytes"] == 1 and cache.nbytes == 80
    d = cache.put("d", 10)
    e = cache.put("e", 10)  # a 4th entry: over max_entries, the LRU one (a) goes
    assert cache.get(a) is None and len(cache) == 3 and cache.stats()["evictions"]["lru"] == 1
    now[0] = 5.0
    assert cache.get(d) is not None  # touched at t=5: lives until t=15
    now[0] = 12.0
    assert cache.get(c) is None and cache.get(e) is None and cache.get(d) is not None
    assert cache.stats()["evictions"]["ttl"] == 2
    assert cache.delete(d) and not cache.delete(d) and cache.nbytes == 0
    with pytest.raises(AdapterTooLargeError, match="max_bytes=100"):
        cache.put("huge", 101)
    with pytest.raises(ValueError, match="cache.ttl_s"):
        AdapterCache(ttl_s=0)


# ----------------------------------------------------------------------------- fixtures: models, registry, Serve


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def registry(tmp_path_factory):
    """A sqlite MLflow with: forecaster v1, v2, v3 (broken weights), a char LM, a seq2seq and an MLP."""
    tmp = tmp_path_factory.mktemp("serve-registry")
    with tracking_experiment(tmp, "serve-tests") as uri:
        store = {"family": "electricity", "features": {"input_size": F, "horizon": H, "window": WINDOW, "stride": H,
                                                       "support_windows": 4, "covariates": COVARIATES},
                 "normalisation": {"method": "mean"}}
        fc = ModelConfig(kind="forecaster", input_size=F, hidden_size=16, horizon=H)
        vocab = Vocab.build(TEXTS, tokenizer="ptb-chars")
        lm = ModelConfig(kind="char_lm", vocab_size=len(vocab), embedding_size=8, hidden_size=16)
        src, tgt = Vocab.build([t.split(" ", 1)[1] for t in TEXTS]), Vocab.build(TEXTS)
        mt = ModelConfig(kind="seq2seq", vocab_size=len(src), tgt_vocab_size=len(tgt), embedding_size=8, hidden_size=16)
        mlp = ModelConfig(kind="mlp", input_size=1, output_size=1, mlp_hidden=[16, 16])
        names = {"forecast": "svc-forecast", "lm": "svc-lm", "mt": "svc-mt", "mlp": "svc-mlp"}
        lm_store = {"family": "ptb-char", "vocab": vocab.to_dict(), "features": {"max_len": 8}}
        mt_store = {"family": "mt-en-de", "vocab": {"src": src.tokens, "tgt": tgt.tokens, "tokenizer": "words"}}
        made = {"f1": (fc, 1, store, "forecast"), "f2": (fc, 2, store, "forecast"), "f3": (fc, 3, store, "forecast"),
                "lm": (lm, 4, lm_store, "lm"), "mt": (mt, 5, mt_store, "mt"),  # the builders' vocabularies
                "mlp": (mlp, 6, {"family": "synthetic"}, "mlp")}
        versions = {key: register_version(tmp, untrained_checkpoint(tmp / f"{key}.pt", cfg, seed, ckpt_store),
                                          names[family], corrupt=key == "f3")
                    for key, (cfg, seed, ckpt_store, family) in made.items()}
        yield {"uri": uri, "names": names, "versions": versions, "vocab": vocab, "src": src, "tgt": tgt}


APP_KW = {"num_cpus": 0.25, "cache_max_entries": 64, "cache_ttl_s": 3600.0}


@pytest.fixture(scope="module")
def server(registry):
    """Four apps on one Serve instance: /f forecaster, /lm, /mt, and /sec (MLP, bearer token, 1 s TTL)."""
    import ray
    from ray import serve

    from pipeline.serving.app import build_app, model_config

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    port = _free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    n, v, uri = registry["names"], registry["versions"], registry["uri"]

    # an adapter of the 16-unit forecaster is 6,296 bytes: the /f cache holds two of them
    def deploy_f(cfg):
        serve.run(build_app(cfg, cache_max_bytes=15_000, **APP_KW), name="f", route_prefix="/f")

    def target(app, model, key, **kw):
        user_config = model_config(f"models:/{n[model]}/{v[key]}", uri)
        return serve.RunTarget(build_app(user_config, **{**APP_KW, **kw}), name=app, route_prefix=f"/{app}")

    secured = {"cache_ttl_s": 1.0, "token_env": "TEST_SERVE_TOKEN", "env_vars": {"TEST_SERVE_TOKEN": TOKEN}}
    serve.run_many([target("f", "forecast", "f1", cache_max_bytes=15_000), target("lm", "lm", "lm"),
                    target("mt", "mt", "mt"), target("sec", "mlp", "mlp", **secured)])  # replicas start in parallel
    yield {"base": f"http://127.0.0.1:{port}", "port": port, "deploy_f": deploy_f, **registry}
    serve.shutdown()
    ray.shutdown()


def _support(rng, n=3, length=WINDOW):
    return [{"x": rng.normal(size=(length, F)).round(4).tolist(), "y": rng.normal(size=H).round(4).tolist()}
            for _ in range(n)]


def _history(days=7):
    steps = 24 * days
    ts = (np.datetime64("2014-03-24T00") + np.arange(steps)).astype(str).tolist()
    values = (500 + 200 * np.sin(np.arange(steps) * 2 * np.pi / 24)).round(2).tolist()
    return {"values": values, "timestamps": ts}


def _post(server, path, body, **kw):
    return requests.post(server["base"] + path, json=body, timeout=60, **kw)


# ----------------------------------------------------------------------------- endpoints


def test_healthz_model_and_openapi(server):
    assert requests.get(server["base"] + "/f/healthz", timeout=10).json()["status"] == "ok"
    info = requests.get(server["base"] + "/f/v1/model", timeout=10).json()
    assert info["name"] == server["names"]["forecast"] and info["version"] == server["versions"]["f1"]
    assert info["family"] == "forecast" and len(info["config_digest"]) == 16 and info["adapt_steps"] == 3
    spec = requests.get(server["base"] + "/f/openapi.json", timeout=10).json()
    assert {"/v1/adapt", "/v1/adapters", "/v1/adapters/{adapter_id}/predict", "/healthz", "/v1/model"} <= set(
        spec["paths"])
    assert requests.get(server["base"] + "/f/docs", timeout=10).status_code == 200


def test_adapt_forecast_task_layout(server):
    rng = np.random.default_rng(0)
    body = {"support": _support(rng, 4), "query": [{"x": rng.normal(size=(30, F)).tolist()}] * 2, "steps": 5}
    r = _post(server, "/f/v1/adapt", body)
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["steps"] == 5 and out["model"]["version"] == server["versions"]["f1"]
    assert out["support_loss_after"] < out["support_loss_before"]
    assert [len(p["values"]) for p in out["predictions"]] == [H, H]
    assert out["predictions"][0] == out["predictions"][1]


def test_adapt_forecast_history(server):
    r = _post(server, "/f/v1/adapt", {"history": _history(7)})
    assert r.status_code == 200, r.text
    values = r.json()["predictions"][0]["values"]
    assert len(values) == H and all(np.isfinite(values))
    missing = _history(7)
    missing["values"][100] = None  # a gap inside the support windows, the builder's max_gap is 0
    r = _post(server, "/f/v1/adapt", {"history": missing})
    assert r.status_code == 422 and "history" in r.text


def test_concurrent_requests_are_batched_and_match_alone(server):
    rng = np.random.default_rng(1)
    bodies = [{"support": _support(rng, int(rng.integers(1, 5)), int(rng.integers(10, 30))),
               "query": [{"x": rng.normal(size=(12, F)).tolist()}], "steps": 2} for _ in range(12)]
    before = requests.get(server["base"] + "/f/v1/model", timeout=10).json()["batching"]["adapt"]
    with ThreadPoolExecutor(12) as pool:
        together = list(pool.map(lambda b: _post(server, "/f/v1/adapt", b), bodies))
    after = requests.get(server["base"] + "/f/v1/model", timeout=10).json()["batching"]["adapt"]
    assert all(r.status_code == 200 for r in together), [r.text for r in together if r.status_code != 200]
    assert after["requests"] - before["requests"] == 12
    assert after["batches"] - before["batches"] < 12 and after["largest"] > 1  # several requests per inner loop
    for body, r in zip(bodies[:3], together[:3]):  # padding next to other tasks changes nothing
        alone = _post(server, "/f/v1/adapt", body).json()
        np.testing.assert_allclose(alone["predictions"][0]["values"], r.json()["predictions"][0]["values"],
                                   rtol=1e-4, atol=1e-5)
        assert alone["support_loss_after"] == pytest.approx(r.json()["support_loss_after"], rel=1e-4)


def test_adapter_lifecycle_and_size_eviction(server):
    rng = np.random.default_rng(2)
    support, query = _support(rng, 3), [{"x": rng.normal(size=(20, F)).tolist()}]
    direct = _post(server, "/f/v1/adapt", {"support": support, "query": query}).json()
    r = _post(server, "/f/v1/adapters", {"support": support})
    assert r.status_code == 201, r.text
    first = r.json()
    assert 2 * first["bytes"] <= 15_000 < 3 * first["bytes"]
    assert first["support_loss_after"] == pytest.approx(direct["support_loss_after"], rel=1e-5)
    pred = _post(server, f"/f/v1/adapters/{first['id']}/predict", {"query": query})
    assert pred.status_code == 200, pred.text
    np.testing.assert_allclose(pred.json()["predictions"][0]["values"], direct["predictions"][0]["values"], rtol=1e-5)
    assert _post(server, f"/f/v1/adapters/{first['id']}/predict", {"history": _history(2)}).status_code == 200
    # the /f cache holds two adapters by bytes: a third evicts the least recently used (the first)
    ids = [_post(server, "/f/v1/adapters", {"support": _support(rng, 2)}).json()["id"] for _ in range(2)]
    assert _post(server, f"/f/v1/adapters/{first['id']}/predict", {"query": query}).status_code == 404
    assert all(_post(server, f"/f/v1/adapters/{i}/predict", {"query": query}).status_code == 200 for i in ids)
    cache = requests.get(server["base"] + "/f/v1/model", timeout=10).json()["cache"]
    assert cache["evictions"]["bytes"] >= 1 and cache["bytes"] <= cache["max_bytes"]
    assert requests.delete(f"{server['base']}/f/v1/adapters/{ids[0]}", timeout=10).status_code == 204
    assert requests.delete(f"{server['base']}/f/v1/adapters/{ids[0]}", timeout=10).status_code == 404
    assert _post(server, f"/f/v1/adapters/{ids[0]}/predict", {"query": query}).status_code == 404


def test_char_lm_distribution_sampling_and_texts(server):
    vocab = server["vocab"]
    ids = vocab.encode("the cat sat", bos=True)
    support = [{"x": ids[:-1], "y": ids[1:]}]
    r = _post(server, "/lm/v1/adapt", {"support": support, "query": [{"x": ids}, {"x": ids[:3]}]})
    assert r.status_code == 200, r.text
    preds = r.json()["predictions"]
    assert len(preds) == 2 and len(preds[0]["next_token_probs"]) == len(vocab)
    assert sum(preds[0]["next_token_probs"]) == pytest.approx(1.0, abs=1e-6)
    assert preds[0]["top"][0]["token"] in vocab.tokens
    sample = {"texts": TEXTS[:2], "prompts": ["the c"], "decode": {"mode": "sample", "max_new_tokens": 12, "seed": 7}}
    a, b = _post(server, "/lm/v1/adapt", sample).json(), _post(server, "/lm/v1/adapt", sample).json()
    assert a["predictions"] == b["predictions"]  # seeded sampling is reproducible
    tokens = a["predictions"][0]["tokens"]
    assert len(tokens) <= 12 and all(0 <= t < len(vocab) for t in tokens) and isinstance(a["predictions"][0]["text"],
                                                                                        str)
    adapter = _post(server, "/lm/v1/adapters", {"texts": TEXTS}).json()["id"]
    r = _post(server, f"/lm/v1/adapters/{adapter}/predict", {"prompts": ["a dog"]})
    assert r.status_code == 200 and len(r.json()["predictions"][0]["next_token_probs"]) == len(vocab)


def test_seq2seq_greedy_beam_and_pairs(server):
    src, tgt = server["src"], server["tgt"]
    pairs = [{"source": t.split(" ", 1)[1], "target": t} for t in TEXTS]
    support = [{"x": src.encode(p["source"], eos=True), "y": tgt.encode(p["target"], eos=True)} for p in pairs]
    for decode in ({"beam": 1, "max_len": 7}, {"beam": 3, "max_len": 7}):
        r = _post(server, "/mt/v1/adapt", {"support": support, "query": [{"x": support[0]["x"]}], "decode": decode})
        assert r.status_code == 200, r.text
        tokens = r.json()["predictions"][0]["tokens"]
        assert len(tokens) <= 7 and EOS not in tokens and all(0 <= t < len(tgt) for t in tokens)
    r = _post(server, "/mt/v1/adapt", {"pairs": pairs, "sources": ["cat sat on the mat"], "steps": 2})
    assert r.status_code == 200, r.text
    assert isinstance(r.json()["predictions"][0]["text"], str)


# ----------------------------------------------------------------------------- bad input


def _raw(server, path, data: bytes, headers=None):
    return requests.post(server["base"] + path, data=data, timeout=60,
                         headers={"Content-Type": "application/json", **(headers or {})})


def _bad_bodies():
    rng = np.random.default_rng(3)
    good = {"support": _support(rng, 2), "query": [{"x": rng.normal(size=(8, F)).tolist()}]}

    def with_(**kw):
        return {**good, **kw}

    ex = good["support"][0]
    return [
        ("nan", json.dumps(good).replace(str(ex["y"][0]), "NaN", 1), "finite number"),
        ("inf", json.dumps(good).replace(str(ex["y"][0]), "Infinity", 1), "finite number"),
        ("overflow", json.dumps(good).replace(str(ex["y"][0]), "1e400", 1), "finite number"),
        ("features", with_(support=[{"x": [[0.0] * 3] * 8, "y": [0.0] * H}]), "input_size"),
        ("horizon", with_(support=[{"x": ex["x"], "y": [0.0] * (H + 1)}]), f"{H} numbers"),
        ("ragged", with_(support=[{"x": [[0.0] * F, [0.0] * 4], "y": ex["y"]}]), "different numbers"),
        ("string", with_(support=[{"x": ex["x"], "y": ["a"] * H}]), "valid number"),
        ("support-count", with_(support=[ex] * (MAX_SUPPORT + 1)), f"at most {MAX_SUPPORT}"),
        ("length", with_(query=[{"x": [[0.0] * F] * (MAX_LENGTH + 1)}]), f"at most {MAX_LENGTH}"),
        ("cells", with_(support=[{"x": [[0.0] * F] * 100, "y": ex["y"]}] * 200), str(MAX_SUPPORT_CELLS)),
        ("steps-high", with_(steps=MAX_STEPS + 1), str(MAX_STEPS)),
        ("steps-negative", with_(steps=-1), "greater than or equal to 0"),
        ("extra-field", with_(bogus=1), "Extra inputs"),
        ("no-query", {"support": good["support"]}, "exactly one of query"),
        ("two-supports", with_(texts=["abc"]), "exactly one of support"),
        ("not-json", "{not json", "JSON"),
        ("diverges", with_(support=[{"x": [[1e30] * F] * 8, "y": [1e30] * H}]), "diverged"),
    ]


@pytest.mark.parametrize("name,body,expect", _bad_bodies(), ids=[b[0] for b in _bad_bodies()])
def test_bad_input_is_a_4xx_naming_field_and_limit(server, name, body, expect):
    data = body.encode() if isinstance(body, str) else json.dumps(body).encode()
    r = _raw(server, "/f/v1/adapt", data)
    assert r.status_code == 422, (name, r.status_code, r.text)
    assert expect in r.text, r.text
    assert requests.get(server["base"] + "/f/healthz", timeout=10).status_code == 200


def test_unknown_tokens_and_decode_limits(server):
    v = len(server["vocab"])
    for bad, expect in ((v, f"[0, {v})"), (2.5, "unknown token"), (-1, "unknown token")):
        r = _post(server, "/lm/v1/adapt", {"support": [{"x": [4, bad], "y": [5, 6]}], "query": [{"x": [4]}]})
        assert r.status_code == 422 and expect in r.text, r.text
        assert "support" in r.text
    r = _post(server, "/lm/v1/adapt", {"support": [{"x": [4, 5], "y": [5]}], "query": [{"x": [4]}]})
    assert r.status_code == 422 and "as many as x" in r.text
    r = _post(server, "/mt/v1/adapt", {"pairs": [{"source": "a", "target": "b"}], "sources": ["a"],
                                       "decode": {"beam": 9}})
    assert r.status_code == 422 and "beam" in r.text and "8" in r.text
    r = _post(server, "/f/v1/adapt", {"texts": ["abc"], "prompts": ["a"]})
    assert r.status_code == 422 and "only for language models" in r.text


def test_oversize_bodies_are_rejected_before_parsing(server):
    conn = http.client.HTTPConnection("127.0.0.1", server["port"], timeout=30)
    conn.putrequest("POST", "/f/v1/adapt")  # declare a huge body, send none: the answer must not wait for it
    conn.putheader("Content-Type", "application/json")
    conn.putheader("Content-Length", str(MAX_BODY_BYTES + 1))
    conn.endheaders()
    r = conn.getresponse()
    assert r.status == 413 and str(MAX_BODY_BYTES) in r.read().decode()
    conn.close()

    def chunks():  # no Content-Length (chunked): counted as it arrives
        for _ in range(MAX_BODY_BYTES // 65536 + 2):
            yield b" " * 65536

    r = requests.post(server["base"] + "/f/v1/adapt", data=chunks(), timeout=60,
                      headers={"Content-Type": "application/json"})
    assert r.status_code == 413 and "limit" in r.text
    assert requests.get(server["base"] + "/f/healthz", timeout=10).status_code == 200


# ----------------------------------------------------------------------------- token and TTL


def test_bearer_token_and_ttl(server):
    base, auth = server["base"] + "/sec", {"Authorization": f"Bearer {TOKEN}"}
    assert requests.get(base + "/healthz", timeout=10).status_code == 200  # the only open route
    for path in ("/v1/model", "/docs", "/openapi.json"):
        assert requests.get(base + path, timeout=10).status_code == 401
    assert requests.get(base + "/v1/model", headers={"Authorization": "Bearer nope"}, timeout=10).status_code == 401
    assert requests.get(base + "/v1/model", headers=auth, timeout=10).json()["family"] == "regression"
    body = {"support": [{"x": [0.5], "y": [0.2]}, {"x": [1.0], "y": [0.4]}], "query": [{"x": [0.7]}]}
    assert requests.post(base + "/v1/adapt", json=body, timeout=30).status_code == 401
    r = requests.post(base + "/v1/adapt", json=body, headers=auth, timeout=30)
    assert r.status_code == 200 and len(r.json()["predictions"][0]["values"]) == 1
    adapter = requests.post(base + "/v1/adapters", json={"support": body["support"]}, headers=auth, timeout=30).json()
    predict = f"{base}/v1/adapters/{adapter['id']}/predict"
    assert requests.post(predict, json={"query": body["query"]}, headers=auth, timeout=30).status_code == 200
    time.sleep(2.0)  # the /sec cache's TTL is 1 s since last use
    assert requests.post(predict, json={"query": body["query"]}, headers=auth, timeout=30).status_code == 404


# ----------------------------------------------------------------------------- version switching


class Load:
    """Background clients hammering /v1/adapt and an adapter's predict; records every outcome."""

    def __init__(self, server, adapter_id: str, clients: int = 4) -> None:
        self.server, self.adapter_id, self.stop = server, adapter_id, threading.Event()
        self.results: list[tuple[int, str | None]] = []
        self.threads = [threading.Thread(target=self._loop, args=(i,), daemon=True) for i in range(clients)]

    def _loop(self, i: int) -> None:
        rng = np.random.default_rng(100 + i)
        while not self.stop.is_set():
            query = [{"x": rng.normal(size=(10, F)).tolist()}]
            try:
                if i % 2:
                    r = _post(self.server, f"/f/v1/adapters/{self.adapter_id}/predict", {"query": query})
                else:
                    r = _post(self.server, "/f/v1/adapt", {"support": _support(rng, 2, 12), "query": query})
            except requests.RequestException as e:  # a refused or dropped connection is a failure too
                self.results.append((0, repr(e)))
                continue
            self.results.append((r.status_code, r.json()["model"]["version"] if r.ok else r.text))

    def __enter__(self) -> Load:
        for t in self.threads:
            t.start()
        time.sleep(1.0)
        return self

    def __exit__(self, *exc) -> None:
        time.sleep(1.0)
        self.stop.set()
        for t in self.threads:
            t.join(60)

    def failures(self) -> list:
        return [r for r in self.results if r[0] != 200]


def _model(server) -> dict:
    return requests.get(server["base"] + "/f/v1/model", timeout=10).json()


def test_version_switch_under_load_failed_load_and_alias_follow(server):
    from mlflow.tracking import MlflowClient

    from pipeline.serving.app import model_config, resolve
    from pipeline.serving.command import follow_alias

    n, v, uri = server["names"]["forecast"], server["versions"], server["uri"]
    rng = np.random.default_rng(4)
    adapter = _post(server, "/f/v1/adapters", {"support": _support(rng, 2)}).json()["id"]

    # 1. v1 -> v2 under concurrent requests: no request fails, replicas are reconfigured in place
    with Load(server, adapter) as load:
        server["deploy_f"](model_config(f"models:/{n}/{v['f2']}", uri))
    assert load.failures() == [] and len(load.results) > 4
    assert {v["f1"], v["f2"]} <= {ver for _, ver in load.results}
    info = _model(server)
    assert info["version"] == v["f2"] and info["previous_version"] == v["f1"] and info["last_switch_error"] is None
    kept = _post(server, f"/f/v1/adapters/{adapter}/predict", {"query": [{"x": [[0.0] * F] * 5}]})
    assert kept.status_code == 200 and kept.json()["model"]["version"] == v["f1"]  # the cache survived the switch

    # 2. a version whose weights do not load: v2 keeps serving, nothing fails
    with Load(server, adapter) as load:
        server["deploy_f"](model_config(f"models:/{n}/{v['f3']}", uri))
    assert load.failures() == []
    info = _model(server)
    assert info["version"] == v["f2"] and f"models:/{n}/{v['f3']}" in info["last_switch_error"]

    # 3. moving the alias alone changes nothing; --follow's loop sees it and reconfigures
    client = MlflowClient(uri, registry_uri=uri)
    client.set_registered_model_alias(n, "champion", v["f2"])
    current = resolve(f"models:/{n}@champion", uri)
    assert current["model_uri"] == f"models:/{n}/{v['f2']}" and current["alias"] == "champion"
    server["deploy_f"](current)
    client.set_registered_model_alias(n, "champion", v["f1"])
    time.sleep(1.0)
    assert _model(server)["version"] == v["f2"]
    stop = threading.Event()
    follower = threading.Thread(target=follow_alias, args=(f"models:/{n}@champion", uri, current, server["deploy_f"]),
                                kwargs={"poll_s": 0.5, "stop": stop}, daemon=True)
    follower.start()
    try:
        deadline = time.monotonic() + 120
        while _model(server)["version"] != v["f1"] and time.monotonic() < deadline:
            time.sleep(0.5)
    finally:
        stop.set()
        follower.join(60)
    info = _model(server)
    assert info["version"] == v["f1"] and info["alias"] == "champion"


# ----------------------------------------------------------------------------- the command and the config


def test_model_process_is_replaced_when_killed_and_stops_with_its_replica(server):
    """The inner loops run in a child process of the replica: killing it takes no replica down, deleting the
    application stops it."""
    from ray import serve

    from pipeline.serving.app import build_app, model_config

    user_config = model_config(f"models:/{server['names']['forecast']}/{server['versions']['f1']}", server["uri"])
    serve.run(build_app(user_config, **APP_KW), name="proc", route_prefix="/proc")
    info = requests.get(server["base"] + "/proc/v1/model", timeout=10).json()["model_process"]
    assert info["pid"] and info["restarts"] == 0 and info["models"] == [user_config["model_uri"]]
    os.kill(info["pid"], signal.SIGKILL)
    assert process_gone(info["pid"])
    body = {"support": _support(np.random.default_rng(7), 2), "query": [{"x": np.ones((8, F)).tolist()}]}
    r = _post(server, "/proc/v1/adapt", body)
    if r.status_code == 503:  # only if this request raced the child's death: it says so, and a retry works
        assert r.headers["Retry-After"] == "1" and "model process stopped" in r.text
        r = _post(server, "/proc/v1/adapt", body)
    assert r.status_code == 200, r.text
    after = requests.get(server["base"] + "/proc/v1/model", timeout=10).json()["model_process"]
    assert after["restarts"] == 1 and after["pid"] not in (None, info["pid"])
    serve.delete("proc")
    assert process_gone(after["pid"])


def test_no_direct_ingress_addresses_on_a_cluster_without_it(server):
    from pipeline.serving.command import direct_ingress_urls

    assert direct_ingress_urls("f", "127.0.0.1", wait_s=0) == []  # only the proxy answers here


def test_serve_command_user_errors(registry, capsys):
    from pipeline.cli import main

    assert main(["serve", "--model", "runs:/abc/model"]) == 2
    assert "--model" in capsys.readouterr().err
    assert main(["serve", "--model", f"models:/{registry['names']['forecast']}@nobody",
                 "--tracking-uri", registry["uri"]]) == 2
    assert "alias" in capsys.readouterr().err
    assert main(["serve", "--model", "models:/x/1", "--port", "0"]) == 2
    assert "--port" in capsys.readouterr().err


def test_deploy_config_is_a_valid_serve_config():
    from ray.serve.schema import ServeDeploySchema

    from pipeline.serving.app import DEPLOYMENT_NAME, app_builder

    config = ServeDeploySchema.model_validate(yaml.safe_load((REPO / "deploy" / "serve_config.yaml").read_text()))
    (application,) = config.applications
    assert application.import_path == "pipeline.serving.app:app_builder"
    (deployment,) = application.deployments
    assert deployment.name == DEPLOYMENT_NAME and deployment.user_config["model_uri"].startswith("models:/")
    app_builder(dict(application.args))  # the args are ones the builder accepts
    with pytest.raises(ValueError, match="unknown keys"):
        app_builder({"bogus": 1})
