"""Data-parallel bench scoring across the processes of one ``torchrun`` launch.

Every rank builds the same work list (units or generation requests, in the same order,
cut into the same batches as a single process would); rank ``r`` of ``N`` runs batches
``r, r + N, ...`` and every rank receives all results (:mod:`fusellm.distributed`). A batch is scored exactly as in a one-process run, so the scores do
not depend on the number of processes. Rank 0 alone writes files; one process (no
``WORLD_SIZE``) works unchanged.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import TypeVar

import numpy as np
from tqdm import tqdm

from fusellm.bench.score import LogProbModel, Unit, batches
from fusellm.distributed import Rank, all_gather

log = logging.getLogger(__name__)
T = TypeVar("T")


def my_share(batches: Sequence[T], rank: Rank, desc: str) -> list[T]:
    """This rank's share of ``batches``: every ``world``-th one from its own index."""
    share = list(batches[rank.rank :: rank.world])
    if rank.world > 1:
        log.info(
            "%s: rank %d of %d takes %d of %d batches",
            desc,
            rank.rank,
            rank.world,
            len(share),
            len(batches),
        )
    return share


def score_units(
    lpm: LogProbModel,
    units: Sequence[Unit],
    pad_id: int,
    batch_tokens: int,
    rank: Rank,
    desc: str,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Score ``units`` (see :meth:`LogProbModel.score`) over all ranks → (summed log-prob
    float64 ``[N]``, scored tokens int64 ``[N]``, greedy match bool ``[N]``) on every rank."""
    if units:  # refused on every rank alike, not only on the one that owns the batch
        lpm.check(max(len(u.ids) for u in units), max(max(u.ids) for u in units))
    plan = list(batches(units, batch_tokens))
    mine = my_share(plan, rank, desc)
    done = []
    with tqdm(
        total=sum(len(units[k].ids) for b in mine for k in b),
        desc=desc,
        unit="tok",
        leave=False,
        disable=rank.rank != 0,
    ) as bar:
        for b in mine:
            done.append((b, *lpm.score([units[k] for k in b], pad_id)))
            bar.update(sum(len(units[k].ids) for k in b))
    lp, n, greedy = np.zeros(len(units)), np.zeros(len(units), np.int64), np.zeros(len(units), bool)
    for part in all_gather(done):
        for b, a, c, g in part:
            lp[b], n[b], greedy[b] = a, c, g
    return lp, n, greedy
