"""Decontamination index: which word n-grams occur in the corpus train split.

Bench drops a task item whose text overlaps the training corpus (the GPT-3 and
lm-evaluation-harness test: a shared word 13-gram). The train split is read once into
the 64-bit hashes of its word 13-grams (and 8-grams, for short items; see
:meth:`DecontamIndex.contains`), kept on disk as one sorted array beside the corpus
manifest and read a 4 KB block per lookup: memory stays bounded whatever the corpus
size, and later bench runs (other tasks, other models) reuse it without reading the
corpus.

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
flagged by a collision less than once in 10**8 items.

Cache. ``corpus/decontam-<key>/`` holds ``ngrams.npy`` (uint64 [N], sorted, unique),
``fence.npy`` (see :class:`DecontamIndex`; both read without pickle) and ``index.json``. The key is the train split's sha256 (the
corpus manifest's record, trusted while the file keeps the recorded size and mtime) and
the settings here, so a changed train split gets a new index and the stale one is
deleted. The build hashes :data:`RUN_HASHES` at a time into sorted runs on disk, then
merges them blockwise into one array: RAM stays ~0.4 GB however long the corpus
(``scripts/bench_decontam.py``); the disk holds the runs and the index (8 bytes per
n-gram each, about 2 n-grams per word) until the runs are deleted.
The directory is written with :func:`fusellm.storage.atomic_dir`: a killed build leaves
only a temp directory, which is never read and is deleted by the next build.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import re
import shutil
import time
import unicodedata
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import BinaryIO

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
FENCES = "fence.npy"
FENCE = 512  # hashes per 4 KB block of ngrams.npy
INFO = "index.json"
RUN_HASHES = 1 << 23  # hashes sorted in RAM at a time (64 MB)
MERGE_HASHES = 1 << 23  # hashes held, over all runs, per merge step
BATCH_CHARS = 1 << 21  # text per hashing pass (~100 MB of numpy temporaries)

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
    """The n-gram hashes of a train split: ``ngrams.npy`` (uint64 [N], sorted, unique) on
    disk and, in RAM, ``fence`` (uint64 [⌈N / FENCE⌉]: the first hash of each 4 KB block).
    A lookup finds its block in the fence and reads that block alone, with a seek and a read rather
    than a memory map: a map's touched pages count toward the RSS, and a thousand items
    touch most pages of a gigabyte index."""

    def __init__(self, path: Path):
        self.path = path
        with open(path / NGRAMS, "rb") as f:
            np.lib.format.read_magic(f)
            (self.n,), _, dtype = np.lib.format.read_array_header_1_0(f)
            self.offset = f.tell()
        size = (path / NGRAMS).stat().st_size
        if dtype != np.dtype("<u8") or size != self.offset + 8 * self.n:
            raise ValueError(f"{size} bytes of {dtype} where {self.n} uint64 belong")
        self.fence = np.load(path / FENCES)
        if self.fence.dtype != np.dtype("<u8") or len(self.fence) != -(-self.n // FENCE):
            raise ValueError(f"{FENCES} has {len(self.fence)} entries for {self.n} hashes")

    def __len__(self) -> int:
        return self.n

    def _found(self, h: np.ndarray) -> np.ndarray:
        """bool [len(h)]: which of the hashes ``h`` (uint64) are in the index."""
        found = np.zeros(len(h), bool)
        blocks = np.searchsorted(self.fence, h, side="right") - 1  # -1: below the smallest
        with open(self.path / NGRAMS, "rb") as f:
            for b in np.unique(blocks[blocks >= 0]):
                f.seek(self.offset + 8 * FENCE * int(b))  # (os.pread: not on Windows)
                data = f.read(8 * FENCE)
                block = np.frombuffer(data, "<u8")
                sel = blocks == b
                i = np.minimum(np.searchsorted(block, h[sel]), len(block) - 1)
                found[sel] = block[i] == h[sel]
        return found

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
        if len(index) == n:
            return index
        problem = f"{len(index)} hashes, {n} recorded"
    except (OSError, ValueError, KeyError, EOFError) as e:
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
        n = _merge(runs, tmp)
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
            run = np.concatenate(pending)
            pending, held = [], 0  # freed before the sort's copies
            runs.append(scratch / f"run-{len(runs):05d}.npy")
            np.save(runs[-1], _sorted_unique(run))

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


class _Run:
    """A sorted run (.npy) read a block at a time into ``buf``. Plain reads, not a memory
    map: mapped pages count toward the process's RSS until unmapped."""

    def __init__(self, f: BinaryIO, block: int):
        self.f = f
        np.lib.format.read_magic(f)
        (self.left,), _, _ = np.lib.format.read_array_header_1_0(f)
        self.block = block
        self.buf = np.empty(0, np.uint64)
        self.refill()

    def refill(self) -> None:
        if not len(self.buf) and self.left:
            self.buf = np.empty(min(self.block, self.left), np.uint64)
            self.f.readinto(memoryview(self.buf).cast("B"))
            self.left -= len(self.buf)

    def take(self, top: np.uint64) -> np.ndarray:
        """The buffered hashes up to ``top``."""
        k = int(np.searchsorted(self.buf, top, side="right"))
        out, self.buf = self.buf[:k], self.buf[k:]
        self.refill()
        return out


def _merge(paths: list[Path], dest: Path) -> int:
    """Merge sorted unique runs into one sorted unique uint64 ``dest/ngrams.npy`` and its
    ``fence.npy``; returns the number of hashes.

    Each step takes, from every run's buffered block, the hashes up to the smallest block
    end: no later block holds one of those, so the step's hashes are final once sorted and
    deduplicated. RAM: :data:`MERGE_HASHES` over all runs."""
    block = max(1, MERGE_HASHES // max(1, len(paths)))
    n = 0
    fence = [np.empty(0, np.uint64)]
    with contextlib.ExitStack() as files:
        runs = [_Run(files.enter_context(open(p, "rb")), block) for p in paths]
        f = files.enter_context(open(dest / NGRAMS, "wb"))
        total = sum(len(r.buf) + r.left for r in runs)
        bar = files.enter_context(tqdm(total=total, unit="hash", desc="decontamination merge"))
        f.write(_npy_header(total))
        live = [r for r in runs if len(r.buf)]
        while live:
            top = min(r.buf[-1] for r in live)
            parts = [r.take(top) for r in live]
            merged = _sorted_unique(np.concatenate(parts))
            f.write(merged.astype("<u8", copy=False).data)
            # the hashes at positions that are multiples of FENCE (a copy: a view would keep
            # every merged block alive)
            fence.append(merged[-n % FENCE :: FENCE].copy())
            n += len(merged)
            bar.update(sum(len(p) for p in parts))
            live = [r for r in live if len(r.buf)]
        f.seek(0)
        f.write(_npy_header(n))
    np.save(dest / FENCES, np.concatenate(fence).astype("<u8", copy=False))
    return n
