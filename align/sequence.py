"""Sequence alignment of two tokenizations of the same text.

Semantics (DESIGN.md): the distribution at position ``i`` predicts token ``i+1``, so a
source distribution belongs at the target position whose *context ends at the same
character*. With character offsets that is a merge of two sorted lists of boundaries:
linear time (:func:`align_offsets`). The paper's MinED dynamic-programming alignment over
token strings (:func:`align_dp`) is kept for tokenizers without offsets and as the
reference in tests.

Boundaries are normalised first: byte-level BPE splits a multi-byte character into
several tokens that all carry the character's span, so only the *last* token of a run of
equal ends closes a context; special tokens with a ``(0, 0)`` span take the end of what
precedes them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

NONE, ONE_ONE, MANY_ONE, ONE_MANY = 0, 1, 2, 3
RELATIONS = {NONE: "none", ONE_ONE: "1:1", MANY_ONE: "many:1", ONE_MANY: "1:many"}


@dataclass
class Alignment:
    """For each of the ``T`` target positions: the source position whose distribution
    belongs there (``src_pos``, -1 = none) and the structural relation of the tokens."""

    src_pos: np.ndarray  # int64 [T]
    relation: np.ndarray  # int8 [T], codes in RELATIONS

    @property
    def aligned_fraction(self) -> float:
        return float((self.src_pos >= 0).mean()) if len(self.src_pos) else 1.0

    def counts(self) -> dict[str, int]:
        return {name: int((self.relation == code).sum()) for code, name in RELATIONS.items()}


def context_ends(offsets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per token: the character where its context ends, and whether it closes a context.

    ``offsets`` int ``[N, 2]``. A token closes a context unless the next token ends at the
    same character (byte pieces of one character, or zero-width tokens).
    """
    offsets = np.asarray(offsets, dtype=np.int64).reshape(-1, 2)
    ends = np.maximum.accumulate(offsets[:, 1]) if len(offsets) else np.zeros(0, np.int64)
    closes = np.ones(len(ends), dtype=bool)
    closes[:-1] = ends[1:] != ends[:-1]
    return ends, closes


def _context_keys(
    offsets: np.ndarray, nbytes: np.ndarray | None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per token: a key identifying where its context ends, whether it closes a character
    boundary, and its context end in characters.

    Closing tokens have key ``(end, 0)``. With per-token byte lengths, a byte piece inside
    a character gets ``(end, bytes still to come before the character closes)``: two byte
    pieces whose contexts end at the same byte of the same character get equal keys.
    Without byte lengths, byte pieces get no key (-1).
    """
    ends, closes = context_ends(offsets)
    n = len(ends)
    key = np.full(n, -1, dtype=np.int64)
    if not n:
        return key, closes, ends
    shift = np.int64(1 << 20)  # bytes remaining in a run stay far below 2**20
    key[closes] = ends[closes] * shift
    if nbytes is not None and not closes.all():
        closer_idx = np.flatnonzero(closes)
        closer = closer_idx[np.searchsorted(closer_idx, np.arange(n))]
        cs = np.cumsum(np.asarray(nbytes, dtype=np.int64))
        remaining = cs[closer] - cs
        part = ~closes
        key[part] = ends[part] * shift + remaining[part]
    return key, closes, ends


def align_offsets(
    src_offsets: np.ndarray,
    tgt_offsets: np.ndarray,
    strict: bool = False,
    src_nbytes: np.ndarray | None = None,
    tgt_nbytes: np.ndarray | None = None,
) -> Alignment:
    """Offset-based alignment in O((S + T) log S).

    ``src_nbytes``/``tgt_nbytes`` (bytes each token contributes, from the canonical
    vocabulary) also align byte pieces of multi-byte characters whose contexts end at the
    same byte. ``strict`` also requires the next tokens to cover the same text (same
    span), i.e. the source predicts exactly the target's next token string.
    """
    src_offsets = np.asarray(src_offsets, dtype=np.int64).reshape(-1, 2)
    tgt_offsets = np.asarray(tgt_offsets, dtype=np.int64).reshape(-1, 2)
    both = src_nbytes is not None and tgt_nbytes is not None
    s_key, s_close, s_end = _context_keys(src_offsets, src_nbytes if both else None)
    t_key, t_close, t_end = _context_keys(tgt_offsets, tgt_nbytes if both else None)
    src_pos = np.full(len(t_key), -1, dtype=np.int64)
    valid = np.flatnonzero(s_key >= 0)
    if len(valid) and len(t_key):
        order = valid[np.argsort(s_key[valid], kind="stable")]
        sk = s_key[order]
        # the last source token with a key (zero-width tokens can repeat one)
        pos = np.searchsorted(sk, t_key, side="right") - 1
        ok = (t_key >= 0) & (pos >= 0)
        ok[ok] &= sk[pos[ok]] == t_key[ok]
        src_pos[ok] = order[pos[ok]]
    if strict and len(src_pos):
        nxt_t = np.vstack([tgt_offsets[1:], [[-1, -1]]])
        has = (src_pos >= 0) & (src_pos + 1 < len(src_offsets))
        nxt_s = np.full_like(nxt_t, -2)
        nxt_s[has] = src_offsets[src_pos[has] + 1]
        src_pos = np.where((nxt_s == nxt_t).all(1), src_pos, -1)
    rel = _relations(s_end[s_close], t_end, t_close)
    rel[(~t_close) & (src_pos >= 0)] = ONE_ONE  # byte pieces ending at the same byte
    return Alignment(src_pos, rel)


def _relations(s_cuts: np.ndarray, t_end: np.ndarray, t_close: np.ndarray) -> np.ndarray:
    """Relation of each target token to the source tokens over the same text."""
    rel = np.zeros(len(t_end), dtype=np.int8)
    if not len(t_end):
        return rel
    # A closing token's segment starts at the previous closing token's end (byte pieces
    # before it belong to the same character).
    closing_ends = t_end[t_close]
    start = np.zeros(len(t_end), dtype=np.int64)
    start[t_close] = np.concatenate([[0], closing_ends[:-1]])
    end = t_end
    s_cuts = np.concatenate([[0], s_cuts])
    in_s = lambda x: np.isin(x, s_cuts)  # noqa: E731
    lo = np.searchsorted(s_cuts, start, side="right")  # first source cut > start
    hi = np.searchsorted(s_cuts, end, side="left")  # first source cut >= end
    inner = hi - lo  # source cuts strictly inside the target token
    both = in_s(start) & in_s(end) & t_close
    rel[both & (inner == 0)] = ONE_ONE
    rel[both & (inner > 0)] = MANY_ONE
    rel[(inner == 0) & ~both & t_close & (end > start)] = ONE_MANY
    return rel


def align_dp(src_tokens: Sequence[str], tgt_tokens: Sequence[str]) -> Alignment:
    """The paper's MinED alignment: DTW over token strings with Levenshtein cost.

    The cost matrix comes from rapidfuzz; the recurrence runs over anti-diagonals
    (vectorised), so time is O(S·T) but in numpy, not Python. The path becomes an
    :class:`Alignment` by :func:`alignment_from_path`.
    """
    from rapidfuzz.distance import Levenshtein
    from rapidfuzz.process import cdist

    S, T = len(src_tokens), len(tgt_tokens)
    if S == 0 or T == 0:
        return alignment_from_path([], T)
    cost = cdist(
        list(src_tokens), list(tgt_tokens), scorer=Levenshtein.distance, dtype=np.int32, workers=-1
    ).astype(np.float64)
    D = np.full((S + 1, T + 1), np.inf)
    D[0, 0] = 0.0
    for d in range(2, S + T + 1):  # cells (i, j) with i + j = d, 1-based
        i = np.arange(max(1, d - T), min(S, d - 1) + 1)
        j = d - i
        best = np.minimum(np.minimum(D[i - 1, j - 1], D[i - 1, j]), D[i, j - 1])
        D[i, j] = cost[i - 1, j - 1] + best
    # backtrack (ties: diagonal first, then source step, then target step)
    path = []
    i, j = S, T
    while i > 0 and j > 0:
        path.append((i - 1, j - 1))
        moves = ((D[i - 1, j - 1], i - 1, j - 1), (D[i - 1, j], i - 1, j), (D[i, j - 1], i, j - 1))
        _, i, j = min(moves, key=lambda m: m[0])
    path.reverse()
    return alignment_from_path(path, T)


def alignment_from_path(path: Sequence[tuple[int, int]], T: int) -> Alignment:
    """:class:`Alignment` of ``T`` target positions from a monotone (source, target) path.

    A target token matched by one source token that matches only it is 1:1; several
    source tokens on one target token is many:1 (the last of them closes the same
    context); one source token over several target tokens is 1:many (it belongs to the
    last of them).
    """
    src_pos = np.full(T, -1, dtype=np.int64)
    rel = np.zeros(T, dtype=np.int8)
    by_t: dict[int, list[int]] = {}
    by_s: dict[int, list[int]] = {}
    for a, b in path:
        by_t.setdefault(b, []).append(a)
        by_s.setdefault(a, []).append(b)
    for b, srcs in by_t.items():
        if len(srcs) > 1:
            src_pos[b], rel[b] = srcs[-1], MANY_ONE
        elif len(by_s[srcs[0]]) == 1:
            src_pos[b], rel[b] = srcs[0], ONE_ONE
        else:
            rel[b] = ONE_MANY
            if by_s[srcs[0]][-1] == b:  # the source token's context closes at the last one
                src_pos[b] = srcs[0]
    return Alignment(src_pos, rel)
