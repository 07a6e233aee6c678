"""Batches of token sequences for the stages that run a model over many of them (extract,
bench, evolve): grouped by length, padded, with an attention mask."""

from __future__ import annotations

from collections.abc import Sequence

import torch


def plan_batches(
    lengths: Sequence[int], batch_tokens: int, max_batch_size: int | None = None
) -> list[list[int]]:
    """Sequence indices grouped into batches of similar length, longest first (padding
    stays small, and an out-of-memory shows on the first batch).

    A batch holds at most ``batch_tokens`` padded tokens and ``max_batch_size`` sequences
    (a single longer sequence gets a batch of its own). Deterministic for given lengths.
    """
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    batches: list[list[int]] = []
    cur: list[int] = []
    for i in order:
        width = lengths[cur[0]] if cur else lengths[i]  # longest first: first is widest
        full = max_batch_size is not None and len(cur) + 1 > max_batch_size
        if cur and (full or (len(cur) + 1) * width > batch_tokens):
            batches.append(cur)
            cur = []
        cur.append(i)
    if cur:
        batches.append(cur)
    return batches


def pad_batch(
    seqs: Sequence[Sequence[int]], pad_id: int, left: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Token lists -> ``input_ids`` and ``attention_mask``, int64 ``[B, L]``.

    Right padding keeps every sequence's positions 0..len-1; ``left`` padding lines the
    sequences up at their ends (generation continues at column L). The pad id only fills
    masked positions: it never reaches a score.
    """
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        cols = slice(width - len(s), width) if left else slice(0, len(s))
        ids[i, cols] = torch.as_tensor(s, dtype=torch.long)
        mask[i, cols] = 1
    return ids, mask
