"""Sequence alignment of two tokenizations of the same text, in bytes.

Semantics (DESIGN.md): the distribution at position ``i`` predicts token ``i+1``, so a
source distribution belongs at the target position whose *context ends at the same byte
of the text*. Three steps:

1. :func:`byte_spans`: each token's span in the text's UTF-8 bytes, from the bytes the
   token contributes (:mod:`align.vocab`), cross-checked against the text. Byte pieces of
   one character end at their own byte (not at the character's end); a token whose bytes
   are not the text's there (a normaliser changed the text, an unknown token, offsets
   that contradict the token) is *unverified* and closes no context.
2. :func:`context_keys`: the one position per context end that a distribution there
   belongs to. Zero-width tokens (BOS, EOS, ``[SEP]``, a phantom dummy-prefix ``▁``)
   share the end of what precedes them; of such a run the key goes to its last position
   (whose next token moves on through the text), except at the end of the document, where
   it goes to the last real token (a trailing EOS's own distribution predicts what comes
   after the document: it never aligns).
3. :func:`align_spans`: equal keys align; linear after the keys (both are sorted).

The paper's MinED dynamic programme over token strings (:func:`align_dp`) is kept for
reproduction; it drifts on real text, so its copies are kept only where both contexts end
at the same byte.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from align.vocab import is_text

NONE, ONE_ONE, MANY_ONE, ONE_MANY = 0, 1, 2, 3
RELATIONS = {NONE: "none", ONE_ONE: "1:1", MANY_ONE: "many:1", ONE_MANY: "1:many"}


@dataclass
class Spans:
    """Byte spans of ``N`` tokens in the UTF-8 of their text."""

    start: np.ndarray  # int64 [N]
    end: np.ndarray  # int64 [N], non-decreasing
    verified: np.ndarray  # bool [N]: the token's bytes are the text's bytes at its span

    def __len__(self) -> int:
        return len(self.end)


@dataclass
class Alignment:
    """For each of the ``T`` target positions: the source position whose distribution
    belongs there (``src_pos``, -1 = none), the structural relation of the tokens, and
    where the target context ends (``tgt_end``, bytes)."""

    src_pos: np.ndarray  # int64 [T]
    relation: np.ndarray  # int8 [T], codes in RELATIONS
    tgt_end: np.ndarray | None = None  # int64 [T]

    @property
    def aligned_fraction(self) -> float:
        return float((self.src_pos >= 0).mean()) if len(self.src_pos) else 1.0

    def counts(self) -> dict[str, int]:
        return {name: int((self.relation == code).sum()) for code, name in RELATIONS.items()}


def char_to_byte(text: str) -> np.ndarray:
    """int64 ``[len(text) + 1]``: the UTF-8 byte offset of every character offset."""
    cp = np.frombuffer(text.encode("utf-32-le", "surrogatepass"), dtype="<u4")
    width = 1 + (cp >= 0x80) + (cp >= 0x800) + (cp >= 0x10000)
    return np.concatenate([[0], np.cumsum(width, dtype=np.int64)])


def byte_spans(
    text: str, pieces: Sequence[bytes | None], offsets: np.ndarray | None = None
) -> Spans:
    """Byte spans of tokens whose bytes are ``pieces`` (canonical bytes, ``None`` or
    ``SPECIAL``-prefixed for specials) over ``text``.

    Lossless tokenizers (byte-level BPE, SentencePiece with byte fallback, with or without
    a dummy-prefix space) take a vectorised path: the pieces concatenate to the text.
    Otherwise each token is placed where the previous one ended (after skipped whitespace,
    or at its character offset from ``offsets`` int ``[N, 2]``) if its bytes are the text's
    there, a leading space in its bytes may be one the text does not have (WordPiece word
    starts, a dummy prefix); a token that fits nowhere keeps its offsets' span unverified.
    """
    data = text.encode("utf-8", "surrogatepass")
    n = len(pieces)
    width = np.array([len(p) if is_text(p) else 0 for p in pieces], dtype=np.int64)
    joined = b"".join(p for p in pieces if is_text(p))
    if joined == data or (joined[:1] == b" " and joined[1:] == data):
        if joined != data:  # a dummy-prefix space the text does not have
            width[int(np.argmax(width > 0))] -= 1
        end = np.cumsum(width)
        return Spans(end - width, end, np.ones(n, dtype=bool))
    return _byte_spans_slow(data, text, pieces, offsets)


def _byte_spans_slow(data: bytes, text: str, pieces, offsets) -> Spans:
    n = len(pieces)
    start = np.zeros(n, dtype=np.int64)
    end = np.zeros(n, dtype=np.int64)
    ok = np.zeros(n, dtype=bool)
    cb = char_to_byte(text) if offsets is not None else None
    if offsets is not None:  # offsets beyond the text are wrong, not a reason to crash
        offsets = np.clip(np.asarray(offsets, dtype=np.int64).reshape(-1, 2), 0, len(text))
    cur = 0
    for i, p in enumerate(pieces):
        o = (int(cb[offsets[i, 0]]), int(cb[offsets[i, 1]])) if offsets is not None else None
        if not is_text(p):
            if o is not None and o[1] > o[0]:  # a special read from literal text
                s = max(o[0], cur)
                start[i], end[i], cur = s, max(o[1], s), max(o[1], s)
            else:
                start[i] = end[i] = cur
                ok[i] = True
            continue
        ws = cur
        while ws < len(data) and data[ws] in b" \t\n\r\x0b\x0c":
            ws += 1
        for c in dict.fromkeys([cur, ws] + ([o[0]] if o is not None and o[0] >= cur else [])):
            if data.startswith(p, c):
                w = len(p)
            elif (
                p[:1] == b" "
                and p[1:2] != b" "
                and (len(p) > 1 or cur == 0)
                and data.startswith(p[1:], c)
            ):
                # one space the text does not have: a WordPiece word start or a dummy
                # prefix. Not a space-only piece mid-text: SentencePiece reads a literal
                # '▁' in the text as a space, so that token spells other bytes.
                w = len(p) - 1
            else:
                continue
            start[i], end[i], ok[i] = c, c + w, True
            cur = c + w
            break
        else:
            s, e = (max(o[0], cur), max(o[1], o[0], cur)) if o is not None else (cur, cur)
            start[i], end[i], cur = s, e, e
    return Spans(start, end, ok)


def context_keys(spans: Spans) -> np.ndarray:
    """int64 ``[N]``: the byte where position ``i``'s context ends if the distribution at
    ``i`` is *the* one for that context end (see the module docstring), else -1."""
    end = spans.end
    n = len(end)
    key = np.full(n, -1, dtype=np.int64)
    if not n:
        return key
    last = np.ones(n, dtype=bool)
    last[:-1] = end[1:] != end[:-1]
    tail = np.flatnonzero(end == end[-1])  # the final run
    last[n - 1] = False
    real = tail[(spans.end[tail] - spans.start[tail]) > 0]
    last[real[0] if len(real) else tail[0]] = True
    use = last & spans.verified
    key[use] = end[use]
    return key


def match_keys(s_key: np.ndarray, t_key: np.ndarray) -> np.ndarray:
    """int64 ``[T]``: for each target key the source position with the same key, -1 where
    none (or the target position has no key, -1). The keys ``>= 0`` of each side must be
    strictly increasing along it (one position per key), as :func:`context_keys` gives."""
    src_pos = np.full(len(t_key), -1, dtype=np.int64)
    s_valid = np.flatnonzero(s_key >= 0)
    if len(s_valid) and len(t_key):
        sk = s_key[s_valid]
        pos = np.clip(np.searchsorted(sk, t_key), 0, len(sk) - 1)
        hit = (t_key >= 0) & (sk[pos] == t_key)
        src_pos[hit] = s_valid[pos[hit]]
    return src_pos


def align_spans(src: Spans, tgt: Spans, strict: bool = False) -> Alignment:
    """Byte-exact alignment in O((S + T) log S): target position ``j`` gets the source
    position whose context ends at the same byte (:func:`context_keys` of both).

    ``strict`` also requires the next tokens to cover the same bytes, i.e. the source
    predicts exactly the target's next token's text.
    """
    s_key, t_key = context_keys(src), context_keys(tgt)
    src_pos = match_keys(s_key, t_key)
    if strict and len(src_pos):
        src_pos = np.where(_next_span_equal(src, tgt, src_pos), src_pos, -1)
    return Alignment(src_pos, _relations(s_key, t_key), tgt.end.copy())


def _next_span_equal(src: Spans, tgt: Spans, src_pos: np.ndarray) -> np.ndarray:
    """Per target position: the aligned source position's next token has the target's
    next token's span (a missing next token is the empty span at the end)."""

    def nxt(sp: Spans, i: np.ndarray) -> np.ndarray:
        has = i + 1 < len(sp)
        j = np.minimum(i + 1, len(sp) - 1)
        last = sp.end[-1]
        return np.stack([np.where(has, sp.start[j], last), np.where(has, sp.end[j], last)], -1)

    ok = src_pos >= 0
    out = np.zeros(len(src_pos), dtype=bool)
    if ok.any():
        t_idx = np.flatnonzero(ok)
        out[t_idx] = (nxt(src, src_pos[t_idx]) == nxt(tgt, t_idx)).all(-1)
    return out


def _relations(s_key: np.ndarray, t_key: np.ndarray) -> np.ndarray:
    """Relation of each target token to the source tokens over the same text.

    A target token with a key covers the bytes from the previous target key to its own;
    source keys are the source's cuts. 1:1 = both ends are cuts and none lies inside,
    many:1 = both ends are cuts with cuts inside, 1:many = no cut inside but an end that
    is not a cut; anything else (and positions without a key) is ``none``.
    """
    rel = np.zeros(len(t_key), dtype=np.int8)
    close = t_key >= 0
    if not close.any():
        return rel
    cuts = np.unique(np.concatenate([[0], s_key[s_key >= 0]]))
    end = t_key[close]
    start = np.concatenate([[0], end[:-1]])
    in_s = lambda x: np.isin(x, cuts)  # noqa: E731
    inner = np.searchsorted(cuts, end, side="left") - np.searchsorted(cuts, start, side="right")
    both = in_s(start) & in_s(end)
    r = np.zeros(len(end), dtype=np.int8)
    r[both & (inner <= 0)] = ONE_ONE
    r[both & (inner > 0)] = MANY_ONE
    r[(inner <= 0) & ~both & (end > start)] = ONE_MANY
    rel[close] = r
    return rel


def align_dp(
    src_tokens: Sequence[str],
    tgt_tokens: Sequence[str],
    src_spans: Spans | None = None,
    tgt_spans: Spans | None = None,
) -> Alignment:
    """The paper's MinED alignment: DTW over token strings with Levenshtein cost.

    The cost matrix comes from rapidfuzz; the recurrence runs over anti-diagonals
    (vectorised), so time is O(S·T) but in numpy, not Python. The path becomes an
    :class:`Alignment` by :func:`alignment_from_path`. With both tokenizations' spans, a
    copy is kept only where the two contexts end at the same byte (the DTW path drifts:
    on English prose 4-12% of its copies land on contexts that end elsewhere).
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
    a = alignment_from_path(path, T)
    if src_spans is not None and tgt_spans is not None:
        s_key, t_key = context_keys(src_spans), context_keys(tgt_spans)
        hit = a.src_pos >= 0
        same = np.zeros(T, dtype=bool)
        same[hit] = (s_key[a.src_pos[hit]] == t_key[hit]) & (t_key[hit] >= 0)
        a.src_pos = np.where(same, a.src_pos, -1)
        a.tgt_end = tgt_spans.end.copy()
    return a


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
