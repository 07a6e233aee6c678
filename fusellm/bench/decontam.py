"""Decontamination index: which word n-grams occur in the corpus train split.

Bench drops a task item whose text overlaps the training corpus (the GPT-3 and
lm-evaluation-harness test: a shared word 13-gram). The train split is read once into
the 64-bit hashes of its word 13-grams (and 8-grams, for short items; see
:meth:`DecontamIndex.contains`), kept on disk as one sorted array beside the corpus
manifest and memory-mapped for lookups: memory stays bounded whatever the corpus size,
and later bench runs (other tasks, other models) reuse it without reading the corpus.

Words. Text is NFKC-normalised and case-folded; a word is a maximal run of letters,
digits and combining marks, so punctuation, spaces and ``_`` only separate words
("Don't STOP!" → don, t, stop). Scripts written without spaces between words (Han,
Hiragana, Katakana, Thai, Lao, Khmer, Myanmar) give one word per character, with its
combining marks: a word segmenter would add a dependency and tie the index to its
dictionary, while 13 Chinese or Japanese characters (some 6-9 words) are still a
specific phrase. Korean is written with spaces and gets words.

Hashes. An n-gram's words joined by NUL, as UTF-8 bytes, hashed polynomially mod 2**64
(prefix sums over a whole batch of documents in one numpy pass) and finished with the
splitmix64 mixer. With a billion hashes in the index a clean item of 50 n-grams is
flagged by a collision about once in 10**8 items.

Cache. ``corpus/decontam-<key>/`` holds ``ngrams.npy`` (uint64 [N], sorted, unique;
loaded without pickle) and ``index.json``. The key is the train split's sha256 (the
corpus manifest's record, trusted while the file keeps the recorded size and mtime) and
the settings here, so a changed train split gets a new index and the stale one is
deleted. The build hashes :data:`RUN_HASHES` at a time into sorted runs on disk, then
merges them blockwise into one array: RAM stays under ~1 GB however long the corpus; the
disk holds the runs and the index (8 bytes per n-gram each) until the runs are deleted.
The directory is written with :func:`fusellm.storage.atomic_dir`: a killed build leaves
only a temp directory, which is never read and is deleted by the next build.
"""

from __future__ import annotations

import io
import json
import logging
import re
import shutil
import time
import unicodedata
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import regex
from tqdm import tqdm

from fusellm.manifest import MANIFEST
from fusellm.recipe import config_hash
from fusellm.storage import (
    TMP_MARK,
    atomic_dir,
    read_json,
    record_problem,
    remove_temp_files,
    sha256_file,
)

log = logging.getLogger(__name__)

NGRAM = 13
SHORT_NGRAM = 8  # items of 8-12 words; shorter ones are never flagged
# Part of the cache key: a change here builds a new index.
SETTINGS = {
    "format": 1,
    "words": "nfkc-casefold-letters-digits-marks-spaceless-per-char",
    "hash": "poly64-nul-joined-utf8-splitmix64",
    "ngrams": [NGRAM, SHORT_NGRAM],
}
PREFIX = "decontam-"
NGRAMS = "ngrams.npy"
INFO = "index.json"
RUN_HASHES = 1 << 24  # hashes sorted in RAM at a time (128 MB)
MERGE_HASHES = 1 << 24  # hashes held, over all runs, per merge step
BATCH_CHARS = 1 << 22  # text per hashing pass (~200 MB of numpy temporaries)

_SPACELESS = r"\p{Han}\p{Hiragana}\p{Katakana}\p{Thai}\p{Lao}\p{Khmer}\p{Myanmar}"
_WORD = regex.compile(rf"(?V1)[{_SPACELESS}]\p{{M}}*|[[\p{{L}}\p{{N}}\p{{M}}]--[{_SPACELESS}]]+")
_ASCII_WORD = re.compile(r"[a-z0-9]+")  # what _WORD finds in case-folded ASCII, 3× faster

_P = 0x9E3779B97F4A7C15  # odd, so invertible mod 2**64
_P_INV = pow(_P, -1, 1 << 64)


def text_words(text: str) -> list[str]:
    """The words n-grams are made of (see the module docstring)."""
    text = unicodedata.normalize("NFKC", text).casefold()
    return (_ASCII_WORD if text.isascii() else _WORD).findall(text)


def _powers(base: int, n: int) -> np.ndarray:
    """uint64 [n]: base**i mod 2**64 (numpy integer arithmetic wraps)."""
    out = np.ones(n, np.uint64)
    np.cumprod(np.full(n - 1, base, np.uint64), out=out[1:])
    return out


def _mix(z: np.ndarray) -> np.ndarray:
    # splitmix64's finaliser: every input bit reaches every output bit
    z ^= z >> np.uint64(30)
    z *= np.uint64(0xBF58476D1CE4E5B9)
    z ^= z >> np.uint64(27)
    z *= np.uint64(0x94D049BB133111EB)
    z ^= z >> np.uint64(31)
    return z


def ngram_hashes(docs: Sequence[Sequence[str]], sizes: Sequence[int]) -> np.ndarray:
    """uint64 [windows]: the hash of every run of ``n`` consecutive words inside one
    document, for each ``n`` in ``sizes`` (all windows of the first size, in order, then
    the next size). The same words hash alike wherever they stand."""
    docs = [d for d in docs if len(d) >= min(sizes)]
    if not docs:
        return np.empty(0, np.uint64)
    counts = np.fromiter(map(len, docs), np.int64, len(docs))
    data = np.frombuffer("\0".join(map("\0".join, docs)).encode(), np.uint8)
    seps = np.flatnonzero(data == 0)  # words never hold NUL
    starts = np.concatenate(([0], seps + 1))
    ends = np.concatenate((seps, [len(data)]))
    # prefix[i] = Σ_{j<i} byte_j · P**j, so bytes [s, e) hash to (prefix[e] − prefix[s]) · P**−s
    prefix = np.zeros(len(data) + 1, np.uint64)
    terms = data.astype(np.uint64)
    terms *= _powers(_P, len(data))
    np.cumsum(terms, out=prefix[1:])
    del terms
    inverse = _powers(_P_INV, len(data))
    doc_end = np.repeat(np.cumsum(counts), counts)  # per word: one past its document's last
    out = []
    for n in sizes:
        w = np.flatnonzero(np.arange(len(starts)) + n <= doc_end)
        s, e = starts[w], ends[w + n - 1]
        out.append(_mix((prefix[e] - prefix[s]) * inverse[s]))
    return np.concatenate(out)


def _sorted_unique(x: np.ndarray) -> np.ndarray:
    # np.unique is several times slower than sort + mask on uint64
    x.sort()
    return x[np.concatenate(([True], x[1:] != x[:-1]))]


class DecontamIndex:
    """The n-gram hashes of a train split, memory-mapped (uint64 [N], sorted, unique)."""

    def __init__(self, path: Path):
        self.path = path
        self.hashes = np.load(path / NGRAMS, mmap_mode="r")

    def __len__(self) -> int:
        return len(self.hashes)

    def _found(self, h: np.ndarray) -> np.ndarray:
        """bool [len(h)]: which hashes are in the index (binary search on the mapped file)."""
        if not len(self.hashes):
            return np.zeros(len(h), bool)
        i = np.minimum(np.searchsorted(self.hashes, h), len(self.hashes) - 1)
        return self.hashes[i] == h

    def contains(self, text: str) -> bool:
        """Whether ``text`` (an item's question and gold answer) overlaps the corpus.

        * 13 words or more: any of its word 13-grams occurs in the corpus (GPT-3,
          lm-evaluation-harness). A shared run of 13 words is not a coincidence.
        * 8 to 12 words: the whole item occurs, tested as every one of its 8-grams
          occurring (they overlap by 7 words; for 8 words it is the item itself). Such
          items are common (about a third of OpenBookQA, a fifth of CommonsenseQA and
          SciQ, a sixth of PIQA), so leaving them unchecked would leave much of a task
          undecontaminated; requiring all of them rather than any keeps a common
          8-word phrase from flagging an item.
        * under 8 words ("Question: 2 + 2? Answer: 4"): never. So few words occur in
          ordinary text by chance; a match would say nothing about a leaked test set.
        """
        words = text_words(text)
        if len(words) >= NGRAM:
            return bool(self._found(ngram_hashes([words], [NGRAM])).any())
        if len(words) >= SHORT_NGRAM:
            return bool(self._found(ngram_hashes([words], [SHORT_NGRAM])).all())
        return False


def open_index(corpus_dir: Path) -> DecontamIndex | None:
    """The decontamination index of ``corpus_dir/train.jsonl``, built on first use and
    cached beside it; None when there is no train split."""
    train = corpus_dir / "train.jsonl"
    if not train.is_file():
        return None
    sha = _train_sha256(corpus_dir, train)
    dest = corpus_dir / f"{PREFIX}{config_hash({'train_sha256': sha, **SETTINGS})[:16]}"
    index = _load(dest)
    if index is None:
        remove_temp_files(corpus_dir)  # what killed builds left
        _build(train, dest, sha)
        for p in corpus_dir.glob(f"{PREFIX}*"):
            if p != dest and p.is_dir() and TMP_MARK not in p.name:
                shutil.rmtree(p)  # the index of an earlier train split
        index = _load(dest)
    return index


def _train_sha256(corpus_dir: Path, train: Path) -> str:
    """The corpus manifest's sha256 of the train split while the file keeps the recorded
    size and mtime (not re-read, as elsewhere in fusellm); otherwise the file's own."""
    man = corpus_dir / MANIFEST
    rec = read_json(man).get("files", {}).get(train.name) if man.is_file() else None
    if rec and record_problem(train, rec) is None:
        return rec["sha256"]
    return sha256_file(train)


def _load(dest: Path) -> DecontamIndex | None:
    if not (dest / INFO).is_file():
        return None
    try:
        index = DecontamIndex(dest)
        n = read_json(dest / INFO)["ngrams"]
        if index.hashes.dtype == np.uint64 and index.hashes.shape == (n,):
            return index
        problem = f"{index.hashes.shape[0]} hashes, {n} recorded"
    except (OSError, ValueError, KeyError) as e:
        problem = str(e)
    log.warning("bench: decontamination index %s is damaged (%s); rebuilding it", dest, problem)
    return None


def _build(train: Path, dest: Path, sha: str) -> None:
    t0 = time.time()
    log.info(
        "bench: indexing the n-grams of %s for decontamination (once; kept at %s)", train, dest
    )
    with atomic_dir(dest) as tmp:
        runs, docs = _hash_runs(train, tmp)
        n = _merge(runs, tmp / NGRAMS)
        for p in runs:
            p.unlink()
        info = {**SETTINGS, "train_sha256": sha, "documents": docs, "ngrams": n}
        (tmp / INFO).write_text(json.dumps(info, indent=2, sort_keys=True) + "\n")
    log.info("bench: %d distinct n-grams of %d documents in %.1fs", n, docs, time.time() - t0)


def _chunks(train: Path) -> Iterator[tuple[object, str]]:
    """(parent document id, text) per line of a corpus split, with a progress bar."""
    with (
        open(train, "rb") as f,
        tqdm(
            total=train.stat().st_size, unit="B", unit_scale=True, desc="decontamination index"
        ) as bar,
    ):
        for lineno, line in enumerate(f, 1):
            bar.update(len(line))
            try:
                d = json.loads(line)
                text = d["text"]
            except (ValueError, KeyError, TypeError) as e:
                raise ValueError(f"{train}:{lineno}: not a corpus document: {e!r}") from None
            if not isinstance(text, str):
                raise ValueError(f"{train}:{lineno}: field 'text' is not a string")
            yield d.get("parent", d.get("id")), text


def _hash_runs(train: Path, scratch: Path) -> tuple[list[Path], int]:
    """Save the train split's n-gram hashes as sorted unique runs (uint64 .npy) under
    ``scratch``; returns their paths and the number of lines read."""
    runs: list[Path] = []
    pending: list[np.ndarray] = []
    held = 0

    def hash_batch(batch: list[list[str]], last: bool = False) -> None:
        nonlocal pending, held
        h = ngram_hashes(batch, [NGRAM, SHORT_NGRAM])
        pending.append(h)
        held += len(h)
        if held >= RUN_HASHES or (last and held):
            runs.append(scratch / f"run-{len(runs):05d}.npy")
            np.save(runs[-1], _sorted_unique(np.concatenate(pending)))
            pending, held = [], 0

    batch: list[list[str]] = []
    chars = lines = 0
    prev, tail = None, []
    for parent, text in _chunks(train):
        lines += 1
        words = text_words(text)
        # The corpus stage cuts a long document into consecutive lines of one parent: carry
        # the last words over the cut so n-grams across it are indexed too.
        if parent is not None and parent == prev:
            words = tail + words
        prev, tail = parent, words[-(NGRAM - 1) :]
        batch.append(words)
        chars += len(text)
        if chars >= BATCH_CHARS:
            hash_batch(batch)
            batch, chars = [], 0
    hash_batch(batch, last=True)
    return runs, lines


def _npy_header(n: int) -> bytes:
    """The .npy header of uint64 [n]: 128 bytes for any n (numpy pads it to a multiple
    of 64), so it can be written before n is known and rewritten after."""
    buf = io.BytesIO()
    header = {"descr": "<u8", "fortran_order": False, "shape": (n,)}
    np.lib.format.write_array_header_1_0(buf, header)
    return buf.getvalue()


def _merge(runs: list[Path], out: Path) -> int:
    """Merge sorted unique runs into one sorted unique uint64 .npy; returns its length.

    Each step takes a block from every run, and from each block every hash up to the
    smallest block end: no later block holds one of those, so the step's hashes are
    final once sorted and deduplicated. RAM: :data:`MERGE_HASHES` over all runs."""
    arrays = [a for a in (np.load(p, mmap_mode="r") for p in runs) if len(a)]
    total = sum(len(a) for a in arrays)
    block = max(1, MERGE_HASHES // max(1, len(arrays)))
    pos = [0] * len(arrays)
    n = 0
    with open(out, "wb") as f, tqdm(total=total, unit="hash", desc="decontamination merge") as bar:
        f.write(_npy_header(total))
        live = list(range(len(arrays)))
        while live:
            blocks = {i: arrays[i][pos[i] : pos[i] + block] for i in live}
            top = min(b[-1] for b in blocks.values())
            parts = []
            for i, b in blocks.items():
                k = int(np.searchsorted(b, top, side="right"))
                parts.append(b[:k])
                pos[i] += k
            merged = _sorted_unique(np.concatenate(parts))
            f.write(merged.astype("<u8", copy=False).data)
            n += len(merged)
            bar.update(sum(len(p) for p in parts))
            live = [i for i in live if pos[i] < len(arrays[i])]
        f.seek(0)
        f.write(_npy_header(n))
    return n
