"""Benchmark bench's decontamination index against the joined-string probe it replaced.

    python scripts/bench_decontam.py              # a 1 GB synthetic train split
    python scripts/bench_decontam.py --gb 0.02    # seconds (smoke)

Writes into a temp dir a ``corpus/train.jsonl`` of ``--gb`` GB as the corpus stage
would (words drawn from a Zipf-distributed vocabulary, documents of log-normal length,
long ones cut into chunks of one parent, a manifest with the file's sha256) and
``--items`` task items (question + answer, some after a few-shot example), half of them
planted verbatim inside a training chunk and half not. Each method runs in its own
child process, which reports its peak RSS (VmHWM):

* ``new``: build the index (``open_index`` on the fresh corpus dir), then look up every
  item (median of ``--repeats`` passes);
* ``cached``: what a later bench run pays: open the built index, look up every item;
* ``old``: the code before: read the split and join its texts into one string, then
  probe it with the last 200 characters of each item.

Both methods must flag every planted item and no clean one. The last line of output is
one JSON object with every figure.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from fusellm.bench.decontam import PREFIX, open_index  # noqa: E402
from fusellm.bench.tasks import Item, question_and_answer  # noqa: E402
from fusellm.storage import atomic_write_json, file_record  # noqa: E402

CHUNK_WORDS = 1500  # about a 2048-token block: where the corpus stage would cut


class Zipf:
    """Words of a synthetic vocabulary (some capitalised or punctuated, as in running text)
    with probability ∝ 1 / rank**1.1."""

    def __init__(self, rng: np.random.Generator, size: int = 50_000):
        letters = np.array(list("abcdefghijklmnopqrstuvwxyz"))
        words = ["".join(rng.choice(letters, rng.integers(2, 11))) for _ in range(size)]
        for i in rng.choice(size, size // 5, replace=False):
            words[i] = rng.choice([words[i].capitalize(), words[i] + ",", words[i] + "."])
        self.words = np.array(words, dtype=object)
        p = 1.0 / np.arange(1, size + 1) ** 1.1
        self.cdf = np.cumsum(p / p.sum())
        self.bytes_per_word = float(p @ np.array([len(w) + 1 for w in words]) / p.sum())
        self.rng = rng

    def __call__(self, n: int) -> list[str]:
        i = np.searchsorted(self.cdf, self.rng.random(n) * self.cdf[-1])
        return list(self.words[i])


def make_data(root: Path, gb: float, n_items: int, seed: int) -> tuple[Path, list[bool]]:
    """corpus/train.jsonl (+ manifest.json) and items.json under ``root``; which items
    were planted."""
    rng = np.random.default_rng(seed)
    zipf = Zipf(rng)
    items, planted = [], []
    for i in range(n_items):
        q = " ".join(zipf(int(rng.integers(6, 30)))) + "?"
        a = " ".join(zipf(int(rng.integers(1, 5))))
        shot = f"Question: {' '.join(zipf(12))}?\nAnswer: x\n\n" if i % 3 == 0 else ""
        items.append(Item(f"synthetic:{i}", [(f"{shot}Question: {q}\nAnswer:", f" {a}")], 0))
        planted.append(i % 2 == 0)
    texts = [question_and_answer(it) for it, pl in zip(items, planted, strict=True) if pl]
    corpus = root / "corpus"
    corpus.mkdir(parents=True)
    train = corpus / "train.jsonl"
    target = int(gb * 1e9)

    def lengths(n: int) -> np.ndarray:  # words per document
        return np.clip(rng.lognormal(6.0, 1.0, n), 20, 20_000).astype(int)

    # one planted item every `stride` chunks, spread over the whole file
    sample = lengths(100_000)
    chunks_per_byte = np.ceil(sample / CHUNK_WORDS).mean() / (sample.mean() * zipf.bytes_per_word)
    stride = max(1, int(0.9 * target * chunks_per_byte / max(1, len(texts))))
    written = chunk = doc = 0
    with open(train, "w", encoding="utf-8") as f:
        while written < target:
            words = zipf(int(lengths(1)[0]))
            for lo in range(0, len(words), CHUNK_WORDS):
                part = words[lo : lo + CHUNK_WORDS]
                if texts and chunk % stride == stride // 2:
                    part.insert(len(part) // 2, texts.pop())
                d = {
                    "id": f"d{doc}#{lo}",
                    "parent": f"d{doc}",
                    "domain": "syn",
                    "text": " ".join(part),
                }
                line = json.dumps(d) + "\n"
                f.write(line)
                written += len(line)
                chunk += 1
            doc += 1
    if texts:
        raise RuntimeError(f"{len(texts)} item(s) not planted: the corpus is too small")
    atomic_write_json(corpus / "manifest.json", {"files": {"train.jsonl": file_record(train)}})
    rows = [[it.id, it.requests[0][0], it.requests[0][1]] for it in items]
    (root / "items.json").write_text(json.dumps(rows))
    return train, planted


def _items(root: Path) -> list[Item]:
    return [Item(i, [(c, a)], 0) for i, c, a in json.loads((root / "items.json").read_text())]


def _old_occurs(item: Item, text: str) -> bool:
    # fusellm.bench.tasks._occurs before the index
    ctx, cont = item.requests[item.gold]
    probe = (ctx.split("\n\n")[-1] + cont)[-200:]
    return len(probe) >= 40 and probe in text


def child(mode: str, root: Path, repeats: int) -> dict:
    items = _items(root)
    corpus = root / "corpus"
    out: dict = {}
    t0 = time.perf_counter()
    if mode == "old":
        with open(corpus / "train.jsonl", encoding="utf-8") as f:
            text = "\n".join(json.loads(line)["text"] for line in f)
        out["read_s"] = time.perf_counter() - t0
        flags = [_old_occurs(it, text) for it in items]
        out["seconds"] = time.perf_counter() - t0
    else:
        index = open_index(corpus)
        out["open_s"] = time.perf_counter() - t0
        times = []
        for _ in range(repeats):
            t = time.perf_counter()
            flags = [index.contains(question_and_answer(it)) for it in items]
            times.append(time.perf_counter() - t)
        out["lookup_s"] = statistics.median(times)
        out["first_lookup_s"] = times[0]
        out["ngrams"] = len(index)
        out["index_mb"] = (index.path / "ngrams.npy").stat().st_size / 2**20
    out["flags"] = flags
    hwm = [x for x in open("/proc/self/status") if x.startswith("VmHWM:")][0]
    out["peak_rss_mb"] = int(hwm.split()[1]) / 1024
    return out


def run_child(mode: str, root: Path, repeats: int) -> dict:
    # VmHWM of a fresh interpreter: its own peak, not this parent's
    cmd = [sys.executable, __file__, "--child", mode, str(root), "--repeats", str(repeats)]
    r = subprocess.run(cmd, stdout=subprocess.PIPE, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"{mode} child failed ({r.returncode})")
    return json.loads(r.stdout.splitlines()[-1])


def run_new(root: Path, repeats: int) -> dict:
    """A build from scratch (an earlier run's index removed first) and the lookups."""
    for p in (root / "corpus").glob(PREFIX + "*"):
        shutil.rmtree(p)
    return run_child("new", root, repeats)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--gb", type=float, default=1.0, help="size of the train split")
    ap.add_argument("--items", type=int, default=1000)
    ap.add_argument("--runs", type=int, default=3, help="builds and old-method runs (median)")
    ap.add_argument("--repeats", type=int, default=5, help="lookup passes per run (median)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--child", nargs=2, metavar=("MODE", "DIR"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.child[0], Path(args.child[1]), args.repeats)))
        return
    with tempfile.TemporaryDirectory(prefix="bench_decontam-") as tmp:
        # the build's peak RSS on a corpus 4× smaller: flat means bounded
        small = Path(tmp) / "quarter"
        make_data(small, args.gb / 4, args.items, args.seed + 1)
        small_peak = run_new(small, 1)["peak_rss_mb"]
        shutil.rmtree(small)
        root = Path(tmp) / "full"
        t0 = time.perf_counter()
        train, planted = make_data(root, args.gb, args.items, args.seed)
        size_mb = train.stat().st_size / 2**20
        print(f"generated {size_mb:.0f} MB, {args.items} items in {time.perf_counter() - t0:.0f}s")
        news, olds = [], []
        for r in range(args.runs):
            news.append(run_new(root, args.repeats))
            olds.append(run_child("old", root, 1))
            print(f"run {r}: build {news[-1]['open_s']:.1f}s, old {olds[-1]['seconds']:.1f}s")
        cached = run_child("cached", root, args.repeats)
    want = np.array(planted)

    def found(r: dict) -> tuple[int, int]:
        f = np.array(r["flags"])
        return int((f & want).sum()), int((f & ~want).sum())

    def med(rs: list[dict], key: str) -> float:
        return statistics.median(r[key] for r in rs)

    new_found, new_clean = found(news[0])
    old_found, old_clean = found(olds[0])
    assert all(found(r) == (new_found, new_clean) for r in [*news, cached])
    build_s, old_s = med(news, "open_s"), med(olds, "seconds")
    cached_s = cached["open_s"] + cached["first_lookup_s"]
    new_peak = max(r["peak_rss_mb"] for r in news)
    old_peak = max(r["peak_rss_mb"] for r in olds)
    result = {
        "train_mb": round(size_mb, 1),
        "items": args.items,
        "planted": int(want.sum()),
        "runs": args.runs,
        "ngrams": news[0]["ngrams"],
        "index_mb": round(news[0]["index_mb"], 1),
        "build_s": round(build_s, 2),
        "lookup_s": round(med(news, "lookup_s"), 4),
        "cached_open_lookup_s": round(cached_s, 4),
        "old_s": round(old_s, 2),
        "old_read_join_s": round(med(olds, "read_s"), 2),
        "speedup": round(old_s / (build_s + med(news, "lookup_s")), 2),
        "speedup_cached": round(old_s / cached_s, 1),
        "new_peak_rss_mb": round(new_peak, 1),
        "new_peak_rss_quarter_corpus_mb": round(small_peak, 1),
        "new_rss_growth_4x_corpus": round(new_peak / small_peak, 2),
        "cached_peak_rss_mb": round(cached["peak_rss_mb"], 1),
        "old_peak_rss_mb": round(old_peak, 1),
        "rss_ratio": round(old_peak / new_peak, 2),
        "planted_found": new_found,
        "clean_flagged": new_clean,
        "old_planted_found": old_found,
        "old_clean_flagged": old_clean,
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
