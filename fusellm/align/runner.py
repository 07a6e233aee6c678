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

from align import vocab_map
from align.vocab import is_text
from fusellm.align.core import align_chat_doc, align_doc, first_tokens, tokenizer_vocab
from fusellm.chat import render
from fusellm.distributed import Rank, any_rank, on_rank0
from fusellm.extract.runner import shard_documents
from fusellm.manifest import load_manifest, outputs_hash
from fusellm.models import load_tokenizer
from fusellm.recipe import Recipe
from fusellm.sharded import finish_if_complete, pending_shards, prepare_dir, sidecar_records
from fusellm.shards import encode_shard, read_metadata, read_shard, shard_name, write_shard
from fusellm.stages import ALIGN, CORPUS, EXTRACT
from fusellm.tracking import start_run

log = logging.getLogger(__name__)
STAGE = ALIGN


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


def _vocabs(recipe: Recipe, src: str, s_man: dict):
    """(source vocabulary, target tokenizer, target vocabulary), sized as the models'
    embeddings were at extraction (the shards record it)."""
    split = next(iter(s_man["stats"]["shards"]))
    out = []
    for name in (src, recipe.target):
        tok = load_tokenizer(recipe.models[name], name)
        rows = _vocab_size(recipe.stage_dir(EXTRACT) / name / split / shard_name(0))
        out.append((tok, tokenizer_vocab(tok, rows)))
    (src_tok, src_vocab), (tgt_tok, tgt_vocab) = out
    return src_tok, src_vocab, tgt_tok, tgt_vocab


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
    # One process builds the vocabulary map (minutes for MinED at 7B vocabularies); the
    # others take it from rank 0 instead of all building the same map at once.
    if any_rank(bool(todo)):
        src_tok, src_vocab, tgt_tok, tgt_vocab = _vocabs(recipe, src, s_man)
        id_map = on_rank0(lambda: _vocab_map(recipe, cfg, src, src_vocab, tgt_tok, tgt_vocab))
        if todo:
            vocabs = (src_vocab, tgt_vocab, src_tok, tgt_tok)
            _compute(recipe, cfg, src, path, todo, vocabs, id_map, k_out, fingerprint, rank)

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
            # mean probability per aligned position that went to no target id (unmapped)
            "lost_mass": sum(r.get("x_lost_mass", 0.0) for r in recs) / max(aligned, 1),
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


def _vocab_map(recipe, cfg, src, src_vocab, tgt_tok, tgt_vocab) -> np.ndarray:
    """Source id -> target id (int32, -1 unmapped) for ``cfg.vocab_method``, cached under
    ``align/maps``."""
    t0 = time.time()
    first_ids = (
        first_tokens(tgt_tok, tgt_vocab.canon, src_vocab.canon)
        if cfg.vocab_method == "next_token"
        else None
    )
    id_map = vocab_map(
        src_vocab,
        tgt_vocab,
        cfg.vocab_method,
        cache_dir=recipe.stage_dir(STAGE) / "maps",
        first=first_ids,
        max_distance=cfg.max_distance,
    )
    text = [is_text(c) for c in src_vocab.canon]
    exact = [
        t and m >= 0 and c == tgt_vocab.canon[m]
        for t, c, m in zip(text, src_vocab.canon, id_map, strict=True)
    ]
    log.info(
        "%s: %s vocabulary map %d -> %d ids in %.1fs (%.1f%% of text tokens exact, %.1f%% unmapped)",
        f"align[{src}]",
        cfg.vocab_method,
        len(src_vocab),
        len(tgt_vocab),
        time.time() - t0,
        100 * sum(exact) / max(sum(text), 1),
        100 * sum(t and m < 0 for t, m in zip(text, id_map, strict=True)) / max(sum(text), 1),
    )
    return id_map


def _compute(recipe, cfg, src, path, todo, vocabs, id_map, k_out, fingerprint, rank) -> None:
    target = recipe.target
    s_dir, t_dir = recipe.stage_dir(EXTRACT) / src, recipe.stage_dir(EXTRACT) / target
    src_vocab, tgt_vocab, src_tok, tgt_tok = vocabs
    t0 = time.time()
    corpus_dir = recipe.stage_dir(CORPUS)
    dps = recipe.extract.docs_per_shard
    with (
        start_run(
            recipe, f"{STAGE}/{src}", {"source": src, **fingerprint}, enabled=rank.rank == 0
        ) as tracker,
        tqdm(desc=f"align {src}", unit="tok", disable=rank.rank != 0) as bar,
    ):
        tot_tok = tot_al = 0
        for split, shards in todo.items():
            for i, texts, turns in shard_documents(corpus_dir, split, dps, shards):
                s_docs, _ = read_shard(s_dir / split / shard_name(i))
                t_docs, _ = read_shard(t_dir / split / shard_name(i))
                ids = [
                    [d.doc_id for d in s_docs],
                    [d.doc_id for d in t_docs],
                    [d for d, _ in texts],
                ]
                if not ids[0] == ids[1] == ids[2]:
                    raise ValueError(
                        f"align[{src}]: shard {split}/{i} holds different documents for {src}, "
                        f"{target} and the corpus; rerun extract for both"
                    )
                out, rel, lost = [], {}, 0.0
                for sd, td, (_, doc_text), conv in zip(s_docs, t_docs, texts, turns, strict=True):
                    if conv is not None:  # each model extracted its own rendering
                        s_r, t_r = render(src_tok, conv, src), render(tgt_tok, conv, target)
                        d, a, lost_d = align_chat_doc(
                            sd,
                            td,
                            (s_r.text, s_r.spans),
                            (t_r.text, t_r.spans),
                            id_map,
                            src_vocab,
                            tgt_vocab,
                            k_out,
                            cfg.gold_span,
                        )
                    else:
                        d, a, lost_d = align_doc(
                            sd,
                            td,
                            doc_text,
                            id_map,
                            src_vocab,
                            tgt_vocab,
                            cfg.seq_method,
                            cfg.strict,
                            k_out,
                            cfg.gold_span,
                        )
                    out.append(d)
                    lost += lost_d
                    for k, v in a.counts().items():
                        rel[k] = rel.get(k, 0) + v
                n = sum(len(d.input_ids) for d in out)
                n_al = int(sum(d.aligned.sum() for d in out))
                data = encode_shard(
                    out, len(tgt_vocab), {"source": src, "target": target, "top_k": str(k_out)}
                )
                write_shard(
                    path / split / shard_name(i),
                    data,
                    len(out),
                    n,
                    {"aligned": n_al, "lost_mass": lost, **{f"rel_{k}": v for k, v in rel.items()}},
                )
                tot_tok, tot_al = tot_tok + n, tot_al + n_al
                bar.update(n)
                tracker.log({"tokens": tot_tok, "aligned_fraction": tot_al / max(tot_tok, 1)})
        tracker.summary(
            {
                "tokens": tot_tok,
                "aligned_fraction": tot_al / max(tot_tok, 1),
                "seconds": round(time.time() - t0, 2),
            }
        )
