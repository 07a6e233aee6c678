"""Projection of a source top-k distribution onto target positions and vocabulary ids."""

from __future__ import annotations

import numpy as np

NEG_INF = np.float32(-np.inf)


def project(
    src_topk_ids: np.ndarray,
    src_topk_logprobs: np.ndarray,
    id_map: np.ndarray,
    src_pos: np.ndarray,
    tgt_next_ids: np.ndarray,
    k_out: int | None = None,
    src_next_ids: np.ndarray | None = None,
    gold_logprobs: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Map source distributions to target positions and vocabulary.

    Args:
        src_topk_ids: int ``[S, k]`` source vocabulary ids.
        src_topk_logprobs: float ``[S, k]`` their log-probs (full-vocabulary softmax).
        id_map: int32 ``[V_src]`` source id -> target id, -1 = unmapped (ids beyond the
            map, e.g. padded embedding rows, are unmapped too).
        src_pos: int ``[T]`` source position for each target position, -1 = none.
        tgt_next_ids: int ``[T]`` the gold *next* target token (-1 at the last position).
        k_out: entries kept per position (default ``k``).
        src_next_ids, gold_logprobs: optional, int / float ``[T]``: at each target
            position, the source's own next token (-1: leave it to ``id_map``) and the
            log-probability the source gives the *text* of the target's next token (NaN:
            unknown). The source's next token then goes to the target's next token with
            that probability instead of through ``id_map`` (whose context-free choice can
            be a token the target tokenizer never emits for this text: ``\n\n`` where it
            writes ``\n`` + ``\n``, or ``'`` where it writes ``'d``); with NaN its mass is
            dropped. Absent from the source's top-k, it is added; the target's next token
            is kept in the row whatever its rank.

    Returns:
        ``ids`` int32 ``[T, k_out]``, ``logprobs`` float32 ``[T, k_out]`` sorted by
        probability, padded with id 0 / ``-inf``; ``aligned`` bool ``[T]``; ``lost``
        float32 ``[T]``: probability of the source's top-k that no target id received
        (unmapped ids, dropped gold mass; 0 where nothing aligned).

    Source ids that map to the same target id merge their probability (sum, i.e.
    logsumexp), unmapped ids drop theirs, so each row's total probability is <= 1. Where
    nothing aligns (or all mass was unmapped) the row is a one-hot on the gold next token
    (log-prob 0), or empty at the last position.
    """
    T = len(src_pos)
    k = src_topk_ids.shape[1] if src_topk_ids.ndim == 2 else 0
    k_out = k_out or max(k, 1)
    ids = np.zeros((T, k_out), dtype=np.int32)
    lps = np.full((T, k_out), NEG_INF, dtype=np.float32)
    src_pos = np.asarray(src_pos, dtype=np.int64)
    tgt_next_ids = np.asarray(tgt_next_ids, dtype=np.int64)
    rows = np.flatnonzero(src_pos >= 0)
    aligned = np.zeros(T, dtype=bool)
    lost = np.zeros(T, dtype=np.float32)
    if len(rows) and k:
        sid = src_topk_ids[src_pos[rows]].astype(np.int64)  # [R, k]
        slp = src_topk_logprobs[src_pos[rows]].astype(np.float64)
        live = np.isfinite(slp)
        valid = (sid >= 0) & (sid < len(id_map))
        tid = np.where(valid, id_map[np.clip(sid, 0, len(id_map) - 1)], -1)
        p_in = np.exp(np.where(live, slp, -np.inf))
        new_lp = slp
        extra = np.zeros(len(rows), dtype=bool)
        if src_next_ids is not None:
            sn = np.asarray(src_next_ids, dtype=np.int64)[rows]
            g = np.asarray(gold_logprobs, dtype=np.float64)[rows]
            is_g = (sid == sn[:, None]) & (sn[:, None] >= 0)
            tid = np.where(is_g, tgt_next_ids[rows][:, None], tid)
            new_lp = np.where(is_g, g[:, None], slp)
            extra = (sn >= 0) & ~is_g.any(1) & np.isfinite(g) & (tgt_next_ids[rows] >= 0)
        ok = (tid >= 0) & live & np.isfinite(new_lp)
        p = np.where(ok, np.minimum(np.exp(np.where(ok, new_lp, -np.inf)), p_in), 0.0)
        lost[rows] = (p_in.sum(1) - p.sum(1)).astype(np.float32)
        r_idx = np.broadcast_to(np.arange(len(rows))[:, None], sid.shape)[ok]
        e = np.flatnonzero(extra)
        m_ids, m_lps, has = merge_topk(
            np.concatenate([r_idx, e]),
            np.concatenate([tid[ok], tgt_next_ids[rows][e]]),
            np.concatenate([p[ok], np.exp(g[e]) if len(e) else np.zeros(0)]),
            len(rows),
            k_out,
            tgt_next_ids[rows] if src_next_ids is not None else None,
        )
        ids[rows], lps[rows] = m_ids, m_lps
        aligned[rows] = has
    fallback = ~aligned & (tgt_next_ids >= 0)
    ids[fallback, 0] = tgt_next_ids[fallback]
    lps[fallback, 0] = 0.0
    return ids, lps, aligned, lost


def merge_topk(
    row: np.ndarray,
    ids: np.ndarray,
    prob: np.ndarray,
    n_rows: int,
    k_out: int,
    keep_ids: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Sum the probabilities of equal ids within each row; keep each row's ``k_out`` most
    probable, sorted.

    Args: flat ``row`` (int, row index), ``ids`` (int, >= 0) and ``prob`` (float) entries;
    ``keep_ids`` (int ``[n_rows]``, -1 none): an id kept in its row whatever its rank
    (the gold next token: the one probability the loss must not lose to the cut).
    Returns: ``ids`` int32 ``[n_rows, k_out]``, ``logprobs`` float32 (padding: id 0,
    ``-inf``) and ``has`` bool ``[n_rows]`` (the row received any entry). Vectorised:
    one ``unique`` over ``row * V + id`` keys and two ``lexsort``.
    """
    out_ids = np.zeros((n_rows, k_out), dtype=np.int32)
    out_lps = np.full((n_rows, k_out), NEG_INF, dtype=np.float32)
    has = np.zeros(n_rows, dtype=bool)
    if len(ids) == 0:
        return out_ids, out_lps, has
    vocab = int(ids.max()) + 1
    uniq, inv = np.unique(row.astype(np.int64) * vocab + ids.astype(np.int64), return_inverse=True)
    total = np.zeros(len(uniq))
    np.add.at(total, inv, prob)
    r_u, t_u = uniq // vocab, uniq % vocab
    must = np.zeros(len(uniq), dtype=bool)
    if keep_ids is not None:
        must = t_u == np.asarray(keep_ids, dtype=np.int64)[r_u]
    order = np.lexsort((-total, ~must, r_u))  # by row, the kept id, then most probable
    r_u, t_u, total = r_u[order], t_u[order], total[order]
    rank = np.arange(len(r_u)) - np.searchsorted(r_u, r_u, side="left")
    keep = rank < k_out
    r_u, t_u, total = r_u[keep], t_u[keep], total[keep]
    order = np.lexsort((-total, r_u))  # the kept entries, most probable first
    r_u, t_u, total = r_u[order], t_u[order], total[order]
    rank = np.arange(len(r_u)) - np.searchsorted(r_u, r_u, side="left")
    out_ids[r_u, rank] = t_u
    with np.errstate(divide="ignore"):
        out_lps[r_u, rank] = np.log(np.minimum(total, 1.0))
    has[np.unique(r_u)] = True
    return out_ids, out_lps, has
