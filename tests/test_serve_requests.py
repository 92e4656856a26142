"""Requests → jobs → predictions in one process, per family (no Ray): what the replica's routes rely on."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from metalstm import MAMLConfig, MetaLearner, ModelConfig, build_model, save_checkpoint
from metalstm.data import EOS
from metalstm.models import MODEL_KINDS
from metalstm.vocab import Vocab
from pipeline.serving.jobs import MAX_BATCH_CELLS, Job, adapt_and_predict, served_model
from pipeline.serving.request_jobs import LAYOUTS, prepare_query, prepare_support
from pipeline.serving.schema import (
    MAX_DECODE_CELLS,
    MAX_QUERY,
    MAX_SUPPORT_CELLS,
    AdapterRequest,
    AdaptRequest,
    PredictRequest,
    RequestError,
)

H, F, WINDOW = 3, 5, 12
COVARIATES = ["value", "hour_sin", "hour_cos", "dow_sin", "dow_cos"]
TEXTS = ["the cat sat on the mat", "a dog ran in the park", "the sun is hot today"]


def _served(tmp_path, cfg: ModelConfig, store: dict):
    torch.manual_seed(0)
    learner = MetaLearner(build_model(cfg), MAMLConfig(inner_steps=2, inner_lr=0.01))
    path = save_checkpoint(tmp_path / f"{cfg.kind}.pt", learner, cfg, {"store": store})
    return served_model(path.read_bytes(), name=cfg.kind, version="1", alias=None, config_digest=None,
                        model_uri=f"models:/{cfg.kind}/1", run_id=None)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("served")
    vocab = Vocab.build(TEXTS, tokenizer="ptb-chars")
    src, tgt = Vocab.build([t.split(" ", 1)[1] for t in TEXTS]), Vocab.build(TEXTS)
    forecast_store = {"features": {"input_size": F, "horizon": H, "window": WINDOW, "stride": H,
                                   "support_windows": 3, "covariates": COVARIATES}, "normalisation": {"method": "mean"}}
    return {
        "regression": _served(tmp, ModelConfig(kind="mlp", input_size=2, output_size=1, mlp_hidden=[8]), {}),
        "forecast": _served(tmp, ModelConfig(kind="forecaster", input_size=F, hidden_size=8, horizon=H),
                            forecast_store),
        "lm": _served(tmp, ModelConfig(kind="char_lm", vocab_size=len(vocab), embedding_size=4, hidden_size=8),
                      {"vocab": vocab.to_dict(), "features": {"max_len": 8}}),
        "mt": _served(tmp, ModelConfig(kind="seq2seq", vocab_size=len(src), tgt_vocab_size=len(tgt), embedding_size=4,
                                       hidden_size=8), {"vocab": {"src": src.tokens, "tgt": tgt.tokens}}),
    }


def _history(days: int = 3) -> dict:
    steps = 24 * days
    ts = (np.datetime64("2014-03-24T00") + np.arange(steps)).astype(str).tolist()
    return {"values": (500 + 200 * np.sin(np.arange(steps) * 2 * np.pi / 24)).round(2).tolist(), "timestamps": ts}


def _adapt(served, req) -> tuple[Job, list]:
    job = Job(served)
    prepare_support(served, req, job)
    prepare_query(served, req, job)
    ((adapted, preds),) = adapt_and_predict([job])
    assert not isinstance(adapted, Exception) and not isinstance(preds, Exception), (adapted, preds)
    return job, preds


def test_every_model_family_has_a_request_layout():
    assert {cls.family for cls in MODEL_KINDS.values()} == set(LAYOUTS)


def test_regression_and_forecast_task_layout(models):
    req = AdaptRequest(support=[{"x": [0.1, 0.2], "y": [0.3]}], query=[{"x": [0.5, 0.6]}, {"x": [0.0, 1.0]}])
    _, preds = _adapt(models["regression"], req)
    assert [len(p.values) for p in preds] == [1, 1]
    window = np.ones((WINDOW, F)).tolist()
    req = AdaptRequest(support=[{"x": window, "y": [0.0] * H}], query=[{"x": window}], decode={"beam": 3})
    job, preds = _adapt(models["forecast"], req)
    assert len(preds[0].values) == H and job.decode.beam == 1  # decode options do not split value batches


def test_forecast_history_is_windowed_and_unscaled(models):
    job, preds = _adapt(models["forecast"], AdaptRequest(history=_history()))
    assert len(job.support_x) == 3 and job.support_x[0].shape == (WINDOW, F) and job.scale[1] > 1
    raw = Job(**{**vars(job), "scale": None})
    ((_, scaled),) = adapt_and_predict([raw])
    offset, scale = job.scale  # forecasts come back in the history's units
    np.testing.assert_allclose(preds[0].values, np.asarray(scaled[0].values) * scale + offset, rtol=1e-6)
    adapter = Job(models["forecast"])
    prepare_support(models["forecast"], AdapterRequest(history=_history()), adapter)
    assert adapter.query_x is None and adapter.scale == job.scale  # /v1/adapters keeps no query
    no_time = _history()
    no_time.pop("timestamps")
    with pytest.raises(RequestError, match="calendar covariates") as e:
        prepare_support(models["forecast"], AdaptRequest(history=no_time), Job(models["forecast"]))
    assert e.value.loc == ("history", "timestamps")


def test_language_model_distribution_sample_and_texts(models):
    served = models["lm"]
    vocab = served.vocab()
    ids = vocab.encode("the cat", bos=True)
    _, preds = _adapt(served, AdaptRequest(support=[{"x": ids[:-1], "y": ids[1:]}], query=[{"x": ids}]))
    assert len(preds[0].next_token_probs) == len(vocab) and preds[0].top[0].token in vocab.tokens
    req = AdaptRequest(texts=TEXTS, prompts=["the c"], decode={"mode": "sample", "max_new_tokens": 6, "seed": 3})
    job, first = _adapt(served, req)
    assert all(len(x) <= 8 for x in job.support_x) and job.query_x[0][0] == vocab.encode("", bos=True)[0]
    assert first == _adapt(served, req)[1] and len(first[0].tokens) <= 6 and isinstance(first[0].text, str)
    with pytest.raises(RequestError, match="as many as x"):
        prepare_support(served, AdaptRequest(support=[{"x": [4, 5], "y": [5]}], query=[{"x": [4]}]), Job(served))
    with pytest.raises(RequestError, match=rf"\[0, {len(vocab)}\)") as e:
        prepare_support(served, AdaptRequest(support=[{"x": [4, len(vocab)], "y": [5, 6]}], query=[{"x": [4]}]),
                        Job(served))
    assert e.value.loc == ("support", 0, "x", 1)


def test_translation_pairs_and_beam(models):
    served = models["mt"]
    pairs = [{"source": t.split(" ", 1)[1], "target": t} for t in TEXTS]
    for beam in (1, 2):
        job, preds = _adapt(served, AdaptRequest(pairs=pairs, sources=["cat sat"], decode={"beam": beam, "max_len": 5}))
        assert job.support_x[0][-1] == EOS and len(preds[0].tokens) <= 5 and EOS not in preds[0].tokens
        assert isinstance(preds[0].text, str)


@pytest.mark.parametrize("family,field,body,expect", [
    ("regression", "history", {"history": _history()}, "only for forecasting models; this one is 'regression'"),
    ("forecast", "texts", {"texts": ["abc"], "prompts": ["a"]}, "only for language models; this one is 'forecast'"),
    ("lm", "pairs", {"pairs": [{"source": "a", "target": "b"}], "sources": ["a"]}, "only for translation models"),
])
def test_a_form_of_another_family_names_the_field(models, family, field, body, expect):
    with pytest.raises(RequestError, match=expect) as e:
        prepare_support(models[family], AdaptRequest(**body), Job(models[family]))
    assert e.value.loc == (field,) and e.value.status == 422


def test_query_forms_of_another_family_and_layout_errors(models):
    served = models["forecast"]
    with pytest.raises(RequestError, match="only for language models") as e:
        prepare_query(served, PredictRequest(prompts=["a"]), Job(served))
    assert e.value.loc == ("prompts",)
    for x, expect in (([[0.0] * 3] * 4, "input_size"), ([[0.0] * F, [0.0] * 4], "different numbers")):
        with pytest.raises(RequestError, match=expect):
            prepare_query(served, PredictRequest(query=[{"x": x}]), Job(served))
    with pytest.raises(RequestError, match=f"{H} numbers"):
        prepare_support(served, AdaptRequest(support=[{"x": [[0.0] * F], "y": [0.0] * (H + 1)}],
                                             query=[{"x": [[0.0] * F]}]), Job(served))


def _decode_refusal(served, req) -> RequestError:
    with pytest.raises(RequestError) as e:
        prepare_query(served, req, Job(served))
    assert e.value.loc == ("decode",) and e.value.status == 422
    assert f"the limit is {MAX_DECODE_CELLS}" in e.value.msg
    return e.value


def test_decoding_work_is_capped_naming_the_fields_and_the_limit(models):
    mt, lm = models["mt"], models["lm"]
    assert MAX_SUPPORT_CELLS + MAX_DECODE_CELLS <= MAX_BATCH_CELLS  # serve.batch refuses a larger single job
    pairs = [{"source": "cat sat", "target": "the cat sat"}]
    e = _decode_refusal(mt, AdaptRequest(pairs=pairs, sources=["cat sat"] * MAX_QUERY,
                                         decode={"beam": 8, "max_len": 1024}))
    assert "64 sources x decode.beam 8 x decode.max_len 1024 = 524288 decoding steps" in e.msg
    assert "lower decode.max_len, decode.beam or send fewer sources" in e.msg
    ids = mt.vocab("source").encode("cat sat", eos=True)
    e = _decode_refusal(mt, PredictRequest(query=[{"x": ids}] * 16, decode={"beam": 8, "max_len": 129}))
    assert "16 query x decode.beam 8 x decode.max_len 129" in e.msg
    e = _decode_refusal(lm, PredictRequest(prompts=["the c"] * MAX_QUERY,
                                           decode={"mode": "sample", "max_new_tokens": 512}))
    assert "64 prompts x decode.max_new_tokens 512 = 32768 decoding steps" in e.msg
    # at the limit, and every request the defaults make, still pass; a distribution decodes nothing
    for served, req in ((mt, PredictRequest(query=[{"x": ids}] * 16, decode={"beam": 8, "max_len": 128})),
                        (mt, PredictRequest(sources=["cat sat"] * MAX_QUERY)),
                        (lm, PredictRequest(prompts=["the c"] * MAX_QUERY, decode={"mode": "sample"})),
                        (lm, PredictRequest(prompts=["the c"] * MAX_QUERY, decode={"max_new_tokens": 512}))):
        job = Job(served)
        prepare_query(served, req, job)
        assert job.decode_cells <= MAX_DECODE_CELLS and job.cost <= MAX_BATCH_CELLS
    assert job.decode_cells == 0
    forecast = models["forecast"]  # decode options do not apply to the other families
    job = Job(forecast)
    prepare_query(forecast, PredictRequest(query=[{"x": np.ones((WINDOW, F)).tolist()}],
                                           decode={"beam": 8, "max_len": 1024}), job)
    assert job.decode_cells == 0


def test_a_job_costs_its_support_and_its_decoding(models):
    mt = models["mt"]
    pairs = [{"source": "cat sat", "target": "the cat sat"}] * 4
    light, heavy = Job(mt), Job(mt)
    for job, decode in ((light, {}), (heavy, {"beam": 8, "max_len": 128})):
        req = AdaptRequest(pairs=pairs, sources=["cat sat"] * 16, decode=decode)
        prepare_support(mt, req, job)
        prepare_query(mt, req, job)
    assert light.cost == MAX_BATCH_CELLS // 16  # small requests: 16 share one batch, as before
    support_cells = 4 * max(len(x) for x in heavy.support_x)  # 4 pairs, padded to the longest source
    assert heavy.cost == support_cells + MAX_DECODE_CELLS  # and 16 sources x beam 8 x 128 tokens
