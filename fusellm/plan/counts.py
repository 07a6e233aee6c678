"""What the plan counts from: the corpus (documents, chunks, characters and a sample of
its texts, per split) and the tokens of each model per split.

Token counts come from whatever the run has already written: extraction manifests (exact);
the corpus manifest (its characters × each tokenizer's tokens per character on a sample);
before the corpus stage, the inputs' text × the same rate; with nothing on disk,
``--corpus-tokens``.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path

from fusellm.corpus.core import SPLITS, split_of
from fusellm.manifest import complete_manifest
from fusellm.models import ModelLoadError, encode, load_tokenizer, special_token_overhead
from fusellm.plan import core
from fusellm.recipe import Recipe
from fusellm.stages import CORPUS, EXTRACT

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


def chars_of(docs: list[tuple[str, str]]) -> int:
    """Characters of the texts of (id, text) pairs."""
    return sum(len(t) for _, t in docs)


def utf8_bytes_of(docs: list[tuple[str, str]]) -> int:
    """UTF-8 bytes of the texts of (id, text) pairs."""
    return sum(len(t.encode()) for _, t in docs)


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
    man = complete_manifest(recipe.stage_dir(CORPUS))
    if man is not None:
        return _from_manifest(recipe, man)
    cfg = recipe.corpus
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
        chars_per_byte = chars_of(texts) / max(utf8_bytes_of(texts), 1)
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


def _from_manifest(recipe: Recipe, man: dict) -> Corpus:
    """The corpus as its complete manifest records it, sampled from ``train.jsonl``."""
    sample = _sample_jsonl(recipe.stage_dir(CORPUS) / "train.jsonl", SAMPLE_CHARS)
    per_char = utf8_bytes_of(sample) / max(chars_of(sample), 1)
    stats = man["stats"]["splits"]
    splits = {
        s: {
            "docs": st["documents"],
            "chunks": st["chunks"],
            "chars": st["chars"],
            "text_bytes": st["chars"] * per_char,
        }
        for s, st in stats.items()
    }
    domains = sorted({k[6:] for st in stats.values() for k in st if k.startswith("chars/")})
    return Corpus(
        splits,
        sample,
        "corpus manifest (documents, chunks, characters)",
        domains,
        sum(f["bytes"] for f in man["files"].values()),
    )


def _spread(docs: list[tuple[str, str]], budget: int) -> list[tuple[str, str]]:
    """Every n-th document so that about ``budget`` characters are kept, from all inputs."""
    total = chars_of(docs)
    step = max(1, math.floor(total / budget)) if total > budget else 1
    return docs[::step]


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
        total += _file_text_bytes(path, fmt, inp.text_field)
    per_doc = utf8_bytes_of(texts) / max(len(texts), 1)
    return total, total / max(per_doc, 1.0), texts


def _take_chars(docs, budget: int):
    got = 0
    for d in docs:
        yield d
        got += len(d.text)
        if got >= budget:
            return


def _file_text_bytes(path: Path, fmt: str, field_name: str) -> float:
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
    rates: dict[str, tuple[float, int]] = {}
    if corpus is not None and corpus.sample:
        for name, tok in toks.items():
            ids = encode(tok, [t for _, t in corpus.sample])["input_ids"]
            specials = special_token_overhead(tok) if add_special else 0
            rates[name] = (sum(map(len, ids)) / max(chars_of(corpus.sample), 1), specials)
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
            f"(sampled {chars_of(corpus.sample):,} chars)"
        )
    for name in recipe.all_models:
        exact = _extracted_tokens(recipe, name)
        if exact:
            per_model[name] = {**per_model.get(name, dict.fromkeys(splits)), **exact}
            basis[name] = f"extraction manifest (exact; {'+'.join(exact)})"
    target = recipe.target
    fractions = _fractions(recipe)
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
    man = complete_manifest(recipe.stage_dir(EXTRACT) / name)
    if man is None:
        return {}
    counts = dict.fromkeys(man["stats"]["shards"], 0.0)
    for rel, rec in man["files"].items():
        counts[rel.split("/")[0]] += rec["tokens"]
    return counts


def _fractions(recipe: Recipe) -> dict[str, float]:
    c = recipe.corpus
    v, t = (c.valid_fraction, c.test_fraction) if c else (0.0, 0.0)
    return {"train": 1.0 - v - t, "valid": v, "test": t}


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
