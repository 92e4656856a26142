"""Task-store builders (electricity, ptb-char, mt-en-de) and the core helpers they share with serving.

Fixtures are tiny files written here. Electricity fixtures encode each value's time index in the value
itself (``value = base + t``), so a window's scaled values tell exactly which hours it covers.
"""

from __future__ import annotations

import gzip
import zipfile
from dataclasses import fields
from pathlib import Path

import numpy as np
import pytest
import torch

from metalstm.data import BOS, EOS, UNK, collate
from metalstm.models import CharLM, Forecaster, Seq2Seq
from metalstm.series import (
    adaptation_task,
    calendar_covariates,
    common_dips,
    finite_runs,
    forecast_input,
    interpolate_gaps,
    make_windows,
    series_scale,
    unscale,
)
from metalstm.vocab import Vocab, tokenize_chars, tokenize_words
from pipeline.cli import main as cli_main
from pipeline.tasks.builders import BUILDERS, builder_module, options_from_mapping
from pipeline.tasks.builders.electricity import (
    ElectricityBuild,
    ElectricityOptions,
    assign_splits,
    detect_layout,
    uci_history_episodes,
)
from pipeline.tasks.builders.mt import MTBuild, MTOptions, find_domains
from pipeline.tasks.builders.ptb import PTBBuild, PTBOptions, read_texts
from pipeline.tasks.command import WRITE_OPTIONS, family_parser
from pipeline.tasks.store import read_manifest, read_tasks

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
needs_data = pytest.mark.skipif(not DATA.exists(), reason=f"real data not found at {DATA}")
T0 = np.datetime64("2014-03-24T00:00:00", "s")  # a Monday
HOUR = np.timedelta64(3600, "s")


def elec_build(source: Path, **options) -> ElectricityBuild:
    return ElectricityBuild(ElectricityOptions(source=source, **options))


def ptb_build(source: Path, **options) -> PTBBuild:
    return PTBBuild(PTBOptions(source=source, **options))


def mt_build(sources: list[Path], **options) -> MTBuild:
    return MTBuild(MTOptions(source=sources, **options))


def hours_of(x_or_y: np.ndarray, scale: float, base: float) -> np.ndarray:
    """Recover the time indices encoded in a window's values (value = base + t, scaled by ``scale``)."""
    v = x_or_y[:, 0] if x_or_y.ndim == 2 else x_or_y
    return np.rint(v.astype(np.float64) * scale - base).astype(int)


# --------------------------------------------------------------------------------------------- core helpers


def test_series_helpers():
    ts = T0 + np.arange(48) * HOUR
    cov = calendar_covariates(ts)
    assert cov.shape == (48, 4) and np.allclose(cov[0], [0, 1, 0, 1])  # Monday 00:00
    assert np.allclose(cov[24, :2], [0, 1]) and not np.allclose(cov[24, 2:], [0, 1])  # same hour, next day
    assert series_scale([0, 0, 0]) == (0.0, 1.0)
    assert series_scale([2.0, -4.0, np.nan]) == (0.0, 3.0)
    off, sc = series_scale([1.0, 3.0], "standard")
    assert (off, sc) == (2.0, 1.0)
    filled = interpolate_gaps([1, np.nan, np.nan, 4, np.nan, np.nan, np.nan, np.nan, 9, np.nan], max_gap=3)
    assert np.allclose(filled[:4], [1, 2, 3, 4]) and np.isnan(filled[4:8]).all() and np.isnan(filled[9])
    assert finite_runs(filled) == [(0, 4), (8, 9)]
    v = np.arange(100.0) + 1
    xs, ys = make_windows(v, None, window=10, horizon=5, stride=20, scale=2.0)
    assert [x.shape for x in xs] == [(10, 1)] * 5 and ys[-1][-1] * 2 == 100  # aligned to the end
    assert all(hours_of(y, 2.0, 1)[0] == hours_of(x, 2.0, 1)[-1] + 1 for x, y in zip(xs, ys))
    with pytest.raises(ValueError, match="NaN"):
        make_windows(np.r_[v[:50], np.nan, v[51:]], None, 10, 5, 5)
    with pytest.raises(ValueError, match="history_values: need at least window=200"):
        forecast_input(v, T0 + np.arange(100) * HOUR, 200, offset=0, scale=1)
    assert np.allclose(unscale(np.array([1.0, 2.0]), 1.0, 10.0), [11.0, 21.0])


def test_vocab_roundtrip_and_tokenizers():
    assert tokenize_chars(" the cat ") == list("the_cat") == tokenize_chars("t h e _ c a t")
    assert tokenize_words("A man&apos;s hat.") == ["a", "man", "'", "s", "hat", "."]
    v = Vocab.build(["b a a", "a c"], max_size=6)
    assert v.tokens[4:] == ["a", "b"]  # most frequent first, capped
    assert v.encode("a c b", eos=True) == [4, UNK, 5, EOS]
    assert v.decode([BOS, 4, 5, EOS, 4]) == "a b"
    assert Vocab.from_dict(v.to_dict()) == v
    chars = Vocab.from_dict({"tokens": ["<pad>", "<unk>", "<bos>", "<eos>", "_", "a", "t"]}, tokenizer="ptb-chars")
    assert chars.decode(chars.encode("at a")) == "at a"
    with pytest.raises(ValueError, match="special tokens"):
        Vocab(["a", "b"])


# --------------------------------------------------------------------------------------------- electricity


def write_uci(folder: Path, clients: int = 10, zeros: tuple[tuple[int, int | None], ...] = ()) -> Path:
    """A TAGI-style UCI folder: 144 + 24 + 168 hours; client c's value at hour t is 1000 (c + 1) + t.

    ``zeros``: (hour, client) readings set to 0, client None = every client (a daylight-saving artefact).
    """
    folder.mkdir(parents=True, exist_ok=True)
    start = 0
    for part, n in (("train", 144), ("val", 24), ("test", 168)):
        t = np.arange(start, start + n)
        m = (1000.0 * (np.arange(clients) + 1))[None, :] + t[:, None]
        for hour, client in zeros:
            if start <= hour < start + n:
                m[hour - start, slice(None) if client is None else client] = 0.0
        np.savetxt(folder / f"elec_{part}.csv", m, delimiter=",", fmt="%.6f")
        (folder / f"elec_{part}_datetime.csv").write_text(
            "\n".join(str(T0 + int(i) * HOUR).replace("T", " ") for i in t) + "\n")
        start += n
    return folder


def test_uci_test_week_protocol(tmp_path):
    src = write_uci(tmp_path / "uci")
    assert detect_layout(src) == "uci"
    b = elec_build(src, test_fraction=0.3, val_fraction=0.2)
    tasks = list(b.tasks())
    assert len(tasks) == 10 and {t["split"] for t in tasks} == {"train", "val", "test"}
    for t in tasks:
        base = 1000.0 * int(t["entity"][3:])
        sup_y = [hours_of(y, t["scale"], base) for y in t["support_y"]]
        qry_y = [hours_of(y, t["scale"], base) for y in t["query_y"]]
        assert max(h.max() for h in sup_y) < min(h.min() for h in qry_y)  # support strictly earlier
        assert t["scale"] == pytest.approx(base + (167 if t["split"] == "test" else 143) / 2)  # history only
        if t["split"] == "test":  # 7 rolling day-ahead forecasts of the test week, inputs = actual values
            assert [h.tolist() for h in qry_y] == [list(range(168 + 24 * d, 192 + 24 * d)) for d in range(7)]
            for d, x in enumerate(t["query_x"]):
                assert hours_of(x, t["scale"], base).tolist() == list(range(168 + 24 * d - 72, 168 + 24 * d))
            assert max(h.max() for h in sup_y) == 167 and len(sup_y) == 5
            # serving builds the same support windows and first query input from the raw history
            hist = base + np.arange(168.0)
            a = adaptation_task(hist, T0 + np.arange(168) * HOUR, window=72, horizon=24, stride=12,
                                support_windows=5)
            assert a["scale"] == t["scale"]
            assert all(np.allclose(p, q) for p, q in zip(a["support_x"], t["support_x"]))
            assert all(np.allclose(p, q) for p, q in zip(a["support_y"], t["support_y"]))
            assert np.allclose(a["query_x"][0], t["query_x"][0])
        else:  # train/val clients never see the test week
            assert max(h.max() for h in qry_y) == 167 and len(qry_y) == 1
    batch = collate(tasks[:3])
    Forecaster(input_size=5, hidden_size=8, num_layers=1, horizon=24).check(batch.support, "support")


def write_gefcom(folder: Path, zones: int = 4, days: int = 60, blank: tuple[int, ...] = (20, 21, 40)) -> Path:
    """GEFCom-like zipped Load_history.csv: quoted thousands values, blank day-rows at ``blank``."""
    lines = ["zone_id,year,month,day," + ",".join(f"h{i}" for i in range(1, 25))]
    for z in range(1, zones + 1):
        for d in range(days):
            day = (np.datetime64("2005-01-01") + d).astype(object)
            vals = [""] * 24 if d in blank else [f'"{10000 * z + 24 * d + h:,}"' for h in range(24)]
            lines.append(f"{z},{day.year},{day.month},{day.day}," + ",".join(vals))
    folder.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(folder / "Load_history.csv.zip", "w") as zf:
        zf.writestr("Load_history.csv", "\n".join(lines) + "\n")
    return folder


SMALL = {"window": 48, "horizon": 24, "stride": 24, "support_windows": 2, "query_windows": 2}


def test_gefcom_gaps_and_episode_order(tmp_path):
    src = write_gefcom(tmp_path / "gef")
    assert detect_layout(src) == "gefcom"
    tasks = list(elec_build(src, test_fraction=0.25, val_fraction=0.25, **SMALL).tasks())
    gap_hours = {24 * d + h for d in (20, 21, 40) for h in range(24)}
    assert tasks and all(t["task_id"].startswith(t["entity"] + "@") for t in tasks)
    for t in tasks:
        base = 10000.0 * int(t["entity"].split("_")[1])
        covered = set()
        for x, y in zip(t["support_x"] + t["query_x"], t["support_y"] + t["query_y"]):
            hx, hy = hours_of(x, t["scale"], base), hours_of(y, t["scale"], base)
            assert (np.diff(np.r_[hx, hy]) == 1).all()  # consecutive hours: no window jumps a gap
            covered |= set(hx) | set(hy)
        assert not covered & gap_hours  # nothing inside the blank days
        sup = max(hours_of(y, t["scale"], base).max() for y in t["support_y"])
        assert sup < min(hours_of(y, t["scale"], base).min() for y in t["query_y"])
    # an episode spans 24 (2 - 1) + 48 + 24 + 2 x 24 = 144 h = 6 days; gap-free runs of 20, 18 and 19 days
    assert sum(t["entity"] == "zone_1" for t in tasks) == 3 + 3 + 3


def test_gefcom_bad_columns_named(tmp_path):
    folder = tmp_path / "g"
    folder.mkdir()
    (folder / "Load_history.csv").write_text("zone_id,year,month,day,h1\n1,2005,1,1,5\n")
    with pytest.raises(ValueError, match=r"missing columns \['h2'"):
        elec_build(folder)


def test_bad_cells_name_file_line_column_and_value(tmp_path):
    """UCI (headerless) and GEFCom cells: an error names the file, line, column and value, never a bare
    ``could not convert string to float``; empty cells stay missing values."""
    uci = write_uci(tmp_path / "uci", clients=3)
    path = next(uci.glob("*_val.csv"))
    lines = path.read_text().splitlines()
    lines[4] = ",".join(lines[4].split(",")[:2] + ["oops"])
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match=rf"{path}: line 5, column 3 \(MT_003\): 'oops' is not a finite number"):
        elec_build(uci)
    hours = ",".join(f"h{i}" for i in range(1, 25))
    days = [f'1,2005,1,{d},' + ",".join(['"16,853"'] * 23 + ["12a" if d == 6 else '"1,000"']) for d in range(1, 9)]
    (tmp_path / "gef").mkdir()
    path = tmp_path / "gef" / "Load_history.csv"
    path.write_text("\n".join([f"zone_id,year,month,day,{hours}", *days, "1,2005,1,9," + "," * 23]) + "\n")
    with pytest.raises(ValueError, match=rf"{path}: line 7, column 'h24': '12a' is not a finite number"):
        elec_build(tmp_path / "gef")


def wide_frame(n_series: int, hours: int, freq_min: int = 60) -> tuple[list[str], np.ndarray]:
    stamps = [str(T0 + np.timedelta64(freq_min * 60 * i, "s")).replace("T", " ") for i in range(hours)]
    values = 100.0 * (np.arange(n_series) + 1)[None, :] + np.arange(hours)[:, None]
    return stamps, values


def test_csv_wide_and_long_agree_with_gaps(tmp_path):
    stamps, values = wide_frame(3, 400, freq_min=30)
    values[50:52, 0] = np.nan  # short gap: interpolated
    values[200:260, 1] = np.nan  # long gap: windows avoid it
    wide = tmp_path / "wide.csv"
    rows = ["time,a,b,c"] + [f"{s}," + ",".join("" if np.isnan(v) else f"{v:g}" for v in r)
                              for s, r in zip(stamps, values)]
    wide.write_text("\n".join(rows) + "\n")
    long = tmp_path / "long.csv"
    rows = ["series_id,timestamp,value"] + [f"{c},{s},{v:g}" for c, col in zip("abc", values.T)
                                           for s, v in zip(stamps, col) if not np.isnan(v)]  # absent = gap
    long.write_text("\n".join(rows) + "\n")
    assert detect_layout(wide) == "csv-wide" and detect_layout(long) == "csv-long"
    opts = dict(SMALL, test_series=["c"], val_series=[])
    bw, bl = elec_build(wide, **opts), elec_build(long, **opts)
    assert bw.features["frequency"] == "30min" and bw.features["covariates"][0] == "hour_sin"
    tw, tl = list(bw.tasks()), list(bl.tasks())
    assert [t["task_id"] for t in tw] == [t["task_id"] for t in tl]
    for a, b in zip(tw, tl):
        for k in ("support_x", "support_y", "query_x", "query_y"):
            assert all(np.array_equal(p, q) for p, q in zip(a[k], b[k]))
    by = {e: [t for t in tw if t["entity"] == e] for e in "abc"}
    assert len(by["a"]) > len(by["b"]) > 0  # the long gap costs b episodes; a's 2-step gap costs none
    for t in by["b"]:
        hours = {h for y in t["query_y"] + t["support_y"] for h in hours_of(y, t["scale"], 200.0)}
        assert not hours & set(range(200, 260))
    assert {t["split"] for t in by["c"]} == {"test"} and {t["split"] for t in by["a"]} == {"train"}
    nocov = elec_build(wide, covariates=False, **opts)
    assert nocov.features["input_size"] == 1 and next(nocov.tasks())["support_x"][0].shape == (48, 1)


def test_split_by_series_is_deterministic():
    ids = [f"s{i:03d}" for i in range(50)]
    a = assign_splits(ids, val_fraction=0.1, test_fraction=0.2, seed=0)
    assert a == assign_splits(list(reversed(ids)), val_fraction=0.1, test_fraction=0.2, seed=0)
    assert sum(v == "test" for v in a.values()) == 10 and sum(v == "val" for v in a.values()) == 5
    assert a != assign_splits(ids, val_fraction=0.1, test_fraction=0.2, seed=1)
    with pytest.raises(ValueError, match="leave no training series"):
        assign_splits(ids[:2], val_fraction=0.4, test_fraction=0.4, seed=0)


def test_electricity_bad_sources(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        elec_build(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="not a UCI .* or GEFCom"):
        elec_build(tmp_path / "empty")
    bad = tmp_path / "long.csv"
    bad.write_text("series_id,timestamp,reading\na,2014-01-01 00:00,1\n")
    with pytest.raises(ValueError, match="no value column"):
        elec_build(bad, layout="csv-long")
    with pytest.raises(ValueError, match="no timestamp column 'when'"):
        elec_build(bad, layout="csv-wide", timestamp_column="when")
    with pytest.raises(ValueError, match="window: 200 steps exceed"):
        elec_build(write_uci(tmp_path / "uci", clients=3), window=200)


DST = "2014-03-30T01:00:00"  # hour 145 of the UCI fixture: the clock change


def test_common_dips_detects_collapses_not_outages():
    m = 100.0 + np.arange(40)[:, None] * np.ones((1, 20))
    m[10] = 0.0  # every series reads 0: an artefact
    m[20] *= 0.3  # every series reads ~30 % of its neighbours (UCI's real DST hour): an artefact
    m[30, :18] = 0.0  # 90 % of the series: not enough
    m[5:7] = 0.0  # two steps: an outage, neither step has two positive neighbours
    m[25, 0], m[26, :] = 0.0, np.nan  # one absent step: its neighbours are not both known
    assert common_dips(m).tolist() == [10, 20]
    assert common_dips(m[:, :2]).tolist() == []  # too few series to tell an artefact from a dip


def test_uci_dst_artefact_masked_and_interpolated(tmp_path):
    src = write_uci(tmp_path / "uci", zeros=((145, None), (50, 0)))
    b = elec_build(src, test_fraction=0.3, val_fraction=0.2)
    assert b.settings["dst_masked_steps"] == 1 and b.settings["dst_masked_at"] == [DST]
    for t in b.tasks():
        base = 1000.0 * int(t["entity"][3:])
        if t["split"] != "test":  # the Sunday query: hour 145 interpolated from 144 and 146, no fake dip
            assert hours_of(t["query_y"][0], t["scale"], base).tolist() == list(range(144, 168))
        else:
            assert hours_of(t["query_x"][0], t["scale"], base).tolist() == list(range(96, 168))
        if t["entity"] == "MT_001":  # one client's zero is a real reading, not an artefact: kept
            assert min(float(x[:, 0].min()) for x in t["support_x"]) == 0.0
    kept = elec_build(src, test_fraction=0.3, val_fraction=0.2, mask_dst=False)
    assert kept.settings["dst_masked_steps"] == 0 and kept.settings["mask_dst"] is False
    task = next(t for t in kept.tasks() if t["split"] == "train")
    assert task["query_y"][0][1] == 0.0  # 01:00 on the Sunday reads 0 when the artefact is kept
    assert elec_build(write_gefcom(tmp_path / "gef"), **SMALL).settings["mask_dst"] is False


def test_uci_history_episodes(tmp_path):
    src = write_uci(tmp_path / "uci")
    old = list(elec_build(src, test_fraction=0.3, val_fraction=0.2).tasks())
    b = elec_build(src, test_fraction=0.3, val_fraction=0.2, history_episodes=5)  # only 3 fit
    assert b.history_episodes == 3 == uci_history_episodes(168, window=72, horizon=24, query_windows=1)
    new = list(b.tasks())
    ids = [t["task_id"] for t in new]
    assert len(ids) == len(set(ids)) == 3 * 7 + 3  # 7 train/val clients x 3 episodes + 3 test clients
    support = {"2014-03-28T00:00:00": 1, "2014-03-29T00:00:00": 3, "2014-03-30T00:00:00": 5}  # Fri, Sat, Sun
    for entity in {t["entity"] for t in new if t["split"] != "test"}:
        tasks = [t for t in new if t["entity"] == entity]
        assert {t["forecast_start"]: len(t["support_x"]) for t in tasks} == support
        base = 1000.0 * int(entity[3:])
        for t in tasks:
            first = int((np.datetime64(t["forecast_start"]) - T0) // HOUR)
            assert hours_of(t["query_y"][0], t["scale"], base).tolist() == list(range(first, first + 24))
            assert max(hours_of(y, t["scale"], base).max() for y in t["support_y"]) == first - 1
            assert t["scale"] == pytest.approx(base + (first - 1) / 2)  # fitted on the history before the query
    old_test, new_test = [t for t in old if t["split"] == "test"], [t for t in new if t["split"] == "test"]
    assert [t["task_id"] for t in old_test] == [t["task_id"] for t in new_test]
    for a, c in zip(old_test, new_test):
        assert (a["offset"], a["scale"]) == (c["offset"], c["scale"])
        for k in ("support_x", "support_y", "query_x", "query_y"):
            assert all(np.array_equal(p, q) for p, q in zip(a[k], c[k]))
    with pytest.raises(ValueError, match="history_episodes: only for the uci layout"):
        elec_build(write_gefcom(tmp_path / "gef"), history_episodes=2, **SMALL)


def test_extra_train_source(tmp_path):
    uci, gef = write_uci(tmp_path / "uci"), write_gefcom(tmp_path / "gef")
    opts = {"test_fraction": 0.3, "val_fraction": 0.2}
    b = elec_build(uci, extra_train_source=gef, extra_max_tasks=10, **opts)
    assert b.settings["extra_train"]["tasks"] == 10 and b.settings["extra_train"]["episode_stride"] == 120
    tasks = list(b.tasks())
    extra = [t for t in tasks if t["entity"].startswith("gefcom:")]
    assert len(extra) == 10 and {t["split"] for t in extra} == {"train"}  # each zone's latest 3, capped at 10
    assert [sum(t["entity"] == f"gefcom:zone_{z}" for t in extra) for z in (1, 2, 3, 4)] == [3, 3, 3, 1]
    assert all(t["task_id"].startswith(t["entity"] + "@") for t in extra)
    assert len({t["task_id"] for t in tasks}) == len(tasks)
    uci_task = next(t for t in tasks if t["split"] == "train" and t["entity"].startswith("MT_"))
    weekdays = set()
    for t in extra:
        assert len(t["support_x"]) == 5 and len(t["query_y"]) == 1  # the UCI layout's 5 windows, 1 query day
        assert t["support_x"][0].shape == uci_task["support_x"][0].shape == (72, 5)
        base = 10000.0 * int(t["entity"].split("_")[1])
        first = hours_of(t["query_y"][0], t["scale"], base)[0]
        assert max(hours_of(y, t["scale"], base).max() for y in t["support_y"]) < first
        weekdays.add(np.datetime64(t["forecast_start"], "D").astype(int) % 7)
    assert len(weekdays) == 3  # episodes 5 days apart: the query weekday rotates
    plain = list(elec_build(uci, **opts).tasks())
    assert [t["task_id"] for t in plain] == [t["task_id"] for t in tasks if not t["entity"].startswith("gefcom:")]
    out = tmp_path / "store"
    assert cli_main(["tasks", "build", "electricity", "--out", str(out), "--source", str(uci), "--test-fraction",
                     "0.3", "--val-fraction", "0.2", "--extra-train-source", str(gef), "--extra-max-tasks", "4"]) == 0
    m = read_manifest(str(out))
    assert m["counts"] == {"train": 5 + 4, "val": 2, "test": 3} and m["builder"]["extra_train"]["tasks"] == 4
    stamps, values = wide_frame(3, 400, freq_min=30)
    wide = tmp_path / "wide.csv"
    wide.write_text("\n".join(["time,a,b,c"] + [f"{s}," + ",".join(f"{v:g}" for v in r)
                                                for s, r in zip(stamps, values)]) + "\n")
    with pytest.raises(ValueError, match=r"frequency 30min, the main source .* has 1h"):
        elec_build(uci, extra_train_source=wide, **opts)
    with pytest.raises(ValueError, match="extra_train_layout: expected one of"):
        elec_build(uci, extra_train_source=uci, **opts)


# --------------------------------------------------------------------------------------------- ptb-char


def write_texts(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    train = [f" the cat sat on mat number {i} " for i in range(10)] + [" " + "abc " * 30]
    (folder / "ptb.train.txt").write_text("\n".join(train) + "\n\n")
    (folder / "ptb.valid.txt").write_text("\n".join(f"a dog {i}" for i in range(7)) + "\n")
    (folder / "ptb.test.txt").write_text("\n".join(f"zebra {i}" for i in range(7)) + "\n")  # z: unseen in train
    return folder


def test_ptb_layout_vocab_and_long_sentences(tmp_path):
    src = write_texts(tmp_path / "ptb")
    b = ptb_build(src, sentences_per_task=4, support_sentences=2, max_len=32)
    train_chars = set("".join(f"thecatsatonmatnumber{i}abc" for i in range(10)))
    assert set(b.vocab.tokens[4:]) == train_chars | {"_"}  # train text only
    assert "z" not in b.vocab.index and "d" not in b.vocab.index
    tasks = list(b.tasks())
    assert b.counts == {"train": 3, "val": 2, "test": 2}  # 11 train sentences -> 4 + 4 + 3
    first = tasks[0]
    assert first["support_x"][0].tolist() == [BOS, *b.vocab.encode("the cat sat on mat number 0")]
    for t in tasks:
        for x, y in zip(t["support_x"] + t["query_x"], t["support_y"] + t["query_y"]):
            assert len(x) == len(y) <= 32
    assert b.vocab.decode(np.concatenate(first["query_x"])) == "the cat sat on mat number 2the cat sat on mat " \
                                                                "number 3"
    long = tasks[2]  # its query: sentence 10 (119 chars) is split into pieces, not dropped
    pieces_y = np.concatenate(long["query_y"][:])
    assert len(long["query_x"]) == 4 and pieces_y[-1] == EOS and long["query_x"][1][0] != BOS
    assert b.vocab.decode(pieces_y) == ("abc " * 30).strip()
    test = [t for t in tasks if t["split"] == "test"][0]
    assert UNK in test["support_x"][0]  # 'z' was never seen in training
    CharLM(len(b.vocab), 8, 8, 1).check(collate(tasks).support, "support")


def test_ptb_char_files_and_single_file(tmp_path):
    words = write_texts(tmp_path / "w")
    chars = tmp_path / "c"
    chars.mkdir()
    for name in ("train", "valid", "test"):
        lines = (words / f"ptb.{name}.txt").read_text().splitlines()
        (chars / f"ptb.char.{name}.txt").write_text(
            "\n".join(" _ ".join(" ".join(w) for w in ln.split()) for ln in lines) + "\n")
    a = list(ptb_build(words, sentences_per_task=4, support_sentences=2).tasks())
    c = list(ptb_build(chars, sentences_per_task=4, support_sentences=2).tasks())
    assert [t["support_x"][0].tolist() for t in a] == [t["support_x"][0].tolist() for t in c]
    one = tmp_path / "book.txt"
    one.write_text("\n".join(f"line {i}" for i in range(100)) + "\n")
    b = ptb_build(one, sentences_per_task=5, support_sentences=2, val_fraction=0.1, test_fraction=0.2)
    assert b.counts == {"train": 14, "val": 2, "test": 4}
    splits = [t["split"] for t in b.tasks()]
    assert splits == sorted(splits, key=["train", "val", "test"].index)  # contiguous: test is the end
    with pytest.raises(ValueError, match=r"no text file for split\(s\) \['test'\]"):
        (words / "ptb.test.txt").unlink()
        ptb_build(words)


# --------------------------------------------------------------------------------------------- mt-en-de


def write_parallel(root: Path) -> Path:
    m30k, onmt = root / "multi30k", root / "wmt_sample"
    m30k.mkdir(parents=True)
    onmt.mkdir()

    def gz(path: Path, lines: list[str]) -> None:
        path.write_bytes(gzip.compress(("\n".join(lines) + "\n").encode()))

    gz(m30k / "train.en.gz", [f"A dog runs number {i}." for i in range(12)])
    gz(m30k / "train.de.gz", [f"Ein Hund läuft Nummer {i}." for i in range(12)])
    gz(m30k / "val.en.gz", [f"A cat sleeps {i}" for i in range(6)])
    gz(m30k / "val.de.gz", [f"Eine Katze schläft {i}" for i in range(6)])
    gz(m30k / "test_2016_flickr.en.gz", [f"A horse jumps {i}" for i in range(6)])
    gz(m30k / "test_2016_flickr.de.gz", [f"Ein Pferd springt {i}" for i in range(6)])
    (onmt / "src-train.txt").write_text("\n".join(f"The council &apos;s vote {i} ." for i in range(9)) + "\n")
    (onmt / "tgt-train.txt").write_text("\n".join(f"Die Abstimmung {i} des Rates ." for i in range(9)) + "\n")
    return root


def test_mt_domains_vocab_and_layout(tmp_path):
    root = write_parallel(tmp_path / "mt")
    assert sorted(find_domains([root])) == ["multi30k-test2016-flickr", "multi30k-train", "multi30k-val",
                                            "wmt-train"]
    b = mt_build([root], support_pairs=1, query_pairs=2)
    assert b.domains == {"train": ["wmt-train", "multi30k-train"], "val": ["multi30k-val"],
                         "test": ["multi30k-test2016-flickr"]}
    tasks = list(b.tasks())
    assert b.counts == {"train": 3 + 4, "val": 2, "test": 2}
    assert [t["task_id"] for t in tasks[:3]] == ["wmt-train/00000", "multi30k-train/00000", "wmt-train/00001"]
    assert "'" in b.src_vocab.index and "council" in b.src_vocab.index  # &apos; unescaped, lowercased
    for word in ("cat", "horse"):  # only in val/test text
        assert word not in b.src_vocab.index
    for side in ("katze", "pferd"):
        assert side not in b.tgt_vocab.index
    val = next(t for t in tasks if t["split"] == "val")
    assert val["query_x"][0].tolist() == [*b.src_vocab.encode("a cat sleeps 1"), EOS]
    assert val["query_x"][0].tolist()[1] == UNK
    assert val["query_y"][0].tolist() == [*b.tgt_vocab.encode("eine katze schläft 1"), EOS]
    assert all(t["entity"] in b.domains[t["split"]] for t in tasks)
    Seq2Seq(len(b.src_vocab), len(b.tgt_vocab), 8, 8, 1).check(collate(tasks).query, "query")
    small = mt_build([root], support_pairs=1, query_pairs=2, max_tasks_per_split=2, vocab_size=10)
    assert small.counts == {"train": 2, "val": 2, "test": 2} and len(small.src_vocab) == 10
    assert {e for e, _, _ in small.plan["train"]} == {"wmt-train", "multi30k-train"}


def test_mt_bad_sources(tmp_path):
    root = write_parallel(tmp_path / "mt")
    with pytest.raises(ValueError, match=r"test_domains: unknown domain\(s\) \['news'\]"):
        mt_build([root], test_domains=["news"])
    (root / "wmt_sample" / "tgt-train.txt").write_text("only one line\n")
    with pytest.raises(ValueError, match="src-train.txt has 9 lines but .*tgt-train.txt has 1"):
        mt_build([root])
    (root / "multi30k" / "val.de.gz").unlink()
    with pytest.raises(FileNotFoundError, match="val.de.gz"):
        find_domains([root])


# --------------------------------------------------------------------------------------------- CLI -> store


def test_cli_builds_stores(tmp_path, capsys):
    uci, ptb, mt = write_uci(tmp_path / "uci"), write_texts(tmp_path / "ptb"), write_parallel(tmp_path / "mt")
    builds = {
        "electricity": ["--source", str(uci), "--test-fraction", "0.3"],
        "ptb-char": ["--source", str(ptb), "--sentences-per-task", "4", "--support-sentences", "2"],
        "mt-en-de": ["--source", str(mt), "--pairs-per-task", "3", "--support-pairs", "1"],
    }
    for family, opts in builds.items():
        out = tmp_path / f"store-{family}"
        assert cli_main(["tasks", "build", family, "--out", str(out), *opts]) == 0
        manifest = read_manifest(str(out))
        assert manifest["family"] == family and manifest["builder"]["name"] == family
        assert manifest["model_kind"] == {"electricity": "forecaster", "ptb-char": "char_lm",
                                          "mt-en-de": "seq2seq"}[family]
        tasks = read_tasks(str(out))
        assert len(tasks) == sum(manifest["counts"].values())
        collate(tasks[:4])
    m = read_manifest(str(tmp_path / "store-electricity"))
    assert m["features"]["input_size"] == 5 and m["normalisation"]["columns"] == ["offset", "scale"]
    assert m["schema"]["extras"] == {"offset": "float64", "scale": "float64", "forecast_start": "string"}
    assert read_manifest(str(tmp_path / "store-ptb-char"))["vocab"]["tokens"][:4] == ["<pad>", "<unk>", "<bos>",
                                                                                      "<eos>"]
    assert set(read_manifest(str(tmp_path / "store-mt-en-de"))["vocab"]) >= {"src", "tgt"}
    assert cli_main(["tasks", "build", "electricity", "--out", str(tmp_path / "x"), "--source",
                     str(tmp_path / "missing")]) == 2
    assert "missing: electricity source not found" in capsys.readouterr().err
    assert cli_main(["tasks", "build", "mt-en-de", "--out", str(tmp_path / "y"), "--source", str(mt),
                     "--pairs-per-task", "3", "--support-pairs", "1", "--query-pairs", "1"]) == 2
    assert "pairs_per_task: 3 != support_pairs 1 + query_pairs 1" in capsys.readouterr().err


@pytest.mark.parametrize("family", list(BUILDERS))
def test_every_cli_flag_is_an_option_field_and_back(family):
    """The flags and the options dataclass name the same options, so the CLI and the builder API cannot drift."""
    module = builder_module(family)
    dests = {a.dest for a in family_parser(family)._actions} - {"help", "out", *WRITE_OPTIONS}
    names = {f.name for f in fields(module.OPTIONS)}
    assert dests - names == ({"source"} if family == "synthetic" else set())  # synthetic ignores --source
    assert names <= dests


def test_options_from_a_mapping_are_typed_and_checked(tmp_path):
    o = options_from_mapping("mt-en-de", {"source": ["a", "b"], "train_domains": ["x"], "max_len": "40"})
    assert o == MTOptions(source=["a", "b"], train_domains=["x"], max_len=40)
    o = options_from_mapping("synthetic", {"amplitude": [1, 2], "train_tasks": 5})
    assert o.amplitude == (1.0, 2.0) and o.train_tasks == 5 and o.shots == 10
    with pytest.raises(ValueError, match=r"config key store.options.windw: Key 'windw' not in 'ElectricityOptions'"):
        options_from_mapping("electricity", {"source": "s", "windw": 3}, "store.options")
    with pytest.raises(ValueError, match="config key options.source: .*missing"):
        options_from_mapping("ptb-char", {})
    with pytest.raises(ValueError, match="config key options.window: .*'a week'"):
        options_from_mapping("electricity", {"source": "s", "window": "a week"})


# --------------------------------------------------------------------------------------------- real data


@needs_data
def test_real_uci_test_week():
    src = DATA / "electricity" / "uci_electricity_2014_03_31_tagi"
    b = elec_build(src)
    tasks = list(b.tasks())
    assert len(tasks) == 370 and b.settings["series_per_split"] == {"train": 259, "val": 37, "test": 74}
    raw_test = np.loadtxt(src / "electricity_2014_03_31_test.csv", delimiter=",")
    test = [t for t in tasks if t["split"] == "test"]
    for t in test[:5]:
        j = int(t["entity"][3:]) - 1
        assert t["forecast_start"] == "2014-03-31T00:00:00" and len(t["query_y"]) == 7
        day0 = unscale(t["query_y"][0], t["offset"], t["scale"])
        assert np.allclose(day0, raw_test[:24, j], rtol=1e-5, atol=1e-3)
    assert all(t["forecast_start"] == "2014-03-30T00:00:00" for t in tasks if t["split"] != "test")
    assert not {t["entity"] for t in test} & {t["entity"] for t in tasks if t["split"] == "train"}


@needs_data
def test_real_gefcom_small_store(tmp_path):
    out = tmp_path / "gef"
    src = DATA / "electricity" / "gefcom2012_load"
    assert cli_main(["tasks", "build", "electricity", "--out", str(out), "--source", str(src),
                     "--max-tasks-per-split", "3"]) == 0
    m = read_manifest(str(out))
    assert m["counts"] == {"train": 3, "val": 3, "test": 3} and m["builder"]["layout"] == "gefcom"
    assert m["builder"]["series_per_split"] == {"train": 14, "val": 2, "test": 4}
    tasks = read_tasks(str(out), "test")
    batch = collate(tasks)
    assert tuple(batch.support.x.shape) == (3, 8, 168, 5) and torch.isfinite(batch.query.y).all()


@needs_data
def test_real_uci_history_episodes_and_gefcom_extra(tmp_path):
    out = tmp_path / "elec"
    src, gef = DATA / "electricity" / "uci_electricity_2014_03_31_tagi", DATA / "electricity" / "gefcom2012_load"
    assert cli_main(["tasks", "build", "electricity", "--out", str(out), "--source", str(src), "--layout", "uci",
                     "--history-episodes", "3", "--extra-train-source", str(gef), "--extra-max-tasks", "140"]) == 0
    m = read_manifest(str(out))
    assert m["counts"] == {"train": 259 * 3 + 140, "val": 37 * 3, "test": 74}
    assert m["builder"]["dst_masked_at"] == [DST] and m["builder"]["extra_train"]["tasks"] == 140
    train = read_tasks(str(out), "train")
    weekday = {t["task_id"]: int(np.datetime64(t["forecast_start"], "D").astype(int) + 3) % 7 for t in train}
    uci_days = {weekday[t["task_id"]] for t in train if t["entity"].startswith("MT_")}
    assert uci_days == {4, 5, 6}  # Fri, Sat, Sun (Monday = 0)
    assert set(weekday.values()) == set(range(7))  # GEFCom's episodes 5 days apart fill in Mon-Thu
    sunday = [unscale(t["query_y"][0], t["offset"], t["scale"]) for t in train
              if t["forecast_start"] == "2014-03-30T00:00:00"]
    dips = [y[1] < 0.5 * min(y[0], y[2]) for y in sunday if min(y[0], y[2]) > 0]
    assert len(sunday) == 259 and sum(dips) < 0.05 * len(dips)  # the clock-change hour no longer collapses


@needs_data
def test_real_ptb_matches_official_char_files():
    texts = read_texts(DATA / "ptb_char")
    assert [t.name for t in texts] == ["ptb.train.txt", "ptb.valid.txt", "ptb.test.txt"]
    official = (DATA / "ptb_char" / "ptb.char.valid.txt").read_text().splitlines()
    for line, ref in list(zip(texts[1].lines, official))[:500]:
        assert tokenize_chars(line, spaced=False) == ref.split()
    b = ptb_build(DATA / "ptb_char", max_tasks_per_split=5)
    assert b.counts == {"train": 5, "val": 5, "test": 5}
    CharLM(len(b.vocab), 8, 8, 1).check(collate(list(b.tasks())).support, "support")


@needs_data
def test_real_mt_small():
    b = mt_build([DATA / "mt_en_de"], max_tasks_per_split=4)
    assert b.domains["train"] == ["wmt-train", "multi30k-train"] and b.counts == {"train": 4, "val": 4, "test": 4}
    assert len(find_domains([DATA / "mt_en_de"])) == 9
    tasks = list(b.tasks())
    assert {t["entity"] for t in tasks if t["split"] == "test"} == {"multi30k-test2016-flickr"}
    Seq2Seq(len(b.src_vocab), len(b.tgt_vocab), 8, 8, 1).check(collate(tasks).support, "support")
