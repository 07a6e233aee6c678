"""Training blocks of whole documents, read lazily from fused shards.

Every fused row was computed by a teacher that saw its document alone, from its first
token (BOS where the tokenizer adds one). The student must see the same context, so with
``packing: documents`` (the default) a block never cuts a document: whole documents are
packed into ``block_size`` blocks (first fit over a window of open blocks, in corpus
order), each document's positions restart at 0, and ``position_ids`` tell the model
where documents start, which transformers turns into attention that never crosses a
document (a block-causal mask for sdpa/eager, varlen kernels for flash attention).
``packing: none`` puts one document in each block (padded). ``packing: stream`` is the
reference FuseLLM / ``group_texts`` layout, kept for reproduction and ablation only: one
token stream cut every ``block_size`` tokens, attention across documents, documents cut
at block edges, so the student's context is not the teacher's.

Only shard headers are read up front (document offsets); a block reads just the rows of
its documents from their shards (:class:`fusellm.shards.RowReader`), so a shuffled
epoch over thousands of shards reads each token once instead of decoding a whole shard
per block, and memory stays bounded by the blocks in flight whatever the corpus size.
Map-style, so the Trainer's sampler, gradient accumulation, multi-process sharding,
dataloader workers and exact resume (it skips consumed batches) all work unchanged.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch

from fusellm.manifest import CorruptArtifact
from fusellm.shards import RowReader, shard_problem

IGNORE = -100
PACKING = ("documents", "none", "stream")


class DocumentTooLong(ValueError):
    """A document longer than a training block: the block would cut its context."""


def pack(lengths: np.ndarray, block_size: int, window: int = 16) -> list[list[int]]:
    """Group documents (by index) into blocks of at most ``block_size`` tokens.

    First fit over the ``window`` most recently opened blocks, in document order:
    deterministic, and a block's documents stay near each other in the corpus (and in
    the shards). Documents with no tokens are left out.
    """
    blocks: list[list[int]] = []
    room: list[int] = []
    open_: list[int] = []
    for d, n in enumerate(lengths.tolist()):
        if n == 0:
            continue
        b = next((b for b in open_ if room[b] >= n), None)
        if b is None:
            b = len(blocks)
            blocks.append([])
            room.append(block_size)
            open_.append(b)
            if len(open_) > window:
                open_.pop(0)
        blocks[b].append(d)
        room[b] -= n
        if room[b] == 0:
            open_.remove(b)
    return blocks


class FusedBlocks(torch.utils.data.Dataset):
    """Blocks of whole documents (``block_size`` tokens at most) with their fused targets.

    Each item: ``input_ids`` int64 ``[L]``, ``shift_labels`` int64 ``[L]`` (next token
    within the document, -100 at a document's last token, on padding and where the next
    token carries no loss: a conversation's prompt and template tokens),
    ``fused_ids`` int64 ``[L, k]``, ``fused_logprobs`` float32 ``[L, k]``,
    ``fused_mask`` bool ``[L]``, ``length`` (real tokens; padding follows them), and with
    ``packing: documents`` ``position_ids`` int64 ``[L]`` (restarting at every document;
    the padding counts as one more).
    """

    def __init__(
        self,
        shards: list[Path],
        block_size: int,
        packing: str = "documents",
        open_shards: int = 64,
    ):
        if not shards:
            raise ValueError("no fused shards to train on")
        if packing not in PACKING:
            raise ValueError(f"unknown packing '{packing}' ({', '.join(PACKING)})")
        self.shards = list(shards)
        self.block_size = block_size
        self.packing = packing
        where, starts, lengths = [], [], []
        for s, p in enumerate(self.shards):
            # size + mtime against the sidecar (a full hash only when they changed): the
            # same check every stage applies to its inputs
            if problem := shard_problem(p):
                raise CorruptArtifact(problem)
            r = RowReader(p)
            offsets = r.doc_offsets
            n = np.diff(offsets)
            too_long = np.flatnonzero(n > block_size)
            if len(too_long) and packing != "stream":
                d = int(too_long[0])
                raise DocumentTooLong(
                    f"train: document '{r.doc_ids[d]}' ({p}) has {int(n[d])} target tokens, "
                    f"more than train.block_size {block_size}: a block would cut the context "
                    "its fused rows were computed on. Set corpus.block_size to at most "
                    "train.block_size (and rerun from the corpus stage) or raise "
                    "train.block_size"
                )
            where.append(np.full(len(n), s, dtype=np.int64))
            starts.append(offsets[:-1])
            lengths.append(n)
            if s == 0:
                self.k = r.k
        lengths = np.concatenate(lengths) if lengths else np.zeros(0, np.int64)
        self.doc_shard = np.concatenate(where)  # document -> shard
        self.doc_start = np.concatenate(starts).astype(np.int64)  # its first row there
        self.doc_len = lengths
        self.total = int(lengths.sum())
        if not self.total:
            raise ValueError("the fused shards hold no tokens to train on")
        # Each block is a run of (document, first token, end token) slices.
        if packing == "stream":
            sl = _stream_slices(lengths, block_size)
        else:
            groups = (
                pack(lengths, block_size)
                if packing == "documents"
                else [[d] for d in np.flatnonzero(lengths)]
            )
            sl = [[(d, 0, int(lengths[d])) for d in g] for g in groups]
        self.slices = np.array([x for b in sl for x in b], dtype=np.int64).reshape(-1, 3)
        self.block_ptr = np.concatenate([[0], np.cumsum([len(b) for b in sl])])
        self._open: OrderedDict[int, RowReader] = OrderedDict()
        self._open_max = open_shards
        self._pid = os.getpid()

    @property
    def packed(self) -> bool:
        """Blocks carry ``position_ids`` that restart at each document."""
        return self.packing == "documents"

    def __len__(self) -> int:
        return len(self.block_ptr) - 1

    @property
    def padding_fraction(self) -> float:
        return 1.0 - self.total / (len(self) * self.block_size)

    def __getstate__(self) -> dict:
        # Open files stay behind when a spawned dataloader worker gets a pickled copy.
        return {**self.__dict__, "_open": OrderedDict()}

    def _reader(self, s: int) -> RowReader:
        if os.getpid() != self._pid:  # a dataloader worker: its own file handles
            self._open, self._pid = OrderedDict(), os.getpid()
        r = self._open.get(s)
        if r is None:
            r = self._open[s] = RowReader(self.shards[s])
            if len(self._open) > self._open_max:
                self._open.popitem(last=False)
        self._open.move_to_end(s)
        return r

    def _doc(self, d: int, lo: int, hi: int) -> dict[str, np.ndarray]:
        """Tokens ``[lo, hi)`` of document ``d`` (labels: the next token in the document)."""
        n, start = int(self.doc_len[d]), int(self.doc_start[d])
        end = min(hi + 1, n)  # one row more for the label of the last token
        rows = self._reader(int(self.doc_shard[d])).rows(start + lo, start + end)
        out = {
            "input_ids": rows["input_ids"][: hi - lo],
            "ids": rows["topk_ids"][: hi - lo],
            "logprobs": rows["topk_logprobs"][: hi - lo],
            "mask": rows["aligned"][: hi - lo],
            # a label that carries no loss (a conversation's prompt and template) is ignored
            "shift_labels": np.append(
                np.where(rows["labels"][1:], rows["input_ids"][1:], IGNORE), IGNORE
            )[: hi - lo],
            "position_ids": np.arange(lo, hi, dtype=np.int64),
        }
        return out

    def __getitem__(self, b: int) -> dict[str, torch.Tensor]:
        if not 0 <= b < len(self):
            raise IndexError(b)
        parts = [
            self._doc(*map(int, x)) for x in self.slices[self.block_ptr[b] : self.block_ptr[b + 1]]
        ]
        cat = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
        n = len(cat["input_ids"])
        pad = self.block_size - n
        item = {
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
        if self.packed:
            pos = np.concatenate([cat["position_ids"], np.arange(pad, dtype=np.int64)])
            item["position_ids"] = torch.from_numpy(pos)
        return item


def _stream_slices(lengths: np.ndarray, block_size: int) -> list[list[tuple[int, int, int]]]:
    """The documents as one stream cut every ``block_size`` tokens (``packing: stream``)."""
    starts = np.concatenate([[0], np.cumsum(lengths)])
    blocks = []
    for lo in range(0, int(starts[-1]), block_size):
        hi = min(lo + block_size, int(starts[-1]))
        d = int(np.searchsorted(starts, lo, side="right") - 1)
        sl = []
        while lo < hi:
            take = min(hi, int(starts[d + 1])) - lo
            if take > 0:
                sl.append((d, lo - int(starts[d]), lo - int(starts[d]) + take))
            lo += max(take, 0)
            d += 1
        blocks.append(sl)
    return blocks


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
