"""Data-parallel bench scoring across the processes of one ``torchrun`` launch.

Every rank builds the same work list (units or generation requests, in the same order,
cut into the same batches as a single process would); rank ``r`` of ``N`` runs batches
``r, r + N, ...`` and every rank receives all results (``torch.distributed`` over gloo on
CPU, nccl on GPU). A batch is scored exactly as in a one-process run, so the scores do
not depend on the number of processes. Rank 0 alone writes files; one process (no
``WORLD_SIZE``) works unchanged.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np
from tqdm import tqdm

from fusellm.bench.score import LogProbModel, Unit, batches

log = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass(frozen=True)
class Ranks:
    """This process's place in the launch: rank ``rank`` of ``world``."""

    rank: int = 0
    world: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    def mine(self, batches: Sequence[T], desc: str) -> list[T]:
        """This rank's share of ``batches``: every ``world``-th one from ``rank``."""
        share = list(batches[self.rank :: self.world])
        if self.world > 1:
            log.info(
                "%s: rank %d of %d takes %d of %d batches",
                desc,
                self.rank,
                self.world,
                len(share),
                len(batches),
            )
        return share

    def all_gather(self, obj: Any) -> list[Any]:
        """``obj`` of every rank, in rank order (every rank gets the list)."""
        if self.world == 1:
            return [obj]
        import torch.distributed as dist

        out: list[Any] = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def from_main(self, fn: Callable[[], T]) -> T:
        """``fn()`` run on rank 0 only; its result (or its failure) on every rank."""
        if self.world == 1:
            return fn()
        import torch.distributed as dist

        box: list[Any] = [None]
        if self.main:
            try:
                box[0] = ("ok", fn())
            except Exception as e:  # every rank must reach the broadcast, or all hang
                box[0] = ("error", e)
        dist.broadcast_object_list(box, src=0)
        status, value = box[0]
        if status == "error":
            if self.main:
                raise value
            raise RuntimeError(f"rank 0 failed: {value}")
        return value


@contextlib.contextmanager
def process_group(device: str) -> Iterator[Ranks]:
    """The launch's ranks; under ``torchrun`` (``WORLD_SIZE`` > 1) a process group is
    started (nccl on GPU with this rank's local device, gloo on CPU) and torn down after."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        yield Ranks()
        return
    import torch
    import torch.distributed as dist

    created = not dist.is_initialized()
    if created:
        if device.startswith("cuda"):
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    ranks = Ranks(dist.get_rank(), dist.get_world_size())
    if ranks.main:
        log.info("bench: data-parallel over %d processes", ranks.world)
    ok = False
    try:
        yield ranks
        ok = True
    finally:
        if created:
            if ok:  # after a failure the other ranks may never arrive
                dist.barrier()
            dist.destroy_process_group()


def score_units(
    lpm: LogProbModel,
    units: Sequence[Unit],
    pad_id: int,
    batch_tokens: int,
    ranks: Ranks,
    desc: str,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Score ``units`` (see :meth:`LogProbModel.score`) over all ranks → (summed log-prob
    float64 ``[N]``, scored tokens int64 ``[N]``, greedy match bool ``[N]``) on every rank."""
    if units:  # refused on every rank alike, not only on the one that owns the batch
        lpm.check(max(len(u.ids) for u in units), max(max(u.ids) for u in units))
    plan = list(batches(units, batch_tokens))
    mine = ranks.mine(plan, desc)
    done = []
    with tqdm(
        total=sum(len(units[k].ids) for b in mine for k in b),
        desc=desc,
        unit="tok",
        leave=False,
        disable=not ranks.main,
    ) as bar:
        for b in mine:
            done.append((b, *lpm.score([units[k] for k in b], pad_id)))
            bar.update(sum(len(units[k].ids) for k in b))
    lp, n, greedy = np.zeros(len(units)), np.zeros(len(units), np.int64), np.zeros(len(units), bool)
    for part in ranks.all_gather(done):
        for b, a, c, g in part:
            lp[b], n[b], greedy[b] = a, c, g
    return lp, n, greedy
