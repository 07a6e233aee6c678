"""Several processes running one recipe: ranks from the launcher's environment, the process
group the CLI sets up once per command, and the few collectives the stages need.

Any launcher that sets ``RANK``/``WORLD_SIZE``/``LOCAL_RANK``/``MASTER_ADDR``/``MASTER_PORT``
works (torchrun, ``accelerate launch``, the deepspeed launcher, srun with those set).
``fusellm run`` under N processes enters every stage on every rank: extract, align and
fuse split their shards by rank, train splits batches, bench splits its scoring batches;
single-process stages (corpus, merge, evolve) run on rank 0 while the others wait. After each stage every rank
waits for all others (:func:`barrier`), so no rank reads a stage's output before the
stage is complete everywhere.

Stage barriers go through a gloo group of their own with a timeout of days: a rank may
wait as long as rank 0 needs to read a large corpus, while the default group (NCCL on
GPUs) keeps its short timeout for training collectives. A rank that fails exits non-zero
and the launcher stops the others.
"""

from __future__ import annotations

import datetime
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

T = TypeVar("T")
STAGE_TIMEOUT = datetime.timedelta(days=7)
_stage_group = None  # the gloo group for stage barriers, once set up


@dataclass(frozen=True)
class Rank:
    rank: int
    world: int
    local: int

    @classmethod
    def from_env(cls) -> Rank:
        """Ranks as set by torchrun, ``accelerate launch`` and the deepspeed launcher."""
        env = os.environ
        return cls(
            int(env.get("RANK", 0)), int(env.get("WORLD_SIZE", 1)), int(env.get("LOCAL_RANK", 0))
        )

    def owns(self, shard: int) -> bool:
        return shard % self.world == self.rank


class OtherRankFailed(RuntimeError):
    """Rank 0 failed in work the others were waiting for (its own error is in its log)."""


def setup(timeout_s: float = 1800) -> None:
    """Join the launcher's process group (NCCL with GPUs, as accelerate would set it up;
    else gloo) with collectives timing out after ``timeout_s`` (the Trainer's
    ``ddp_timeout``: the Trainer reuses this group), and create the stage barrier group.
    Nothing to do in a single process. Idempotent."""
    global _stage_group
    if Rank.from_env().world <= 1 or _stage_group is not None:
        return
    import torch
    import torch.distributed as dist

    if not dist.is_initialized():
        if torch.cuda.is_available():
            torch.cuda.set_device(Rank.from_env().local)
        dist.init_process_group(
            "nccl" if torch.cuda.is_available() else "gloo",
            timeout=datetime.timedelta(seconds=timeout_s),
        )
    _stage_group = dist.new_group(backend="gloo", timeout=STAGE_TIMEOUT)


def _group():
    """The group for stage coordination: the stage group, else the default group when a
    library set one up (the Trainer does), else None (a single process)."""
    if _stage_group is not None:
        return _stage_group
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.group.WORLD
    return None


def barrier() -> None:
    """Wait until every rank gets here (no-op in a single process)."""
    group = _group()
    if group is not None:
        import torch.distributed as dist

        dist.barrier(group=group)


def any_rank(flag: bool) -> bool:
    """True on every rank when ``flag`` is true on any rank."""
    group = _group()
    if group is None:
        return flag
    import torch
    import torch.distributed as dist

    t = torch.tensor([int(flag)])
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
    return bool(t.item())


def all_gather(obj: T) -> list[T]:
    """``obj`` of every rank, in rank order, on every rank (``[obj]`` in one process)."""
    group = _group()
    if group is None:
        return [obj]
    import torch.distributed as dist

    out: list = [None] * dist.get_world_size(group)
    dist.all_gather_object(out, obj, group=group)
    return out


def on_rank0(fn: Callable[[], T]) -> T:
    """``fn()`` on rank 0 only; every rank returns its result, or raises its failure
    (:class:`OtherRankFailed` on the other ranks)."""
    group = _group()
    if group is None:
        return fn()
    import torch.distributed as dist

    box: list = [None]
    if dist.get_rank() == 0:
        try:
            box[0] = ("ok", fn())
        except Exception as e:  # every rank must reach the broadcast, or they all hang
            box[0] = ("error", e)
    dist.broadcast_object_list(box, src=0, group=group)
    status, value = box[0]
    if status == "error":
        if dist.get_rank() == 0:
            raise value
        raise OtherRankFailed(f"rank 0 failed: {value}")
    return value


def teardown() -> None:
    """Leave the process group once every rank is done (live gloo/NCCL threads at
    interpreter exit can abort a process after all its work is written)."""
    global _stage_group
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        barrier()
        dist.destroy_process_group()
    _stage_group = None
