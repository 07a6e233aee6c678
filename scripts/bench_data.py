"""Benchmark the training dataset's random access: blocks/s over 10 vs 1,000 fused shards.

    python scripts/bench_data.py                 # 2M tokens, 2,048-token blocks
    python scripts/bench_data.py --tokens 8e6    # a larger corpus

The Trainer samples blocks in random order, so over thousands of fused shards nearly every
block lands in a shard that is not in memory. The same fused documents (synthetic: random
ids and log-probs at k = 10, a 32k vocabulary, document lengths 50-2,000 tokens) are
written once into 10 and once into 1,000 shards; then, for each layout:

* ``blocks_per_s``: blocks read in a random order (median of repeats) through
  :class:`fusellm.train.data.FusedBlocks`, which reads only a block's rows from its shards;
* ``whole_shard_blocks_per_s``: the same blocks when each one decodes the whole shards its
  documents are in (what the reader did before, once a shuffle left its small cache);
* ``open_s``: building the dataset (headers and sidecars of every shard).

``blocks_per_s_10_over_1000`` must stay at most 1.5: the cost of a block does not grow
with the number of shards. The last line of output is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from fusellm.shards import DocDist, encode_shard, read_shard, shard_name, write_shard  # noqa: E402
from fusellm.train.data import FusedBlocks  # noqa: E402

V, K = 32_000, 10


def documents(total: int, seed: int = 0) -> list[DocDist]:
    rng = np.random.default_rng(seed)
    docs, n = [], 0
    while n < total:
        t = int(min(rng.integers(50, 2000), total - n)) or 1
        lp = np.sort(rng.normal(-6, 2, (t, K)).astype(np.float32), axis=1)[:, ::-1]
        docs.append(
            DocDist(
                f"doc{len(docs)}",
                rng.integers(0, V, t).astype(np.int32),
                np.stack([np.arange(t), np.arange(t) + 1], 1).astype(np.int32),
                rng.integers(0, V, (t, K)).astype(np.int32),
                torch.from_numpy(lp.copy()).half(),
                rng.random(t).astype(np.float32),
                rng.random(t) < 0.9,
            )
        )
        n += t
    return docs


def write(docs: list[DocDist], n_shards: int, out: Path) -> list[Path]:
    out.mkdir(parents=True)
    paths = []
    for i, part in enumerate(np.array_split(np.arange(len(docs)), n_shards)):
        p = out / shard_name(i)
        ds = [docs[j] for j in part]
        write_shard(
            p,
            encode_shard(ds, V, {}, ce_name="target_ce"),
            len(ds),
            sum(len(d.input_ids) for d in ds),
        )
        paths.append(p)
    return paths


def whole_shard_read(ds: FusedBlocks, b: int) -> int:
    """Decode every shard the block's documents live in, whole (the old reader's cost)."""
    n = 0
    for d, _lo, _hi in ds.slices[ds.block_ptr[b] : ds.block_ptr[b + 1]]:
        docs, _ = read_shard(ds.shards[int(ds.doc_shard[d])], verify=False)
        n += len(docs)
    return n


def rate(fn, order: list[int], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        for b in order:
            fn(b)
        times.append(time.perf_counter() - t)
    return len(order) / statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--tokens", type=float, default=2e6)
    ap.add_argument("--block", type=int, default=2048)
    ap.add_argument("--blocks", type=int, default=300, help="blocks read per repeat")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()

    docs = documents(int(args.tokens))
    out: dict = {"tokens": int(args.tokens), "documents": len(docs), "block": args.block}
    with tempfile.TemporaryDirectory() as tmp:
        for n_shards in (10, 1000):
            paths = write(docs, n_shards, Path(tmp) / f"s{n_shards}")
            t = time.perf_counter()
            ds = FusedBlocks(paths, args.block)
            open_s = time.perf_counter() - t
            rng = np.random.default_rng(1)
            order = rng.permutation(len(ds))[: args.blocks].tolist()
            out[f"shards_{n_shards}"] = {
                "blocks": len(ds),
                "open_s": round(open_s, 3),
                "blocks_per_s": round(rate(ds.__getitem__, order, args.repeats), 1),
                "whole_shard_blocks_per_s": round(
                    rate(lambda b, ds=ds: whole_shard_read(ds, b), order[:60], 1), 1
                ),
            }
    a, b = out["shards_10"], out["shards_1000"]
    out["blocks_per_s_10_over_1000"] = round(a["blocks_per_s"] / b["blocks_per_s"], 3)
    out["speedup_over_whole_shard_at_10"] = round(
        a["blocks_per_s"] / a["whole_shard_blocks_per_s"], 1
    )
    print(json.dumps(out))


if __name__ == "__main__":
    main()
