"""Packed training blocks read lazily from fused shards.

The documents of the fused shards form one token stream (shard order, document order);
block ``b`` is tokens ``[b·L, (b+1)·L)``, each carrying its fused top-k target. Only the
sidecars are read up front (token counts); a block loads the one or two shards it spans,
with a small cache, so memory is bounded by a few shards whatever the corpus size.
Map-style, so the Trainer's sampler, gradient accumulation, multi-process sharding and
exact resume (it skips consumed batches) all work unchanged.
"""

from __future__ import annotations

import bisect
from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch

from fusellm.shards import read_shard, sidecar
from fusellm.storage import read_json

IGNORE = -100


class FusedBlocks(torch.utils.data.Dataset):
    """Blocks of ``block_size`` target tokens with their fused top-k targets.

    Each item: ``input_ids`` int64 ``[L]``, ``shift_labels`` int64 ``[L]`` (next token
    within the document, -100 at a document's last token and on padding),
    ``fused_ids`` int64 ``[L, k]``, ``fused_logprobs`` float32 ``[L, k]``,
    ``fused_mask`` bool ``[L]``, ``length`` (real tokens; only the last block is short).
    """

    def __init__(self, shards: list[Path], block_size: int, cache_shards: int = 2):
        if not shards:
            raise ValueError("no fused shards to train on")
        self.shards = list(shards)
        self.block_size = block_size
        counts = [read_json(sidecar(p))["tokens"] for p in self.shards]
        self.starts = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        self.total = int(self.starts[-1])
        self._cache: OrderedDict[int, dict[str, np.ndarray]] = OrderedDict()
        self._cache_size = cache_shards
        self._verified: set[int] = set()
        self.k = self._shard(0)["ids"].shape[1]

    def __len__(self) -> int:
        return (self.total + self.block_size - 1) // self.block_size

    def _shard(self, i: int) -> dict[str, np.ndarray]:
        if i in self._cache:
            self._cache.move_to_end(i)
            return self._cache[i]
        # A shard is re-read whenever it falls out of the cache (every epoch, every
        # shuffled visit): hash it once, not on each read.
        docs, _ = read_shard(self.shards[i], verify=i not in self._verified)
        self._verified.add(i)
        ids = np.concatenate([d.input_ids for d in docs]).astype(np.int64)
        labels = np.concatenate(
            [np.append(d.input_ids[1:], IGNORE) for d in docs if len(d.input_ids)] or [np.zeros(0)]
        )
        arr = {
            "input_ids": ids,
            "shift_labels": labels.astype(np.int64),
            "ids": np.concatenate([d.topk_ids for d in docs]).astype(np.int64),
            "logprobs": torch.cat([d.topk_logprobs for d in docs]).float().numpy(),
            "mask": np.concatenate(
                [
                    d.aligned if d.aligned is not None else np.ones(len(d.input_ids), bool)
                    for d in docs
                ]
            ),
        }
        self._cache[i] = arr
        if len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)
        return arr

    def __getitem__(self, b: int) -> dict[str, torch.Tensor]:
        if not 0 <= b < len(self):
            raise IndexError(b)
        lo, hi = b * self.block_size, min((b + 1) * self.block_size, self.total)
        parts = []
        s = bisect.bisect_right(self.starts, lo) - 1
        while lo < hi:
            a = self._shard(s)
            off = lo - self.starts[s]
            take = min(hi - lo, len(a["input_ids"]) - off)
            parts.append({k: v[off : off + take] for k, v in a.items()})
            lo += take
            s += 1
        cat = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
        n, L = len(cat["input_ids"]), self.block_size
        pad = L - n
        return {
            "input_ids": torch.from_numpy(np.pad(cat["input_ids"], (0, pad))),
            "shift_labels": torch.from_numpy(
                np.pad(cat["shift_labels"], (0, pad), constant_values=IGNORE)
            ),
            "fused_ids": torch.from_numpy(np.pad(cat["ids"], ((0, pad), (0, 0)))),
            "fused_logprobs": torch.from_numpy(
                np.pad(cat["logprobs"], ((0, pad), (0, 0)), constant_values=-np.inf)
            ),
            "fused_mask": torch.from_numpy(np.pad(cat["mask"], (0, pad))),
            "length": torch.tensor(n),
        }


def collate(items: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Stack blocks; ``attention_mask`` from lengths; ``labels`` for the Trainer's token
    count (it counts ``shift_labels`` when present, which is what the loss uses)."""
    batch = {k: torch.stack([it[k] for it in items]) for k in items[0] if k != "length"}
    lengths = torch.stack([it["length"] for it in items])
    batch["attention_mask"] = (
        torch.arange(batch["input_ids"].shape[1])[None, :] < lengths[:, None]
    ).long()
    batch["labels"] = torch.where(batch["attention_mask"].bool(), batch["input_ids"], IGNORE)
    return batch
