"""Fusion functions, registered by name (``fuse.method`` in a recipe).

A fuser takes the candidates of one document (every source's distribution on the
target's positions and vocabulary, the target's own included when it is a source) and
returns one top-k distribution per target position (FuseLLM, Wan et al. 2024, Sec. 3.3):

* ``min_ce``: the distribution of the candidate with the lowest cross-entropy on the text
  (per sequence, or per token among the candidates aligned at that position);
* ``avg_ce``: the mixture ``Σ_s w_s p_s`` with ``w = softmax(−CE / τ)``. (The reference
  code took a softmax over ``exp(−CE)``, which is nearly uniform; dividing the CE by a
  temperature is what makes the weights follow the CE.)

What "cross-entropy on the text" means is the ``criterion``:

* ``nll_per_byte`` (default): each candidate's NLL of the *same bytes*, per byte. At
  sequence level, the text between the first and last context ends that every candidate
  shares; at token level, from this position's context end to the next one that every
  candidate aligned here shares. Tokenizers that cut text into longer tokens no longer
  look worse (per-token CE follows bytes per token, not model quality), and a source
  without BOS is not scored on text the others are not.
* ``ce_per_token``: the paper's, for reproduction: the mean CE over the candidate's own
  tokens (sequence), the CE of the aligned token (token).

Register a new fuser with ``@register_fuser("name")``; the runner needs no change.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from align import merge_topk

CRITERIA = ("nll_per_byte", "ce_per_token")


@dataclass
class Candidate:
    """One source's distributions over the ``T`` target positions of a document."""

    ids: np.ndarray  # int32 [T, k] target vocabulary ids
    logprobs: np.ndarray  # float32 [T, k], -inf padding
    aligned: np.ndarray  # bool [T]: a real distribution here (else a gold one-hot fallback)
    ce: np.ndarray  # float32 [T]: token CE of this source at the aligned position (NaN: none)
    seq_ce: float  # the source's CE on the whole document (its own tokenization)
    cum_nll: np.ndarray | None = None  # float [T]: NLL up to the context end (NaN: no end here)
    byte_end: np.ndarray | None = None  # int [T]: byte where each target context ends
    next_ids: np.ndarray | None = None  # int [T]: the target's gold next token (-1: none), kept


@dataclass(frozen=True)
class FuseParams:
    level: str = "sequence"  # "sequence" | "token"
    temperature: float = 1.0
    k_out: int = 10
    criterion: str = "nll_per_byte"


Fused = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]
"""(ids int32 [T, k_out], logprobs float32 [T, k_out], aligned bool [T], weights [n_candidates])"""

FUSERS: dict[str, Callable[[list[Candidate], FuseParams], Fused]] = {}


def register_fuser(name: str):
    def deco(fn: Callable[[list[Candidate], FuseParams], Fused]):
        FUSERS[name] = fn
        return fn

    return deco


def _fit(
    ids: np.ndarray, lps: np.ndarray, k: int, keep: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Cut or pad rows to ``k`` entries (padding: id 0, -inf); a cut keeps ``keep`` (the
    gold next token of each row, -1 none) whatever its rank."""
    if ids.shape[1] > k:
        live = np.isfinite(lps)
        rows = np.broadcast_to(np.arange(len(ids))[:, None], ids.shape)[live]
        return merge_topk(rows, ids[live], np.exp(lps[live].astype(np.float64)), len(ids), k, keep)[
            :2
        ]
    pad = k - ids.shape[1]
    return (
        np.pad(ids, ((0, 0), (0, pad))).astype(np.int32),
        np.pad(lps, ((0, 0), (0, pad)), constant_values=-np.inf).astype(np.float32),
    )


def with_gold(
    ids: np.ndarray, lps: np.ndarray, next_ids: np.ndarray, ce: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Rows of a model's own top-k with its gold next token added at its exact
    probability ``exp(-ce)`` where the top-k lacks it (replacing the least probable
    entry): the probability the loss needs most is never lost to the cut.

    ``ids`` int ``[T, k]``, ``lps`` float ``[T, k]``, ``next_ids`` int ``[T]`` (-1: none),
    ``ce`` float ``[T]`` (NaN: none). Returns the same shapes.
    """
    T, k = ids.shape
    add = (next_ids >= 0) & np.isfinite(ce) & ~(ids == next_ids[:, None]).any(1)
    if not add.any():
        return ids, lps
    live = np.isfinite(lps)
    rows = np.broadcast_to(np.arange(T)[:, None], ids.shape)[live]
    a = np.flatnonzero(add)
    return merge_topk(
        np.concatenate([rows, a]),
        np.concatenate([ids[live], next_ids[a]]),
        np.concatenate([np.exp(lps[live].astype(np.float64)), np.exp(-ce[a].astype(np.float64))]),
        T,
        k,
        next_ids,
    )[:2]


def _per_token_seq(cands: list[Candidate]) -> np.ndarray:
    return np.array(
        [c.seq_ce if np.isfinite(c.seq_ce) else np.inf for c in cands], dtype=np.float64
    )


def _bytes_and_cum(cands: list[Candidate]) -> tuple[np.ndarray, np.ndarray]:
    """``byte_end`` int64 [T] and the stacked ``cum_nll`` float64 [n, T] (NaN kept)."""
    end = next((c.byte_end for c in cands if c.byte_end is not None), None)
    if end is None or any(c.cum_nll is None for c in cands):
        raise ValueError(
            "criterion nll_per_byte needs every candidate's cum_nll and the byte ends "
            "(align shards written by this version; rerun align)"
        )
    return np.asarray(end, dtype=np.int64), np.stack([c.cum_nll for c in cands]).astype(np.float64)


def seq_scores(cands: list[Candidate], p: FuseParams) -> np.ndarray:
    """float64 ``[n]``: each candidate's CE on the document under ``p.criterion`` (+inf:
    none). A document with fewer than two context ends that all candidates share (too
    short to compare on the same bytes) falls back to per-token CE."""
    if p.criterion == "ce_per_token" or len(cands) == 1:
        return _per_token_seq(cands)
    end, cum = _bytes_and_cum(cands)
    shared = np.flatnonzero(np.isfinite(cum).all(0))
    if len(shared) < 2:
        return _per_token_seq(cands)
    a, b = shared[0], shared[-1]
    return (cum[:, b] - cum[:, a]) / (end[b] - end[a])


def token_scores(cands: list[Candidate], p: FuseParams) -> np.ndarray:
    """float64 ``[n, T]``: each candidate's CE at each position under ``p.criterion``,
    +inf where it has no distribution (not aligned). Per byte, positions with no later
    context end shared by the candidates aligned there (the end of the document) take
    the sequence-level score."""
    aligned = np.stack([c.aligned for c in cands])
    if p.criterion == "ce_per_token" or len(cands) == 1:
        ce = np.stack([np.where(c.aligned & np.isfinite(c.ce), c.ce, np.inf) for c in cands])
        return ce.astype(np.float64)
    end, cum = _bytes_and_cum(cands)
    n, T = cum.shape
    has = aligned & np.isfinite(cum)
    score = np.full((n, T), np.inf)
    mask = (has * (1 << np.arange(n))[:, None]).sum(0)  # which candidates are here, as bits
    for m in np.unique(mask[mask > 0]):
        members = np.flatnonzero((m >> np.arange(n)) & 1)
        ok = has[members].all(0)
        # next position after j where every member has a context end (T: none)
        idx = np.where(ok, np.arange(T), T)
        nxt = np.append(np.minimum.accumulate(idx[::-1])[::-1][1:], T)
        js = np.flatnonzero(mask == m)
        js = js[nxt[js] < T]
        jn = nxt[js]
        seg = (cum[np.ix_(members, jn)] - cum[np.ix_(members, js)]) / (end[jn] - end[js])
        score[np.ix_(members, js)] = seg
    tail = has & ~np.isfinite(score).any(0, keepdims=True)
    seq = seq_scores(cands, p)
    score = np.where(tail, np.broadcast_to(seq[:, None], (n, T)), score)
    return score


def cumulative_nll(ce: np.ndarray, width: np.ndarray) -> np.ndarray:
    """float64 ``[N]``: at position ``i``, the NLL of tokens ``1..i`` (what positions
    ``< i`` predicted), counting only predictions of tokens that cover text (a zero-width
    EOS or special has no bytes to be scored per byte).

    ``ce`` float ``[N]`` (NaN at the last position), ``width`` int ``[N]`` bytes per token.
    """
    ce = np.asarray(ce, dtype=np.float64)
    pred = np.zeros(len(ce))
    if len(ce) > 1:
        pred[:-1] = np.where((np.asarray(width)[1:] > 0) & np.isfinite(ce[:-1]), ce[:-1], 0.0)
    return np.concatenate([[0.0], np.cumsum(pred[:-1])]) if len(ce) else pred


def _softmax_neg(ce: np.ndarray, tau: float, axis: int = 0) -> np.ndarray:
    """softmax(−ce/τ) along ``axis``; +inf CE gets weight 0; all-inf slices get all zeros."""
    z = -ce / tau
    m = np.max(np.where(np.isfinite(z), z, -np.inf), axis=axis, keepdims=True)
    m = np.where(np.isfinite(m), m, 0.0)
    e = np.where(np.isfinite(z), np.exp(z - m), 0.0)
    s = e.sum(axis=axis, keepdims=True)
    return np.divide(e, s, out=np.zeros_like(e), where=s > 0)


@register_fuser("min_ce")
def min_ce(cands: list[Candidate], p: FuseParams) -> Fused:
    """Lowest CE wins (ties: the first candidate, i.e. recipe order)."""
    n, T = len(cands), len(cands[0].aligned)
    if p.level == "sequence":
        s = int(np.argmin(seq_scores(cands, p)))
        ids, lps = _fit(cands[s].ids, cands[s].logprobs, p.k_out, cands[s].next_ids)
        return ids, lps, cands[s].aligned.copy(), np.eye(n)[s]
    ce = token_scores(cands, p)
    best = np.argmin(ce, axis=0)  # all-inf columns -> 0 (the first candidate's row)
    fits = [_fit(c.ids, c.logprobs, p.k_out, c.next_ids) for c in cands]
    ids = np.stack([f[0] for f in fits])[best, np.arange(T)]
    lps = np.stack([f[1] for f in fits])[best, np.arange(T)]
    aligned = np.isfinite(ce).any(axis=0) | cands[0].aligned
    weights = np.bincount(best, minlength=n) / max(T, 1)
    return ids, lps, aligned, weights


@register_fuser("avg_ce")
def avg_ce(cands: list[Candidate], p: FuseParams) -> Fused:
    """Mixture weighted by softmax(−CE/τ) (per sequence or per token)."""
    n, T = len(cands), len(cands[0].aligned)
    if p.level == "sequence":
        w = _softmax_neg(seq_scores(cands, p), p.temperature)
        if not w.any():
            w = np.eye(n)[0]
        w_tok = np.repeat(w[:, None], T, axis=1)
    else:
        w_tok = _softmax_neg(token_scores(cands, p), p.temperature, axis=0)
        none = ~w_tok.any(axis=0)
        w_tok[0, none] = 1.0  # nothing aligned: the first candidate's (fallback) row
    rows, ids, probs = [], [], []
    for c, w in zip(cands, w_tok, strict=True):
        live = np.isfinite(c.logprobs) & (w[:, None] > 0)
        r = np.broadcast_to(np.arange(T)[:, None], c.ids.shape)[live]
        rows.append(r)
        ids.append(c.ids[live])
        probs.append(np.exp(c.logprobs[live].astype(np.float64)) * w[r])
    out_ids, out_lps, has = merge_topk(
        np.concatenate(rows),
        np.concatenate(ids),
        np.concatenate(probs),
        T,
        p.k_out,
        cands[0].next_ids,
    )
    aligned = np.zeros(T, dtype=bool)
    for c, w in zip(cands, w_tok, strict=True):
        aligned |= c.aligned & (w > 0)
    return out_ids, out_lps, aligned, w_tok.mean(axis=1)


def fuse(method: str, cands: list[Candidate], params: FuseParams) -> Fused:
    if method not in FUSERS:
        raise KeyError(f"unknown fusion method '{method}'; registered: {sorted(FUSERS)}")
    if not cands:
        raise ValueError("fusion needs at least one candidate")
    if params.criterion not in CRITERIA:
        raise ValueError(f"unknown criterion '{params.criterion}' ({', '.join(CRITERIA)})")
    return FUSERS[method](cands, params)
