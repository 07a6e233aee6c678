"""Pure core of the corpus stage: deterministic splits and block-fitting cuts.

No I/O and no model code: a tokenizer enters only as a function ``text -> token count``
plus a function ``text -> token character spans`` so that tests can use any tokenizer.
"""

from __future__ import annotations

import bisect
import hashlib
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

SPLITS = ("train", "valid", "test")

Spans = Callable[[str], Sequence[tuple[int, int]]]
"""``text -> [(start, end), ...]`` character spans of the tokens (no special tokens)."""


def split_of(doc_id: str, valid_fraction: float, test_fraction: float, salt: str = "") -> str:
    """Split of a document from a stable hash of its id (not of its position or text).

    Adding, removing or reordering other documents never moves this one, and all chunks
    cut from one document share its split (no train/test leakage inside a document).
    """
    h = hashlib.sha256(f"{salt}\0{doc_id}".encode()).digest()
    u = int.from_bytes(h[:8], "big") / 2**64  # uniform in [0, 1)
    if u < test_fraction:
        return "test"
    if u < test_fraction + valid_fraction:
        return "valid"
    return "train"


@dataclass(frozen=True)
class Fitter:
    """A tokenizer as the cutter sees it: spans of its tokens and its special-token overhead."""

    name: str
    spans: Spans
    n_special: int = 0  # tokens the model adds per sequence (BOS/EOS)


_BREAKS = (
    re.compile(r"\n\s*\n"),
    re.compile(r"\n"),
    re.compile(r"(?<=[.!?;:])\s"),
    re.compile(r"\s"),
)


def _snap_back(text: str, lo: int, hi: int) -> int:
    """Largest natural break point in ``(lo, hi]``: paragraph, line, sentence, word.

    Falls back to ``hi`` (texts without spaces, e.g. CJK). The break goes *after* the
    whitespace so each chunk starts with a new word, not with the separator.
    """
    window = text[lo:hi]
    # Only look at the last half of the window: a break too early wastes the block.
    floor = (hi - lo) // 2
    for pat in _BREAKS:
        best = None
        for m in pat.finditer(window):
            if m.end() > floor:
                best = m.end()
        if best is not None and lo + best < hi + 1:
            return lo + best
    return hi


def _limit(
    spans: Sequence[tuple[int, int]], starts: list[int], pos: int, budget: int
) -> int | None:
    """Character position where a chunk beginning at ``pos`` runs out of ``budget`` tokens."""
    i0 = bisect.bisect_right(starts, pos - 1)  # first token starting at or after pos
    # A token straddling pos (starts before, ends after) will be re-tokenized inside the
    # chunk: count it as one more token.
    if i0 > 0 and spans[i0 - 1][1] > pos:
        i0 -= 1
    if i0 + budget >= len(spans):
        return None
    return max(spans[i0 + budget][0], pos + 1)


def cut_spans(text: str, fitters: Sequence[Fitter], block_size: int) -> list[tuple[int, int]]:
    """Cut ``text`` into consecutive ``[start, end)`` spans that every fitter tokenizes
    into at most ``block_size`` tokens (special tokens included).

    Properties: the spans tile the text exactly (their concatenation is ``text``), are in
    order, and each one fits every fitter. The cut points prefer paragraph, line,
    sentence and word breaks. Cost: one tokenization of the text plus one of each chunk
    per fitter (a cut that does not fit after re-tokenization is moved back and retried).
    """
    if not text:
        return []
    tokenized = []
    for f in fitters:
        spans = list(f.spans(text))
        tokenized.append((f, spans, [s for s, _ in spans]))
    out: list[tuple[int, int]] = []
    pos = 0
    while pos < len(text):
        end = len(text)
        for f, spans, starts in tokenized:
            budget = block_size - f.n_special
            if budget < 1:
                raise ValueError(
                    f"block_size {block_size} leaves no room after {f.name}'s special tokens"
                )
            lim = _limit(spans, starts, pos, budget)
            if lim is not None:
                end = min(end, lim)
        if end < len(text):
            end = _snap_back(text, pos, end)
        # Re-tokenizing a chunk can differ from the whole-text tokenization at its edges;
        # shrink until every fitter agrees that the chunk fits.
        while end - pos > 1 and not all(
            len(f.spans(text[pos:end])) + f.n_special <= block_size for f in fitters
        ):
            end = pos + max(1, (end - pos) * 9 // 10)
        out.append((pos, end))
        pos = end
    return out
