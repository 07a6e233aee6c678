"""The plan's disk section: the bytes each stage writes (corpus lines, shards, vocabulary
maps, models, checkpoints, the decontamination index), what is left after the run and
the peak while it runs."""

from __future__ import annotations

import json
import math

from fusellm.corpus.core import SPLITS
from fusellm.merge.config import evolve_searches
from fusellm.plan import core
from fusellm.plan.context import Context
from fusellm.plan.core import DTYPE_BYTES, Row
from fusellm.plan.counts import chars_of, utf8_bytes_of
from fusellm.shards import id_width
from fusellm.stages import (
    ALIGN,
    BENCH,
    CLM_ONLY,
    CORPUS,
    EVOLVE,
    EXTRACT,
    FUSE,
    MERGE,
    PAIRWISE,
    TRAIN,
)


def disk_rows(ctx: Context) -> tuple[list[Row], dict[str, float]]:
    """The rows, and the totals ``disk_after_run``, ``disk_peak`` (+ what exists only
    while a stage runs) and ``disk_unknown_rows``."""
    r = ctx.recipe
    rows: list[Row] = []
    transient = {}  # extra bytes that exist only while a stage runs
    if r.corpus is not None:
        rows.append(_corpus(ctx))
    idx = _decontam_index(ctx)
    if idx is not None:
        rows.append(idx)
        if idx.value is not None:
            transient[BENCH] = idx.value  # the sorted runs beside the index while it is built
    rows += _shard_rows(ctx)
    for stage in (TRAIN, CLM_ONLY):
        if r.train is not None and ctx.wanted(stage):
            model, ckpt, extra = _trained(ctx, stage)
            rows += [model, ckpt]
            transient[stage] = extra
    for src in _pairs(ctx):
        model, ckpt, extra = _trained(ctx, PAIRWISE, f"{src}/train/")
        rows += [model, ckpt]
        transient[f"{PAIRWISE}/{src}"] = extra
    if ctx.wanted(MERGE):
        for name, spec in r.merge.items():
            rows.append(
                _model_dir(
                    ctx, MERGE, name, DTYPE_BYTES[spec.dtype], f"merged weights in {spec.dtype}"
                )
            )
    if ctx.wanted(EVOLVE):
        for name, cfg in evolve_searches(r.evolve):
            item = f"{name}/model" if name else "model"
            what = (
                "the best merge in float32"
                if cfg.space == "ps"
                else "the best layer path in float32, as long as the model it starts from "
                f"(at most {cfg.repeats} × all the sources' layers)"
            )
            rows.append(_model_dir(ctx, EVOLVE, item, 4, what))
    known = sum(x.value for x in rows if x.value is not None)
    return rows, {
        "disk_after_run": known,
        "disk_peak": known + max(transient.values(), default=0),
        "disk_unknown_rows": sum(x.value is None for x in rows),
    }


def _corpus(ctx: Context) -> Row:
    c = ctx.corpus
    if c is None:
        return Row(CORPUS, "train/valid/test.jsonl", None, "inputs not on disk")
    if c.line_bytes is not None:
        return Row(CORPUS, "train/valid/test.jsonl", c.line_bytes, "written (corpus manifest)")
    text = sum(st["text_bytes"] for st in c.splits.values())
    chunks = ctx.chunks(list(SPLITS))
    esc = sum(len(json.dumps(t, ensure_ascii=False).encode()) - 2 for _, t in c.sample) / max(
        utf8_bytes_of(c.sample), 1
    )
    domain = max(c.domains, key=len, default="")
    per_chunk = sum(
        len(json.dumps({"id": i, "parent": i[:-2], "domain": domain, "text": ""}).encode()) + 1
        for i, _ in c.sample
    ) / max(len(c.sample), 1)
    return Row(
        CORPUS,
        "train/valid/test.jsonl",
        core.corpus_line_bytes(text, esc, chunks, per_chunk),
        f"text × {esc:.3f} (JSON escaping) + {per_chunk:.0f} B per chunk (id, parent, domain)",
    )


def _decontam_index(ctx: Context) -> Row | None:
    from fusellm.bench.harness import is_harness
    from fusellm.bench.tasks import LM

    b = ctx.recipe.bench
    if b is None or not b.decontaminate or not any(t != LM and not is_harness(t) for t in b.tasks):
        return None
    if ctx.corpus is None or not ctx.corpus.sample:
        return Row(BENCH, "corpus/decontam-* (n-gram index)", None, "train split unknown")
    from fusellm.bench.decontam import text_words

    sample = ctx.corpus.sample
    words = sum(len(text_words(t)) for _, t in sample) / max(chars_of(sample), 1)
    train_words = words * ctx.corpus.splits["train"]["chars"]
    return Row(
        BENCH,
        "corpus/decontam-* (n-gram index)",
        train_words * core.DECONTAM_BYTES_PER_WORD,
        f"{train_words:,.0f} train words × 16 B (13- and 8-gram hashes); 2× while built",
    )


def _shard_rows(ctx: Context) -> list[Row]:
    """The top-k shards of extract (per model), align (per source, + its vocabulary map)
    and fuse."""
    r = ctx.recipe
    ext = r.extract
    docs = ctx.chunks()
    rows = []
    if ctx.wanted(EXTRACT):
        for name in ctx.extract_models:
            meta = (("model", name), ("top_k", str(ext.top_k)))
            fmt = core.ShardFormat(
                "extract", ctx.shapes[name].vocab_rows, ext.top_k, ext.logprob_dtype, meta
            )
            rows.append(_shards(ctx, EXTRACT, name, fmt, ctx.model_tokens(name), docs))
    t_rows = ctx.shapes[r.target].vocab_rows
    t_tokens = ctx.model_tokens(r.target)
    if ctx.wanted(ALIGN):
        k = r.align.top_k or ext.top_k
        for src in (s for s in r.sources if s != r.target):
            meta = (("source", src), ("target", r.target), ("top_k", str(k)))
            fmt = core.ShardFormat("align", t_rows, k, ext.logprob_dtype, meta)
            rows.append(_shards(ctx, ALIGN, src, fmt, t_tokens, docs))
            map_bytes = 4 * ctx.shapes[src].vocab_rows + 128
            rows.append(Row(ALIGN, f"maps/{src}", map_bytes, "int32 per source id (.npy)"))
    if r.fuse is not None:
        fz = r.fuse
        meta = (("level", fz.level), ("method", fz.method))
        fmt = core.ShardFormat("fuse", t_rows, fz.top_k or ext.top_k, ext.logprob_dtype, meta)
        if ctx.wanted(FUSE):
            rows.append(_shards(ctx, FUSE, "shards", fmt, t_tokens, docs))
        for src in _pairs(ctx):  # each pair's fused shards: the same format and tokens
            rows.append(_shards(ctx, PAIRWISE, f"{src}/fuse", fmt, t_tokens, docs))
    return rows


def _pairs(ctx: Context) -> list[str]:
    """The sources of pairwise fusion (``pairwise:``), each with its own fuse and train."""
    if not ctx.wanted(PAIRWISE) or ctx.recipe.train is None:
        return []
    from fusellm.train.pairwise import pair_sources

    return pair_sources(ctx.recipe)


def _shards(ctx: Context, stage, name, fmt: core.ShardFormat, tokens, docs) -> Row:
    if tokens is None or docs is None:
        return Row(stage, name, None, "tokens unknown")
    dps = ctx.recipe.extract.docs_per_shard
    b = fmt.stage_bytes(tokens, docs, dps, ctx.id_bytes)
    shards = math.ceil(docs / dps)
    return Row(
        stage,
        name,
        b,
        f"{fmt.token_bytes()} B/token (k={fmt.top_k}, {id_width(fmt.vocab_rows)}-byte ids) "
        f"+ {shards:,} shard headers",
    )


def _model_dir(ctx: Context, stage: str, item: str, dtype_bytes: int, what: str) -> Row:
    """A saved copy of the target: its weights at ``dtype_bytes`` + its tokenizer."""
    shape = ctx.shapes[ctx.recipe.target]
    tb = ctx.tokenizer_bytes
    return Row(
        stage,
        item,
        core.model_dir_bytes(shape, dtype_bytes, tb),
        f"{what}: {core.human_count(shape.params)} params × {dtype_bytes} B"
        + (f" + tokenizer {core.human_bytes(tb)}" if tb else " (+ tokenizer, size unknown)"),
    )


def _trained(ctx: Context, stage: str, prefix: str = "") -> tuple[Row, Row, float]:
    """(the trained model, its checkpoints, bytes of checkpoints that exist only while
    training); ``prefix``: where under the stage directory (a pair's ``SOURCE/train/``)."""
    args = ctx.args
    zero, _, _ = ctx.zero
    t = ctx.recipe.target
    spec_dtype = ctx.recipe.models[t].dtype
    trained = ctx.weight_bytes(t) if zero else 4
    saved = (
        DTYPE_BYTES[spec_dtype] if not zero and spec_dtype in ("bfloat16", "float16") else trained
    )
    model = _model_dir(ctx, stage, f"{prefix}model", saved, "the trained model")
    steps, per_epoch, _, _ = ctx.steps
    if steps is None:
        return model, Row(stage, f"{prefix}checkpoints", None, "steps unknown"), 0.0
    n = core.saves(steps, str(args.save_strategy.value), args.save_steps, per_epoch)
    every = args.logging_steps
    logged = steps // int(every) if every >= 1 else round(1 / every)
    one = core.checkpoint_bytes(ctx.shapes[t].params, trained, zero) + core.checkpoint_small_files(
        ctx.settings.gpus, zero, logged
    )
    steady, peak, final = core.checkpoints_kept(
        n, args.checkpoint_limit, args.keep_checkpoints_when_done
    )
    what = f"ZeRO-{zero}" if zero else "no DeepSpeed"
    ckpt = Row(
        stage,
        f"{prefix}checkpoints",
        final * one,
        f"{core.human_bytes(one)} each ({what}); {n} saved, {final} kept after the run, "
        f"{peak} at once while one is written",
        {
            "each": one,
            "saved": n,
            "while_training": steady,
            "at_once": peak,
            "after_run": final,
        },
    )
    return model, ckpt, (peak - final) * one
