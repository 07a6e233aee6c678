"""``fusellm align``: every source's top-k distributions on the target's tokens and vocabulary.

Reads ``run_dir/extract/<source>`` and ``run_dir/extract/<target>`` shard by shard (the
same documents in the same shards), writes ``run_dir/align/<source>/<split>/shard-*``
in the shard format, and records the aligned fraction per source in the manifest. The
target itself needs no alignment (fuse reads its extraction directly). The vocabulary
map of each tokenizer pair is computed once and cached under ``run_dir/align/maps``.
"""

from __future__ import annotations

import logging
import time

import numpy as np
from tqdm.auto import tqdm

from align import canonicalize, vocab_map
from fusellm.align.core import align_doc, byte_lengths, vocab_strings
from fusellm.extract.runner import STAGE as EXTRACT
from fusellm.manifest import load_manifest, outputs_hash
from fusellm.models import load_tokenizer
from fusellm.recipe import Recipe
from fusellm.sharded import Rank, finish_if_complete, pending_shards, prepare_dir, sidecar_records
from fusellm.shards import encode_shard, read_metadata, read_shard, shard_name, write_shard
from fusellm.tracking import start_run

log = logging.getLogger(__name__)
STAGE = "align"


def _vocab_size(shard) -> int:
    return int(read_metadata(shard)["vocab_size"])


def run(recipe: Recipe, force: bool = False) -> dict[str, dict | None]:
    cfg = recipe.align
    if cfg is None:
        raise ValueError("the recipe has no 'align:' section")
    rank = Rank.from_env()
    target = recipe.target
    t_dir = recipe.stage_dir(EXTRACT) / target
    t_man = load_manifest(t_dir, f"extract (model '{target}')")
    out = {}
    for src in [s for s in recipe.sources if s != target]:
        out[src] = _run_source(recipe, cfg, src, t_man, rank, force)
    return out


def _canon(recipe: Recipe, name: str, vocab_size: int) -> list[bytes | None]:
    tok = load_tokenizer(recipe.models[name], name)
    return canonicalize(vocab_strings(tok, vocab_size), set(tok.all_special_ids))


def _run_source(recipe, cfg, src, t_man, rank, force) -> dict | None:
    target = recipe.target
    s_dir = recipe.stage_dir(EXTRACT) / src
    s_man = load_manifest(s_dir, f"extract (model '{src}')")
    if s_man["stats"]["shards"] != t_man["stats"]["shards"]:
        raise ValueError(
            f"align[{src}]: its extraction has shards {s_man['stats']['shards']} but the target's has "
            f"{t_man['stats']['shards']}; extract both with the same corpus and extract config"
        )
    k_out = cfg.top_k or recipe.extract.top_k
    fingerprint = {
        "config": cfg.model_dump(mode="json") | {"top_k": k_out},
        "source": outputs_hash(s_man),
        "target": outputs_hash(t_man),
    }
    path = recipe.stage_dir(STAGE) / src
    label = f"align[{src}]"
    prepare_dir(path, fingerprint, force, rank, label)
    plan = dict(s_man["stats"]["shards"])
    todo = pending_shards(path, plan, rank, label)
    if todo:
        _compute(recipe, cfg, src, path, todo, s_man, t_man, k_out, fingerprint, rank)

    def stats() -> dict:
        recs = sidecar_records(path, plan)
        tokens = sum(r["tokens"] for r in recs)
        rel: dict[str, int] = {}
        for r in recs:
            for k, v in r.items():
                if k.startswith("x_rel_"):
                    rel[k[6:]] = rel.get(k[6:], 0) + v
        aligned = sum(r.get("x_aligned", 0) for r in recs)
        return {
            "aligned_fraction": aligned / max(tokens, 1),
            "relations": rel,
            "source": src,
            "target": target,
        }

    man = finish_if_complete(path, plan, fingerprint, cfg.model_dump(mode="json"), label, stats)
    if man:
        log.info(
            "%s: aligned fraction %.4f (%s)",
            label,
            man["stats"]["aligned_fraction"],
            cfg.vocab_method,
        )
    return man


def _compute(recipe, cfg, src, path, todo, s_man, t_man, k_out, fingerprint, rank) -> None:
    target = recipe.target
    s_dir, t_dir = recipe.stage_dir(EXTRACT) / src, recipe.stage_dir(EXTRACT) / target
    first = next(iter(todo))
    v_src = _vocab_size(s_dir / first / shard_name(0))
    v_tgt = _vocab_size(t_dir / first / shard_name(0))
    t0 = time.time()
    c_src, c_tgt = _canon(recipe, src, v_src), _canon(recipe, target, v_tgt)
    id_map = vocab_map(c_src, c_tgt, cfg.vocab_method, cache_dir=recipe.stage_dir(STAGE) / "maps")
    map_s = time.time() - t0
    log.info(
        "%s: %s vocabulary map %d -> %d ids in %.1fs (%.1f%% exact)",
        f"align[{src}]",
        cfg.vocab_method,
        v_src,
        v_tgt,
        map_s,
        100
        * float(
            np.mean(
                [
                    c is not None and m >= 0 and c == c_tgt[m]
                    for c, m in zip(c_src, id_map, strict=True)
                ]
            )
        ),
    )
    nbytes = (byte_lengths(c_src), byte_lengths(c_tgt))
    strings = None
    if cfg.seq_method == "dp":
        strings = (
            [c.decode("latin-1") if c is not None else "" for c in c_src],
            [c.decode("latin-1") if c is not None else "" for c in c_tgt],
        )
    with (
        start_run(
            recipe, f"{STAGE}/{src}", {"source": src, **fingerprint}, enabled=rank.rank == 0
        ) as tracker,
        tqdm(desc=f"align {src}", unit="tok", disable=rank.rank != 0) as bar,
    ):
        tot_tok = tot_al = 0
        for split, shards in todo.items():
            for i in shards:
                s_docs, _ = read_shard(s_dir / split / shard_name(i))
                t_docs, _ = read_shard(t_dir / split / shard_name(i))
                if [d.doc_id for d in s_docs] != [d.doc_id for d in t_docs]:
                    raise ValueError(
                        f"align[{src}]: shard {split}/{i} holds different documents for {src} and {target}"
                    )
                out, rel = [], {}
                for sd, td in zip(s_docs, t_docs, strict=True):
                    d, a = align_doc(
                        sd,
                        td,
                        id_map,
                        cfg.seq_method,
                        cfg.strict,
                        k_out,
                        *(strings or (None, None)),
                        *nbytes,
                    )
                    out.append(d)
                    for k, v in a.counts().items():
                        rel[k] = rel.get(k, 0) + v
                n = sum(len(d.input_ids) for d in out)
                n_al = int(sum(d.aligned.sum() for d in out))
                data = encode_shard(
                    out, v_tgt, {"source": src, "target": target, "top_k": str(k_out)}
                )
                write_shard(
                    path / split / shard_name(i),
                    data,
                    len(out),
                    n,
                    {"aligned": n_al, **{f"rel_{k}": v for k, v in rel.items()}},
                )
                tot_tok, tot_al = tot_tok + n, tot_al + n_al
                bar.update(n)
                tracker.log({"tokens": tot_tok, "aligned_fraction": tot_al / max(tot_tok, 1)})
        tracker.summary(
            {
                "tokens": tot_tok,
                "aligned_fraction": tot_al / max(tot_tok, 1),
                "vocab_map_seconds": round(map_s, 2),
                "seconds": round(time.time() - t0, 2),
            }
        )
