"""English→German translation tasks: one task = ``support + query`` consecutive sentence pairs of one domain.

A domain is one line-aligned pair of files, named ``<corpus>-<part>``: Multi30k's ``{part}.{en,de}[.gz]``
(``multi30k-train``, ``multi30k-val``, ``multi30k-test2016-flickr``, ...) and the OpenNMT WMT sample's
``{src,tgt}-{part}.txt`` (``wmt-train`` = mixed WMT training corpora, ``wmt-val``, ``wmt-test`` = newstest
sets). The corpus name comes from the folder (``multi30k``, ``wmt``, or the folder's name). Splits are by
domain (``--train-domains`` / ``--val-domains`` / ``--test-domains``), so no test sentence is ever in a
training task.

Tokens: :func:`metalstm.vocab.tokenize_words` (HTML entities unescaped, lowercased, words and punctuation
marks). Source and target vocabularies are built from the TRAINING tasks only, capped by ``--vocab-size``
(most frequent first, the rest → UNK). Layout: ``x = source ids + [EOS]``, ``y = target ids + [EOS]``; pairs
with an empty side or a side longer than ``--max-len`` (EOS included) are dropped.
"""

from __future__ import annotations

import argparse
import gzip
import logging
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from metalstm.data import EOS
from metalstm.vocab import Vocab, tokenize_words

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
DEFAULT_DOMAINS = {"train": ("wmt-train", "multi30k-train"), "val": ("multi30k-val",),
                   "test": ("multi30k-test2016-flickr",)}


@dataclass
class Domain:
    name: str
    src_path: Path
    tgt_path: Path


@dataclass(kw_only=True)
class MTOptions:
    """``metalstm tasks build mt-en-de`` options (the module docstring explains them)."""

    source: list[str | Path]  # folders of parallel files, each searched one level deep
    train_domains: list[str] | None = None  # None: those of DEFAULT_DOMAINS the sources have
    val_domains: list[str] | None = None
    test_domains: list[str] | None = None
    support_pairs: int = 5
    query_pairs: int | None = None  # None: pairs_per_task - support_pairs, else 10
    pairs_per_task: int | None = None  # support + query pairs, a check on the two
    vocab_size: int = 8000  # cap on each vocabulary, special tokens included
    min_count: int = 1
    max_len: int = 64  # pairs with a side longer than this (EOS included) are dropped
    src_lang: str = "en"
    tgt_lang: str = "de"
    max_tasks_per_split: int | None = None


OPTIONS = MTOptions


def _read_lines(path: Path) -> list[str]:
    try:
        data = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
        return data.decode("utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: cannot read as UTF-8 text ({e})") from e


def _corpus_name(folder: Path) -> str:
    name = folder.name.lower()
    for known in ("multi30k", "wmt"):
        if known in name:
            return known
    return re.sub(r"[^a-z0-9]+", "-", name).strip("-") or "corpus"


def _part_name(part: str) -> str:
    """``test_2016_flickr`` → ``test2016-flickr``."""
    return re.sub(r"[^a-z0-9]+", "-", re.sub(r"(test|val|train)_(\d)", r"\1\2", part.lower())).strip("-")


def find_domains(sources: list[str | Path], *, src_lang: str = "en", tgt_lang: str = "de") -> dict[str, Domain]:
    """Line-aligned file pairs under ``sources`` (folders, searched one level deep) as named domains."""
    folders: list[Path] = []
    for s in sources:
        p = Path(s)
        if not p.exists():
            raise FileNotFoundError(f"{p}: mt-en-de source not found")
        if not p.is_dir():
            raise ValueError(f"{p}: expected a folder of parallel files (Multi30k or OpenNMT layout)")
        folders.append(p)
        folders.extend(sorted(q for q in p.iterdir() if q.is_dir()))
    out: dict[str, Domain] = {}
    for folder in folders:
        corpus = _corpus_name(folder)
        for src in sorted(folder.iterdir()):
            m30k = re.fullmatch(rf"(.+)\.{re.escape(src_lang)}(\.gz)?", src.name)
            onmt = re.fullmatch(r"src-(.+)\.txt", src.name)
            if m30k:
                part, tgt = m30k.group(1), src.with_name(f"{m30k.group(1)}.{tgt_lang}{m30k.group(2) or ''}")
            elif onmt:
                part, tgt = onmt.group(1), src.with_name(f"tgt-{onmt.group(1)}.txt")
            else:
                continue
            if not tgt.exists():
                raise FileNotFoundError(f"{tgt}: the target side of {src} is missing")
            name = f"{corpus}-{_part_name(part)}"
            if name in out:
                raise ValueError(f"domain {name!r}: found twice ({out[name].src_path} and {src})")
            out[name] = Domain(name, src, tgt)
    if not out:
        raise ValueError(f"{[str(s) for s in sources]}: no parallel files (*.{src_lang}[.gz] + *.{tgt_lang}[.gz], or "
                         f"src-*.txt + tgt-*.txt)")
    return out


def read_pairs(domain: Domain, max_len: int, limit: int | None = None) -> tuple[list[tuple[list[str], list[str]]], int]:
    """Tokenised pairs of a domain (the first ``limit`` kept) and how many were dropped (an empty side, or a
    side longer than ``max_len``)."""
    src, tgt = _read_lines(domain.src_path), _read_lines(domain.tgt_path)
    if len(src) != len(tgt):
        raise ValueError(f"{domain.src_path} has {len(src)} lines but {domain.tgt_path} has {len(tgt)}; "
                         f"parallel files must be line-aligned")
    pairs, dropped = [], 0
    for s, t in zip(src, tgt):
        if limit is not None and len(pairs) >= limit:
            break
        a, b = tokenize_words(s), tokenize_words(t)
        if not a or not b or len(a) + 1 > max_len or len(b) + 1 > max_len:
            dropped += 1
            continue
        pairs.append((a, b))
    return pairs, dropped


def _domain_list(text: str | list[str] | tuple[str, ...] | None) -> list[str] | None:
    if text is None:
        return None
    items = text.split(",") if isinstance(text, str) else list(text)
    return [d.strip() for d in items if d.strip()]


def _query_pairs(o: MTOptions) -> int:
    """``query_pairs``, or ``pairs_per_task - support_pairs``, else 10; a mismatch of the three is an error."""
    query_pairs = o.query_pairs
    if o.pairs_per_task is not None:
        if query_pairs is None:
            query_pairs = o.pairs_per_task - o.support_pairs
        if o.pairs_per_task != o.support_pairs + query_pairs:
            raise ValueError(f"pairs_per_task: {o.pairs_per_task} != support_pairs {o.support_pairs} + "
                             f"query_pairs {query_pairs}")
    return 10 if query_pairs is None else query_pairs


def _choose_domains(available: dict[str, Domain], o: MTOptions) -> dict[str, list[str]]:
    """Each split's domains: the given ones (all must exist), else the defaults this source has; disjoint."""
    domains: dict[str, list[str]] = {}
    for split, given in (("train", o.train_domains), ("val", o.val_domains), ("test", o.test_domains)):
        names = _domain_list(given)
        if names is None:
            names = [d for d in DEFAULT_DOMAINS[split] if d in available]
        unknown = [d for d in names if d not in available]
        if unknown:
            raise ValueError(f"{split}_domains: unknown domain(s) {unknown}; available: {sorted(available)}")
        domains[split] = names
    if not domains["train"]:
        raise ValueError(f"train_domains: none chosen and none of the defaults {list(DEFAULT_DOMAINS['train'])} "
                         f"exist; available: {sorted(available)}")
    used = [d for s in SPLITS for d in domains[s]]
    if len(used) != len(set(used)):
        dup = sorted({d for d in used if used.count(d) > 1})
        raise ValueError(f"domains: {dup} assigned to more than one split")
    return domains


class MTBuild:
    """Finds the domains, reads and tokenises the chosen ones, plans tasks, builds train-only vocabularies."""

    def __init__(self, options: MTOptions) -> None:
        o = options
        support_pairs, query_pairs, max_len, limit = o.support_pairs, _query_pairs(o), o.max_len, o.max_tasks_per_split
        if support_pairs < 1 or query_pairs < 1:
            raise ValueError(f"support_pairs/query_pairs: must be >= 1, got {support_pairs}/{query_pairs}")
        if max_len < 2:
            raise ValueError(f"max_len: must be >= 2, got {max_len}")
        if limit is not None and limit < 1:
            raise ValueError(f"max_tasks_per_split: must be >= 1, got {limit}")
        sources = [o.source] if isinstance(o.source, (str, Path)) else list(o.source)
        self.sources = [str(s) for s in sources]
        self.available = find_domains(sources, src_lang=o.src_lang, tgt_lang=o.tgt_lang)
        self.domains = _choose_domains(self.available, o)
        self.support_pairs, self.query_pairs, self.max_len = support_pairs, query_pairs, max_len
        self.max_tasks_per_split, self.src_lang, self.tgt_lang = limit, o.src_lang, o.tgt_lang
        k = support_pairs + query_pairs
        pairs_limit = None if limit is None else limit * k  # enough pairs for the kept tasks of a domain
        self.dropped: dict[str, int] = {}
        self.plan: dict[str, list[tuple[str, int, list]]] = {}  # split -> [(domain, index, pairs)]
        for split in SPLITS:
            per_domain = []
            for name in self.domains[split]:
                pairs, self.dropped[name] = read_pairs(self.available[name], max_len, pairs_limit)
                per_domain.append([(name, i // k, pairs[i : i + k]) for i in range(0, len(pairs) - k + 1, k)])
                log.info("mt-en-de: %s: %d pairs (%d dropped) -> %d tasks", name, len(pairs), self.dropped[name],
                         len(per_domain[-1]))
            # interleave the domains so a --max-tasks-per-split store still mixes them
            merged = [t for group in _round_robin(per_domain) for t in group]
            self.plan[split] = merged[:limit] if limit else merged
        if not self.plan["train"]:
            raise ValueError(f"train_domains {self.domains['train']}: no complete task of {k} pairs")
        train_pairs = [p for _, _, pairs in self.plan["train"] for p in pairs]
        self.src_vocab = Vocab.build((s for s, _ in train_pairs), tokenizer="words", max_size=o.vocab_size,
                                     min_count=o.min_count)
        self.tgt_vocab = Vocab.build((t for _, t in train_pairs), tokenizer="words", max_size=o.vocab_size,
                                     min_count=o.min_count)
        self.counts = {s: len(self.plan[s]) for s in SPLITS}

    @property
    def vocab(self) -> dict[str, Any]:
        return {"src": self.src_vocab.tokens, "tgt": self.tgt_vocab.tokens, "tokenizer": "words"}

    @property
    def features(self) -> dict[str, Any]:
        return {"src_vocab_size": len(self.src_vocab), "tgt_vocab_size": len(self.tgt_vocab), "tokenizer": "words",
                "src_lang": self.src_lang, "tgt_lang": self.tgt_lang, "max_len": self.max_len,
                "support_pairs": self.support_pairs, "query_pairs": self.query_pairs}

    @property
    def settings(self) -> dict[str, Any]:
        return {"sources": self.sources, "domains": self.domains,
                "files": {d: [str(self.available[d].src_path), str(self.available[d].tgt_path)]
                          for s in SPLITS for d in self.domains[s]},
                "dropped_pairs": self.dropped, "max_len": self.max_len, "tasks": self.counts,
                "max_tasks_per_split": self.max_tasks_per_split}

    def _encode(self, pairs: list) -> tuple[list[np.ndarray], list[np.ndarray]]:
        xs = [np.asarray([*self.src_vocab.encode(s), EOS], np.int32) for s, _ in pairs]
        ys = [np.asarray([*self.tgt_vocab.encode(t), EOS], np.int32) for _, t in pairs]
        return xs, ys

    def tasks(self) -> Iterator[dict]:
        n = 0
        for split in SPLITS:
            for domain, index, pairs in self.plan[split]:
                sx, sy = self._encode(pairs[: self.support_pairs])
                qx, qy = self._encode(pairs[self.support_pairs :])
                yield {"task_id": f"{domain}/{index:05d}", "entity": domain, "split": split,
                       "support_x": sx, "support_y": sy, "query_x": qx, "query_y": qy}
                n += 1
                if n % 1000 == 0:
                    log.info("mt-en-de: %d/%d tasks", n, sum(self.counts.values()))


def _round_robin(groups: list[list]) -> Iterator[list]:
    for i in range(max((len(g) for g in groups), default=0)):
        yield [g[i] for g in groups if i < len(g)]


def add_options(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("mt-en-de")
    g.add_argument("--source", action="append", required=True,
                   help="folder of parallel files (Multi30k *.en.gz/*.de.gz or OpenNMT src-*/tgt-*), searched one "
                        "level deep; repeatable")
    g.add_argument("--train-domains", type=_domain_list,
                   help=f"comma-separated (default: {','.join(DEFAULT_DOMAINS['train'])})")
    g.add_argument("--val-domains", type=_domain_list,
                   help=f"comma-separated (default: {','.join(DEFAULT_DOMAINS['val'])})")
    g.add_argument("--test-domains", type=_domain_list,
                   help=f"comma-separated (default: {','.join(DEFAULT_DOMAINS['test'])})")
    g.add_argument("--support-pairs", type=int, help="support sentence pairs per task")
    g.add_argument("--query-pairs", type=int, help="query sentence pairs per task (default 10, or pairs-per-task "
                   "minus support-pairs)")
    g.add_argument("--pairs-per-task", type=int, help="support + query pairs per task")
    g.add_argument("--vocab-size", type=int, help="cap on each vocabulary, special tokens included")
    g.add_argument("--min-count", type=int, help="drop tokens seen fewer times in training tasks")
    g.add_argument("--max-len", type=int, help="drop pairs with a side longer than N tokens (EOS incl.)")
    g.add_argument("--src-lang", help="source language suffix of Multi30k files")
    g.add_argument("--tgt-lang", help="target language suffix of Multi30k files")
    g.add_argument("--max-tasks-per-split", type=int, help="keep the first N tasks of each split (domains interleaved)")


def build(options: MTOptions, out: str, *, overwrite: bool = False, rows_per_group: int | None = None) -> dict:
    """Read the domains, write the store to ``out`` and return its manifest."""
    from pipeline.tasks.store import write_store

    b = MTBuild(options)
    log.info("mt-en-de: domains %s, vocab src %d tgt %d, tasks %s", b.domains, len(b.src_vocab), len(b.tgt_vocab),
             b.counts)
    return write_store(out, b.tasks(), family="mt-en-de", model_kind="seq2seq", features=b.features, vocab=b.vocab,
                       builder={"name": "mt-en-de", **b.settings}, limits={"max_seq_len": b.max_len},
                       overwrite=overwrite, rows_per_group=rows_per_group)
