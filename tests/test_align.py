"""align/: canonicalisation, vocabulary maps, sequence alignment and projection properties."""

from __future__ import annotations

import itertools
import subprocess
import sys

import numpy as np
import pytest
from conftest import ADVERSARIAL, TEXT

from align import (
    align_dp,
    align_offsets,
    canonicalize,
    detect_kind,
    exact_map,
    min_ed_map,
    project,
    vocab_map,
)
from align.sequence import MANY_ONE, ONE_MANY, ONE_ONE, context_ends


def lev(a: str, b: str) -> int:
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        cur = [i]
        for j, cb in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
        prev = cur
    return prev[-1]


@pytest.fixture(scope="module")
def toks(tiny_models):
    from transformers import AutoTokenizer

    return {n: AutoTokenizer.from_pretrained(p) for n, p in tiny_models.items()}


def vocab_list(tok) -> list[str | None]:
    inv = {i: t for t, i in tok.get_vocab().items()}
    return [inv.get(i) for i in range(max(inv) + 1)]


def canon(tok):
    return canonicalize(vocab_list(tok), set(tok.all_special_ids))


def test_align_imports_neither_torch_nor_fusellm():
    code = "import sys, align; bad = [m for m in ('torch', 'fusellm') if m in sys.modules]; sys.exit(str(bad) if bad else 0)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


def test_kind_detected_from_vocabulary(toks):
    kinds = {n: detect_kind(vocab_list(t)) for n, t in toks.items()}
    assert kinds == {
        "llama_bpe": "bytelevel",
        "neox_unigram": "sentencepiece",
        "gpt2_wordpiece": "wordpiece",
        "mpt_bpe": "bytelevel",
    }


def test_bytelevel_canonical_bytes_reassemble_text(toks):
    tok = toks["llama_bpe"]
    c = canon(tok)
    for text in TEXT[:8] + ADVERSARIAL:
        ids = tok(text, add_special_tokens=False)["input_ids"]
        assert b"".join(c[i] for i in ids) == text.encode(), text


def test_sentencepiece_canonical_bytes_reassemble_text(toks):
    tok = toks["neox_unigram"]
    c = canon(tok)
    for text in ["hello world", "The quick brown fox.", "Tokyo and Kyoto"]:
        ids = tok(text, add_special_tokens=False)["input_ids"]
        got = b"".join(c[i] or b"" for i in ids)
        assert got.strip() == text.encode(), (got, text)


def test_byte_fallback_and_specials():
    assert canonicalize(["<0x0A>", "▁a", "<s>", None], {2}, kind="sentencepiece") == [
        b"\n",
        b" a",
        b"\x00special:<s>",
        None,
    ]
    src, tgt = (
        [b"\x00special:</s>", b"\x00special:<eos>", b" a"],
        [b" a", b"\x00special:</s>", b" b"],
    )
    assert min_ed_map(src, tgt).tolist() == [1, -1, 0]  # specials only map to the same literal
    assert canonicalize(["##ing", "run"], kind="wordpiece") == [b"ing", b" run"]
    assert canonicalize(["Ġhi", "Ċ"], kind="bytelevel") == [b" hi", b"\n"]


def test_identical_tokenizers_identity_map_and_all_one_to_one(toks):
    for name, tok in toks.items():
        c = canon(tok)
        ident = np.array([i if x is not None else -1 for i, x in enumerate(c)], dtype=np.int32)
        # identity wherever a token's bytes are unique in the vocabulary
        uniq = [i for i, x in enumerate(c) if x is not None and c.index(x) == i]
        for m in (exact_map(c, c), min_ed_map(c, c)):
            assert np.array_equal(m[uniq], ident[uniq]), name
        for text in TEXT[:6] + ADVERSARIAL:
            off = tok(text, return_offsets_mapping=True)["offset_mapping"]
            a = align_offsets(np.array(off), np.array(off))
            _, closes = context_ends(np.array(off).reshape(-1, 2))
            assert np.array_equal(a.src_pos[closes], np.flatnonzero(closes))


def test_min_ed_matches_brute_force_with_smallest_id_ties(toks):
    src, tgt = canon(toks["neox_unigram"]), canon(toks["llama_bpe"])
    m = min_ed_map(src, tgt, chunk=17)
    tgt_s = [
        (j, x.decode("latin-1"))
        for j, x in enumerate(tgt)
        if x is not None and not x.startswith(b"\x00")
    ]
    for i in range(0, len(src), 7):
        if src[i] is None or src[i].startswith(b"\x00special:"):
            assert m[i] == -1 or tgt[m[i]] == src[i]
            continue
        q = src[i].decode("latin-1")
        d = [(lev(q, s), j) for j, s in tgt_s]
        assert m[i] == min(d)[1], (i, q)


def test_vocab_map_cache(tmp_path, toks):
    src, tgt = canon(toks["gpt2_wordpiece"]), canon(toks["mpt_bpe"])
    a = vocab_map(src, tgt, "min_ed", tmp_path)
    files = list(tmp_path.glob("vocab-map-min_ed-*.npy"))
    assert len(files) == 1
    stamp = files[0].stat().st_mtime_ns
    assert np.array_equal(vocab_map(src, tgt, "min_ed", tmp_path), a)
    assert files[0].stat().st_mtime_ns == stamp
    assert len(list(tmp_path.glob("vocab-map-em-*.npy"))) == 0
    em = vocab_map(src, tgt, "em", tmp_path)
    assert ((em == a) | (em == -1)).all()
    with pytest.raises(ValueError, match="unknown vocabulary mapping method"):
        vocab_map(src, tgt, "fuzzy")


@pytest.mark.parametrize(
    "pair", list(itertools.permutations(["llama_bpe", "neox_unigram", "gpt2_wordpiece"], 2))
)
def test_alignment_order_coverage_and_adversarial(toks, pair):
    s_tok, t_tok = toks[pair[0]], toks[pair[1]]
    for text in TEXT[:8] + ADVERSARIAL + ["".join(ADVERSARIAL)]:
        s = s_tok(text, return_offsets_mapping=True)
        t = t_tok(text, return_offsets_mapping=True)
        for strict in (False, True):
            a = align_offsets(np.array(s["offset_mapping"]), np.array(t["offset_mapping"]), strict)
            assert len(a.src_pos) == len(t["input_ids"])
            got = a.src_pos[a.src_pos >= 0]
            assert (np.diff(got) > 0).all()  # order preserved, each source used once
            # the aligned source context ends exactly where the target context ends
            s_end = (
                np.maximum.accumulate(np.array(s["offset_mapping"]).reshape(-1, 2)[:, 1])
                if got.size
                else None
            )
            t_end = np.maximum.accumulate(np.array(t["offset_mapping"]).reshape(-1, 2)[:, 1])
            if got.size:
                assert (s_end[a.src_pos[a.src_pos >= 0]] == t_end[a.src_pos >= 0]).all()
        loose = align_offsets(np.array(s["offset_mapping"]), np.array(t["offset_mapping"]))
        strict = align_offsets(np.array(s["offset_mapping"]), np.array(t["offset_mapping"]), True)
        on = strict.src_pos >= 0  # strict keeps a subset of the loose alignment
        assert (strict.src_pos[on] == loose.src_pos[on]).all()
        dp = align_dp(
            s_tok.convert_ids_to_tokens(s["input_ids"]), t_tok.convert_ids_to_tokens(t["input_ids"])
        )
        got = dp.src_pos[dp.src_pos >= 0]
        assert (np.diff(got) >= 0).all() and len(dp.src_pos) == len(t["input_ids"])


def test_relations_on_known_spans():
    # text "abcdef": source tokens ab|cd|ef, target tokens abcd|e|f
    src = np.array([[0, 2], [2, 4], [4, 6]])
    tgt = np.array([[0, 4], [4, 5], [5, 6]])
    a = align_offsets(src, tgt)
    assert a.src_pos.tolist() == [1, -1, 2]
    assert a.relation.tolist() == [MANY_ONE, ONE_MANY, ONE_MANY]
    b = align_offsets(tgt, src)
    assert b.src_pos.tolist() == [-1, 0, 2] and b.relation[2] == MANY_ONE
    same = align_offsets(src, src)
    assert same.relation.tolist() == [ONE_ONE] * 3 and same.aligned_fraction == 1.0
    # byte pieces of one character share a span; only the last closes the context
    bytes_ = np.array([[0, 1], [1, 2], [1, 2], [1, 2], [2, 3]])
    whole = np.array([[0, 1], [1, 2], [2, 3]])
    assert align_offsets(bytes_, whole).src_pos.tolist() == [0, 3, 4]
    assert align_offsets(whole, bytes_).src_pos.tolist() == [0, -1, -1, 1, 2]


def test_strict_requires_same_next_token():
    src = np.array([[0, 2], [2, 4], [4, 6]])
    tgt = np.array([[0, 2], [2, 3], [3, 6]])
    assert align_offsets(src, tgt).src_pos.tolist() == [0, -1, 2]
    assert align_offsets(src, tgt, strict=True).src_pos.tolist() == [-1, -1, -1]


def test_projection_properties():
    rng = np.random.default_rng(0)
    S, T, k, Vs, Vt = 30, 25, 6, 50, 20
    logits = rng.normal(size=(S, Vs))
    lp = logits - np.log(np.exp(logits).sum(1, keepdims=True))
    ids = np.argsort(-lp, 1)[:, :k]
    lps = np.take_along_axis(lp, ids, 1).astype(np.float32)
    id_map = rng.integers(-1, Vt, size=Vs).astype(np.int32)  # many:1 and unmapped ids
    src_pos = np.where(rng.random(T) < 0.7, np.sort(rng.choice(S, T, replace=False)), -1)
    nxt = np.append(rng.integers(0, Vt, T - 1), -1)
    out_ids, out_lp, aligned = project(ids, lps, id_map, src_pos, nxt)
    p = np.exp(out_lp.astype(np.float64))
    assert (p.sum(1) <= 1 + 1e-6).all()
    assert ((out_ids >= 0) & (out_ids < Vt)).all()
    for j in range(T):
        live = out_lp[j] > -np.inf
        assert len(set(out_ids[j][live])) == live.sum()  # duplicates merged
        assert (np.diff(out_lp[j][live]) <= 1e-6).all()  # sorted
        if aligned[j]:
            i = src_pos[j]
            expect = {}
            for sid, lp_ in zip(ids[i], lps[i], strict=True):
                if id_map[sid] >= 0:
                    expect[id_map[sid]] = expect.get(id_map[sid], 0) + np.exp(lp_)
            got = {
                int(t): float(np.exp(v))
                for t, v in zip(out_ids[j][live], out_lp[j][live], strict=True)
            }
            assert got.keys() == expect.keys() and all(abs(got[t] - expect[t]) < 1e-5 for t in got)
        elif nxt[j] >= 0:  # one-hot on the gold NEXT token
            assert out_ids[j, 0] == nxt[j] and out_lp[j, 0] == 0 and live.sum() == 1
        else:
            assert live.sum() == 0
