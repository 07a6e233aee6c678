"""``fusellm extract``: top-k next-token distributions of each model over the corpus.

Output per model: ``run_dir/extract/<model>/<split>/shard-NNNNN.safetensors`` (format in
:mod:`fusellm.shards`), a sidecar per shard, and ``manifest.json`` once every shard of
every split is done.

Scale-out needs no coordination: shard ``i`` belongs to rank ``i % WORLD_SIZE`` (ranks
from torchrun / ``accelerate launch`` / the deepspeed launcher). Each rank skips shards
that already have a valid sidecar, recomputes missing, unfinished or corrupt ones, and
the rank that finds every shard valid writes the manifest. Shard contents depend only on
the documents in the shard, so 1 and N processes write the same shards.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from fusellm.corpus.runner import STAGE as CORPUS_STAGE
from fusellm.corpus.runner import split_file
from fusellm.extract.config import CONTENT_FIELDS, ExtractConfig
from fusellm.extract.core import TopKScorer, pad_batch, plan_batches
from fusellm.manifest import (
    FINGERPRINT,
    MANIFEST,
    StageInputsChanged,
    diff_fields,
    load_manifest,
    package_versions,
)
from fusellm.models import load_model, load_tokenizer, locate, tokenizer_fingerprint
from fusellm.recipe import Recipe, redact
from fusellm.shards import DocDist, encode_shard, shard_name, shard_problem, sidecar, write_shard
from fusellm.storage import atomic_write_json, read_json, remove_temp_files
from fusellm.tracking import start_run

log = logging.getLogger(__name__)
STAGE = "extract"


@dataclass(frozen=True)
class Rank:
    rank: int
    world: int
    local: int

    @classmethod
    def from_env(cls) -> Rank:
        env = os.environ
        return cls(
            int(env.get("RANK", 0)), int(env.get("WORLD_SIZE", 1)), int(env.get("LOCAL_RANK", 0))
        )

    def owns(self, shard: int) -> bool:
        return shard % self.world == self.rank


def model_dir(recipe: Recipe, name: str) -> Path:
    return recipe.stage_dir(STAGE) / name


def model_shards(recipe: Recipe, name: str, split: str) -> list[Path]:
    """The complete extraction of ``name`` for ``split``: its shard paths in order.

    Raises FileNotFoundError (telling what to run) if that extraction is not complete.
    """
    path = model_dir(recipe, name)
    man = load_manifest(path, f"extract (model '{name}')")
    n = man["stats"]["shards"].get(split)
    if n is None:
        raise FileNotFoundError(
            f"extract[{name}]: split '{split}' was not extracted (extract.splits)"
        )
    return [path / split / shard_name(i) for i in range(n)]


def _device(cfg: ExtractConfig, rank: Rank) -> str:
    if cfg.device != "auto":
        return cfg.device
    return f"cuda:{rank.local}" if torch.cuda.is_available() else "cpu"


def _max_positions(model) -> int | None:
    c = model.config
    for attr in ("max_position_embeddings", "n_positions", "max_seq_len"):
        v = getattr(c, attr, None)
        if isinstance(v, int) and v > 0:
            return v
    return None


def _read_docs(path: Path) -> Iterator[tuple[str, str]]:
    with open(path, encoding="utf-8") as f:
        for line in f:
            rec = json.loads(line)
            yield rec["id"], rec["text"]


def _count_lines(path: Path) -> int:
    with open(path, "rb") as f:
        return sum(1 for _ in f)


def _prepare(path: Path, fingerprint: dict, force: bool, rank: Rank, name: str) -> None:
    """Check the recorded fingerprint; clear this rank's shards when forced or stale."""
    path.mkdir(parents=True, exist_ok=True)
    fp_file = path / FINGERPRINT
    old = read_json(fp_file) if fp_file.exists() else None
    mine = [p for p in path.glob("*/shard-*.safetensors") if rank.owns(int(p.name[6:11]))]
    if old is not None and old != fingerprint and not force and any(path.glob("*/shard-*")):
        fields = ", ".join(diff_fields(old, fingerprint)[:5])
        raise StageInputsChanged(
            f"extract[{name}]: {path} holds shards made from different inputs or config "
            f"(differs: {fields}). Pass --force to recompute, or use another run_dir."
        )
    if force or (old is not None and old != fingerprint):
        for p in mine:
            p.unlink(missing_ok=True)
            sidecar(p).unlink(missing_ok=True)
        if rank.rank == 0:
            (path / MANIFEST).unlink(missing_ok=True)
    remove_temp_files(path)
    atomic_write_json(fp_file, fingerprint)


def extract_shard(
    scorer: TopKScorer,
    tok,
    docs: list[tuple[str, str]],
    cfg: ExtractConfig,
    max_pos: int | None,
    name: str,
) -> list[DocDist]:
    """Tokenize and score one shard's documents (order kept)."""
    enc = tok(
        [t for _, t in docs], add_special_tokens=cfg.add_special_tokens, return_offsets_mapping=True
    )
    seqs = enc["input_ids"]
    for (doc_id, _), s in zip(docs, seqs, strict=True):
        if max_pos is not None and len(s) > max_pos:
            raise ValueError(
                f"extract[{name}]: document '{doc_id}' has {len(s)} tokens, more than the model's "
                f"{max_pos} positions; add '{name}' to corpus.fit_models or lower corpus.block_size"
            )
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    k = cfg.top_k
    out: list[DocDist | None] = [None] * len(docs)
    nonempty = [i for i, s in enumerate(seqs) if s]
    for batch in plan_batches(
        [len(seqs[i]) for i in nonempty], cfg.batch_tokens, cfg.max_batch_size
    ):
        idx = [nonempty[j] for j in batch]
        ids, mask = pad_batch([seqs[i] for i in idx], pad)
        dev = scorer.head.weight.device
        for i, sc in zip(idx, scorer(ids.to(dev), mask.to(dev)), strict=True):
            out[i] = DocDist(
                docs[i][0],
                np.asarray(seqs[i], dtype=np.int32),
                np.asarray(enc["offset_mapping"][i], dtype=np.int32).reshape(-1, 2),
                sc.topk_ids.numpy(),
                sc.topk_logprobs.to(getattr(torch, cfg.logprob_dtype)),
                sc.ce.numpy(),
            )
    for i, d in enumerate(out):
        if d is None:  # a document with no tokens for this tokenizer
            out[i] = DocDist(
                docs[i][0],
                np.zeros(0, np.int32),
                np.zeros((0, 2), np.int32),
                np.zeros((0, k), np.int32),
                torch.zeros(0, k, dtype=getattr(torch, cfg.logprob_dtype)),
                np.zeros(0, np.float32),
            )
    return out  # type: ignore[return-value]


def run(recipe: Recipe, force: bool = False) -> dict[str, dict | None]:
    """Extract every configured model; returns {model: manifest or None if skipped/partial}."""
    cfg = recipe.extract
    if cfg is None:
        raise ValueError("the recipe has no 'extract:' section")
    corpus = load_manifest(recipe.stage_dir(CORPUS_STAGE), CORPUS_STAGE)
    corpus_dir = recipe.stage_dir(CORPUS_STAGE)
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
    }
    path = model_dir(recipe, name)
    _prepare(path, fingerprint, force, rank, name)
    plan = {
        s: math.ceil(corpus["files"][split_file(s)]["rows"] / cfg.docs_per_shard)
        for s in cfg.splits
    }
    todo = {}
    for split, n in plan.items():
        for i in range(n):
            if not rank.owns(i):
                continue
            p = path / split / shard_name(i)
            problem = shard_problem(p)
            if problem and p.exists() and sidecar(p).exists():
                log.warning("extract[%s]: %s; recomputing it", name, problem)
            if problem:
                todo.setdefault(split, []).append(i)
    n_todo = sum(len(v) for v in todo.values())
    if n_todo:
        (path / MANIFEST).unlink(missing_ok=True)
        _compute(recipe, cfg, name, spec, tok, corpus_dir, todo, path, rank, fingerprint)
    else:
        log.info("extract[%s]: all shards of rank %d/%d are complete", name, rank.rank, rank.world)
    return _finish_if_complete(path, plan, fingerprint, cfg, name)


def _compute(recipe, cfg, name, spec, tok, corpus_dir, todo, path, rank, fingerprint) -> None:
    device = _device(cfg, rank)
    t0 = time.time()
    model = load_model(spec, name, device)
    scorer = TopKScorer(model, cfg.top_k, cfg.head_chunk_tokens)
    max_pos = _max_positions(model)
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
        start_run(recipe, f"{STAGE}/{name}", tracker_cfg)
        if rank.rank == 0
        else _NoTrack() as tracker,
        tqdm(desc=f"extract {name}", unit="tok", disable=rank.rank != 0) as bar,
    ):
        load_s = time.time() - t0
        stats = {"tokens": 0, "bytes": 0, "shards": 0}

        def emit(split: str, shard: int, docs: list[tuple[str, str]]) -> None:
            n, b = _write(scorer, tok, docs, cfg, max_pos, name, path / split / shard_name(shard))
            stats.update(
                tokens=stats["tokens"] + n, bytes=stats["bytes"] + b, shards=stats["shards"] + 1
            )
            bar.update(n)
            tracker.log(
                {**stats, "tokens_per_s": stats["tokens"] / max(time.time() - t0 - load_s, 1e-9)}
            )

        for split, shards in todo.items():
            # One pass over the split file; documents of shards this rank does not own
            # (or that are already done) are skipped without tokenizing them.
            wanted = set(shards)
            docs: list[tuple[str, str]] = []
            shard = 0
            for j, doc in enumerate(_read_docs(corpus_dir / split_file(split))):
                if j // cfg.docs_per_shard != shard:
                    if docs:
                        emit(split, shard, docs)
                    docs, shard = [], j // cfg.docs_per_shard
                if shard in wanted:
                    docs.append(doc)
            if docs:
                emit(split, shard, docs)
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


def _write(scorer, tok, docs, cfg, max_pos, name, path: Path) -> tuple[int, int]:
    dists = extract_shard(scorer, tok, docs, cfg, max_pos, name)
    data = encode_shard(dists, scorer.vocab_size, {"model": name, "top_k": str(cfg.top_k)})
    n = sum(len(d.input_ids) for d in dists)
    write_shard(path, data, len(dists), n)
    return n, len(data)


def _finish_if_complete(
    path: Path, plan: dict[str, int], fingerprint: dict, cfg: ExtractConfig, name: str
) -> dict | None:
    files, tokens, docs, nbytes = {}, 0, 0, 0
    for split, n in plan.items():
        for i in range(n):
            p = path / split / shard_name(i)
            # Each rank has just verified its own shards' sha256; here a size check against
            # the sidecar is enough to know whether the other ranks are done.
            sc = sidecar(p)
            rec = read_json(sc) if sc.exists() else None
            if rec is None or not p.exists() or p.stat().st_size != rec["bytes"]:
                log.info("extract[%s]: %s not finished yet (another rank's share?)", name, p)
                return None
            files[f"{split}/{shard_name(i)}"] = {
                "sha256": rec["sha256"],
                "bytes": rec["bytes"],
                "rows": rec["docs"],
                "tokens": rec["tokens"],
            }
            tokens, docs, nbytes = tokens + rec["tokens"], docs + rec["docs"], nbytes + rec["bytes"]
    man_path = path / MANIFEST
    if (
        man_path.exists()
        and read_json(man_path).get("fingerprint") == fingerprint
        and read_json(man_path).get("files") == files
    ):
        return read_json(man_path)
    manifest = {
        "stage": f"{STAGE}/{name}",
        "fingerprint": fingerprint,
        "config": redact(cfg.model_dump(mode="json")),
        "files": files,
        "stats": {
            "tokens": tokens,
            "documents": docs,
            "bytes": nbytes,
            "bytes_per_token": nbytes / max(tokens, 1),
            "shards": {s: n for s, n in plan.items()},
        },
        "versions": package_versions(),
        "complete": True,
    }
    atomic_write_json(man_path, manifest)
    log.info(
        "extract[%s]: complete: %d tokens in %d documents, %.1f B/token",
        name,
        tokens,
        docs,
        nbytes / max(tokens, 1),
    )
    return manifest


class _NoTrack:
    def log(self, *a, **k) -> None: ...
    def summary(self, *a, **k) -> None: ...
    def __enter__(self):
        return self

    def __exit__(self, *a) -> None: ...
