"""``fusellm fuse``: one fused top-k distribution per target position.

Candidates per document: the target's own extraction (when the target is a source) and
each other source's aligned shards. Writes ``run_dir/fuse/<split>/shard-*`` in the shard
format (target tokens, fused ids/log-probs, ``aligned`` = not a fallback) and records in
the manifest how much weight each source received. Adding a source later means
extracting and aligning only that source, then re-running fuse (with ``--force``, since
the fused output changes).
"""

from __future__ import annotations

import logging
import time

import numpy as np
from tqdm.auto import tqdm

from fusellm.distributed import Rank
from fusellm.fuse.core import Candidate, FuseParams, cumulative_nll, fuse, with_gold
from fusellm.manifest import load_manifest, outputs_hash
from fusellm.recipe import Recipe
from fusellm.sharded import finish_if_complete, pending_shards, prepare_dir, sidecar_records
from fusellm.shards import DocDist, encode_shard, read_shard, shard_name, write_shard
from fusellm.stages import ALIGN, EXTRACT, FUSE
from fusellm.tracking import start_run

log = logging.getLogger(__name__)
STAGE = FUSE


def candidate(d: DocDist, byte_end: np.ndarray | None = None) -> Candidate:
    """A shard document as a fusion candidate.

    Aligned shards carry the source's ``cum_nll`` and the target's ``byte_end``. The
    target's own extraction is aligned everywhere; its ``cum_nll`` comes from its own CE
    over the byte ends that any aligned source's shard carries (``byte_end``), and its
    rows get the gold next token at its exact probability where the top-k lacks it (as
    aligned rows do, :func:`align.project`)."""
    nxt = np.append(d.input_ids[1:], -1).astype(np.int64)
    ids, lps = d.topk_ids, d.topk_logprobs.float().numpy()
    aligned, cum, end = d.aligned, d.cum_nll, d.byte_end
    if aligned is None:  # the target's own extraction
        aligned = np.ones(len(d.input_ids), dtype=bool)
        ids, lps = with_gold(ids, lps, nxt, d.ce)
        if byte_end is not None:
            end = np.asarray(byte_end, dtype=np.int64)
            cum = cumulative_nll(d.ce, np.diff(end, prepend=0))
    return Candidate(ids, lps, aligned, d.ce, d.seq_ce, cum, end, nxt)


def _inputs(recipe: Recipe, sources: list[str]) -> dict:
    """Directory and complete manifest of each source's candidate shards."""
    out = {}
    for s in sources:
        if s == recipe.target:
            d = recipe.stage_dir(EXTRACT) / s
            out[s] = (d, load_manifest(d, f"extract (model '{s}')"))
        else:
            d = recipe.stage_dir(ALIGN) / s
            out[s] = (d, load_manifest(d, f"align (source '{s}')"))
    return out


def run(recipe: Recipe, force: bool = False) -> dict | None:
    cfg = recipe.fuse
    if cfg is None:
        raise ValueError("the recipe has no 'fuse:' section")
    rank = Rank.from_env()
    sources = cfg.sources or recipe.sources
    inputs = _inputs(recipe, sources)
    t_dir = recipe.stage_dir(EXTRACT) / recipe.target
    t_man = load_manifest(t_dir, f"extract (model '{recipe.target}')")
    plan = dict(t_man["stats"]["shards"])
    for s, (_, man) in inputs.items():
        if man["stats"]["shards"] != plan:
            raise ValueError(
                f"fuse: shards of '{s}' {man['stats']['shards']} differ from the target's {plan}"
            )
    k_out = cfg.top_k or recipe.extract.top_k
    params = FuseParams(cfg.level, cfg.temperature, k_out, cfg.criterion)
    fingerprint = {
        "config": cfg.model_dump(mode="json") | {"sources": sources, "top_k": k_out},
        "inputs": {s: outputs_hash(man) for s, (_, man) in inputs.items()},
        "target": outputs_hash(t_man),
    }
    path = recipe.stage_dir(STAGE)
    prepare_dir(path, fingerprint, force, rank, STAGE)
    todo = pending_shards(path, plan, rank, STAGE)
    if todo:
        _compute(recipe, cfg, sources, inputs, t_dir, path, todo, params, fingerprint, rank)

    def stats() -> dict:
        recs = sidecar_records(path, plan)
        docs = max(sum(r["docs"] for r in recs), 1)
        tokens = max(sum(r["tokens"] for r in recs), 1)
        return {
            "method": cfg.method,
            "level": cfg.level,
            "source_weight": {s: sum(r.get(f"x_w_{s}", 0.0) for r in recs) / docs for s in sources},
            "fused_fraction": sum(r.get("x_aligned", 0) for r in recs) / tokens,
        }

    man = finish_if_complete(path, plan, fingerprint, cfg.model_dump(mode="json"), STAGE, stats)
    if man:
        log.info(
            "fuse: %s/%s, source weights %s", cfg.method, cfg.level, man["stats"]["source_weight"]
        )
    return man


def _compute(recipe, cfg, sources, inputs, t_dir, path, todo, params, fingerprint, rank) -> None:
    t0 = time.time()
    with (
        start_run(recipe, STAGE, fingerprint, enabled=rank.rank == 0) as tracker,
        tqdm(desc="fuse", unit="tok", disable=rank.rank != 0) as bar,
    ):
        total = 0
        for split, shards in todo.items():
            for i in shards:
                t_docs, meta = read_shard(t_dir / split / shard_name(i))
                per_source = [read_shard(inputs[s][0] / split / shard_name(i))[0] for s in sources]
                out, weights, n_al = [], np.zeros(len(sources)), 0
                for j, td in enumerate(t_docs):
                    for s, docs in zip(sources, per_source, strict=True):
                        if docs[j].doc_id != td.doc_id:
                            raise ValueError(
                                f"fuse: shard {split}/{i} of '{s}' holds other documents than the target's"
                            )
                    ends = next(
                        (d[j].byte_end for d in per_source if d[j].byte_end is not None), None
                    )
                    cands = [candidate(docs[j], ends) for docs in per_source]
                    if len(td.input_ids) == 0:
                        out.append(td)
                        continue
                    ids, lps, aligned, w = fuse(cfg.method, cands, params)
                    weights += w
                    n_al += int(aligned.sum())
                    out.append(
                        DocDist(
                            td.doc_id,
                            td.input_ids,
                            td.offsets,
                            ids,
                            _torch_like(lps, td),
                            td.ce,
                            aligned,
                            labels=td.labels,  # a conversation's: only responses are labels
                        )
                    )
                n = sum(len(d.input_ids) for d in out)
                data = encode_shard(
                    out,
                    int(meta["vocab_size"]),
                    {"method": cfg.method, "level": cfg.level},
                    ce_name="target_ce",  # the rows are fused; this CE is the target's
                )
                write_shard(
                    path / split / shard_name(i),
                    data,
                    len(out),
                    n,
                    {
                        "aligned": n_al,
                        **{f"w_{s}": float(w) for s, w in zip(sources, weights, strict=True)},
                    },
                )
                total += n
                bar.update(n)
                tracker.log({"tokens": total})
        tracker.summary({"tokens": total, "seconds": round(time.time() - t0, 2)})


def _torch_like(lps: np.ndarray, like: DocDist):
    import torch

    return torch.from_numpy(lps).to(like.topk_logprobs.dtype)
