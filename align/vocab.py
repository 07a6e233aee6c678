"""Token-string canonicalisation and source -> target vocabulary maps (EM, MinED, next token).

Every token becomes the *bytes* it contributes to the text, so vocabularies of different
kinds compare in one space:

* byte-level BPE (GPT-2 ``Ġ``/``Ċ`` byte map): each character maps back to its byte;
* SentencePiece (``▁`` = space) with byte fallback (``<0x0A>`` = byte 0x0A);
* WordPiece: ``##x`` continues a word (``x``); other tokens start one (`` x``);
* added tokens (non-special ones too): their content's literal UTF-8 (a byte-level
  vocabulary stores them unmapped: ``ö`` is the two bytes C3 B6, not the stand-in for F6);
* anything else: the token's UTF-8.

The kind is detected from the vocabulary itself (never from a class name or a path).
Special tokens canonicalise to ``SPECIAL + role`` when they have a role (``eos``, ``bos``,
...: the EOS of one tokenizer is the EOS of another) and ``SPECIAL + literal`` otherwise;
they map only to an equal special, never by edit distance. Ids without a token (padded
embedding rows) canonicalise to ``None`` and never map.

Several ids of one vocabulary can have the same bytes (SentencePiece byte fallback
``<0x2E>`` beside ``.``; added tokens duplicating pieces). Among them the map takes, in
order: the id with the source token's own string (so any tokenizer mapped onto itself is
the identity), the id the target tokenizer itself emits for those bytes
(``Vocab.emitted``), a normal piece over a ``<0x..>`` one, the smallest id.

For rapidfuzz the bytes are viewed as Latin-1 strings (one char per byte).
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property, lru_cache
from pathlib import Path

import numpy as np

_BYTE_FALLBACK = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")
SPECIAL = b"\x00special:"
"""Prefix of special tokens' canonical form: they map only to an equal special."""
ROLES = ("eos", "bos", "unk", "pad", "sep", "cls", "mask")
"""Special-token roles, in the order that names an id holding several (GPT-2: bos = eos)."""
METHODS = ("em", "min_ed", "next_token")


@lru_cache(maxsize=1)
def byte_decoder() -> dict[str, int]:
    """Inverse of GPT-2's ``bytes_to_unicode`` (printable stand-ins for the 256 bytes)."""
    bs = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs, strict=True)}


def detect_kind(tokens: Sequence[str | None]) -> str:
    """``bytelevel`` | ``sentencepiece`` | ``wordpiece`` | ``plain``, from the tokens alone."""
    toks = [t for t in tokens if t]
    if not toks:
        return "plain"
    n = len(toks)
    if sum(t.startswith("##") for t in toks) / n > 0.03:
        return "wordpiece"
    if sum("▁" in t for t in toks) / n > 0.03:
        return "sentencepiece"
    dec = byte_decoder()
    in_map = sum(all(c in dec for c in t) for t in toks) / n
    if in_map > 0.9 and sum(("Ġ" in t) or ("Ċ" in t) for t in toks) / n > 0.01:
        return "bytelevel"
    return "plain"


def is_byte_fallback(token: str | None) -> bool:
    return token is not None and _BYTE_FALLBACK.match(token) is not None


def canonicalize(
    tokens: Sequence[str | None],
    special: set[int] = frozenset(),
    kind: str | None = None,
    added: set[int] = frozenset(),
    roles: Mapping[int, str] | None = None,
) -> list[bytes | None]:
    """Bytes each token contributes to the text (``SPECIAL``-prefixed for specials,
    ``None`` for missing ids).

    ``added``: ids of added (non-special) tokens, read as literal text whatever the kind.
    ``roles``: id -> role (``eos``, ...) of special tokens.
    """
    kind = kind or detect_kind(tokens)
    roles = roles or {}
    dec = byte_decoder()
    out: list[bytes | None] = []
    for i, t in enumerate(tokens):
        if t is None:
            out.append(None)
        elif i in special or i in roles:
            out.append(SPECIAL + (f"role:{roles[i]}" if i in roles else t).encode())
        elif i in added:
            out.append(t.encode())
        elif kind == "bytelevel":
            out.append(b"".join(bytes([dec[c]]) if c in dec else c.encode() for c in t))
        elif kind == "sentencepiece":
            m = _BYTE_FALLBACK.match(t)
            out.append(bytes([int(m.group(1), 16)]) if m else t.replace("▁", " ").encode())
        elif kind == "wordpiece":
            out.append(t[2:].encode() if t.startswith("##") else b" " + t.encode())
        else:
            out.append(t.encode())
    return out


def is_text(c: bytes | None) -> bool:
    """A token that stands for text (not a special, not a missing id)."""
    return c is not None and not c.startswith(SPECIAL)


@dataclass
class Vocab:
    """One tokenizer's vocabulary in byte space.

    ``tokens``: the token string of each id (None: no token); ``canon``: its bytes (see
    :func:`canonicalize`); ``emitted``: for bytes that several ids share, the id the
    tokenizer itself emits for them (filled by the caller, which has the tokenizer).
    """

    tokens: list[str | None]
    canon: list[bytes | None]
    emitted: dict[bytes, int] = field(default_factory=dict)

    def __post_init__(self):
        if len(self.tokens) != len(self.canon):
            raise ValueError(
                f"{len(self.tokens)} token strings but {len(self.canon)} canonical forms"
            )

    def __len__(self) -> int:
        return len(self.canon)

    @classmethod
    def from_bytes(cls, canon: Sequence[bytes | None]) -> Vocab:
        """A vocabulary known only by its bytes (no strings, no tie preferences)."""
        return cls([None] * len(canon), list(canon))

    @cached_property
    def rank(self) -> np.ndarray:
        """int8 ``[V]`` preference among ids with equal bytes (lower wins; then smaller id):
        0 the id the tokenizer emits, 1 a normal piece, 2 a byte-fallback ``<0x..>``."""
        r = np.array([2 if is_byte_fallback(t) else 1 for t in self.tokens], dtype=np.int8)
        for c, j in self.emitted.items():
            if 0 <= j < len(r) and self.canon[j] == c:
                r[j] = 0
        return r

    @cached_property
    def best(self) -> dict[bytes, int]:
        """bytes -> the preferred id with those bytes."""
        out: dict[bytes, int] = {}
        rank = self.rank
        for j, c in enumerate(self.canon):
            if c is not None and (c not in out or rank[j] < rank[out[c]]):
                out[c] = j
        return out

    @cached_property
    def by_string(self) -> dict[str, int]:
        return {t: j for j, t in enumerate(self.tokens) if t is not None}

    @cached_property
    def nbytes(self) -> np.ndarray:
        """int64 ``[V]``: bytes each id contributes to the text (0 for specials)."""
        return np.array([len(c) if is_text(c) else 0 for c in self.canon], dtype=np.int64)

    def hash(self) -> str:
        h = hashlib.sha256()
        for c in self.canon:
            h.update(b"\x00" if c is None else b"\x01" + len(c).to_bytes(4, "little") + c)
        for c, j in sorted(self.emitted.items()):
            h.update(b"\x02" + c + j.to_bytes(4, "little"))
        h.update(np.packbits([is_byte_fallback(t) for t in self.tokens]).tobytes())
        return h.hexdigest()


def exact_map(src: Vocab, tgt: Vocab) -> np.ndarray:
    """EM: int32 ``[len(src)]``, the target id with equal bytes (ties as in the module
    docstring), else -1."""
    out = np.full(len(src), -1, dtype=np.int32)
    for i, c in enumerate(src.canon):
        if c is None or (j := tgt.best.get(c)) is None:
            continue
        s = src.tokens[i]
        same = tgt.by_string.get(s) if s is not None else None
        out[i] = same if same is not None and tgt.canon[same] == c else j
    return out


def min_ed_map(
    src: Vocab,
    tgt: Vocab,
    max_distance: int | None = None,
    chunk: int = 256,
    workers: int = -1,
) -> np.ndarray:
    """MinED: int32 ``[len(src)]``, the target id at minimum Levenshtein distance (bytes).

    Exact matches are taken first (distance 0, :func:`exact_map`). The rest are searched
    in rings of growing length difference: a target ``r`` bytes longer or shorter is at
    distance >= r, so once a query's best distance is <= r no unsearched target can beat
    or tie it. Each ring is scored with rapidfuzz's multi-threaded ``cdist`` (rows in
    chunks of ``chunk``). Ties go to the lowest (rank, id) as in :class:`Vocab`, exactly
    as a full scan would (tested against one). With ``max_distance``, a token whose best
    distance exceeds it maps to -1 (its probability leaves the row).
    """
    from rapidfuzz.distance import Levenshtein
    from rapidfuzz.process import cdist

    out = exact_map(src, tgt)
    # Specials only map exactly (done above); they are never edit-distance candidates.
    cand = np.array([j for j, c in enumerate(tgt.canon) if is_text(c)], dtype=np.int64)
    todo = np.array(
        [i for i, c in enumerate(src.canon) if is_text(c) and out[i] < 0], dtype=np.int64
    )
    if len(cand) == 0 or len(todo) == 0:
        return out
    t_str = [tgt.canon[j].decode("latin-1") for j in cand]
    t_len = np.array([len(x) for x in t_str])
    # Candidate order inside a ring = preference order, so argmin's first minimum wins ties.
    pref = tgt.rank[cand].astype(np.int64) * (len(tgt) + 1) + cand  # (rank, id) as one key
    by_len = {n: np.flatnonzero(t_len == n) for n in np.unique(t_len)}
    q_str = {i: src.canon[i].decode("latin-1") for i in todo}
    q_len = np.array([len(q_str[i]) for i in todo])
    best_d = np.full(len(todo), np.iinfo(np.int32).max, dtype=np.int64)
    best_p = np.full(len(todo), np.iinfo(np.int64).max, dtype=np.int64)
    best_j = np.full(len(todo), -1, dtype=np.int64)
    max_r = int(max(t_len.max(), q_len.max()))
    if max_distance is not None:
        max_r = min(max_r, max_distance)
    for r in range(max_r + 1):
        for L in np.unique(q_len):
            rows = np.flatnonzero((q_len == L) & (best_d > r - 1))  # not final yet
            if len(rows) == 0:
                continue
            ring = [by_len[n] for n in {L - r, L + r} if n in by_len]
            if not ring:
                continue
            ring = np.concatenate(ring)
            ring = ring[np.argsort(pref[ring], kind="stable")]
            choices = [t_str[c] for c in ring]
            for a in range(0, len(rows), chunk):
                rr = rows[a : a + chunk]
                d = cdist(
                    [q_str[todo[x]] for x in rr],
                    choices,
                    scorer=Levenshtein.distance,
                    dtype=np.int32,
                    workers=workers,
                )
                k = np.argmin(d, axis=1)
                dk, pk = d[np.arange(len(rr)), k].astype(np.int64), pref[ring[k]]
                better = (dk < best_d[rr]) | ((dk == best_d[rr]) & (pk < best_p[rr]))
                best_d[rr] = np.where(better, dk, best_d[rr])
                best_p[rr] = np.where(better, pk, best_p[rr])
                best_j[rr] = np.where(better, cand[ring[k]], best_j[rr])
        if (best_d <= r).all():
            break
    if max_distance is not None:
        best_j[best_d > max_distance] = -1
    out[todo] = best_j.astype(np.int32)
    return out


def next_token_map(src: Vocab, tgt: Vocab, first: np.ndarray) -> np.ndarray:
    """Next-token map: int32 ``[len(src)]``, the target token that starts the same text.

    A source distribution gives p(next source token = s); the text that follows then
    starts with s's bytes. A target token with exactly those bytes takes it (as in
    :func:`exact_map`); otherwise the one the target tokenizer emits *first* for that
    text: ``first`` (int ``[len(src)]``, -1 = unknown) holds it for each source id, found
    by the caller with the target tokenizer (word-initial where the source token is).
    Where it is unknown (bytes that are not UTF-8 on their own, tokenizers that normalise
    the text), the longest target token whose bytes begin the source token's bytes.
    Unlike MinED, whatever a source token maps to is a prefix of its own bytes.
    """
    out = exact_map(src, tgt)
    first = np.asarray(first)
    if len(first) != len(src):
        raise ValueError(f"first-token table has {len(first)} rows for {len(src)} source ids")
    longest = max((len(c) for c in tgt.best if is_text(c)), default=0)
    for i, c in enumerate(src.canon):
        if not is_text(c) or out[i] >= 0:
            continue
        j = int(first[i])
        if 0 <= j < len(tgt) and is_text(tgt.canon[j]) and c.startswith(tgt.canon[j]):
            out[i] = j
            continue
        for n in range(min(len(c), longest), 0, -1):
            if (j := tgt.best.get(c[:n])) is not None:
                out[i] = j
                break
    return out


def vocab_map(
    src: Vocab,
    tgt: Vocab,
    method: str = "min_ed",
    cache_dir: str | os.PathLike | None = None,
    first: np.ndarray | None = None,
    max_distance: int | None = None,
) -> np.ndarray:
    """Source id -> target id (int32, -1 = unmapped) by ``em``, ``min_ed`` or ``next_token``.

    ``next_token`` needs ``first`` (see :func:`next_token_map`); ``max_distance`` applies
    to ``min_ed``. With ``cache_dir`` the map is stored as ``.npy`` keyed by both
    vocabularies' hashes, the method and its inputs, so each tokenizer pair is mapped once.
    """
    if method not in METHODS:
        raise ValueError(f"unknown vocabulary mapping method '{method}' ({', '.join(METHODS)})")
    if method == "next_token" and first is None:
        raise ValueError("vocabulary method 'next_token' needs the first-token table")
    path = None
    if cache_dir is not None:
        extra = {
            "em": "",
            "min_ed": f"max_distance={max_distance}",
            "next_token": hashlib.sha256(np.asarray(first, dtype=np.int64).tobytes()).hexdigest()
            if first is not None
            else "",
        }[method]
        key = hashlib.sha256(f"{src.hash()}:{tgt.hash()}:{method}:{extra}:v3".encode()).hexdigest()[
            :32
        ]
        path = Path(cache_dir) / f"vocab-map-{method}-{key}.npy"
        if path.exists():
            return np.load(path, allow_pickle=False)
    if method == "em":
        m = exact_map(src, tgt)
    elif method == "min_ed":
        m = min_ed_map(src, tgt, max_distance)
    else:
        m = next_token_map(src, tgt, first)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
        with open(tmp, "wb") as f:
            np.save(f, m, allow_pickle=False)
        os.replace(tmp, path)
    return m
