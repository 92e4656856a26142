"""Does one English source sentence give its domain away, and could a WMT-only model reach caption words?

The numbers behind docs/taskstore.md's MT design note. Run from the repository root:
``python3 docs/results/mt_domain_check.py`` (reads ../shared/data/mt_en_de; about 5 s).
"""

from __future__ import annotations

import collections
import gzip
import math
from pathlib import Path

DATA = Path("../shared/data/mt_en_de")


def sentences(path: Path) -> list[list[str]]:
    """Lower-cased whitespace tokens of each non-empty line (gzip or plain text)."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as f:
        return [line.strip().lower().split() for line in f if line.strip()]


def domain_accuracy() -> None:
    """A unigram naive-Bayes domain classifier fit on training sources, scored on each domain's test sources."""
    train = {"wmt": sentences(DATA / "wmt14_opennmt_sample/src-train.txt"),
             "multi30k": sentences(DATA / "multi30k/train.en.gz")}
    test = {"wmt": sentences(DATA / "wmt14_opennmt_sample/src-test.txt"),
            "multi30k": sentences(DATA / "multi30k/test_2016_flickr.en.gz")}
    counts = {d: collections.Counter(w for s in ss for w in s) for d, ss in train.items()}
    vocab = len(set().union(*counts.values()))
    totals = {d: sum(c.values()) for d, c in counts.items()}

    def score(sentence: list[str], d: str) -> float:
        return math.log(len(train[d])) + sum(math.log((counts[d][w] + 1) / (totals[d] + vocab)) for w in sentence)

    for d, ss in test.items():
        right = sum(max(train, key=lambda e, s=s: score(s, e)) == d for s in ss)
        print(f"{d}: {right}/{len(ss)} test sources classified to their own domain ({100 * right / len(ss):.1f} %)")


def caption_oov(vocab_size: int = 4000) -> None:
    """Share of Multi30k test-2016 German tokens outside the WMT sample's most frequent target words."""
    counts = collections.Counter(w for s in sentences(DATA / "wmt14_opennmt_sample/tgt-train.txt") for w in s)
    top = {w for w, _ in counts.most_common(vocab_size)}
    refs = sentences(DATA / "multi30k/test_2016_flickr.de.gz")
    tokens = sum(len(s) for s in refs)
    outside = sum(w not in top for s in refs for w in s)
    print(f"Multi30k test 2016 German tokens outside the WMT-sample top-{vocab_size} target vocabulary: "
          f"{100 * outside / tokens:.1f} %")


if __name__ == "__main__":
    domain_accuracy()
    caption_oov()
