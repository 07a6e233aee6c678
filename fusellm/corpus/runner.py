"""``fusellm corpus``: read inputs, split by document id, cut to fit every model's block.

Writes ``run_dir/corpus/{train,valid,test}.jsonl`` (one chunk per line:
``{"id", "parent", "domain", "text"}``) and ``manifest.json`` with per-split counts,
skip counts per reason, and sha256 of every file.

Bad input (see :mod:`fusellm.corpus.readers` for the reasons): with ``on_error: error``
the first bad record stops the stage with ``file:line: reason: detail`` and nothing is
published; with ``on_error: skip`` it is skipped and counted per reason in the manifest
(``stats.skipped``, one example each in ``stats.skip_examples``).

Long documents are not bad input: each is cut (:func:`fusellm.corpus.core.cut_spans`) into
consecutive chunks that every model in ``fit_models`` (default: all) tokenizes, special
tokens included, into at most ``block_size`` tokens; chunks are ``<id>#0, <id>#1, ...``,
reassemble the document exactly, and depend only on the text and the tokenizers (the
same input gives byte-identical files). A ``block_size`` above the maximum length of a
model it fits is refused before anything is read, naming the model and its maximum.
"""

from __future__ import annotations

import itertools
import json
import logging
import multiprocessing
import os
import sys
from collections import Counter
from collections.abc import Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor

from tqdm.auto import tqdm

from fusellm.corpus.builtin import builtin_identity, read_builtin
from fusellm.corpus.core import SPLITS, Fitter, cut_spans, split_of
from fusellm.corpus.readers import CorpusInputError, Problems, RawDoc, input_files, read_input
from fusellm.manifest import StageDir
from fusellm.models import (
    ENCODING,
    check_positions,
    encode,
    load_tokenizer,
    spec_max_positions,
    special_token_overhead,
    tokenizer_fingerprint,
)
from fusellm.recipe import Recipe
from fusellm.stages import CORPUS
from fusellm.storage import atomic_open, sha256_tree
from fusellm.tracking import start_run

log = logging.getLogger(__name__)
STAGE = CORPUS


def split_file(split: str) -> str:
    return f"{split}.jsonl"


def _input_identity(recipe: Recipe) -> dict[str, str]:
    ids = {}
    for i, inp in enumerate(recipe.corpus.inputs):
        if inp.builtin:
            ids[f"inputs.{i}"] = f"builtin:{inp.builtin}:{builtin_identity(inp.builtin)}"
        else:
            ids[f"inputs.{i}"] = ",".join(
                f"{p.name}={sha256_tree(p)[:16]}" for p in input_files(inp)
            )
    return ids


CUT_BATCH = 256  # documents handed to the worker processes at a time


def _unique(docs: Iterable[RawDoc], seen: dict[str, str], problems: Problems) -> Iterator[RawDoc]:
    """``docs`` without repeated ids (each repeat reported as ``duplicate_id``)."""
    for doc in docs:
        if doc.id in seen:
            problems.report(
                "duplicate_id", doc.origin, f"id '{doc.id}' already used at {seen[doc.id]}"
            )
            continue
        seen[doc.id] = doc.origin
        yield doc


def _batches(items: Iterable, n: int) -> Iterator[list]:
    it = iter(items)
    while batch := list(itertools.islice(it, n)):
        yield batch


class Cutter:
    """:func:`cut_spans` over batches of texts, in order, in ``num_proc`` forked worker
    processes (0: one per CPU this process may use, at most 8; 1: in this process). The
    workers inherit the tokenizers; each text is cut exactly as in one process, so the
    output is the same whatever ``num_proc`` is. A worker that dies (out of memory) fails
    the stage (``BrokenProcessPool``) instead of hanging it. Forking is Linux-only here
    (macOS and Windows cut in this process)."""

    def __init__(self, fitters: list[Fitter], block_size: int, num_proc: int):
        global _CUT
        _CUT = (fitters, block_size)
        n = num_proc or min(
            len(os.sched_getaffinity(0))
            if hasattr(os, "sched_getaffinity")
            else os.cpu_count() or 1,
            8,
        )
        self.processes = n if sys.platform.startswith("linux") else 1
        self.pool = None
        if self.processes > 1:
            self.pool = ProcessPoolExecutor(
                self.processes,
                mp_context=multiprocessing.get_context("fork"),
                initializer=_quiet_tokenizers,
            )
            self.pool.submit(int).result()  # fork the workers now, before W&B's threads start

    def cut(self, texts: list[str]) -> list[list[tuple[int, int]]]:
        if self.pool is None:
            return [_cut(t) for t in texts]
        chunk = max(1, len(texts) // (4 * self.processes))
        return list(self.pool.map(_cut, texts, chunksize=chunk))

    def __enter__(self) -> Cutter:
        return self

    def __exit__(self, *exc) -> None:
        if self.pool is not None:
            self.pool.shutdown(cancel_futures=True)


def _quiet_tokenizers() -> None:
    # A worker tokenizes one text at a time: no thread pool of its own (and no warning
    # that the forked tokenizer's parallelism is disabled).
    os.environ["TOKENIZERS_PARALLELISM"] = "false"


_CUT: tuple[list[Fitter], int] | None = None  # what forked workers cut with


def _cut(text: str) -> list[tuple[int, int]]:
    fitters, block_size = _CUT
    return cut_spans(text, fitters, block_size)


def _fitter(name: str, tok) -> Fitter:
    def spans(text: str):
        return encode(tok, [text], offsets=True)["offset_mapping"][0]

    return Fitter(name, spans, special_token_overhead(tok))


def _fits(doc, toks: dict, cfg, problems: Problems) -> bool:
    """Whether a conversation, rendered in each fitted model's own chat template, fits
    ``block_size`` tokens (reported as ``too_long`` otherwise)."""
    from fusellm.chat import ConversationError, render, rendering_ids

    for name, tok in toks.items():
        try:
            n = len(rendering_ids(tok, render(tok, doc.turns, name).text))
        except ConversationError as e:
            problems.report("bad_conversation", doc.origin, str(e))
            return False
        if n > cfg.block_size:
            problems.report(
                "too_long",
                doc.origin,
                f"the conversation is {n} tokens in '{name}''s chat template, more than "
                f"corpus.block_size {cfg.block_size} (conversations are not cut)",
            )
            return False
    return True


def run(recipe: Recipe, force: bool = False) -> dict | None:
    """Run the corpus stage; returns the manifest, or None when it was already complete."""
    cfg = recipe.corpus
    if cfg is None:
        raise ValueError("the recipe has no 'corpus:' section")
    fit = cfg.fit_models or recipe.all_models
    toks = {name: load_tokenizer(recipe.models[name], name) for name in fit}
    for name in fit:  # chunks of block_size tokens must fit each model's positions
        limit = spec_max_positions(recipe.models[name], name)
        check_positions(name, limit, cfg.block_size, "corpus.block_size")
    fingerprint = {
        # num_proc changes how fast, never what is written
        "config": cfg.model_dump(mode="json", exclude={"num_proc"}),
        "inputs": _input_identity(recipe),
        "tokenizers": {n: tokenizer_fingerprint(t) for n, t in toks.items()},
        "encoding": ENCODING,
    }
    sd = StageDir(STAGE, recipe.stage_dir(STAGE), fingerprint)
    if not sd.prepare(force):
        log.info("corpus: complete and unchanged at %s (skipped)", sd.path)
        return None
    fitters = [_fitter(n, t) for n, t in toks.items()]
    problems = Problems(cfg.on_error)
    stats = {s: Counter(documents=0, chunks=0, chars=0) for s in SPLITS}
    seen: dict[str, str] = {}
    # the workers are forked first, before W&B starts threads in this process
    with (
        Cutter(fitters, cfg.block_size, cfg.num_proc) as cutter,
        start_run(recipe, STAGE, fingerprint) as tracker,
    ):
        with (
            atomic_open(sd.path / split_file("train"), "w") as f_train,
            atomic_open(sd.path / split_file("valid"), "w") as f_valid,
            atomic_open(sd.path / split_file("test"), "w") as f_test,
        ):
            out = {"train": f_train, "valid": f_valid, "test": f_test}
            bar = tqdm(desc="corpus", unit="doc")
            for inp in cfg.inputs:
                docs = (
                    read_builtin(inp.builtin)
                    if inp.builtin
                    else read_input(inp, problems, cfg.min_chars)
                )
                if inp.builtin and inp.max_docs is not None:
                    docs = itertools.islice(docs, inp.max_docs)
                for batch in _batches(_unique(docs, seen, problems), CUT_BATCH):
                    # Cutting needs every fitter's tokenization of the text: the stage's
                    # cost. Worker processes cut a batch of documents at a time, in order.
                    # A conversation is never cut: it must fit whole in every rendering.
                    texts = [d.text for d in batch if d.turns is None]
                    cuts = iter(cutter.cut(texts) if texts else [])
                    for doc in batch:
                        if doc.turns is not None and not _fits(doc, toks, cfg, problems):
                            continue
                        spans = next(cuts) if doc.turns is None else [(0, len(doc.text))]
                        domain = inp.domain or doc.domain
                        split = split_of(
                            doc.id, cfg.valid_fraction, cfg.test_fraction, cfg.split_salt
                        )
                        for i, (a, b) in enumerate(spans):
                            rec = {
                                "id": f"{doc.id}#{i}",
                                "parent": doc.id,
                                "domain": domain,
                                "text": doc.text[a:b],
                            }
                            if doc.turns is not None:
                                rec["messages"] = [
                                    {"role": t.role, "content": t.content} for t in doc.turns
                                ]
                            out[split].write(json.dumps(rec, ensure_ascii=False) + "\n")
                        st = stats[split]
                        st["documents"] += 1
                        st["chunks"] += len(spans)
                        st["chars"] += len(doc.text)
                        st[f"chars/{domain}"] += len(doc.text)
                        bar.update(1)
            bar.close()
        total = sum(stats[s]["documents"] for s in SPLITS)
        if total == 0:
            raise CorpusInputError(
                f"corpus: no documents were read (all inputs empty or skipped: {dict(problems.counts)})"
            )
        files = {
            split_file(s): sd.file_record(split_file(s), rows=stats[s]["chunks"]) for s in SPLITS
        }
        summary = {
            "splits": {s: dict(stats[s]) for s in SPLITS},
            "skipped": dict(problems.counts),
            "skip_examples": problems.examples,
            "block_size": cfg.block_size,
            "fit_models": fit,
        }
        tracker.summary(
            {f"{s}_{k}": stats[s][k] for s in SPLITS for k in ("documents", "chunks", "chars")}
            | {f"skipped_{k}": v for k, v in problems.counts.items()}
        )
        manifest = sd.finish(files, summary, fingerprint["config"])
    log.info("corpus: %d documents -> %s", total, {s: stats[s]["chunks"] for s in SPLITS})
    return manifest
