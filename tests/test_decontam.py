"""The decontamination index: word normalisation, the on-disk n-gram set (built in runs,
merged, cached, rebuilt), and which items it flags."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

import fusellm.bench.decontam as dc
from fusellm.bench.decontam import FENCES, NGRAMS, PREFIX, ngram_hashes, open_index, text_words
from fusellm.storage import TMP_MARK

ROOT = Path(__file__).resolve().parent.parent
VOCAB = [f"w{i}" for i in range(40)]


def _write(corpus: Path, docs: list[tuple[str, str]]) -> Path:
    corpus.mkdir(parents=True, exist_ok=True)
    train = corpus / "train.jsonl"
    with open(train, "w", encoding="utf-8") as f:
        for i, (parent, text) in enumerate(docs):
            f.write(json.dumps({"id": f"{parent}#{i}", "parent": parent, "text": text}) + "\n")
    return train


def _indexes(corpus: Path) -> list[Path]:
    return sorted(p for p in corpus.iterdir() if p.name.startswith(PREFIX))


def test_words_ignore_case_punctuation_and_width_and_split_spaceless_scripts():
    assert text_words("Don't STOP_now!! (ﬁne-tuned) ＡＢＣ x2") == [
        "don",
        "t",
        "stop",
        "now",
        "fine",
        "tuned",
        "abc",
        "x2",
    ]
    # Chinese and Japanese: one word per character; Korean keeps its spaced words;
    # combining marks stay with their letter (Devanagari vowel signs, Thai tone marks).
    assert text_words("東京タワーに行く。") == ["東", "京", "タ", "ワ", "ー", "に", "行", "く"]
    assert text_words("한국어 문장입니다") == ["한국어", "문장입니다"]
    assert text_words("हिन्दी भाषा") == ["हिन्दी", "भाषा"]
    assert text_words("ไม่") == ["ไ", "ม่"]  # Thai: per character, the tone mark kept
    assert text_words("Ünïcode ÜNÏCODE") == ["ünïcode", "ünïcode"]
    # the ASCII fast path finds exactly what the Unicode pattern finds
    ascii_text = "".join(map(chr, range(128))).casefold() * 3
    assert dc._ASCII_WORD.findall(ascii_text) == dc._WORD.findall(ascii_text)


def test_hashes_depend_on_the_words_only_never_on_where_they_stand():
    a = ngram_hashes([["x", "a", "b", "c"], ["a", "b", "c"], ["a", "b"]], [3])
    assert len(a) == 3 and a[1] == a[2] and a[0] != a[1]
    assert a.dtype == np.uint64
    # windows never cross a document boundary
    assert len(ngram_hashes([["a", "b"], ["c", "d"]], [3])) == 0
    # a word boundary is part of the n-gram: "ab c" is not "a bc"
    ab, bc = ngram_hashes([["ab", "c"], ["a", "bc"]], [2])
    assert ab != bc


def test_the_index_is_every_ngram_of_every_document_across_runs_and_cuts(tmp_path, monkeypatch):
    """Built in many small runs and merge steps, the index equals the set of 13- and 8-gram
    hashes of the whole documents, including the n-grams across the corpus stage's cuts."""
    monkeypatch.setattr(dc, "RUN_HASHES", 300)
    monkeypatch.setattr(dc, "MERGE_HASHES", 100)
    monkeypatch.setattr(dc, "BATCH_CHARS", 2000)
    rng = random.Random(0)
    whole, lines = [], []
    for d in range(60):
        words = [rng.choice(VOCAB) for _ in range(rng.randint(0, 80))]
        whole.append(words)
        cuts = sorted(rng.sample(range(1, max(2, len(words))), min(2, max(0, len(words) - 2))))
        for lo, hi in zip([0, *cuts], [*cuts, len(words)], strict=True):
            lines.append((f"doc{d}", " ".join(words[lo:hi]) + " "))
    _write(tmp_path / "corpus", lines)
    index = open_index(tmp_path / "corpus")
    expect = np.unique(ngram_hashes(whole, [13, 8]))
    assert len(expect) > 10 * dc.RUN_HASHES  # many runs were merged
    assert np.array_equal(np.load(index.path / NGRAMS), expect)
    assert np.array_equal(index.fence, expect[:: dc.FENCE])
    assert index._found(expect).all() and not index._found(expect + np.uint64(1)).any()
    info = json.loads((index.path / "index.json").read_text())
    assert info["ngrams"] == len(expect) and info["documents"] == len(lines)
    assert sorted(p.name for p in index.path.iterdir()) == [FENCES, "index.json", NGRAMS]


def test_items_overlapping_the_corpus_are_found_by_their_words(tmp_path):
    rng = random.Random(1)
    filler = " ".join(rng.choice(VOCAB) for _ in range(200))
    long_item = "Which gas do plants absorb from the air to make sugar during photosynthesis? Carbon dioxide"
    short_item = "Question: Pumpkin pie spice comes from\nAnswer: plants"
    tiny_item = "Question: 2 + 2?\nAnswer: 4"
    docs = [
        # the long item inside a longer document, other case and punctuation
        ("a", filler + " WHICH gas -- do plants absorb (from the air) to make SUGAR during "),
        ("a", "photosynthesis... carbon-dioxide, " + filler),
        ("b", filler + " question; pumpkin pie spice COMES from / answer: plants. " + filler),
        ("c", "question: a bird would find nest making materials in the woods"),
        ("d", filler + " question 2 2 answer 4 " + filler),
    ]
    _write(tmp_path / "corpus", docs)
    index = open_index(tmp_path / "corpus")
    assert index.contains(long_item)
    assert not index.contains(long_item.replace("sugar", "starch"))  # 13+ words: any 13-gram
    assert index.contains(long_item.replace("Carbon dioxide", "oxygen"))  # still 13 shared
    assert index.contains(short_item)  # 8 words: the whole item
    assert not index.contains(short_item.replace("plants", "rocks"))
    # 9-12 words: all 8-grams, not one of them
    assert not index.contains(
        "Question: A bird would find nest making materials in a\nAnswer: tree"
    )
    assert not index.contains(tiny_item)  # under 8 words: never, even though it occurs
    assert not index.contains("")


def test_cache_is_reused_without_the_corpus_and_a_changed_split_rebuilds_it(tmp_path):
    corpus = tmp_path / "corpus"
    words = " ".join(VOCAB[:20])
    train = _write(corpus, [("a", words)])
    # a corpus manifest as the corpus stage writes it: the key is its recorded sha256
    from fusellm.storage import atomic_write_json, file_record

    atomic_write_json(corpus / "manifest.json", {"files": {"train.jsonl": file_record(train)}})
    first = open_index(corpus)
    stamp = (first.path / NGRAMS).stat().st_mtime_ns
    # The second open reads no corpus byte (the split is stat-ed against its manifest
    # record): blank the file, keeping its size and mtime; reading it would fail.
    st = train.stat()
    train.write_bytes(b"\0" * st.st_size)
    os.utime(train, ns=(st.st_atime_ns, st.st_mtime_ns))
    again = open_index(corpus)
    assert again.path == first.path and (again.path / NGRAMS).stat().st_mtime_ns == stamp
    assert again.contains(words)
    # A changed split (the corpus stage rerun, a new manifest) gets a new index; the old goes.
    train = _write(corpus, [("b", " ".join(VOCAB[20:40]))])
    atomic_write_json(corpus / "manifest.json", {"files": {"train.jsonl": file_record(train)}})
    new = open_index(corpus)
    assert new.path != first.path and _indexes(corpus) == [new.path]
    assert new.contains(" ".join(VOCAB[20:40])) and not new.contains(words)


def test_a_killed_build_is_never_used_and_its_leftovers_are_removed(tmp_path):
    corpus = tmp_path / "corpus"
    _write(corpus, [("a", " ".join(VOCAB[:30]))])
    # kill -9 the build when it has written the whole ngrams.npy but not its index.json
    code = textwrap.dedent(
        f"""
        import os, signal, sys
        def hook(event, args):
            if event == "open" and str(args[0]).endswith("index.json") and args[1] == "w":
                os.kill(os.getpid(), signal.SIGKILL)
        sys.addaudithook(hook)
        from pathlib import Path
        from fusellm.bench.decontam import open_index
        open_index(Path({str(corpus)!r}))
        """
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True)
    assert r.returncode == -9, r.stderr.decode()[-2000:]
    (left,) = _indexes(corpus)
    assert TMP_MARK in left.name and (left / NGRAMS).is_file()  # complete-looking, not renamed
    index = open_index(corpus)
    assert TMP_MARK not in index.path.name and _indexes(corpus) == [index.path]
    assert index.contains(" ".join(VOCAB[:13]))


def test_a_damaged_index_is_rebuilt(tmp_path, caplog):
    corpus = tmp_path / "corpus"
    _write(corpus, [("a", " ".join(VOCAB[:30]))])
    index = open_index(corpus)
    n = len(index)
    with open(index.path / NGRAMS, "r+b") as f:  # truncated: the .npy no longer loads
        f.truncate(os.path.getsize(index.path / NGRAMS) - 8)
    with caplog.at_level("WARNING"):
        again = open_index(corpus)
    assert "is damaged" in caplog.text and len(again) == n
    np.save(again.path / NGRAMS, np.load(again.path / NGRAMS)[1:])  # loads, one hash short
    caplog.clear()
    with caplog.at_level("WARNING"):
        third = open_index(corpus)
    assert f"{n - 1} hashes, {n} recorded" in caplog.text and len(third) == n
    assert third.contains(" ".join(VOCAB[:13]))


def test_a_bad_corpus_line_is_named(tmp_path):
    corpus = tmp_path / "corpus"
    train = _write(corpus, [("a", "fine text")])
    with open(train, "a") as f:
        f.write('{"id": "x", "body": "no text field"}\n')
    with pytest.raises(ValueError, match=r"train\.jsonl:2: not a corpus document"):
        open_index(corpus)
    assert _indexes(corpus) == []  # nothing half-built left behind
