"""Token-string canonicalisation and source -> target vocabulary maps (EM, MinED).

Every token becomes the *bytes* it contributes to the text, so vocabularies of different
kinds compare in one space:

* byte-level BPE (GPT-2 ``Ġ``/``Ċ`` byte map): each character maps back to its byte;
* SentencePiece (``▁`` = space) with byte fallback (``<0x0A>`` = byte 0x0A);
* WordPiece: ``##x`` continues a word (``x``); other tokens start one (`` x``);
* anything else: the token's UTF-8.

The kind is detected from the vocabulary itself (never from a class name or a path).
Special tokens canonicalise to ``SPECIAL + literal`` and map only to the same literal
special token (never by edit distance); ids without a token (padded embedding rows)
canonicalise to ``None`` and never map. For rapidfuzz the bytes are viewed as Latin-1 strings (one char per byte).
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path

import numpy as np

_BYTE_FALLBACK = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")
SPECIAL = b"\x00special:"
"""Prefix of special tokens' canonical form: they map only to the same literal special."""


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


def canonicalize(
    tokens: Sequence[str | None], special: set[int] = frozenset(), kind: str | None = None
) -> list[bytes | None]:
    """Bytes each token contributes to the text; ``None`` for specials and missing ids."""
    kind = kind or detect_kind(tokens)
    dec = byte_decoder()
    out: list[bytes | None] = []
    for i, t in enumerate(tokens):
        if t is None:
            out.append(None)
        elif i in special:
            out.append(SPECIAL + t.encode())
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


def vocab_hash(canon: Sequence[bytes | None]) -> str:
    h = hashlib.sha256()
    for c in canon:
        h.update(b"\x00" if c is None else b"\x01" + len(c).to_bytes(4, "little") + c)
    return h.hexdigest()


def exact_map(src: Sequence[bytes | None], tgt: Sequence[bytes | None]) -> np.ndarray:
    """EM: int32 ``[len(src)]``, the smallest target id with equal bytes, else -1."""
    first: dict[bytes, int] = {}
    for j, c in enumerate(tgt):
        if c is not None and c not in first:
            first[c] = j
    return np.array([first.get(c, -1) if c is not None else -1 for c in src], dtype=np.int32)


def min_ed_map(
    src: Sequence[bytes | None], tgt: Sequence[bytes | None], chunk: int = 256, workers: int = -1
) -> np.ndarray:
    """MinED: int32 ``[len(src)]``, the target id at minimum Levenshtein distance.

    Exact matches are taken first (distance 0). The rest are searched in rings of growing
    length difference: a target ``r`` characters longer or shorter is at distance >= r, so
    once a query's best distance is <= r no unsearched target can beat or tie it. Each
    ring is scored with rapidfuzz's multi-threaded ``cdist`` (rows in chunks of ``chunk``).
    Ties go to the smallest target id, exactly as a full scan would (tested against one).
    """
    from rapidfuzz.distance import Levenshtein
    from rapidfuzz.process import cdist

    out = exact_map(src, tgt)
    # Specials only map exactly (done above); they are never edit-distance candidates.
    cand = np.array(
        [j for j, c in enumerate(tgt) if c is not None and not c.startswith(SPECIAL)],
        dtype=np.int64,
    )
    todo = np.array(
        [
            i
            for i, c in enumerate(src)
            if c is not None and out[i] < 0 and not c.startswith(SPECIAL)
        ],
        dtype=np.int64,
    )
    if len(cand) == 0 or len(todo) == 0:
        return out
    t_str = [tgt[j].decode("latin-1") for j in cand]
    t_len = np.array([len(x) for x in t_str])
    by_len = {n: np.flatnonzero(t_len == n) for n in np.unique(t_len)}  # ids ascending
    q_str = {i: src[i].decode("latin-1") for i in todo}
    q_len = np.array([len(q_str[i]) for i in todo])
    best_d = np.full(len(todo), np.iinfo(np.int32).max, dtype=np.int64)
    best_j = np.full(len(todo), np.iinfo(np.int64).max, dtype=np.int64)
    max_r = int(max(t_len.max(), q_len.max()))
    for r in range(max_r + 1):
        for L in np.unique(q_len):
            rows = np.flatnonzero((q_len == L) & (best_d > r - 1))  # not final yet
            if len(rows) == 0:
                continue
            ring = [by_len[n] for n in {L - r, L + r} if n in by_len]
            if not ring:
                continue
            ring = np.sort(np.concatenate(ring))  # ascending candidate index = ascending id
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
                k = np.argmin(d, axis=1)  # first minimum: the smallest id in this ring
                dk, jk = d[np.arange(len(rr)), k].astype(np.int64), cand[ring[k]]
                better = (dk < best_d[rr]) | ((dk == best_d[rr]) & (jk < best_j[rr]))
                best_d[rr] = np.where(better, dk, best_d[rr])
                best_j[rr] = np.where(better, jk, best_j[rr])
        if (best_d <= r).all():
            break
    out[todo] = best_j.astype(np.int32)
    return out


def vocab_map(
    src: Sequence[bytes | None],
    tgt: Sequence[bytes | None],
    method: str = "min_ed",
    cache_dir: str | os.PathLike | None = None,
) -> np.ndarray:
    """Source id -> target id (int32, -1 = unmapped) by ``em`` or ``min_ed``.

    With ``cache_dir`` the map is stored as ``.npy`` keyed by both vocabularies' hashes
    and the method, so each tokenizer pair is mapped once.
    """
    if method not in ("em", "min_ed"):
        raise ValueError(f"unknown vocabulary mapping method '{method}' (em, min_ed)")
    path = None
    if cache_dir is not None:
        key = hashlib.sha256(
            f"{vocab_hash(src)}:{vocab_hash(tgt)}:{method}:v2".encode()
        ).hexdigest()[:32]
        path = Path(cache_dir) / f"vocab-map-{method}-{key}.npy"
        if path.exists():
            return np.load(path, allow_pickle=False)
    m = exact_map(src, tgt) if method == "em" else min_ed_map(src, tgt)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
        with open(tmp, "wb") as f:
            np.save(f, m, allow_pickle=False)
        os.replace(tmp, path)
    return m
