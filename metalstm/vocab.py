"""Token vocabularies and the tokenizers the task-store builders use, shared with serving.

Serving must encode a request exactly as the builder encoded the training text, so both import the
tokenizers from here and rebuild the :class:`Vocab` from the task store's manifest (or a checkpoint's
``extra``) with :meth:`Vocab.from_dict`.

Two tokenizers:

- ``"ptb-chars"``: characters, with ``_`` as the word boundary (the Penn Treebank character-level
  convention: ``' _ '.join(' '.join(word) for word in line.split())``). Plain text and text already in the
  spaced character format both tokenise to the same list.
- ``"words"``: lowercase, HTML entities unescaped (the WMT sample is escaped: ``&apos;``, ``&quot;``),
  then words and single punctuation marks as separate tokens.
"""

from __future__ import annotations

import html
import re
from collections import Counter
from collections.abc import Iterable, Sequence
from typing import Any

from metalstm.data import BOS, EOS, PAD, SPECIAL_TOKENS, UNK

WORD_BOUNDARY = "_"
_WORD_RE = re.compile(r"\w+|[^\w\s]")


def is_spaced_chars(line: str) -> bool:
    """True if ``line`` is already in PTB character format (single-character tokens separated by spaces)."""
    parts = line.split()
    return len(parts) > 1 and WORD_BOUNDARY in parts and all(len(p) == 1 for p in parts)


def tokenize_chars(text: str, *, spaced: bool | None = None) -> list[str]:
    """PTB character tokens: each word's characters, words joined by ``_`` (no leading/trailing ``_``).

    ``spaced=None`` detects the ``"c o n s _ m a y"`` format of ``ptb.char.*.txt``; ``True``/``False`` forces it
    (a one-word line like ``"a b"`` is ambiguous, so builders pass what they know about the file).
    """
    if spaced is None:
        spaced = is_spaced_chars(text)
    if spaced:
        return text.split()
    out: list[str] = []
    for word in text.split():
        if out:
            out.append(WORD_BOUNDARY)
        out.extend(word)
    return out


def tokenize_words(text: str) -> list[str]:
    """Lowercased words and punctuation marks: ``"A man's hat."`` → ``['a', 'man', "'", 's', 'hat', '.']``."""
    return _WORD_RE.findall((html.unescape(text) if "&" in text else text).lower())


TOKENIZERS = {"ptb-chars": tokenize_chars, "words": tokenize_words}


class Vocab:
    """A token list with the four special tokens first (``PAD=0 UNK=1 BOS=2 EOS=3``); unknown tokens map to UNK."""

    def __init__(self, tokens: Sequence[str], tokenizer: str = "words") -> None:
        tokens = list(tokens)
        if tuple(tokens[: len(SPECIAL_TOKENS)]) != SPECIAL_TOKENS:
            raise ValueError(f"tokens: must start with the special tokens {list(SPECIAL_TOKENS)}, got {tokens[:4]}")
        if len(set(tokens)) != len(tokens):
            dup = sorted(t for t, c in Counter(tokens).items() if c > 1)[:5]
            raise ValueError(f"tokens: duplicates {dup}")
        if tokenizer not in TOKENIZERS:
            raise ValueError(f"tokenizer: expected one of {sorted(TOKENIZERS)}, got {tokenizer!r}")
        self.tokens = tokens
        self.tokenizer = tokenizer
        self.index = {t: i for i, t in enumerate(tokens)}

    @classmethod
    def build(cls, texts: Iterable[str | Sequence[str]], *, tokenizer: str = "words", max_size: int | None = None,
              min_count: int = 1) -> Vocab:
        """Most frequent tokens first (ties by token), capped at ``max_size`` entries including the specials."""
        if max_size is not None and max_size <= len(SPECIAL_TOKENS):
            raise ValueError(f"max_size: must exceed the {len(SPECIAL_TOKENS)} special tokens, got {max_size}")
        if min_count < 1:
            raise ValueError(f"min_count: must be >= 1, got {min_count}")
        tok = TOKENIZERS[tokenizer]
        counts: Counter[str] = Counter()
        for text in texts:
            counts.update(tok(text) if isinstance(text, str) else text)
        for special in SPECIAL_TOKENS:
            counts.pop(special, None)
        ranked = sorted((t for t, c in counts.items() if c >= min_count), key=lambda t: (-counts[t], t))
        if max_size is not None:
            ranked = ranked[: max_size - len(SPECIAL_TOKENS)]
        return cls([*SPECIAL_TOKENS, *ranked], tokenizer)

    def __len__(self) -> int:
        return len(self.tokens)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Vocab) and self.tokens == other.tokens and self.tokenizer == other.tokenizer

    def __repr__(self) -> str:
        return f"Vocab(size={len(self)}, tokenizer={self.tokenizer!r})"

    def tokenize(self, text: str) -> list[str]:
        return TOKENIZERS[self.tokenizer](text)

    def encode(self, text_or_tokens: str | Sequence[str], *, bos: bool = False, eos: bool = False) -> list[int]:
        """Ids for a text (tokenised with this vocab's tokenizer) or a token list; UNK for unknown tokens."""
        tokens = self.tokenize(text_or_tokens) if isinstance(text_or_tokens, str) else text_or_tokens
        ids = [self.index.get(t, UNK) for t in tokens]
        return [BOS, *ids, EOS] if bos and eos else [BOS, *ids] if bos else [*ids, EOS] if eos else ids

    def decode(self, ids: Iterable[int], *, stop_at_eos: bool = True) -> str:
        """Text for ids: stops at EOS, skips PAD/BOS, shows UNK as ``<unk>``; chars rejoin words at ``_``."""
        out: list[str] = []
        for i in ids:
            i = int(i)
            if i == EOS and stop_at_eos:
                break
            if i in (PAD, BOS, EOS):
                continue
            out.append(self.tokens[i] if 0 <= i < len(self.tokens) else SPECIAL_TOKENS[UNK])
        if self.tokenizer == "ptb-chars":
            return "".join(" " if t == WORD_BOUNDARY else t for t in out)
        return " ".join(out)

    def to_dict(self) -> dict[str, Any]:
        return {"tokens": list(self.tokens), "tokenizer": self.tokenizer}

    @classmethod
    def from_dict(cls, d: dict[str, Any], *, tokenizer: str | None = None) -> Vocab:
        """Inverse of :meth:`to_dict`; also accepts a manifest's ``{"tokens": [...]}`` with ``tokenizer`` given."""
        if "tokens" not in d:
            raise ValueError(f"vocab: missing 'tokens' (keys: {sorted(d)})")
        return cls(d["tokens"], tokenizer or d.get("tokenizer", "words"))
