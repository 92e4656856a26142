"""Character-level language-modelling tasks from Penn Treebank (or any line-per-sentence text).

A task is a contiguous run of ``--sentences-per-task`` sentences (lines) of one text: the first
``--support-sentences`` are the support set, the rest the query set, each sentence one sequence
``x = [BOS] + chars``, ``y = chars + [EOS]`` (next-character targets, same length). Sentences longer than
``--max-len`` are split into consecutive pieces of at most ``--max-len`` steps (not dropped); a piece after
the first starts mid-sentence, without BOS.

Characters follow the PTB convention (:func:`metalstm.vocab.tokenize_chars`): a word's letters, ``_`` between
words. The vocabulary is the four special tokens then the characters of the TRAIN text, sorted; characters
only seen in valid/test map to UNK.

Sources (``--source``): ``ptb.zip`` (or a folder holding it) with ``ptb.{train,valid,test}.txt``; a folder
of ``*train*``/``*valid*``/``*test*`` text files (word or ``ptb.char.*`` character format); or one text file,
cut into train/val/test by task order (the last ``--test-fraction`` of tasks are test, the ones before them
val).
"""

from __future__ import annotations

import argparse
import itertools
import logging
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from metalstm.data import SPECIAL_TOKENS, sentence_pieces
from metalstm.vocab import WORD_BOUNDARY, Vocab, is_spaced_chars, tokenize_chars

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
_SPLIT_KEYS = {"train": ("train",), "val": ("valid", "val"), "test": ("test",)}
TEXT_FORMATS = ("auto", "words", "chars")


@dataclass
class Text:
    """One text: its name (for task ids/entities), split and lines (raw)."""

    name: str
    split: str
    lines: list[str]
    spaced: bool  # lines are in "c h a r _ f o r m a t"


@dataclass(kw_only=True)
class PTBOptions:
    """``metalstm tasks build ptb-char`` options (the module docstring explains them)."""

    source: str | Path  # ptb.zip, a folder of train/valid/test text files, or one text file
    sentences_per_task: int = 20
    support_sentences: int = 5  # the first N sentences of a task are its support set
    max_len: int = 256  # sentences are split into pieces of at most N steps
    text_format: str = "auto"  # auto | words | chars
    val_fraction: float = 0.1  # single-file source: share of val tasks
    test_fraction: float = 0.1  # single-file source: share of test tasks
    max_tasks_per_split: int | None = None


OPTIONS = PTBOptions


def _split_of(name: str) -> str | None:
    stem = Path(name).name.lower()
    for split, keys in _SPLIT_KEYS.items():
        if any(f".{k}." in f".{stem}." or f"_{k}." in stem or f"-{k}." in stem or stem.startswith(f"{k}.")
               for k in keys):
            return split
    return None


def _is_spaced(name: str, lines: list[str], text_format: str) -> bool:
    if text_format != "auto":
        return text_format == "chars"
    if "char" in Path(name).name.lower():
        return True
    sample = [ln for ln in lines[:50] if ln.strip()]
    return bool(sample) and all(is_spaced_chars(ln) for ln in sample)


def _decode(data: bytes, where: str) -> list[str]:
    try:
        return data.decode("utf-8").splitlines()
    except UnicodeDecodeError as e:
        raise ValueError(f"{where}: not UTF-8 text ({e})") from e


def read_texts(source: str | Path, *, text_format: str = "auto") -> list[Text]:
    """The texts of a source, each tagged with its split (a single file is tagged ``"all"``)."""
    if text_format not in TEXT_FORMATS:
        raise ValueError(f"text_format: expected one of {list(TEXT_FORMATS)}, got {text_format!r}")
    source = Path(source)
    if not source.exists():
        raise FileNotFoundError(f"{source}: ptb-char source not found")
    if source.is_dir():
        zips = sorted(source.glob("*.zip"))
        txts = sorted(p for p in source.iterdir() if p.is_file() and p.suffix == ".txt" and _split_of(p.name))
        by_split: dict[str, list[Path]] = {}
        for p in txts:
            by_split.setdefault(_split_of(p.name), []).append(p)
        if "train" not in by_split and len(zips) == 1:
            return read_texts(zips[0], text_format=text_format)
        missing = [s for s in SPLITS if s not in by_split]
        if missing:
            raise ValueError(f"{source}: no text file for split(s) {missing} (expected names containing "
                             f"train / valid / test, or one ptb.zip)")
        out = []
        for split in SPLITS:
            # ptb.char.* (official char files) and ptb.* (word files) hold the same text; prefer the char file
            p = sorted(by_split[split], key=lambda q: ("char" not in q.name.lower(), q.name))[0]
            lines = _decode(p.read_bytes(), str(p))
            out.append(Text(p.name, split, lines, _is_spaced(p.name, lines, text_format)))
        return out
    if source.suffix == ".zip":
        with zipfile.ZipFile(source) as zf:
            members = {}
            for name in zf.namelist():
                if name.startswith("__MACOSX") or name.endswith("/") or not _split_of(name):
                    continue
                members.setdefault(_split_of(name), name)
            missing = [s for s in SPLITS if s not in members]
            if missing:
                raise ValueError(f"{source}: no member for split(s) {missing} (members: {zf.namelist()[:10]})")
            out = []
            for split in SPLITS:
                lines = _decode(zf.read(members[split]), f"{source}:{members[split]}")
                out.append(Text(Path(members[split]).name, split, lines,
                                _is_spaced(members[split], lines, text_format)))
            return out
    with open(source, "rb") as f:
        lines = _decode(f.read(), str(source))
    return [Text(source.name, "all", lines, _is_spaced(source.name, lines, text_format))]


class PTBBuild:
    """Reads the texts and builds the train-only character vocabulary; :meth:`tasks` yields task records."""

    def __init__(self, options: PTBOptions) -> None:
        o = options
        if o.sentences_per_task < 2:
            raise ValueError(f"sentences_per_task: must be >= 2 (support + query), got {o.sentences_per_task}")
        if not 1 <= o.support_sentences < o.sentences_per_task:
            raise ValueError(f"support_sentences: must be in [1, sentences_per_task={o.sentences_per_task}), "
                             f"got {o.support_sentences}")
        if o.max_len < 2:
            raise ValueError(f"max_len: must be >= 2, got {o.max_len}")
        limit = o.max_tasks_per_split
        if limit is not None and limit < 1:
            raise ValueError(f"max_tasks_per_split: must be >= 1, got {limit}")
        self.source = Path(o.source)
        self.sentences_per_task, self.support_sentences = o.sentences_per_task, o.support_sentences
        self.max_len, self.max_tasks_per_split = o.max_len, limit
        self.texts = read_texts(self.source, text_format=o.text_format)
        # (split, text, first line, sentences as token lists) per task, in text order
        self.plan: list[tuple[str, Text, int, list[list[str]]]] = []
        for text in self.texts:
            chunks = self._chunk(text)
            if limit is not None and len(self.texts) > 1:
                chunks = itertools.islice(chunks, limit)
            self.plan.extend(chunks)
        if len(self.texts) == 1:
            self._assign_fractions(o.val_fraction, o.test_fraction)
        if limit is not None:
            seen = dict.fromkeys(SPLITS, 0)
            keep = []
            for item in self.plan:
                if seen[item[0]] < limit:
                    seen[item[0]] += 1
                    keep.append(item)
            self.plan = keep
        train_chars = {c for split, _, _, sents in self.plan if split == "train" for s in sents for c in s}
        if not train_chars:
            raise ValueError(f"{self.source}: the train text has no characters")
        # the boundary is a symbol even if a train text were one word per line
        self.vocab = Vocab([*SPECIAL_TOKENS, *sorted(train_chars | {WORD_BOUNDARY})], tokenizer="ptb-chars")
        self.counts = {s: sum(item[0] == s for item in self.plan) for s in SPLITS}

    def _chunk(self, text: Text) -> Iterator[tuple[str, Text, int, list[list[str]]]]:
        """Blocks of ``sentences_per_task`` non-blank lines, tokenised lazily (a small store reads little)."""
        block: list[tuple[int, list[str]]] = []
        for i, line in enumerate(text.lines):
            sent = tokenize_chars(line, spaced=text.spaced)
            if not sent:  # blank lines are not sentences
                continue
            block.append((i, sent))
            if len(block) == self.sentences_per_task:
                yield text.split, text, block[0][0], [s for _, s in block]
                block = []
        if len(block) > self.support_sentences:  # a short final block still needs one query sentence
            yield text.split, text, block[0][0], [s for _, s in block]

    def _assign_fractions(self, val_fraction: float, test_fraction: float) -> None:
        for name, frac in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
            if not 0.0 <= frac < 1.0:
                raise ValueError(f"{name}: must be in [0, 1), got {frac}")
        n = len(self.plan)
        n_test = max(1, round(test_fraction * n)) if test_fraction > 0 else 0
        n_val = max(1, round(val_fraction * n)) if val_fraction > 0 else 0
        if n_test + n_val >= n:
            raise ValueError(f"{self.texts[0].name}: {n} tasks are too few for {n_val} val + {n_test} test tasks "
                             f"and at least one train task")
        splits = ["train"] * (n - n_val - n_test) + ["val"] * n_val + ["test"] * n_test
        self.plan = [(sp, text, first, sents) for sp, (_, text, first, sents) in zip(splits, self.plan)]

    @property
    def features(self) -> dict[str, Any]:
        return {"vocab_size": len(self.vocab), "tokenizer": "ptb-chars", "word_boundary": WORD_BOUNDARY,
                "max_len": self.max_len, "sentences_per_task": self.sentences_per_task,
                "support_sentences": self.support_sentences}

    @property
    def settings(self) -> dict[str, Any]:
        return {"source": str(self.source), "texts": {t.name: t.split for t in self.texts},
                "sentences_per_task": self.sentences_per_task, "support_sentences": self.support_sentences,
                "max_len": self.max_len, "max_tasks_per_split": self.max_tasks_per_split, "tasks": self.counts}

    def tasks(self) -> Iterator[dict]:
        """Task records in text order; each sentence contributes one or more ``(x, y)`` pieces."""
        for n, (split, text, first, sents) in enumerate(self.plan):
            sides: dict[str, tuple[list[np.ndarray], list[np.ndarray]]] = {"support": ([], []), "query": ([], [])}
            for j, sent in enumerate(sents):
                xs, ys = sides["support" if j < self.support_sentences else "query"]
                for x, y in sentence_pieces(self.vocab.encode(sent), self.max_len):
                    xs.append(x)
                    ys.append(y)
            span = f"{text.name}:{first + 1}"
            yield {"task_id": f"{split}/{span}", "entity": span, "split": split,
                   "support_x": sides["support"][0], "support_y": sides["support"][1],
                   "query_x": sides["query"][0], "query_y": sides["query"][1]}
            if (n + 1) % 500 == 0:
                log.info("ptb-char: %d/%d tasks", n + 1, len(self.plan))


def add_options(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("ptb-char")
    g.add_argument("--source", required=True, help="ptb.zip, a folder of train/valid/test text files, or one file")
    g.add_argument("--sentences-per-task", type=int, help="contiguous sentences per task")
    g.add_argument("--support-sentences", type=int, help="the first N sentences are the support set")
    g.add_argument("--max-len", type=int, help="split sentences into pieces of at most N steps")
    g.add_argument("--text-format", choices=TEXT_FORMATS,
                   help="words (plain text) or chars (ptb.char.* format); auto: by file name and content")
    g.add_argument("--val-fraction", type=float, help="single-file source: share of val tasks")
    g.add_argument("--test-fraction", type=float, help="single-file source: share of test tasks")
    g.add_argument("--max-tasks-per-split", type=int, help="keep the first N tasks of each split")


def build(options: PTBOptions, out: str, *, overwrite: bool = False, rows_per_group: int | None = None) -> dict:
    """Read the texts, write the store to ``out`` and return its manifest."""
    from pipeline.tasks.store import write_store

    b = PTBBuild(options)
    log.info("ptb-char: %s, vocab %d, tasks %s", {t.name: t.split for t in b.texts}, len(b.vocab), b.counts)
    return write_store(out, b.tasks(), family="ptb-char", model_kind="char_lm", features=b.features,
                       vocab=b.vocab.to_dict(), builder={"name": "ptb-char", **b.settings},
                       limits={"max_seq_len": b.max_len}, overwrite=overwrite, rows_per_group=rows_per_group)
