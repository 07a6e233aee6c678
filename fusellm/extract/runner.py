"""``fusellm extract``: top-k next-token distributions of each model over the corpus.

Output per model: ``run_dir/extract/<model>/<split>/shard-NNNNN.safetensors`` (format in
:mod:`fusellm.shards`), a sidecar per shard, and ``manifest.json`` once every shard of
every split is done.

Scale-out needs no coordination: shard ``i`` belongs to rank ``i % WORLD_SIZE`` (ranks
from torchrun / ``accelerate launch`` / the deepspeed launcher). Each rank skips shards
that already have a valid sidecar, recomputes missing, unfinished or corrupt ones, and
the rank that finds every shard valid writes the manifest. Shard contents depend only on
the documents in the shard, so 1 and N processes write the same shards.

Bad model input (the rules for every stage are in :mod:`fusellm.models`): before a
shard's forward pass, a document longer than the model's maximum positions, or a token id
beyond the model's embedding rows (a tokenizer larger than the model), stops with a
:class:`~fusellm.models.ModelInputError` naming the model, the document and the token or
limit. The pad token plays no part: batches are right-padded with id 0, every padded
position is masked and dropped before the output head, so nothing stored depends on it.
Padded embedding rows are part of the stored distribution (top-k and log-softmax over
all rows).
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from fusellm.batching import pad_batch, plan_batches
from fusellm.chat import Turn, render, rendering_ids, response_labels
from fusellm.corpus.runner import split_file
from fusellm.distributed import Rank
from fusellm.extract.config import CONTENT_FIELDS, ExtractConfig
from fusellm.extract.core import TopKScorer
from fusellm.manifest import load_manifest
from fusellm.models import (
    ENCODING,
    ModelInputError,
    check_positions,
    encode,
    load_model,
    load_tokenizer,
    locate,
    max_positions,
    resolve_dtype,
    tokenizer_fingerprint,
)
from fusellm.recipe import Recipe
from fusellm.sharded import finish_if_complete, pending_shards, prepare_dir, shard_paths
from fusellm.shards import DocDist, encode_shard, shard_name, write_shard
from fusellm.stages import CORPUS, EXTRACT
from fusellm.tracking import start_run

log = logging.getLogger(__name__)
STAGE = EXTRACT


def model_dir(recipe: Recipe, name: str) -> Path:
    return recipe.stage_dir(STAGE) / name


def model_shards(recipe: Recipe, name: str, split: str) -> list[Path]:
    """The complete extraction of ``name`` for ``split``: its shard paths in order.

    Raises FileNotFoundError (telling what to run) if that extraction is not complete.
    """
    path = model_dir(recipe, name)
    man = load_manifest(path, f"extract (model '{name}')")
    return shard_paths(path, man, split, f"extract[{name}]")


def _device(cfg: ExtractConfig, rank: Rank) -> str:
    if cfg.device != "auto":
        return cfg.device
    return f"cuda:{rank.local}" if torch.cuda.is_available() else "cpu"


def shard_documents(
    corpus_dir: Path, split: str, docs_per_shard: int, shards
) -> Iterator[tuple[int, list[tuple[str, str]], list[list[Turn] | None]]]:
    """``(shard, [(doc id, text), ...], turns)`` for each of ``shards`` in one pass over
    the split file: shard ``i`` holds documents ``[i·n, (i+1)·n)``; documents of other
    shards are skipped without being kept. ``turns[j]``: document ``j``'s conversation
    (a chat corpus row, see :mod:`fusellm.chat`), else None."""
    wanted = set(shards)
    docs: list[tuple[str, str]] = []
    turns: list[list[Turn] | None] = []
    shard = 0
    with open(corpus_dir / split_file(split), encoding="utf-8") as f:
        for j, line in enumerate(f):
            if j // docs_per_shard != shard:
                if docs:
                    yield shard, docs, turns
                docs, turns, shard = [], [], j // docs_per_shard
            if shard in wanted:
                rec = json.loads(line)
                docs.append((rec["id"], rec["text"]))
                msgs = rec.get("messages")
                turns.append([Turn(m["role"], m["content"]) for m in msgs] if msgs else None)
    if docs:
        yield shard, docs, turns


@dataclass
class Tokenized:
    """One shard's documents as the model's tokenizer encodes them (host work only)."""

    docs: list[tuple[str, str]]  # (doc id, text; a conversation's: this model's rendering)
    seqs: list[list[int]]  # token ids per document
    offsets: list  # character spans per document
    labels: list  # per document: bool [T] of a conversation (response_labels), else None


def tokenize_shard(
    tok,
    docs: list[tuple[str, str]],
    cfg: ExtractConfig,
    max_pos,
    name: str,
    vocab_size: int,
    turns: list[list[Turn] | None] | None = None,
) -> Tokenized:
    """Tokenize one shard's documents and check every one against the model (length, token
    ids) before any forward pass, so bad input stops with a message, not an index error.
    A conversation (``turns[j]``) is the model's own rendering of it
    (:func:`fusellm.chat.render`), tokenized as a rendering (its template's special tokens
    are special); ``Tokenized.docs`` then holds the rendering."""
    turns = turns or [None] * len(docs)
    plain = [j for j, t in enumerate(turns) if t is None]
    seqs: list = [None] * len(docs)
    offsets: list = [None] * len(docs)
    if plain:
        enc = encode(tok, [docs[j][1] for j in plain], cfg.add_special_tokens, offsets=True)
        for j, s, o in zip(plain, enc["input_ids"], enc["offset_mapping"], strict=True):
            seqs[j], offsets[j] = s, o
    docs = list(docs)
    labels: list = [None] * len(docs)
    for j, t in enumerate(turns):
        if t is not None:
            r = render(tok, t, name)
            docs[j] = (docs[j][0], r.text)
            seqs[j], offsets[j] = rendering_ids(tok, r.text, offsets=True)
            starts = np.asarray([a for a, _ in offsets[j]], dtype=np.int64)
            labels[j] = response_labels(starts, r.spans)
    for (doc_id, _), s in zip(docs, seqs, strict=True):
        check_positions(
            name,
            max_pos,
            len(s),
            f"extract: document '{doc_id}'",
            f"add '{name}' to corpus.fit_models or lower corpus.block_size, then rerun "
            "the corpus stage with --force",
        )
        if s and max(s) >= vocab_size:
            bad = next(t for t in s if t >= vocab_size)
            raise ModelInputError(
                f"model '{name}': extract: document '{doc_id}' has token "
                f"{tok.convert_ids_to_tokens(bad)!r} (id {bad}) beyond the model's "
                f"{vocab_size} embedding rows: the tokenizer does not belong to this "
                f"model (check models.{name}.tokenizer)"
            )
    return Tokenized(docs, seqs, offsets, labels)


def score_shard(scorer: TopKScorer, t: Tokenized, cfg: ExtractConfig) -> list[DocDist]:
    """Run the model over one tokenized shard (order kept)."""
    # Padded positions are masked and dropped before the head, so any valid id will do:
    # id 0 exists in every vocabulary, whereas the tokenizer's pad token may be missing,
    # be EOS, or be an added token beyond the embedding.
    pad = 0
    k, dtype = cfg.top_k, getattr(torch, cfg.logprob_dtype)
    out: list[DocDist | None] = [None] * len(t.docs)
    nonempty = [i for i, s in enumerate(t.seqs) if s]
    for batch in plan_batches(
        [len(t.seqs[i]) for i in nonempty], cfg.batch_tokens, cfg.max_batch_size
    ):
        idx = [nonempty[j] for j in batch]
        ids, mask = pad_batch([t.seqs[i] for i in idx], pad)
        dev = scorer.device
        for i, sc in zip(idx, scorer(ids.to(dev), mask.to(dev)), strict=True):
            out[i] = DocDist(
                t.docs[i][0],
                np.asarray(t.seqs[i], dtype=np.int32),
                np.asarray(t.offsets[i], dtype=np.int32).reshape(-1, 2),
                sc.topk_ids.numpy(),
                sc.topk_logprobs.to(dtype),
                sc.ce.numpy(),
                labels=t.labels[i],
            )
    for i, d in enumerate(out):
        if d is None:  # a document with no tokens for this tokenizer
            out[i] = DocDist(
                t.docs[i][0],
                np.zeros(0, np.int32),
                np.zeros((0, 2), np.int32),
                np.zeros((0, k), np.int32),
                torch.zeros(0, k, dtype=dtype),
                np.zeros(0, np.float32),
            )
    return out  # type: ignore[return-value]


def extract_shard(
    scorer: TopKScorer,
    tok,
    docs: list[tuple[str, str]],
    cfg: ExtractConfig,
    max_pos: tuple[int, str] | None,
    name: str,
) -> list[DocDist]:
    """Tokenize and score one shard's documents (order kept)."""
    return score_shard(
        scorer, tokenize_shard(tok, docs, cfg, max_pos, name, scorer.vocab_size), cfg
    )


def write_dists(
    dists: list[DocDist], vocab_size: int, cfg: ExtractConfig, name: str, path: Path
) -> tuple[int, int]:
    """Serialise and write one shard (hashing it for its sidecar); (tokens, bytes)."""
    data = encode_shard(dists, vocab_size, {"model": name, "top_k": str(cfg.top_k)})
    n = sum(len(d.input_ids) for d in dists)
    write_shard(path, data, len(dists), n)
    return n, len(data)


def run(recipe: Recipe, force: bool = False) -> dict[str, dict | None]:
    """Extract every configured model; returns {model: manifest or None if skipped/partial}."""
    cfg = recipe.extract
    if cfg is None:
        raise ValueError("the recipe has no 'extract:' section")
    corpus = load_manifest(recipe.stage_dir(CORPUS), CORPUS)
    corpus_dir = recipe.stage_dir(CORPUS)
    rank = Rank.from_env()
    results = {}
    for name in cfg.models or recipe.all_models:
        results[name] = _run_model(recipe, cfg, name, corpus, corpus_dir, rank, force)
    return results


def _run_model(recipe, cfg, name, corpus, corpus_dir, rank, force) -> dict | None:
    spec = recipe.models[name]
    tok = load_tokenizer(spec, name)
    fingerprint = {
        "config": {f: getattr(cfg, f) for f in CONTENT_FIELDS},
        "corpus": {s: corpus["files"][split_file(s)]["sha256"] for s in cfg.splits},
        "model": locate(spec, name).identity,
        "dtype": spec.dtype,
        "tokenizer": tokenizer_fingerprint(tok),
        "encoding": ENCODING,
    }
    if resolve_dtype(spec, _device(cfg, rank)) != torch.float32:
        # A bf16/fp16 model's head runs in float32 (it used to round the logits to bf16):
        # shards of the old head must not be resumed into.
        fingerprint["head"] = "float32"
    path = model_dir(recipe, name)
    prepare_dir(path, fingerprint, force, rank, f"extract[{name}]")
    plan = {
        s: math.ceil(corpus["files"][split_file(s)]["rows"] / cfg.docs_per_shard)
        for s in cfg.splits
    }
    todo = pending_shards(path, plan, rank, f"extract[{name}]")
    n_todo = sum(len(v) for v in todo.values())
    if n_todo:
        _compute(recipe, cfg, name, spec, tok, corpus_dir, todo, path, rank, fingerprint)
    else:
        log.info("extract[%s]: all shards of rank %d/%d are complete", name, rank.rank, rank.world)
    return finish_if_complete(
        path, plan, fingerprint, cfg.model_dump(mode="json"), f"extract[{name}]"
    )


def _compute(recipe, cfg, name, spec, tok, corpus_dir, todo, path, rank, fingerprint) -> None:
    device = _device(cfg, rank)
    t0 = time.time()
    model = load_model(spec, name, device)
    scorer = TopKScorer(model, cfg.top_k, cfg.head_chunk_tokens)
    max_pos = max_positions(model.config)
    log.info(
        "extract[%s]: %s on %s, vocab %d, head %s, %d shard(s) to do (rank %d/%d)",
        name,
        type(model).__name__,
        device,
        scorer.vocab_size,
        "chunked" if scorer.split_head else "full",
        sum(map(len, todo.values())),
        rank.rank,
        rank.world,
    )
    tracker_cfg = {"model": name, **cfg.model_dump(mode="json"), "fingerprint": fingerprint}
    with (
        start_run(recipe, f"{STAGE}/{name}", tracker_cfg, enabled=rank.rank == 0) as tracker,
        tqdm(desc=f"extract {name}", unit="tok", disable=rank.rank != 0) as bar,
    ):
        load_s = time.time() - t0
        stats = {"tokens": 0, "bytes": 0, "shards": 0}

        def written(n: int, b: int) -> None:
            stats.update(
                tokens=stats["tokens"] + n, bytes=stats["bytes"] + b, shards=stats["shards"] + 1
            )
            bar.update(n)
            tracker.log(
                {**stats, "tokens_per_s": stats["tokens"] / max(time.time() - t0 - load_s, 1e-9)}
            )

        # Host work overlaps the model's: the next shard is tokenized and checked, and the
        # last one serialised, hashed and written, in threads while this one runs (the
        # tokenizer, hashing and file writes release the GIL). At most one shard waits
        # at either end; errors surface in order, from .result().
        shards = (
            (split, shard, docs, turns)
            for split, todo_split in todo.items()
            for shard, docs, turns in shard_documents(
                corpus_dir, split, cfg.docs_per_shard, todo_split
            )
        )
        v = scorer.vocab_size
        with ThreadPoolExecutor(1) as reader, ThreadPoolExecutor(1) as writer:
            ahead = reader.submit(_next_tokenized, shards, tok, cfg, max_pos, name, v)
            pending = None
            while (item := ahead.result()) is not None:
                split, shard, tokenized = item
                ahead = reader.submit(_next_tokenized, shards, tok, cfg, max_pos, name, v)
                dists = score_shard(scorer, tokenized, cfg)
                if pending is not None:
                    written(*pending.result())
                path_i = path / split / shard_name(shard)
                pending = writer.submit(write_dists, dists, v, cfg, name, path_i)
            if pending is not None:
                written(*pending.result())
        tokens, bytes_ = stats["tokens"], stats["bytes"]
        secs = time.time() - t0 - load_s
        tracker.summary(
            {
                "tokens": tokens,
                "bytes": bytes_,
                "shards": stats["shards"],
                "seconds": round(secs, 2),
                "load_seconds": round(load_s, 2),
                "tokens_per_s": tokens / max(secs, 1e-9),
                "bytes_per_token": bytes_ / max(tokens, 1),
            }
        )


def _next_tokenized(shards, tok, cfg, max_pos, name, vocab_size):
    """The next (split, shard, tokenized documents) from the ``shards`` iterator, or None."""
    item = next(shards, None)
    if item is None:
        return None
    split, shard, docs, turns = item
    return split, shard, tokenize_shard(tok, docs, cfg, max_pos, name, vocab_size, turns)
