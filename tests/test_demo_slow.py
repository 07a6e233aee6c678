"""Real pretrained demo models and data (installed from PyPI packages): run with -m slow."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from fusellm.models import load_model, load_tokenizer, locate, model_vocab_size
from fusellm.recipe import load_recipe

pytestmark = pytest.mark.slow
QUICKSTART = Path(__file__).parent.parent / "recipes" / "quickstart.yaml"
ADVERSARIAL = "Hello  world\t日本語 😀 👩‍👩‍👧 <0x0A> ▁Ġ\n\n  def f(x): return x"


@pytest.mark.parametrize(
    "name,vocab,arch",
    [("smollm2", 49152, "LlamaForCausalLM"), ("gemma3", 262144, "Gemma3ForCausalLM")],
)
def test_demo_models_load_offline_from_packages(name, vocab, arch):
    r = load_recipe(QUICKSTART)
    spec = r.models[name]
    assert locate(spec, name).kind == "gguf"
    tok = load_tokenizer(spec, name)
    model = load_model(spec, name)
    assert type(model).__name__ == arch and model_vocab_size(model) == vocab
    enc = tok(ADVERSARIAL, return_offsets_mapping=True, add_special_tokens=False)
    assert all(0 <= a <= b <= len(ADVERSARIAL) for a, b in enc["offset_mapping"])
    ids = torch.tensor([enc["input_ids"][:32]])
    with torch.inference_mode():
        logits = model(ids).logits
    assert torch.isfinite(logits).all() and logits.shape[-1] == vocab
    # a real pretrained model predicts real text far better than uniform
    text = "The capital of France is Paris. The capital of Germany is Berlin."
    ids = torch.tensor([tok(text)["input_ids"]])
    with torch.inference_mode():
        loss = model(ids, labels=ids).loss.item()
    assert loss < 0.5 * torch.log(torch.tensor(float(vocab))).item()


def test_quickstart_corpus_stage(tmp_path):
    from fusellm.cli import main

    assert main(["corpus", str(QUICKSTART), f"run_dir={tmp_path}", "tracking.mode=offline"]) == 0
    man = json.loads((tmp_path / "corpus" / "manifest.json").read_text())
    splits = man["stats"]["splits"]
    domains = {k.split("/")[1] for k in splits["test"] if k.startswith("chars/")}
    assert domains == {"drama", "fiction", "encyclopedia", "science"}
    r = load_recipe(QUICKSTART)
    toks = [load_tokenizer(r.models[n], n) for n in r.all_models]
    with open(tmp_path / "corpus" / "train.jsonl", encoding="utf-8") as f:
        rows = [json.loads(line) for line in f]
    assert len(rows) == man["files"]["train.jsonl"]["rows"] > 100
    for tok in toks:
        assert max(len(tok(x["text"])["input_ids"]) for x in rows) <= r.corpus.block_size


@pytest.mark.parametrize("name", ["smollm2", "gemma3"])
def test_extraction_on_demo_models_matches_direct_topk(name):
    from fusellm.extract.config import ExtractConfig
    from fusellm.extract.core import TopKScorer
    from fusellm.extract.runner import extract_shard
    from fusellm.shards import decode_shard, encode_shard

    r = load_recipe(QUICKSTART)
    tok = load_tokenizer(r.models[name], name)
    model = load_model(r.models[name], name)
    cfg = ExtractConfig(top_k=10, head_chunk_tokens=64)
    scorer = TopKScorer(model, cfg.top_k, cfg.head_chunk_tokens)
    assert scorer.split_head  # the chunked head reproduces the model's logits
    texts = [
        "The capital of France is Paris.",
        ADVERSARIAL,
        "def add(a, b):\n    return a + b\n" * 3,
    ]
    dists = extract_shard(scorer, tok, [(f"d{i}", t) for i, t in enumerate(texts)], cfg, None, name)
    docs, _ = decode_shard(encode_shard(dists, scorer.vocab_size, {}))
    for d, t in zip(docs, texts, strict=True):
        x = torch.tensor([tok(t)["input_ids"]])
        with torch.inference_mode():
            lp = torch.log_softmax(model(x).logits[0].float(), -1)
            loss = model(x, labels=x).loss.item()
        vals, idx = lp.topk(10)
        stored = torch.from_numpy(d.topk_ids).long()
        assert torch.allclose(d.topk_logprobs.float(), vals, atol=1e-2, rtol=2e-3)
        assert torch.allclose(d.topk_logprobs.float(), lp.gather(1, stored), atol=1e-2, rtol=2e-3)
        assert (stored[:, 0] == idx[:, 0]).float().mean() > 0.97
        assert abs(d.seq_ce - loss) < 1e-3


def test_offsets_and_dp_alignment_agree_on_real_tokenizers():
    """On 1:1 positions the offsets alignment pairs contexts ending at the same character; the DP
    agrees on >= 97% of them (measured 98.1%: where they differ, the DTW path drifts
    around a tokenisation difference and the offsets pairing is the right one)."""
    import itertools

    import numpy as np

    from align import align_dp, align_offsets, canonicalize
    from align.sequence import ONE_ONE
    from fusellm.align.core import vocab_strings
    from fusellm.corpus.builtin import read_builtin

    r = load_recipe(QUICKSTART)
    toks = {n: load_tokenizer(r.models[n], n) for n in ("smollm2", "gemma3")}
    vocab = {"smollm2": 49152, "gemma3": 262144}
    canon = {
        n: canonicalize(vocab_strings(t, vocab[n]), set(t.all_special_ids)) for n, t in toks.items()
    }
    strs = {n: [c.decode("latin-1") if c is not None else "" for c in canon[n]] for n in toks}
    texts = [d.text for d in itertools.islice(read_builtin("lambada"), 15)] + [
        ADVERSARIAL,
        "東京" * 20,
    ]
    for s, t in [("gemma3", "smollm2"), ("smollm2", "gemma3")]:
        total = agree = 0
        for text in texts:
            es = toks[s](text, return_offsets_mapping=True)
            et = toks[t](text, return_offsets_mapping=True)
            a = align_offsets(np.array(es["offset_mapping"]), np.array(et["offset_mapping"]))
            d = align_dp(
                [strs[s][i] for i in es["input_ids"]], [strs[t][i] for i in et["input_ids"]]
            )
            one = np.flatnonzero(a.relation == ONE_ONE)
            s_end = np.maximum.accumulate(np.array(es["offset_mapping"])[:, 1])
            t_end = np.maximum.accumulate(np.array(et["offset_mapping"])[:, 1])
            assert (s_end[a.src_pos[one]] == t_end[one]).all()  # contexts end at the same character
            total += len(one)
            agree += int((a.src_pos[one] == d.src_pos[one]).sum())
        assert total > 500 and agree / total >= 0.97, (s, t, agree / total)


def test_quickstart_end_to_end(tmp_path):
    """The README's main job on a reduced corpus and 8 items per task: every stage on the
    real models, ending with a bench table of target vs CLM-only vs fused."""
    from fusellm.cli import main
    from fusellm.stages import NOT_BUILT_EXIT, STAGES

    small = [
        "corpus.inputs.0.max_docs=1",
        "corpus.inputs.1.max_docs=12",
        "corpus.inputs.2.max_docs=6",
        "corpus.inputs.3.max_docs=6",
        f"run_dir={tmp_path}",
        "tracking.mode=offline",
        "bench.limit=8",
        "evolve.generations=2",
        "evolve.popsize=4",
    ]
    rc = main(["run", str(QUICKSTART), *small])
    unbuilt = [
        s
        for s in STAGES.values()
        if not s.built and getattr(load_recipe(QUICKSTART), s.name) is not None
    ]
    assert rc == (NOT_BUILT_EXIT if unbuilt else 0)
    al = json.loads((tmp_path / "align" / "gemma3" / "manifest.json").read_text())
    assert al["complete"] and 0.85 < al["stats"]["aligned_fraction"] <= 1.0
    fu = json.loads((tmp_path / "fuse" / "manifest.json").read_text())
    assert fu["complete"] and set(fu["stats"]["source_weight"]) == {"smollm2", "gemma3"}
    for m in ("smollm2", "gemma3"):
        ex = json.loads((tmp_path / "extract" / m / "manifest.json").read_text())
        assert ex["stats"]["bytes_per_token"] <= 64
    assert main(["verify", str(tmp_path)]) == 0
    assert any((tmp_path / "wandb").glob("offline-run-*"))
    res = json.loads((tmp_path / "bench" / "results.json").read_text())
    assert res["models"] == ["target", "clm_only", "fused", "merge:ties", "evolve", "gemma3"]
    bpb = {
        r["model"]: r["value"] for r in res["rows"] if r["metric"] == "bpb" and r["group"] == "all"
    }
    assert all(0.3 < v < 3.0 for v in bpb.values()), bpb  # real models on real text
    md = (tmp_path / "bench" / "results.md").read_text()
    assert all(f"| {m} |" in md for m in res["models"])
