"""Fusion properties (pure) and the align -> fuse stages end to end on tiny models."""

from __future__ import annotations

import json

import numpy as np
import pytest

from fusellm.cli import main
from fusellm.fuse.core import FUSERS, Candidate, FuseParams, fuse, register_fuser
from fusellm.manifest import StageInputsChanged
from fusellm.recipe import load_recipe
from fusellm.shards import iter_docs

RNG = np.random.default_rng(0)


def cand(T=12, k=5, V=40, seq_ce=2.0, aligned_p=0.8, seed=None) -> Candidate:
    """A random candidate; its per-byte NLL (``cum_nll`` over 3-byte target tokens) is
    set to 0.1·seed per byte, finite where aligned."""
    rng = np.random.default_rng(seed)
    logits = rng.normal(size=(T, V)) * 2
    lp = logits - np.log(np.exp(logits).sum(1, keepdims=True))
    ids = np.argsort(-lp, 1)[:, :k].astype(np.int32)
    lps = np.take_along_axis(lp, ids, 1).astype(np.float32)
    aligned = rng.random(T) < aligned_p
    end = 3 * np.arange(1, T + 1)
    cum = np.where(aligned, 0.1 * (seed or 0) * end, np.nan)
    ce = rng.uniform(0.5, 4, T).astype(np.float32)
    return Candidate(ids, lps, aligned, ce, seq_ce, cum, end)


def dense(ids, lps, V=40):
    p = np.zeros((ids.shape[0], V))
    for t in range(ids.shape[0]):
        for i, v in zip(ids[t], lps[t], strict=True):
            if np.isfinite(v):
                p[t, i] += np.exp(v)
    return p


PER_TOKEN = "ce_per_token"


@pytest.mark.parametrize("criterion", ["nll_per_byte", PER_TOKEN])
@pytest.mark.parametrize("method", ["min_ce", "avg_ce"])
@pytest.mark.parametrize("level", ["sequence", "token"])
def test_fusing_one_source_returns_it(method, level, criterion):
    c = cand(seed=1, aligned_p=1.0)
    ids, lps, aligned, w = fuse(method, [c], FuseParams(level, 1.0, 5, criterion))
    assert np.allclose(dense(ids, lps), dense(c.ids, c.logprobs), atol=1e-6)
    assert w.tolist() == [1.0]


def test_min_ce_sequence_picks_lowest_ce():
    cs = [cand(seed=i, seq_ce=ce) for i, ce in enumerate([2.5, 1.1, 3.0])]
    ids, lps, _, w = fuse("min_ce", cs, FuseParams("sequence", 1.0, 5, PER_TOKEN))
    assert np.array_equal(ids, cs[1].ids) and w.tolist() == [0, 1, 0]
    # per byte: candidate 0 has the lowest NLL per byte (0.1 · seed)
    *_, w = fuse(
        "min_ce",
        [cand(seed=i, seq_ce=ce) for i, ce in enumerate([2.5, 1.1, 3.0])],
        FuseParams("sequence", 1.0, 5),
    )
    assert w.tolist() == [1, 0, 0]


def test_per_byte_selection_follows_model_quality_not_bytes_per_token():
    """Model A predicts the text at 0.5 nats/byte with 4-byte tokens (2.0 nats/token),
    model B at 0.8 nats/byte with 1-byte tokens (0.8 nats/token): per token prefers the
    worse model B, per byte the better model A."""
    T = 9
    end = 4 * np.arange(T)  # target contexts end every 4 bytes; both models share them
    a, b = cand(T=T, seed=1, aligned_p=1.0), cand(T=T, seed=2, aligned_p=1.0)
    a.cum_nll, a.seq_ce, a.byte_end = 0.5 * end, 2.0, end
    b.cum_nll, b.seq_ce, b.byte_end = 0.8 * end, 0.8, end
    for level in ("sequence", "token"):
        *_, w_tok = fuse("min_ce", [a, b], FuseParams(level, 1.0, 5, PER_TOKEN))
        *_, w_byte = fuse("min_ce", [a, b], FuseParams(level, 1.0, 5))
        assert w_tok[1] > w_tok[0] and w_byte.tolist() == [1.0, 0.0], level


def test_per_byte_sequence_compares_only_the_text_every_candidate_predicts():
    """B has no BOS, so it cannot predict the first token: A's NLL on it (large) is not
    held against A; from the first shared context end on, A is better."""
    T = 6
    end = np.array([0, 5, 10, 15, 20, 25])
    a, b = cand(T=T, seed=1, aligned_p=1.0), cand(T=T, seed=2, aligned_p=1.0)
    a.cum_nll, a.byte_end = np.array([0.0, 50, 51, 52, 53, 54]), end  # 50 nats on token 1
    b.cum_nll, b.byte_end = np.array([np.nan, 0, 2, 4, 6, 8]), end
    b.aligned[0] = False
    *_, w = fuse("min_ce", [a, b], FuseParams("sequence", 1.0, 5))
    assert w.tolist() == [1.0, 0.0]  # A: 4 nats over bytes 5..25, B: 8


def brute_token_scores(cands):
    """Per position: NLL per byte to the next context end that every candidate aligned
    here shares; the sequence-level per-byte score where there is none."""
    cum = np.stack([c.cum_nll for c in cands])
    has = np.stack([c.aligned for c in cands]) & np.isfinite(cum)
    end = cands[0].byte_end
    n, T = cum.shape
    shared = np.flatnonzero(np.isfinite(cum).all(0))
    seq = (cum[:, shared[-1]] - cum[:, shared[0]]) / (end[shared[-1]] - end[shared[0]])
    out = np.full((n, T), np.inf)
    for j in range(T):
        members = np.flatnonzero(has[:, j])
        nxt = [jj for jj in range(j + 1, T) if has[members, jj].all()]
        for c in members:
            out[c, j] = (cum[c, nxt[0]] - cum[c, j]) / (end[nxt[0]] - end[j]) if nxt else seq[c]
    return out


def test_per_byte_token_level_scores_segments_between_shared_context_ends():
    from fusellm.fuse.core import token_scores

    rng = np.random.default_rng(3)
    T = 30
    end = np.cumsum(rng.integers(1, 5, T))
    cs = []
    for s in range(3):
        c = cand(T=T, seed=s + 1, aligned_p=1.0 if s == 0 else 0.6)
        c.byte_end = end
        c.cum_nll = np.where(c.aligned, np.cumsum(rng.uniform(0, 3, T)), np.nan)
        cs.append(c)
    want = brute_token_scores(cs)
    got = token_scores(cs, FuseParams("token"))
    assert np.allclose(np.where(np.isfinite(want), want, -1), np.where(np.isfinite(got), got, -1))
    ids, lps, _, _ = fuse("min_ce", cs, FuseParams("token", 1.0, 5))
    for t in range(T):
        assert np.array_equal(ids[t], cs[int(np.argmin(want[:, t]))].ids[t])


def test_min_ce_token_picks_lowest_aligned_ce_per_position():
    cs = [cand(seed=i) for i in range(3)]
    ids, lps, _, _ = fuse("min_ce", cs, FuseParams("token", 1.0, 5, PER_TOKEN))
    ce = np.stack([np.where(c.aligned, c.ce, np.inf) for c in cs])
    for t in range(len(ids)):
        best = int(np.argmin(ce[:, t])) if np.isfinite(ce[:, t]).any() else 0
        assert np.array_equal(ids[t], cs[best].ids[t])


def test_avg_ce_equal_ce_is_the_mean():
    cs = [cand(seed=i, seq_ce=2.0, aligned_p=1.0) for i in range(3)]
    ids, lps, _, w = fuse("avg_ce", cs, FuseParams("sequence", 1.0, 15, PER_TOKEN))
    assert np.allclose(w, 1 / 3)
    mean = sum(dense(c.ids, c.logprobs) for c in cs) / 3
    assert np.allclose(dense(ids, lps), mean, atol=1e-6)  # k_out=15 keeps every entry


def test_avg_ce_weights_follow_ce_not_uniform():
    cs = [cand(seed=0, seq_ce=1.0), cand(seed=1, seq_ce=3.0)]
    *_, w = fuse("avg_ce", cs, FuseParams("sequence", 1.0, 5, PER_TOKEN))
    assert np.allclose(w, np.exp([-1, -3]) / np.exp([-1, -3]).sum())  # 0.881 / 0.119
    *_, w_hot = fuse("avg_ce", cs, FuseParams("sequence", 0.1, 5, PER_TOKEN))
    assert w_hot[0] > 0.999


def test_avg_ce_total_mass_at_most_one_and_sorted():
    cs = [cand(seed=i, seq_ce=float(i)) for i in range(4)]
    for level in ("sequence", "token"):
        for criterion in ("nll_per_byte", PER_TOKEN):
            ids, lps, _, _ = fuse("avg_ce", cs, FuseParams(level, 0.7, 6, criterion))
            assert (np.exp(lps.astype(np.float64)).sum(1) <= 1 + 1e-6).all()
            assert (np.diff(np.where(np.isfinite(lps), lps, -1e9), axis=1) <= 1e-6).all()


def test_unknown_fuser_and_registry():
    with pytest.raises(KeyError, match="unknown fusion method 'nope'"):
        fuse("nope", [cand()], FuseParams())
    with pytest.raises(ValueError, match="unknown criterion"):
        fuse("min_ce", [cand()], FuseParams(criterion="bits"))
    assert {"min_ce", "avg_ce"} <= set(FUSERS)


def pipeline(recipe, *extra):
    return main(["run", str(recipe), "--stages", "corpus,extract,align,fuse", *extra])


def with_sections(recipe, body="align: {vocab_method: min_ed}\nfuse: {method: min_ce}\n"):
    recipe.write_text(recipe.read_text() + body)
    return recipe


def test_pipeline_aligns_and_fuses_heterogeneous_tiny_models(ext_recipe):
    rec = with_sections(ext_recipe)
    assert pipeline(rec) == 0
    run = rec.parent / "run"
    r = load_recipe(rec)
    for src in ["neox_unigram", "gpt2_wordpiece", "mpt_bpe"]:
        man = json.loads((run / "align" / src / "manifest.json").read_text())
        assert man["complete"] and 0.3 < man["stats"]["aligned_fraction"] <= 1.0, man["stats"]
        assert sum(man["stats"]["relations"].values()) == man["stats"]["tokens"]
    fman = json.loads((run / "fuse" / "manifest.json").read_text())
    assert set(fman["stats"]["source_weight"]) == set(r.sources)
    assert abs(sum(fman["stats"]["source_weight"].values()) - 1) < 1e-6
    target = list(iter_docs(sorted((run / "extract/llama_bpe/train").glob("shard-*.safetensors"))))
    fused = list(iter_docs(sorted((run / "fuse/train").glob("shard-*.safetensors"))))
    assert [d.doc_id for d in fused] == [d.doc_id for d in target]
    for f, t in zip(fused, target, strict=True):
        assert np.array_equal(f.input_ids, t.input_ids)  # the target's tokens
        p = np.exp(f.topk_logprobs.float().numpy().astype(np.float64))
        assert (p.sum(1) <= 1 + 2e-3).all() and (f.topk_ids < 320).all()
    # rerun: nothing recomputed
    stamps = {p: p.stat().st_mtime_ns for p in run.glob("*/**/shard-*")}
    assert pipeline(rec) == 0
    assert stamps == {p: p.stat().st_mtime_ns for p in run.glob("*/**/shard-*")}
    # a different fusion method is refused, then forced
    from fusellm.fuse.runner import run as fuse_run

    with pytest.raises(StageInputsChanged, match=r"config\.method"):
        fuse_run(load_recipe(rec, ["fuse.method=avg_ce"]))
    assert main(["fuse", str(rec), "fuse.method=avg_ce", "--force"]) == 0


def assert_own_rows_with_gold(ids, lps, own: dict, gold: int | None, ce: float, k: int = 10):
    """A fused row equals a model's own top-k entries (``own``: id -> log-prob) with its
    gold next token added at ``-ce`` where they lacked it, displacing one of the least
    probable entries of a full row (ties in fp16 may pick either)."""
    got = {int(i): float(v) for i, v in zip(ids, lps.float(), strict=True) if v > -np.inf}
    want = dict(own)
    if gold is not None and gold not in want:
        want[gold] = -float(ce)
    assert set(got) <= set(want) and (gold is None or gold in got)
    # the gold entry carries the fp32 CE, the others the fp16 top-k: one fp16 step apart
    assert all(abs(got[i] - want[i]) < 5e-3 for i in got)
    dropped = set(want) - set(got)
    assert len(dropped) == max(len(want) - k, 0)
    floor = min(v for i, v in got.items() if i != gold) if len(got) > 1 else -np.inf
    assert all(want[i] <= floor + 5e-3 for i in dropped)


def test_fusing_only_the_target_returns_its_extraction(ext_recipe):
    rec = with_sections(ext_recipe, "align: {}\nfuse: {method: avg_ce, sources: [llama_bpe]}\n")
    assert pipeline(rec, "extract.models=[llama_bpe]", "sources=[llama_bpe]") == 0
    run = rec.parent / "run"
    target = list(iter_docs(sorted((run / "extract/llama_bpe/train").glob("shard-*.safetensors"))))
    fused = list(iter_docs(sorted((run / "fuse/train").glob("shard-*.safetensors"))))
    for f, t in zip(fused, target, strict=True):
        # its own rows, with the gold next token at its exact probability where the top-k
        # lacked it (it displaces the least probable entry)
        for j in range(len(t.input_ids)):
            own = dict(
                zip(t.topk_ids[j].tolist(), t.topk_logprobs[j].float().tolist(), strict=True)
            )
            gold = int(t.input_ids[j + 1]) if j + 1 < len(t.input_ids) else None
            assert_own_rows_with_gold(f.topk_ids[j], f.topk_logprobs[j], own, gold, t.ce[j])


def test_same_model_under_two_names_aligns_one_to_one(ext_recipe, tiny_models):
    rec = with_sections(ext_recipe)
    rec.write_text(
        rec.read_text().replace(
            "models:\n", f"models:\n  twin: {{path: {tiny_models['llama_bpe']}}}\n"
        )
    )
    args = ["extract.models=[llama_bpe,twin]", "sources=[llama_bpe,twin]"]
    assert pipeline(rec, *args) == 0
    run = rec.parent / "run"
    man = json.loads((run / "align/twin/manifest.json").read_text())
    assert man["stats"]["aligned_fraction"] == 1.0
    assert man["stats"]["relations"]["1:1"] == man["stats"]["tokens"]
    a = list(iter_docs(sorted((run / "align/twin/train").glob("shard-*.safetensors"))))
    t = list(iter_docs(sorted((run / "extract/llama_bpe/train").glob("shard-*.safetensors"))))
    from transformers import AutoTokenizer

    real = set(AutoTokenizer.from_pretrained(tiny_models["llama_bpe"]).get_vocab().values())
    for x, y in zip(a, t, strict=True):
        for j in range(len(x.input_ids) - 1):
            # the same entries, minus padded embedding rows (ids without a token never map),
            # plus the gold next token at its exact probability where the top-k lacked it
            want = {
                int(i): float(v)
                for i, v in zip(y.topk_ids[j], y.topk_logprobs[j].float(), strict=True)
                if int(i) in real
            }
            assert_own_rows_with_gold(
                x.topk_ids[j], x.topk_logprobs[j], want, int(y.input_ids[j + 1]), y.ce[j]
            )


def test_adding_a_source_later_recomputes_only_it(ext_recipe):
    rec = with_sections(ext_recipe)
    base = ["extract.models=[llama_bpe,neox_unigram]", "sources=[llama_bpe,neox_unigram]"]
    assert pipeline(rec, *base) == 0
    run = rec.parent / "run"
    before = {p: p.stat().st_mtime_ns for p in run.glob("extract/**/shard-*")} | {
        p: p.stat().st_mtime_ns for p in run.glob("align/**/shard-*")
    }
    more = [
        "extract.models=[llama_bpe,neox_unigram,mpt_bpe]",
        "sources=[llama_bpe,neox_unigram,mpt_bpe]",
    ]
    # extract and align of the new source only; fuse refuses (its inputs changed) ...
    assert main(["run", str(rec), "--stages", "extract,align", *more]) == 0
    assert before == {p: p.stat().st_mtime_ns for p in before}
    assert (run / "align/mpt_bpe/manifest.json").exists()
    assert main(["fuse", str(rec), *more]) == 2
    # ... until forced
    assert main(["fuse", str(rec), *more, "--force"]) == 0
    fman = json.loads((run / "fuse/manifest.json").read_text())
    assert set(fman["stats"]["source_weight"]) == {"llama_bpe", "neox_unigram", "mpt_bpe"}


def test_a_new_fuser_plugs_in(ext_recipe):
    @register_fuser("first_source")
    def first_source(cands, p):
        c = cands[0]
        return c.ids[:, : p.k_out], c.logprobs[:, : p.k_out], c.aligned, np.eye(len(cands))[0]

    try:
        rec = with_sections(ext_recipe, "align: {}\nfuse: {method: first_source}\n")
        assert (
            pipeline(
                rec, "extract.models=[llama_bpe,neox_unigram]", "sources=[llama_bpe,neox_unigram]"
            )
            == 0
        )
        fman = json.loads((rec.parent / "run/fuse/manifest.json").read_text())
        assert fman["stats"]["source_weight"] == {"llama_bpe": 1.0, "neox_unigram": 0.0}
    finally:
        FUSERS.pop("first_source")
