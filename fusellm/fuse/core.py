"""Fusion functions, registered by name (``fuse.method`` in a recipe).

A fuser takes the candidates of one document (every source's distribution on the
target's positions and vocabulary, the target's own included when it is a source) and
returns one top-k distribution per target position (FuseLLM, Wan et al. 2024, Sec. 3.3):

* ``min_ce``: the distribution of the candidate with the lowest cross-entropy on the text
  (per sequence: the sequence CE; per token: the CE at that position among candidates
  aligned there);
* ``avg_ce``: the mixture ``Σ_s w_s p_s`` with ``w = softmax(−CE / τ)``. (The reference
  code took a softmax over ``exp(−CE)``, which is nearly uniform; dividing the CE by a
  temperature is what makes the weights follow the CE.)

Register a new fuser with ``@register_fuser("name")``; the runner needs no change.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from align import merge_topk


@dataclass
class Candidate:
    """One source's distributions over the ``T`` target positions of a document."""

    ids: np.ndarray  # int32 [T, k] target vocabulary ids
    logprobs: np.ndarray  # float32 [T, k], -inf padding
    aligned: np.ndarray  # bool [T]: a real distribution here (else a gold one-hot fallback)
    ce: np.ndarray  # float32 [T]: token CE of this source at the aligned position (NaN: none)
    seq_ce: float  # the source's CE on the whole document (its own tokenization)


@dataclass(frozen=True)
class FuseParams:
    level: str = "sequence"  # "sequence" | "token"
    temperature: float = 1.0
    k_out: int = 10


Fused = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]
"""(ids int32 [T, k_out], logprobs float32 [T, k_out], aligned bool [T], weights [n_candidates])"""

FUSERS: dict[str, Callable[[list[Candidate], FuseParams], Fused]] = {}


def register_fuser(name: str):
    def deco(fn: Callable[[list[Candidate], FuseParams], Fused]):
        FUSERS[name] = fn
        return fn

    return deco


def _fit(ids: np.ndarray, lps: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Cut or pad rows to ``k`` entries (padding: id 0, -inf)."""
    if ids.shape[1] >= k:
        return ids[:, :k].astype(np.int32), lps[:, :k].astype(np.float32)
    pad = k - ids.shape[1]
    return (
        np.pad(ids, ((0, 0), (0, pad))).astype(np.int32),
        np.pad(lps, ((0, 0), (0, pad)), constant_values=-np.inf).astype(np.float32),
    )


def _token_ce(cands: list[Candidate]) -> np.ndarray:
    """[n, T] token CE, +inf where a candidate is not aligned or has no CE."""
    ce = np.stack([np.where(c.aligned & np.isfinite(c.ce), c.ce, np.inf) for c in cands])
    return ce.astype(np.float64)


def _seq_ce(cands: list[Candidate]) -> np.ndarray:
    return np.array(
        [c.seq_ce if np.isfinite(c.seq_ce) else np.inf for c in cands], dtype=np.float64
    )


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
        s = int(np.argmin(_seq_ce(cands)))
        ids, lps = _fit(cands[s].ids, cands[s].logprobs, p.k_out)
        return ids, lps, cands[s].aligned.copy(), np.eye(n)[s]
    ce = _token_ce(cands)
    best = np.argmin(ce, axis=0)  # all-inf columns -> 0 (the first candidate's row)
    fits = [_fit(c.ids, c.logprobs, p.k_out) for c in cands]
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
        w = _softmax_neg(_seq_ce(cands), p.temperature)
        if not w.any():
            w = np.eye(n)[0]
        w_tok = np.repeat(w[:, None], T, axis=1)
    else:
        w_tok = _softmax_neg(_token_ce(cands), p.temperature, axis=0)
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
        np.concatenate(rows), np.concatenate(ids), np.concatenate(probs), T, p.k_out
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
    return FUSERS[method](cands, params)
