"""``metalstm experiment`` end to end on a tiny synthetic store, the baselines' maths, and real-data smoke tests."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from metalstm.baselines import KneserNeyLM, adapt_path, pooled_errors, seasonal_naive, subsample_support, t_interval
from metalstm.config import ModelConfig
from metalstm.data import BOS, EOS, collate
from metalstm.maml import inner_loop
from metalstm.models import batched, build_model

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"

TINY = ["seeds=[0,1]", "shots=[1,3]", "steps=[0,1,3]", "report_steps=1", "train.schedule.meta_steps=4",
        "train.schedule.meta_batch_size=4", "train.model.hidden_size=8", "baselines.pretrain_steps=4",
        "baselines.pretrain_batch=8", "baselines.scratch_steps=3", "baselines.finetune_lrs=[0.01,0.1]",
        "val_every=2", "val_tasks=4", "test_tasks=5", "eval_batch=3", "baselines.season=4"]


# ----------------------------------------------------------------------------- maths


def test_t_interval_matches_the_t_distribution():
    mean, half, n = t_interval([1.0, 2.0, 3.0, 4.0, float("nan")])
    assert (mean, n) == (2.5, 4)
    assert half == pytest.approx(3.182446 * np.std([1, 2, 3, 4], ddof=1) / 2, rel=1e-5)
    assert math.isnan(t_interval([1.0])[1]) and t_interval([])[2] == 0


def test_seasonal_naive_repeats_the_last_season_of_each_window():
    x = torch.arange(10, dtype=torch.float32).view(1, 1, 10, 1).repeat(1, 2, 1, 2)
    mask = torch.ones(1, 2, 10)
    mask[0, 1, 8:] = 0  # second window has 8 real steps
    pred = seasonal_naive(x, mask, horizon=5, season=3)
    assert pred[0, 0].tolist() == [7, 8, 9, 7, 8]
    assert pred[0, 1].tolist() == [5, 6, 7, 5, 6]
    with pytest.raises(ValueError, match="season"):
        seasonal_naive(x, mask, horizon=5, season=9)


def test_pooled_errors_are_in_original_units():
    pred, y, mask = torch.tensor([[[1.0, 1.0]], [[2.0, 2.0]]]), torch.ones(2, 1, 2), torch.ones(2, 1, 2)
    out = pooled_errors(pred, y, mask, offset=torch.zeros(2), scale=torch.tensor([1.0, 10.0]))
    # errors 0,0 (task 0) and 10,10 (task 1, scale 10) over |y| = 1+1+10+10
    assert out["nd"] == pytest.approx(20 / 22)
    assert out["nrmse"] == pytest.approx(math.sqrt(200 / 4) / (22 / 4))


def test_kneser_ney_is_a_distribution_and_learns_the_text():
    rng = np.random.default_rng(0)
    vocab = 8
    seqs = []
    for _ in range(50):  # a deterministic cycle 4 5 6 7 4 5 ... with random phase
        start = rng.integers(4)
        body = [4 + (start + i) % 4 for i in range(12)]
        seqs.append(([BOS, *body], [*body, EOS]))
    lm = KneserNeyLM(3, vocab).fit(seqs)
    x = [BOS, 4, 5]
    probs = [2 ** lm.token_log2probs(x, [4, 5, w])[-1] for w in range(vocab)]
    assert sum(probs) == pytest.approx(1.0, abs=1e-9)
    assert int(np.argmax(probs)) == 6  # after 4 5 comes 6
    assert lm.bits_per_token(seqs[:5]) < 0.5 * math.log2(vocab)
    unseen = [([BOS, 7, 7, 7], [7, 7, 7, EOS])]
    assert math.isfinite(lm.bits_per_token(unseen))
    with pytest.raises(ValueError, match="order"):
        KneserNeyLM(30, 100)


def test_adapt_path_sgd_is_mamls_inner_loop_and_subsample_is_fair():
    torch.manual_seed(0)
    model = build_model(ModelConfig(kind="forecaster", hidden_size=6, input_size=1, horizon=3))
    rng = np.random.default_rng(0)
    tasks = [{"support_x": [rng.normal(size=(5, 1)).astype(np.float32) for _ in range(4)],
              "support_y": [rng.normal(size=3).astype(np.float32) for _ in range(4)],
              "query_x": [rng.normal(size=(5, 1)).astype(np.float32)],
              "query_y": [rng.normal(size=3).astype(np.float32)], "task_id": f"t{i}"} for i in range(2)]
    cut = subsample_support(tasks[0], 2, np.random.default_rng(1))
    assert len(cut["support_x"]) == 2 and len(tasks[0]["support_x"]) == 4
    assert any(np.array_equal(cut["support_x"][0], s) for s in tasks[0]["support_x"])
    batch = collate(tasks)
    theta = {n: p.detach() for n, p in model.named_parameters()}
    path = adapt_path(model, theta, batch.support, [0, 2, 3], 0.1)
    assert set(path) == {0, 2, 3}
    assert torch.equal(path[0]["head.bias"][0], theta["head.bias"])
    start = {n: p.detach().requires_grad_(True) for n, p in batched(model, 2).items()}
    ref, _ = inner_loop(model, start, batch.support, steps=3, lr=0.1, create_graph=False)
    for n in ref:
        torch.testing.assert_close(path[3][n], ref[n].detach())
    adam = adapt_path(model, theta, batch.support, [4], 0.01, optimizer="adam")[4]
    with torch.no_grad():
        before = model.task_loss(batched(model, 2), batch.support)
        after = model.task_loss(adam, batch.support)
    assert bool((after < before).all())


# ----------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    from pipeline.experiment import Experiment, load_experiment_config, log_to_mlflow, write_report
    from pipeline.tasks.builders.synthetic import build_synthetic

    root = tmp_path_factory.mktemp("experiment")
    store = str(root / "store")
    build_synthetic(store, tasks_per_split=12, shots=4, queries=2, window=8, horizon=4, seed=3)
    (root / "results.md").write_text("# Results\n\nHand-written introduction.\n")
    cfg = load_experiment_config(Path(__file__).resolve().parents[1] / "configs" / "experiment_sinusoid.yaml", [
        *TINY, f"store.uri={store}", "maml_lrs=[0.01,0.3]",
        "methods=[maml,maml_cold,mamlpp,fomaml,transfer,transfer_long,scratch,classical]",
        f"report.dir={root / 'results'}", f"report.markdown={root / 'results.md'}",
        f"train.tracking.uri=sqlite:///{root / 'mlflow.db'}", "train.tracking.experiment=exp-test"])
    exp = Experiment(cfg)
    results = exp.run()
    files = write_report(results, cfg, "metalstm experiment tiny")
    run_id = log_to_mlflow(cfg, results, files)
    return {"root": root, "cfg": cfg, "results": results, "files": files, "run_id": run_id}


def _cell(results, method, shots, steps, metric="mse"):
    rows = [r for r in results["summary"] if (r["method"], r["shots"], r["steps"]) == (method, shots, steps)]
    assert len(rows) == 1, (method, shots, steps)
    return rows[0][metric]


def test_every_method_shot_and_step_is_measured_over_tasks_and_seeds(tiny_run):
    res = tiny_run["results"]
    for method in ("maml", "maml_cold", "mamlpp", "fomaml", "transfer", "transfer_long"):
        for shots in (1, 3):
            for steps in (0, 1, 3):
                cell = _cell(res, method, shots, steps)
                assert cell["n"] == 5 * 2 and math.isfinite(cell["mean"]) and math.isfinite(cell["ci95"])
    for method in ("scratch", "classical"):
        assert _cell(res, method, 3, None)["n"] == 10
    # k = 0 is θ itself: independent of K; adaptation changes the predictions
    assert _cell(res, "maml", 1, 0)["mean"] == pytest.approx(_cell(res, "maml", 3, 0)["mean"])
    assert _cell(res, "maml", 3, 3)["mean"] != pytest.approx(_cell(res, "maml", 3, 0)["mean"])
    # electricity-style pooled errors come from the store's scale column, here absent (synthetic): none
    assert not any(k.startswith("pooled_") for r in res["summary"] for k in r)
    # rates were chosen on val for every (K, k) and seed; compute was recorded for every training run
    chosen = [s for s in res["selected"] if s["method"] == "transfer"]
    assert len(chosen) == 2 * 2 * 3 and all(s["lr"] in (0.01, 0.1) for s in chosen)
    trained = {(c["method"], c["seed"]) for c in res["compute"] if c["phase"] == "train"}
    adapted = ("maml", "maml_cold", "mamlpp", "fomaml", "transfer", "transfer_long")
    assert trained == {(m, s) for m in adapted for s in (0, 1)}


def test_meta_rows_start_warm_and_choose_their_rate_on_val(tiny_run):
    res = tiny_run["results"]
    # warm-started rows carry the transfer model's pre-training in their compute; the cold row does not
    warm = {(c["method"], c["seed"]) for c in res["compute"] if c["phase"] == "pre-train (warm start)"}
    assert warm == {(m, s) for m in ("maml", "mamlpp", "fomaml") for s in (0, 1)}
    # a warm start is validated before its first meta-step (selection may keep it); a cold start is not
    assert res["curves"]["maml-seed0"][0]["step"] == 0 and "val" in res["curves"]["maml-seed0"][0]
    assert res["curves"]["maml_cold-seed0"][0]["step"] == 1
    # k = 0 of a warm row that selection kept at step 0 would equal transfer's k = 0; at least θ is shared input
    chosen = [s for s in res["selected"] if s["method"] == "maml"]
    assert len(chosen) == 2 * 2 * 3 and {s["lr"] for s in chosen} <= {0.01, 0.3, 0.05}
    assert not [s for s in res["selected"] if s["method"] == "mamlpp"]  # learned rates: nothing chosen
    # transfer_long got as much CPU as Meta-LSTM's pre-training + meta-training: more Adam steps than transfer
    budgets = {c["method"]: c["budget"] for c in res["compute"] if c["phase"] == "train" and c["seed"] == 0}
    assert int(budgets["transfer_long"].split()[0]) > int(budgets["transfer"].split()[0])


def test_report_plots_and_markdown_block(tiny_run):
    from pipeline.experiment import update_markdown

    root, files = tiny_run["root"], tiny_run["files"]
    for name in ("sinusoid_shots", "sinusoid_steps"):
        assert files[name].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    text = (root / "results.md").read_text()
    assert text.startswith("# Results\n\nHand-written introduction.")
    assert "<!-- experiment:sinusoid:begin -->" in text and "| Meta-LSTM (MAML) | 3 |" in text
    assert "results/sinusoid_shots.png" in text and "metalstm experiment tiny" in text
    data = json.loads(files["json"].read_text())
    assert data["family"] == "synthetic" and data["summary"]
    update_markdown(root / "results.md", "sinusoid", "replaced\n")
    again = (root / "results.md").read_text()
    assert "replaced" in again and "| Meta-LSTM (MAML)" not in again and "Hand-written introduction." in again
    assert again.count("experiment:sinusoid:begin") == 1


def test_merging_per_seed_runs_gives_the_same_summary(tiny_run):
    from pipeline.experiment import merge_results

    res = tiny_run["results"]
    parts = []
    for seed in (0, 1):
        part = {**res, "config": {**res["config"], "seeds": [seed]}}
        for key in ("rows", "pooled_rows", "compute"):
            part[key] = [r for r in res[key] if r.get("seed") == seed]
        part["selected"] = [r for r in res["selected"] if r.get("seed") == seed]
        parts.append(part)
    merged = merge_results(parts)
    assert merged["config"]["seeds"] == [0, 1] and merged["parallel_runs"] == 2
    assert merged["summary"] == res["summary"] and merged["paired"] == res["paired"]
    with pytest.raises(ValueError, match="seeds overlap"):
        merge_results([parts[0], parts[0]])


def test_results_are_logged_to_mlflow(tiny_run):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{tiny_run['root'] / 'mlflow.db'}")
    run = client.get_run(tiny_run["run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.metrics["test.maml.K3.k1.mse"] == pytest.approx(_cell(tiny_run["results"], "maml", 3, 1)["mean"])
    assert "test.scratch.K1.kna.mse" in run.data.metrics
    assert run.data.params["shots"] in ("[1, 3]", "[1,3]")
    listed = {a.path for a in client.list_artifacts(run.info.run_id, "report")}
    assert {"report/sinusoid_shots.png", "report/sinusoid.json", "report/sinusoid.md"} <= listed


def test_config_errors_name_the_key(tmp_path):
    from pipeline.experiment import load_experiment_config

    with pytest.raises(ValueError, match="config key shots"):
        load_experiment_config(None, ["shots=[0]"])
    with pytest.raises(ValueError, match="config key report_steps"):
        load_experiment_config(None, ["steps=[0,1]", "report_steps=5"])
    with pytest.raises(ValueError, match="config key methods"):
        load_experiment_config(None, ["methods=[maml,nope]"])
    with pytest.raises(ValueError, match="baselines.nope|nope"):
        load_experiment_config(None, ["baselines.nope=1"])
    with pytest.raises(FileNotFoundError):
        load_experiment_config(tmp_path / "missing.yaml")


def test_the_store_is_built_once_from_its_options(tmp_path):
    from pipeline.experiment import StoreSpec, load_experiment_config, prepare_store
    from pipeline.tasks.store import read_manifest

    options = {"tasks_per_split": 2, "window": 8, "horizon": 4}
    uri = prepare_store(StoreSpec(family="synthetic", options=options, cache_dir=str(tmp_path)))
    m = read_manifest(uri)
    assert m["counts"] == {"train": 2, "val": 2, "test": 2} and m["model_kind"] == "forecaster"
    # the cache key is every option, defaults included: spelling a default out reuses the store
    same = StoreSpec(family="synthetic", options={**options, "shots": 10}, cache_dir=str(tmp_path))
    assert prepare_store(same) == uri and read_manifest(uri)["created_at"] == m["created_at"]
    other = StoreSpec(family="synthetic", options={**options, "layout": "points"}, cache_dir=str(tmp_path))
    assert read_manifest(prepare_store(other))["model_kind"] == "mlp"
    with pytest.raises(ValueError, match="config key store.options.windw: Key 'windw' not in 'SyntheticOptions'"):
        load_experiment_config(None, ["store.options.windw=3"])
    with pytest.raises(ValueError, match="config key store.family: expected one of"):
        load_experiment_config(None, ["store.family=weather"])


def test_metrics_and_labels_follow_the_model():
    from metalstm.models import model_class
    from pipeline.experiment import label_of, reported_metrics

    # as the report always had them per store: synthetic, electricity (a scaled store), ptb-char, mt-en-de
    assert reported_metrics(model_class("forecaster"), pooled=False) == ["mse"]
    assert reported_metrics(model_class("mlp"), pooled=False) == ["mse"]
    assert reported_metrics(model_class("forecaster"), pooled=True) == ["nd", "nrmse", "mse"]
    assert reported_metrics(model_class("char_lm"), pooled=False) == ["bpc"]
    assert reported_metrics(model_class("seq2seq"), pooled=False) == ["bleu", "chrf", "nll"]
    lm = {"config": {"train": {"model": {"kind": "char_lm"}}}, "classical": "n-gram"}
    assert label_of(lm, "transfer") == "transfer + dynamic evaluation (Krause et al. 2018)"
    assert label_of(lm, "classical") == "n-gram" and label_of(lm, "maml") == "Meta-LSTM (MAML)"
    assert label_of({"config": {"train": {"model": {"kind": "forecaster"}}}}, "transfer") == \
        "transfer (pre-train + fine-tune)"


def test_cli_rejects_a_bad_override_cleanly(capsys):
    from pipeline.cli import main

    assert main(["experiment", "configs/experiment_sinusoid.yaml", "seeds=[]"]) == 2
    assert "config key seeds" in capsys.readouterr().err


@pytest.mark.parametrize("path", sorted((Path(__file__).resolve().parents[1] / "configs").glob("experiment_*.yaml")),
                         ids=lambda p: p.name)
def test_shipped_experiment_configs_load(path):
    from pipeline.experiment import load_experiment_config

    cfg = load_experiment_config(path)
    assert cfg.name and cfg.store.family
    if path.name.endswith("_gpu.yaml"):
        assert cfg.device.startswith("cuda")


# ----------------------------------------------------------------------------- real data


@pytest.mark.realdata
def test_electricity_real_data_smoke(tmp_path):
    source = DATA / "electricity" / "uci_electricity_2014_03_31_tagi"
    if not source.is_dir():
        pytest.skip(f"real data not found at {source}")
    from pipeline.experiment import Experiment, load_experiment_config

    cfg = load_experiment_config(Path(__file__).resolve().parents[1] / "configs" / "experiment_electricity.yaml", [
        "seeds=[0]", "shots=[2]", "steps=[0,1]", "report_steps=1", "train.schedule.meta_steps=2",
        "train.schedule.meta_batch_size=2", "train.model.hidden_size=8", "baselines.pretrain_steps=2",
        "methods=[maml,classical]", "val_tasks=2", "test_tasks=6", f"store.cache_dir={tmp_path}",
        f"store.options.source={source}", "store.options.max_tasks_per_split=6"])
    res = Experiment(cfg).run()
    naive = [r for r in res["summary"] if r["method"] == "classical"][0]
    # the previous day's actuals on the 2014-03-31 week: a strong, sane baseline on any handful of clients
    assert 0.0 < naive["pooled_nd"]["mean"] < 0.6
    assert naive["nd"]["n"] == 6
    assert any(r["method"] == "maml" and r["steps"] == 1 for r in res["summary"])


@pytest.mark.realdata
def test_ptb_real_data_ngram_smoke(tmp_path):
    source = DATA / "ptb_char" / "ptb.zip"
    if not source.is_file():
        pytest.skip(f"real data not found at {source}")
    from pipeline.experiment import Experiment, load_experiment_config

    cfg = load_experiment_config(Path(__file__).resolve().parents[1] / "configs" / "experiment_ptb.yaml", [
        "seeds=[0]", "shots=[2]", "steps=[0]", "report_steps=0", "methods=[classical]", "val_tasks=4",
        "test_tasks=4", "baselines.ngram_orders=[2,4]", f"store.cache_dir={tmp_path}",
        f"store.options.source={source}", "store.options.max_tasks_per_split=40"])
    res = Experiment(cfg).run()
    bpc = [r for r in res["summary"] if r["method"] == "classical"][0]["bpc"]["mean"]
    assert 1.0 < bpc < math.log2(cfg.train.model.vocab_size)


def test_a_diverged_adaptation_is_reported_never_dropped():
    from pipeline.experiment import _fmt, paired, summarize, verdict_lines

    rows = [{"method": m, "shots": 1, "steps": 1, "seed": 0, "task_id": f"t{i}", "mse": v}
            for m, vals in (("maml", [1.0, float("inf"), 2.0]), ("transfer", [1.5, 1.5, 1.5]))
            for i, v in enumerate(vals)]
    cell = [r for r in summarize(rows, [], ["mse"]) if r["method"] == "maml"][0]["mse"]
    assert cell["mean"] == float("inf") and cell["diverged"] == 1 and cell["n"] == 3
    assert _fmt(cell) == "diverged on 1 of 3"
    lines = verdict_lines({"metrics": ["mse"], "paired": paired(rows, "mse", [1], 1)})
    assert lines == ["- K = 1: Meta-LSTM vs transfer: loses (Meta-LSTM diverged) (Δmse = +inf ± inf)"]
