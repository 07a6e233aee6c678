"""``fusellm plan RECIPE``: what a recipe will cost, before it runs.

Gathers what is known without running anything heavy: model shapes from their configs
(:mod:`fusellm.plan.shapes`), token counts from whatever the run has already written
(extraction manifests: exact; the corpus manifest: its characters × each tokenizer's
tokens per character on a sample; nothing yet: the inputs' text × the same rate), the
recipe's settings, and for a CPU run the measured memory of the framework itself. The
arithmetic is :mod:`fusellm.plan.core`. Prints one table per section (tokens, disk,
memory, time), or with ``--json`` one JSON object.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import subprocess
import sys
import tempfile
import textwrap
from dataclasses import asdict, dataclass, field
from functools import cached_property
from itertools import islice
from pathlib import Path

from fusellm.corpus.core import SPLITS, split_of
from fusellm.manifest import MANIFEST
from fusellm.models import ModelLoadError, encode, load_tokenizer, special_token_overhead
from fusellm.plan import core
from fusellm.plan.core import DTYPE_BYTES, ModelShape, Row
from fusellm.plan.shapes import model_config, shape_of
from fusellm.recipe import Recipe
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
    STAGES,
    TRAIN,
)

log = logging.getLogger(__name__)

SAMPLE_CHARS = 400_000  # text tokenized per model to measure its tokens per character


@dataclass
class Corpus:
    """What is known of the corpus: per split documents, chunks, characters and UTF-8
    bytes (None where unknown), a sample of its texts (id, text) and how it is known."""

    splits: dict[str, dict[str, float | None]]
    sample: list[tuple[str, str]]
    basis: str
    domains: list[str] = field(default_factory=list)
    line_bytes: float | None = None  # the written jsonl (known once the stage has run)


@dataclass
class Tokens:
    """Tokens per model per split, and how each count was obtained."""

    per_model: dict[str, dict[str, float | None]]
    basis: dict[str, str]
    chunk_tokens: dict[str, list[int]] = field(default_factory=dict)  # sampled lengths


# ------------------------------------------------------------------------------ models


def model_shapes(recipe: Recipe) -> dict[str, ModelShape]:
    out = {}
    for name in recipe.all_models:
        spec = recipe.models[name]
        cfg, where = model_config(spec, name)
        try:
            out[name] = shape_of(cfg, where, spec.trust_remote_code)
        except Exception as e:
            raise ModelLoadError(
                f"model '{name}': cannot build its shapes from {where}: {e}"
            ) from e
    return out


def tokenizers(recipe: Recipe) -> dict[str, object]:
    """The tokenizers that load here (a hub model offline has none: its counts are then
    assumed equal to the target's and the plan says so)."""
    out = {}
    for name in recipe.all_models:
        try:
            out[name] = load_tokenizer(recipe.models[name], name)
        except ModelLoadError as e:
            log.info("plan: no tokenizer for '%s' (%s)", name, str(e).splitlines()[0])
    return out


# ------------------------------------------------------------------------------ corpus


def corpus_facts(recipe: Recipe) -> Corpus | None:
    """From the corpus manifest when the stage has run, else from its inputs; None when
    the inputs are not on disk."""
    cfg = recipe.corpus
    man_path = recipe.stage_dir(CORPUS) / MANIFEST
    if man_path.exists() and json.loads(man_path.read_text()).get("complete"):
        man = json.loads(man_path.read_text())
        sample = _sample_jsonl(recipe.stage_dir(CORPUS) / "train.jsonl", SAMPLE_CHARS)
        per_char = _bytes_per_char(sample)
        splits = {
            s: {
                "docs": st["documents"],
                "chunks": st["chunks"],
                "chars": st["chars"],
                "text_bytes": st["chars"] * per_char,
            }
            for s, st in man["stats"]["splits"].items()
        }
        domains = sorted(
            {k[6:] for st in man["stats"]["splits"].values() for k in st if k.startswith("chars/")}
        )
        return Corpus(
            splits,
            sample,
            "corpus manifest (documents, chunks, characters)",
            domains,
            sum(f["bytes"] for f in man["files"].values()),
        )
    if cfg is None:
        return None
    from fusellm.corpus.builtin import DOMAINS, read_builtin
    from fusellm.corpus.readers import CorpusInputError

    splits = {s: {"docs": 0.0, "chunks": None, "chars": 0.0, "text_bytes": 0.0} for s in SPLITS}
    sample: list[tuple[str, str]] = []
    domains: set[str] = set()
    fractions = {"valid": cfg.valid_fraction, "test": cfg.test_fraction}
    fractions["train"] = 1.0 - sum(fractions.values())
    for inp in cfg.inputs:
        if inp.builtin:
            seen: set[str] = set()
            for doc in islice(read_builtin(inp.builtin), inp.max_docs):
                if doc.id in seen:
                    continue
                seen.add(doc.id)
                st = splits[split_of(doc.id, cfg.valid_fraction, cfg.test_fraction, cfg.split_salt)]
                st["docs"] += 1
                st["chars"] += len(doc.text)
                st["text_bytes"] += len(doc.text.encode())
                sample.append((f"{doc.id}#0", doc.text))
            domains.add(inp.domain or DOMAINS[inp.builtin])
            continue
        try:
            text_bytes, docs, texts = _path_input(inp, cfg.min_chars)
        except (CorpusInputError, OSError) as e:
            log.info("plan: corpus input not readable here: %s", e)
            return None
        if texts:
            domains.add(inp.domain or "<from the input>")
        chars_per_byte = sum(len(t) for _, t in texts) / max(
            sum(len(t.encode()) for _, t in texts), 1
        )
        for s, frac in fractions.items():
            splits[s]["docs"] += docs * frac
            splits[s]["chars"] += text_bytes * chars_per_byte * frac
            splits[s]["text_bytes"] += text_bytes * frac
        sample += texts
    return Corpus(
        splits,
        _spread(sample, SAMPLE_CHARS),
        "corpus inputs (before the corpus stage)",
        sorted(domains),
    )


def _spread(docs: list[tuple[str, str]], budget: int) -> list[tuple[str, str]]:
    """Every n-th document so that about ``budget`` characters are kept, from all inputs."""
    total = sum(len(t) for _, t in docs)
    step = max(1, math.floor(total / budget)) if total > budget else 1
    return docs[::step]


def _bytes_per_char(sample: list[tuple[str, str]]) -> float:
    return sum(len(t.encode()) for _, t in sample) / max(sum(len(t) for _, t in sample), 1)


def _sample_jsonl(path: Path, budget: int, probes: int = 64) -> list[tuple[str, str]]:
    """(id, text) of corpus lines: the whole file when small, else lines read at
    ``probes`` evenly spaced offsets (the file is in input order: domains come in runs)."""
    size = path.stat().st_size
    out: list[tuple[str, str]] = []
    with open(path, "rb") as f:
        if size <= 2 * budget:
            offsets, per_probe = [0], size
        else:
            offsets, per_probe = [i * size // probes for i in range(probes)], budget // probes
        for off in offsets:
            f.seek(off)
            if off:
                f.readline()  # the rest of a line cut by the seek
            got = 0
            while got < per_probe and (line := f.readline()):
                rec = json.loads(line)
                out.append((rec["id"], rec["text"]))
                got += len(rec["text"])
    return out


def _path_input(inp, min_chars: int) -> tuple[float, float, list[tuple[str, str]]]:
    """(UTF-8 text bytes, documents, sampled (id, text)) of a file input, from its size
    and a sample of its first documents: jsonl by the sample's text share of its lines
    (and gzip ratio), parquet by the text column's uncompressed size, ``save_to_disk``
    datasets by the text column's Arrow buffers, plain text as is."""
    from fusellm.corpus.readers import Problems, detect_format, input_files, read_input

    texts = [
        (d.id, d.text)
        for d in _take_chars(read_input(inp, Problems("skip"), min_chars), SAMPLE_CHARS)
    ]
    total = 0.0
    for path in input_files(inp):
        fmt = inp.format if inp.format != "auto" else detect_format(path)
        total += _text_bytes(path, fmt, inp.text_field)
    per_doc = sum(len(t.encode()) for _, t in texts) / max(len(texts), 1)
    return total, total / max(per_doc, 1.0), texts


def _take_chars(docs, budget: int):
    got = 0
    for d in docs:
        yield d
        got += len(d.text)
        if got >= budget:
            return


def _text_bytes(path: Path, fmt: str, field_name: str) -> float:
    size = path.stat().st_size
    if fmt == "jsonl":
        import gzip

        with open(path, "rb") as raw:
            f = gzip.GzipFile(fileobj=raw) if path.name.endswith(".gz") else raw
            text = lines = 0
            for line in islice(f, 2000):
                lines += len(line)
                value = json.loads(line).get(field_name)
                text += len(value.encode()) if isinstance(value, str) else 0
            consumed = raw.tell() or 1
        inflate = lines / consumed if path.name.endswith(".gz") else 1.0
        return size * inflate * text / max(lines, 1)
    if fmt == "parquet":
        import pyarrow.parquet as pq

        meta = pq.ParquetFile(path).metadata
        col = meta.schema.names.index(field_name)
        return float(
            sum(
                meta.row_group(i).column(col).total_uncompressed_size
                for i in range(meta.num_row_groups)
            )
        )
    if fmt == "disk":
        import datasets

        ds = datasets.load_from_disk(str(path))
        ds = ds["train"] if isinstance(ds, datasets.DatasetDict) else ds
        return float(ds.data.column(field_name).nbytes)
    return float(size)


# ------------------------------------------------------------------------------ tokens


def token_counts(
    recipe: Recipe, corpus: Corpus | None, toks: dict, corpus_tokens: float | None
) -> Tokens:
    """Tokens per model and split: exact from complete extractions; else the corpus's
    characters × tokens per character on its sample + the special tokens per document;
    else ``--corpus-tokens`` (the target's train split), the same for every model."""
    splits = list(SPLITS)
    add_special = recipe.extract.add_special_tokens if recipe.extract else True
    per_model: dict[str, dict[str, float | None]] = {}
    basis: dict[str, str] = {}
    lengths: dict[str, list[int]] = {}
    fractions = _fractions(recipe)
    rates: dict[str, tuple[float, int]] = {}
    if corpus is not None and corpus.sample:
        for name, tok in toks.items():
            ids = encode(tok, [t for _, t in corpus.sample])["input_ids"]
            specials = special_token_overhead(tok) if add_special else 0
            rates[name] = (sum(map(len, ids)) / max(_chars(corpus.sample), 1), specials)
            lengths[name] = [len(x) + specials for x in ids]
    for name, (rate, specials) in rates.items():
        per_model[name] = {
            s: core.tokens_from_chars(
                corpus.splits[s]["chars"], rate, _chunks(corpus, s, lengths, recipe), specials
            )
            for s in splits
        }
        basis[name] = (
            f"{corpus.basis}: characters × {rate:.4f} tokens/char "
            f"(sampled {_chars(corpus.sample):,} chars)"
        )
    for name in recipe.all_models:
        exact = _extracted_tokens(recipe, name)
        if exact:
            per_model[name] = {**per_model.get(name, dict.fromkeys(splits)), **exact}
            basis[name] = f"extraction manifest (exact; {'+'.join(exact)})"
    target = recipe.target
    for name in recipe.all_models:
        if name in per_model:
            continue
        if corpus_tokens is not None:
            train = fractions["train"]
            per_model[name] = {s: corpus_tokens * fractions[s] / train for s in splits}
            basis[name] = "--corpus-tokens" + (
                "" if name == target else f" (no tokenizer here: assumed = {target}'s)"
            )
        elif target in per_model and name != target:
            per_model[name] = dict(per_model[target])
            basis[name] = f"no tokenizer here: assumed = {target}'s"
        else:
            per_model[name] = dict.fromkeys(splits)
            basis[name] = "unknown: no corpus on disk and no --corpus-tokens"
    return Tokens(per_model, basis, lengths)


def _extracted_tokens(recipe: Recipe, name: str) -> dict[str, float]:
    """Tokens per split of a complete extraction of ``name`` (empty if there is none)."""
    path = recipe.stage_dir(EXTRACT) / name / MANIFEST
    man = json.loads(path.read_text()) if path.exists() else {}
    if not man.get("complete"):
        return {}
    counts = dict.fromkeys(man["stats"]["shards"], 0.0)
    for rel, rec in man["files"].items():
        counts[rel.split("/")[0]] += rec["tokens"]
    return counts


def _fractions(recipe: Recipe) -> dict[str, float]:
    c = recipe.corpus
    v, t = (c.valid_fraction, c.test_fraction) if c else (0.0, 0.0)
    return {"train": 1.0 - v - t, "valid": v, "test": t}


def _chars(sample) -> int:
    return sum(len(t) for _, t in sample)


def _chunks(corpus: Corpus, split: str, lengths: dict[str, list[int]], recipe: Recipe) -> float:
    """Documents of a split after cutting: known once the corpus ran; before, each sampled
    document becomes ⌈tokens / block⌉ chunks for the tokenizer that needs the most tokens
    for it (``lengths``: per model, tokens of each sampled document). Cuts at paragraph and
    sentence breaks leave chunks a little short of the block: this is a lower bound."""
    known = corpus.splits[split]["chunks"]
    if known is not None:
        return known
    block = recipe.corpus.block_size
    longest = [max(per_doc) for per_doc in zip(*lengths.values(), strict=True)]
    per_doc = sum(max(1, math.ceil(n / block)) for n in longest) / max(len(longest), 1)
    return corpus.splits[split]["docs"] * per_doc


def split_chunks(recipe: Recipe, corpus: Corpus | None, tokens: Tokens, split: str) -> float | None:
    """Documents (chunks) of a split: counted, estimated from the sample, or assumed half a
    block long when only a token count is known."""
    if corpus is not None:
        return _chunks(corpus, split, tokens.chunk_tokens, recipe)
    n = tokens.per_model[recipe.target][split]
    block = recipe.corpus.block_size if recipe.corpus else 2048
    return None if n is None else n / (block / 2)


# -------------------------------------------------------------------------------- plan


@dataclass
class Settings:
    gpus: int
    device: str | None  # a key of core.DEVICES, or None
    corpus_tokens: float | None
    recipe_args: list[str]  # the recipe file and overrides (a subprocess loads it again)


def build(recipe: Recipe, settings: Settings) -> dict:
    """The plan as one JSON-able dict: ``notes``, ``models``, ``tokens``, ``disk``,
    ``memory``, ``time`` (each a list of rows), ``totals``."""
    notes: list[str] = []
    shapes = model_shapes(recipe)
    bundled = [
        f"{n} ({recipe.models[n].path})"
        for n, s in shapes.items()
        if s.config_from.startswith("bundled")
    ]
    if bundled:
        notes.append(
            f"the hub is unreachable: shapes of {', '.join(bundled)} from bundled copies of "
            "their public config.json"
        )
    toks = tokenizers(recipe)
    corpus = corpus_facts(recipe)
    if corpus is None and settings.corpus_tokens is None:
        notes.append(
            "the corpus inputs are not on disk: token counts unknown (pass --corpus-tokens N)"
        )
    elif corpus is None:
        notes.append(
            f"tokens from --corpus-tokens {settings.corpus_tokens:.3g} (the target's train split; "
            "the corpus inputs are not on disk)"
        )
    tokens = token_counts(recipe, corpus, toks, settings.corpus_tokens)
    if recipe.train is None:
        notes.append("no train: section: training, checkpoints and training memory left out")
    ctx = _Context(recipe, settings, shapes, toks, corpus, tokens, notes)
    return {
        "recipe": recipe.name,
        "run_dir": recipe.run_dir,
        "gpus": settings.gpus,
        "device": settings.device,
        "notes": notes,
        "models": {n: asdict(s) for n, s in shapes.items()},
        "tokens": [asdict(r) for r in ctx.token_rows()],
        "disk": [asdict(r) for r in ctx.disk_rows()],
        "memory": [asdict(r) for r in ctx.memory_rows()],
        "time": [asdict(r) for r in ctx.time_rows()],
        "totals": ctx.totals,
    }


@dataclass
class _Context:
    recipe: Recipe
    settings: Settings
    shapes: dict[str, ModelShape]
    toks: dict
    corpus: Corpus | None
    tokens: Tokens
    notes: list[str]
    totals: dict = field(default_factory=dict)

    # ---------------------------------------------------------------- shared quantities

    @property
    def extract_splits(self) -> list[str]:
        return list(self.recipe.extract.splits) if self.recipe.extract else ["train"]

    def model_tokens(self, name: str, splits: list[str] | None = None) -> float | None:
        counts = self.tokens.per_model[name]
        vals = [counts[s] for s in splits or self.extract_splits]
        return None if any(v is None for v in vals) else sum(vals)

    def chunks(self, splits: list[str] | None = None) -> float | None:
        vals = [
            split_chunks(self.recipe, self.corpus, self.tokens, s)
            for s in splits or self.extract_splits
        ]
        return None if any(v is None for v in vals) else sum(vals)

    def id_bytes(self) -> float:
        ids = (
            [i for i, _ in self.corpus.sample]
            if self.corpus and self.corpus.sample
            else ["x" * 24 + "#0"]
        )
        return sum(core.id_header_bytes(i) for i in ids) / len(ids)

    def wanted(self, stage: str) -> bool:
        st = STAGES[stage]
        return getattr(self.recipe, st.section_name) is not None and st.wanted(self.recipe)

    @property
    def train(self) -> dict:
        return self.recipe.train or {}

    @cached_property
    def args(self):
        """The recipe's training arguments, built as the train stage builds them but
        without the settings whose checks need the training machine (bf16 needs a GPU,
        DeepSpeed its config): :attr:`mixed` and :meth:`zero` read those."""
        from fusellm.train.runner import build_args

        keep = {k: v for k, v in self.train.items() if k not in MACHINE_DEPENDENT}
        recipe = self.recipe.model_copy(update={"train": {**keep, "use_cpu": True}})
        return build_args(recipe, "/nonexistent-fusellm-plan", False)

    @property
    def mixed(self) -> bool:
        """bf16 or fp16 training (autocast without DeepSpeed)."""
        return bool(self.train.get("bf16") or self.train.get("fp16"))

    def deepspeed(self) -> dict | None:
        ds = self.train.get("deepspeed")
        if ds is None:
            return None
        return json.loads(Path(ds).read_text()) if isinstance(ds, str) else ds

    def zero(self) -> tuple[int, bool, bool]:
        """(ZeRO stage (0: no DeepSpeed), optimizer offloaded, parameters offloaded)."""
        ds = self.deepspeed()
        if ds is None:
            return 0, False, False
        z = ds.get("zero_optimization", {})

        def offloaded(key: str) -> bool:
            return (z.get(key) or {}).get("device", "none") not in ("none", None)

        return int(z.get("stage", 0)), offloaded("offload_optimizer"), offloaded("offload_param")

    @property
    def on_cpu(self) -> bool:
        if self.settings.device is not None:
            return self.settings.device == "cpu"
        return bool(self.train.get("use_cpu")) or (
            self.recipe.extract is not None and self.recipe.extract.device == "cpu"
        )

    def weight_bytes(self, name: str) -> int:
        """Bytes per weight as the model entry loads: its dtype; ``auto`` is bf16 on a GPU,
        float32 on a CPU (:func:`fusellm.models.resolve_dtype`)."""
        d = self.recipe.models[name].dtype
        if d == "auto":
            return 4 if self.on_cpu else 2
        return DTYPE_BYTES[d]

    def blocks(self) -> tuple[float | None, str]:
        """Training blocks of the train split, and how they were counted."""
        args = self.args
        n = self.model_tokens(self.recipe.target, [args.train_split])
        if n is None:
            return None, "unknown tokens"
        block = args.block_size
        if args.packing == "stream":
            return n / block, "one token stream cut into blocks"
        if args.packing == "none":
            return self.chunks([args.train_split]), "one document per block"
        lengths = self.tokens.chunk_tokens.get(self.recipe.target)
        if not lengths:
            return n / block, "assumed full: document lengths unknown"
        import numpy as np

        from fusellm.train.data import pack

        # a sampled document longer than the block is cut into about equal chunks
        lens = np.asarray([n // c for n in lengths for c in [-(-n // block)] for _ in range(c)])
        fill = lens.sum() / (len(pack(lens, block)) * block)
        return n / (block * fill), f"documents packed first-fit {fill:.1%} full (sampled lengths)"

    def steps(self) -> tuple[int | None, int | None, float | None, str]:
        """(optimizer steps, steps per epoch, blocks, how blocks were counted)."""
        args = self.args
        blocks, how = self.blocks()
        if blocks is None:
            return None, None, None, how
        world = self.settings.gpus
        steps, per_epoch = core.train_steps(
            max(round(blocks), 1),
            args.per_device_train_batch_size,
            world,
            args.gradient_accumulation_steps,
            args.num_train_epochs,
            args.max_steps,
        )
        return steps, per_epoch, blocks, how

    def train_tokens(self) -> float | None:
        """Tokens trained on: the train split × epochs (or the steps × batch tokens that
        ``max_steps`` allows)."""
        args = self.args
        n = self.model_tokens(self.recipe.target, [args.train_split])
        if n is None:
            return None
        steps, per_epoch, blocks, _ = self.steps()
        return n * steps / per_epoch if per_epoch else n * args.num_train_epochs

    # ------------------------------------------------------------------------ tokens

    def token_rows(self) -> list[Row]:
        rows = []
        r = self.recipe
        if self.corpus is not None:
            for s, st in self.corpus.splits.items():
                chunks = split_chunks(r, self.corpus, self.tokens, s)
                rows.append(
                    Row(
                        CORPUS,
                        f"{s} ({r.target} tokens)",
                        self.tokens.per_model[r.target][s],
                        f"{st['docs']:,.0f} documents, {chunks or 0:,.0f} chunks, "
                        f"{st['chars']:,.0f} characters; {self.corpus.basis}",
                    )
                )
        for name in r.all_models:
            if self.wanted(EXTRACT) and name in (r.extract.models or r.all_models):
                rows.append(
                    Row(
                        EXTRACT,
                        name,
                        self.model_tokens(name),
                        f"{'+'.join(self.extract_splits)}: {self.tokens.basis[name]}",
                    )
                )
        for src in r.sources:
            if src != r.target and self.wanted(ALIGN):
                rows.append(
                    Row(ALIGN, src, self.model_tokens(r.target), f"the target's ({r.target})")
                )
        if self.wanted(FUSE):
            rows.append(Row(FUSE, r.target, self.model_tokens(r.target), "the target's"))
        if r.train is not None:
            steps, _, blocks, how = self.steps()
            args = self.args
            rows.append(
                Row(
                    TRAIN,
                    f"{args.train_split} × {args.num_train_epochs:g} epoch(s)",
                    self.train_tokens(),
                    f"{blocks or 0:,.0f} blocks of {args.block_size} ({how}); {steps or 0:,} steps of "
                    f"{args.per_device_train_batch_size}×{args.gradient_accumulation_steps}×{self.settings.gpus} blocks",
                )
            )
        return rows

    # -------------------------------------------------------------------------- disk

    def disk_rows(self) -> list[Row]:
        r = self.recipe
        rows: list[Row] = []
        transient = {}  # extra bytes that exist only while a stage runs
        if r.corpus is not None:
            rows.append(self._corpus_disk())
        idx = self._decontam_disk()
        if idx is not None:
            rows.append(idx)
            if idx.value is not None:
                transient[BENCH] = idx.value  # the sorted runs beside the index while it is built
        ext = r.extract
        docs = self.chunks()
        if self.wanted(EXTRACT):
            for name in ext.models or r.all_models:
                fmt = core.ShardFormat(
                    "extract",
                    self.shapes[name].vocab_rows,
                    ext.top_k,
                    ext.logprob_dtype,
                    (("model", name), ("top_k", str(ext.top_k))),
                )
                rows.append(self._shards(EXTRACT, name, fmt, self.model_tokens(name), docs))
        t_rows = self.shapes[r.target].vocab_rows
        if self.wanted(ALIGN):
            k = r.align.top_k or ext.top_k
            for src in (s for s in r.sources if s != r.target):
                meta = (("source", src), ("target", r.target), ("top_k", str(k)))
                fmt = core.ShardFormat("align", t_rows, k, ext.logprob_dtype, meta)
                rows.append(self._shards(ALIGN, src, fmt, self.model_tokens(r.target), docs))
                rows.append(
                    Row(
                        ALIGN,
                        f"maps/{src}",
                        4 * self.shapes[src].vocab_rows + 128,
                        "int32 per source id (.npy)",
                    )
                )
        if self.wanted(FUSE):
            fz = r.fuse
            k = fz.top_k or ext.top_k
            fmt = core.ShardFormat(
                "fuse", t_rows, k, ext.logprob_dtype, (("level", fz.level), ("method", fz.method))
            )
            rows.append(self._shards(FUSE, "shards", fmt, self.model_tokens(r.target), docs))
        for stage in (TRAIN, CLM_ONLY):
            if r.train is not None and self.wanted(stage):
                model, ckpt, extra = self._train_disk(stage)
                rows += [model, ckpt]
                transient[stage] = extra
        if self.wanted(MERGE):
            for name, spec in r.merge.items():
                rows.append(
                    self._model_dir(
                        f"{MERGE}", name, DTYPE_BYTES[spec.dtype], f"merged weights in {spec.dtype}"
                    )
                )
        if self.wanted(EVOLVE):
            rows.append(self._model_dir(EVOLVE, "model", 4, "the best merge in float32"))
        known = [x.value for x in rows if x.value is not None]
        self.totals["disk_after_run"] = sum(known)
        self.totals["disk_peak"] = sum(known) + max(transient.values(), default=0)
        self.totals["disk_unknown_rows"] = sum(x.value is None for x in rows)
        return rows

    def _corpus_disk(self) -> Row:
        c = self.corpus
        if c is None:
            return Row(CORPUS, "train/valid/test.jsonl", None, "inputs not on disk")
        if c.line_bytes is not None:
            return Row(CORPUS, "train/valid/test.jsonl", c.line_bytes, "written (corpus manifest)")
        text = sum(st["text_bytes"] for st in c.splits.values())
        chunks = sum(split_chunks(self.recipe, c, self.tokens, s) for s in SPLITS)
        esc = sum(len(json.dumps(t, ensure_ascii=False).encode()) - 2 for _, t in c.sample) / max(
            sum(len(t.encode()) for _, t in c.sample), 1
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

    def _decontam_disk(self) -> Row | None:
        from fusellm.bench.harness import is_harness
        from fusellm.bench.tasks import LM

        b = self.recipe.bench
        if (
            b is None
            or not b.decontaminate
            or not any(t != LM and not is_harness(t) for t in b.tasks)
        ):
            return None
        if self.corpus is None or not self.corpus.sample:
            return Row(BENCH, "corpus/decontam-* (n-gram index)", None, "train split unknown")
        from fusellm.bench.decontam import text_words

        words = sum(len(text_words(t)) for _, t in self.corpus.sample) / max(
            _chars(self.corpus.sample), 1
        )
        train_words = words * self.corpus.splits["train"]["chars"]
        return Row(
            BENCH,
            "corpus/decontam-* (n-gram index)",
            train_words * core.DECONTAM_BYTES_PER_WORD,
            f"{train_words:,.0f} train words × 16 B (13- and 8-gram hashes); 2× while built",
        )

    def _shards(self, stage, name, fmt: core.ShardFormat, tokens, docs) -> Row:
        if tokens is None or docs is None:
            return Row(stage, name, None, "tokens unknown")
        dps = self.recipe.extract.docs_per_shard
        b = fmt.stage_bytes(tokens, docs, dps, self.id_bytes())
        shards = math.ceil(docs / dps)
        return Row(
            stage,
            name,
            b,
            f"{fmt.token_bytes()} B/token (k={fmt.top_k}, {id_width(fmt.vocab_rows)}-byte ids) "
            f"+ {shards:,} shard headers",
        )

    def _tokenizer_bytes(self, name: str) -> int:
        tok = self.toks.get(name)
        if tok is None:
            return 0
        with tempfile.TemporaryDirectory() as d:
            tok.save_pretrained(d)
            return sum(p.stat().st_size for p in Path(d).iterdir())

    def _model_dir(self, stage: str, item: str, dtype_bytes: int, what: str) -> Row:
        t = self.recipe.target
        tb = self._tokenizer_bytes(t)
        return Row(
            stage,
            item,
            core.model_dir_bytes(self.shapes[t], dtype_bytes, tb),
            f"{what}: {core.human_count(self.shapes[t].params)} params × {dtype_bytes} B"
            + (f" + tokenizer {core.human_bytes(tb)}" if tb else " (+ tokenizer, size unknown)"),
        )

    def _train_disk(self, stage: str) -> tuple[Row, Row, float]:
        args = self.args
        zero, _, _ = self.zero()
        t = self.recipe.target
        shape = self.shapes[t]
        spec_dtype = self.recipe.models[t].dtype
        trained = self.weight_bytes(t) if zero else 4
        saved = (
            DTYPE_BYTES[spec_dtype]
            if not zero and spec_dtype in ("bfloat16", "float16")
            else trained
        )
        model = self._model_dir(stage, "model", saved, "the trained model")
        steps, per_epoch, _, _ = self.steps()
        if steps is None:
            return model, Row(stage, "checkpoints", None, "steps unknown"), 0.0
        n = core.saves(steps, str(args.save_strategy.value), args.save_steps, per_epoch)
        every = args.logging_steps
        logged = steps // int(every) if every >= 1 else round(1 / every)
        one = core.checkpoint_bytes(shape.params, trained, zero) + core.checkpoint_small_files(
            self.settings.gpus, zero, logged
        )
        steady, peak, final = core.checkpoints_kept(
            n, args.checkpoint_limit, args.keep_checkpoints_when_done
        )
        what = f"ZeRO-{zero}" if zero else "no DeepSpeed"
        ckpt = Row(
            stage,
            "checkpoints",
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

    # ------------------------------------------------------------------------ memory

    def memory_rows(self) -> list[Row]:
        rows = []
        if self.recipe.train is not None:
            rows += self._train_memory()
        if self.wanted(EXTRACT):
            rows += self._extract_memory()
        return rows

    @cached_property
    def baseline(self) -> dict:
        """The framework's and each tokenizer's resident memory (measured)."""
        return measure_baseline(self.recipe, self.settings.recipe_args, list(self.toks))

    def _train_memory(self) -> list[Row]:
        args = self.args
        t = self.recipe.target
        s = self.shapes[t]
        zero, off_opt, off_param = self.zero()
        world = self.settings.gpus
        mixed = self.mixed
        module = self.weight_bytes(t) if zero else 4
        act = 2 if mixed else module
        where = "CPU RSS" if self.on_cpu else "GPU memory"
        stage = TRAIN
        rows = []
        if zero:
            states, how = zero_model_states(s, zero, world, off_opt, off_param)
            rows.append(Row(stage, f"model states, ZeRO-{zero} over {world} rank(s)", states, how))
        else:
            for item, b in core.plain_model_states(s.params, s.linear_params, mixed).items():
                rows.append(
                    Row(stage, item, b, f"{core.human_count(s.params)} params (no DeepSpeed)")
                )
        tokens = args.per_device_train_batch_size * args.block_size
        bt = f"B·T {args.per_device_train_batch_size}·{args.block_size}"
        on = args.gradient_checkpointing
        a_on = core.activation_bytes(s, tokens, act, module, on)
        a_off = core.activation_bytes(s, tokens, act, module, not on)
        rows.append(
            Row(
                stage,
                f"activations (gradient checkpointing {'on' if on else 'off'})",
                a_on,
                f"{bt}; per layer and token {core.human_bytes(core.layer_activation_bytes(s, act, module))} "
                f"({act}-byte activations, {module}-byte residual)",
            )
        )
        from fusellm.train.trainer import head_chunk_tokens

        chunk = head_chunk_tokens(args.head_chunk_tokens, s.vocab_rows)
        logits = act if mixed else module
        loss = core.loss_bytes(min(chunk, tokens) if chunk else tokens, s.vocab_rows, logits)
        rows.append(
            Row(
                stage,
                "loss [B, T, V] term",
                loss,
                (
                    f"chunked: {chunk} rows × V {s.vocab_rows:,}"
                    if chunk
                    else f"unchunked: {bt} × V {s.vocab_rows:,}"
                )
                + f" × {logits + 8 if logits != 4 else 8} B",
            )
        )
        if self.on_cpu:
            base = self.baseline
            rows.append(
                Row(
                    stage,
                    "framework (every stage's imports)",
                    base["framework"],
                    "measured in a subprocess",
                )
            )
            if t in base["tokenizers"]:
                rows.append(
                    Row(stage, f"tokenizer {t}", base["tokenizers"][t], "measured in a subprocess")
                )
        total = sum(r.value for r in rows)
        other = total - a_on + a_off
        rows.append(
            Row(
                stage,
                f"total {where} per rank",
                total,
                f"{'without' if on else 'with'} gradient checkpointing {core.human_bytes(other)}; "
                + (
                    "not counted: what earlier stages of one process leave resident"
                    if self.on_cpu
                    else "not counted: CUDA context, ZeRO buckets"
                ),
            )
        )
        self.totals[f"train_{'cpu_rss' if self.on_cpu else 'gpu'}_per_rank"] = total
        return rows

    def _extract_memory(self) -> list[Row]:
        ext = self.recipe.extract
        rows = []
        peak = 0.0
        for name in ext.models or self.recipe.all_models:
            s = self.shapes[name]
            wb = self.weight_bytes(name)
            parts = core.extract_memory(s, wb, ext.batch_tokens, ext.head_chunk_tokens)
            total = sum(parts.values())
            basis = " + ".join(f"{k} {core.human_bytes(v)}" for k, v in parts.items())
            if self.on_cpu:
                base = self.baseline
                total += base["framework"] + base["tokenizers"].get(name, 0)
                basis += (
                    f" + framework {core.human_bytes(base['framework'])} + tokenizer (measured)"
                )
            rows.append(
                Row(EXTRACT, f"{name} ({'CPU RSS' if self.on_cpu else 'GPU memory'})", total, basis)
            )
            peak = max(peak, total)
            conv = gguf_conversion(self.recipe, name)
            if conv is not None and not conv:
                c = core.GGUF_CONVERSION_FACTOR * 4 * s.params + (
                    self.baseline["framework"] if self.on_cpu else 0
                )
                rows.append(
                    Row(
                        EXTRACT,
                        f"{name}: GGUF conversion (first run only, CPU)",
                        c,
                        f"{core.GGUF_CONVERSION_FACTOR:g} × float32 weights + framework",
                    )
                )
                peak = max(peak, c)
        self.totals["extract_peak_per_process"] = peak
        return rows

    # -------------------------------------------------------------------------- time

    def time_rows(self) -> list[Row]:
        kind = self.settings.device
        if kind is None:
            return []
        dev = core.DEVICES[kind]
        r = self.recipe
        rows = []
        n = self.settings.gpus
        if dev.peak_flops is None:
            return self._cpu_time_rows()
        mfu_note = f"{dev.peak_flops / 1e12:.0f} TFLOPS × {n} {dev.name}"
        if self.wanted(EXTRACT):
            for name in r.extract.models or r.all_models:
                tok = self.model_tokens(name)
                s = (
                    None
                    if tok is None
                    else core.seconds(
                        core.infer_flops(self.shapes[name].params, tok),
                        dev.peak_flops,
                        dev.infer_mfu,
                        n,
                    )
                )
                rows.append(
                    Row(
                        EXTRACT,
                        name,
                        s,
                        f"2·N·tokens at {dev.infer_mfu:.0%} of {mfu_note}",
                    )
                )
        if r.train is not None:
            args = self.args
            tok = self.train_tokens()
            for stage in (TRAIN, CLM_ONLY):
                if not self.wanted(stage):
                    continue
                f = (
                    None
                    if tok is None
                    else core.train_flops(
                        self.shapes[r.target].params, tok, 1, args.gradient_checkpointing
                    )
                )
                rows.append(
                    Row(
                        stage,
                        r.target,
                        None if f is None else core.seconds(f, dev.peak_flops, dev.train_mfu, n),
                        f"{'8' if args.gradient_checkpointing else '6'}·N·tokens at {dev.train_mfu:.0%} of {mfu_note}",
                    )
                )
        known = [x.value for x in rows if x.value is not None]
        self.totals["seconds"] = sum(known)
        return rows

    def _cpu_time_rows(self) -> list[Row]:
        r = self.recipe
        rows = []
        rates = {}
        for name in r.all_models:
            rates[name] = cpu_tokens_per_second(r, name)
        if self.wanted(EXTRACT):
            for name in r.extract.models or r.all_models:
                tok, rate = self.model_tokens(name), rates[name]
                rows.append(
                    Row(
                        EXTRACT,
                        name,
                        None if tok is None or rate is None else tok / rate,
                        f"forward pass measured here: {rate:,.0f} tokens/s"
                        if rate
                        else "model not at hand here (not converted/downloaded): unknown",
                    )
                )
        if r.train is not None:
            args = self.args
            tok, rate = self.train_tokens(), rates[r.target]
            factor = 4 if args.gradient_checkpointing else 3
            for stage in (TRAIN, CLM_ONLY):
                if self.wanted(stage):
                    rows.append(
                        Row(
                            stage,
                            r.target,
                            None if tok is None or rate is None else tok * factor / rate,
                            f"{factor}× the measured forward time per token (backward ≈ 2 forwards)"
                            if rate
                            else "model not at hand here: unknown",
                        )
                    )
        known = [x.value for x in rows if x.value is not None]
        self.totals["seconds"] = sum(known)
        return rows


# TrainingArguments fields whose checks depend on the machine that trains.
MACHINE_DEPENDENT = (
    "bf16",
    "fp16",
    "bf16_full_eval",
    "fp16_full_eval",
    "tf32",
    "deepspeed",
    "use_cpu",
)


def zero_model_states(
    s: ModelShape, stage: int, world: int, off_opt: bool, off_param: bool
) -> tuple[int, str]:
    """Per-rank parameters, gradients and optimizer states under ZeRO: DeepSpeed's own
    estimator where DeepSpeed is installed (without its 1.5× CPU buffer factor, which is
    for the host side), else the ZeRO paper's formula."""
    try:
        from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
        from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs
    except ImportError:
        return core.zero_paper_model_states(
            s.params, stage, world
        ), "ZeRO paper: (2 + 2 + 12) B/param, partitioned (DeepSpeed not installed)"
    if stage == 3:
        _, gpu, _ = estimate_zero3_model_states_mem_needs(
            s.params,
            s.largest_layer_params,
            num_gpus_per_node=world,
            cpu_offload=off_opt,
            cpu_offload_params=off_param,
        )
        return int(gpu), "DeepSpeed's estimate_zero3_model_states_mem_needs"
    _, gpu = estimate_zero2_model_states_mem_needs(
        s.params, num_gpus_per_node=world, cpu_offload=off_opt
    )
    return int(gpu), "DeepSpeed's estimate_zero2_model_states_mem_needs (also for ZeRO-1)"


def gguf_conversion(recipe: Recipe, name: str) -> bool | None:
    """None: not a GGUF model; else whether it is converted already (cached)."""
    from fusellm.models import PARTS_PREFIX, converted_dir, locate

    spec = recipe.models[name]
    if not (spec.path.startswith(PARTS_PREFIX) or spec.path.endswith(".gguf") or spec.gguf_file):
        return None
    return (converted_dir(locate(spec, name), "model") / "fusellm-converted.json").exists()


# Measured in a fresh interpreter: the resident memory of a `fusellm run` process before any
# model is loaded (torch, transformers, datasets, every stage's modules, W&B when tracking
# is on), and what each tokenizer adds.
_BASELINE = r"""
import json, sys
def rss():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS"):
            return int(line.split()[1]) * 1024
import datasets, transformers.trainer
import fusellm.cli, fusellm.corpus.runner, fusellm.extract.runner, fusellm.align.runner
import fusellm.fuse.runner, fusellm.train.runner, fusellm.train.trainer, fusellm.train.data
if sys.argv[1] == "1":
    import wandb
out = {"framework": rss(), "tokenizers": {}}
from fusellm.recipe import load_recipe
from fusellm.models import load_tokenizer
recipe = load_recipe(sys.argv[2], sys.argv[3:])
for name in json.loads(sys.stdin.read()):
    before = rss()
    tok = load_tokenizer(recipe.models[name], name)
    out["tokenizers"][name] = rss() - before
print(json.dumps(out))
"""


def measure_baseline(recipe: Recipe, recipe_args: list[str], names: list[str]) -> dict:
    """``{"framework": bytes, "tokenizers": {name: bytes}}`` measured in a subprocess
    (Linux ``/proc``; zeros elsewhere)."""
    if not Path("/proc/self/status").exists():
        return {"framework": 0, "tokenizers": {}}
    wandb = recipe.tracking.backend == "wandb" and recipe.tracking.mode != "disabled"
    p = subprocess.run(
        [sys.executable, "-c", _BASELINE, "1" if wandb else "0", *recipe_args],
        input=json.dumps(names),
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
    )
    if p.returncode != 0:
        raise RuntimeError(f"plan: measuring the framework's memory failed: {p.stderr[-2000:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def cpu_tokens_per_second(recipe: Recipe, name: str, n_tokens: int = 256) -> float | None:
    """Tokens per second of a forward pass over ``n_tokens`` of the model on this CPU, if
    its weights are at hand without converting or downloading (a local directory, a
    converted GGUF); else None."""
    import time

    import torch

    from fusellm.models import load_model
    from fusellm.packages import resolve_pkg_path

    spec = recipe.models[name]
    conv = gguf_conversion(recipe, name)
    if conv is False:  # a GGUF model not converted yet: loading it would convert it
        return None
    if conv is None:  # a local directory; a hub id would be downloaded
        try:
            if not resolve_pkg_path(spec.path).is_dir():
                return None
        except (ImportError, FileNotFoundError, ValueError):
            return None
    model = load_model(spec, name, "cpu")
    ids = torch.arange(n_tokens).remainder(model.config.get_text_config().vocab_size)[None]
    times = []
    with torch.inference_mode():
        for _ in range(4):  # the first pass pages the weights in: the best of the others
            t0 = time.perf_counter()
            model(input_ids=ids)
            times.append(time.perf_counter() - t0)
    secs = min(times[1:])
    return n_tokens / secs


# ---------------------------------------------------------------------------- output


def render(plan: dict) -> str:
    out = [
        f"fusellm plan: {plan['recipe']} (run_dir {plan['run_dir']}, {plan['gpus']} rank(s)"
        + (f", device {plan['device']})" if plan["device"] else ")")
    ]
    for n in plan["notes"]:
        out += textwrap.wrap(
            n, 96, initial_indent="  note: ", subsequent_indent=" " * 8, break_on_hyphens=False
        )
    out.append("")
    out.append("models")
    head = ["", "params", "hidden", "layers", "heads/kv", "vocab rows", "tied", "config"]
    rows = [
        [
            n,
            f"{m['params']:,}",
            str(m["hidden"]),
            str(m["layers"]),
            f"{m['heads']}/{m['kv_heads']}",
            f"{m['vocab_rows']:,}",
            "yes" if m["tied"] else "no",
            m["config_from"],
        ]
        for n, m in plan["models"].items()
    ]
    out += _table(head, rows)
    sections = [
        ("tokens", core.human_count, None),
        (
            "disk",
            core.human_bytes,
            ("disk_after_run", "after the run", "disk_peak", "peak while running"),
        ),
        ("memory", core.human_bytes, None),
        ("time", core.human_seconds, ("seconds", "these stages", None, None)),
    ]
    for key, fmt, total in sections:
        if not plan[key]:
            continue
        out.append("")
        out.append(key)
        rows = [[r["stage"], r["item"], fmt(r["value"]), r["basis"]] for r in plan[key]]
        if total:
            a, label_a, b, label_b = total
            rows.append(["total", label_a, fmt(plan["totals"].get(a)), ""])
            if b:
                rows.append(["", label_b, fmt(plan["totals"].get(b)), ""])
        out += _table(["stage", "item", key if key != "time" else "time", "how"], rows)
    return "\n".join(out)


def _table(head: list[str], rows: list[list[str]]) -> list[str]:
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head) - 1)]

    def line(r: list[str]) -> str:
        return (
            "  " + "  ".join(c.ljust(w) for c, w in zip(r[:-1], widths, strict=True)) + "  " + r[-1]
        ).rstrip()

    return [line(head), *map(line, rows)]


def run(
    recipe: Recipe,
    source: list[str],
    gpus: int | None,
    device: str | None,
    corpus_tokens: float | None,
    as_json: bool,
) -> int:
    """Print the plan of ``recipe`` (loaded from ``source``: its file and overrides)."""
    world = gpus or int(os.environ.get("WORLD_SIZE", "1"))
    # stdout carries only the plan (DeepSpeed prints notices when its estimators load)
    with contextlib.redirect_stdout(sys.stderr):
        plan = build(recipe, Settings(world, device, corpus_tokens, source))
    print(json.dumps(plan) if as_json else render(plan))
    return 0
