"""bench: metrics equal a direct computation; statistics; ensembles; caching; CLM-only."""

from __future__ import annotations

import json
import math
import os
import re
import sys

import numpy as np
import pytest
import torch
from conftest import write_recipe

from fusellm.bench.score import LogProbModel, Unit, batches, document_units, request_unit
from fusellm.bench.stats import compare, item_metrics
from fusellm.cli import main


def _direct_nll(model, tok, text: str) -> tuple[float, int]:
    """Σ −log p(token | everything before) over all text tokens, BOS first."""
    ids = torch.tensor([[tok.bos_token_id, *tok(text, add_special_tokens=False)["input_ids"]]])
    with torch.no_grad():
        lp = model(ids).logits[0].float().log_softmax(-1)
    return float(-lp[:-1].gather(-1, ids[0, 1:, None]).sum()), ids.shape[1] - 1


@pytest.fixture()
def bench_recipe(tiny_recipe):
    text = tiny_recipe.read_text() + "\nbench:\n  models: [llama, neox]\n  tasks: [lm]\n"
    return write_recipe(tiny_recipe, text)


def test_bits_per_byte_equals_total_nll_over_utf8_bytes(bench_recipe, tiny_models):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    assert main(["run", str(bench_recipe), "--stages", "corpus,bench"]) == 0
    run = bench_recipe.parent / "run"
    res = json.loads((run / "bench" / "results.json").read_text())
    docs = [json.loads(x) for x in open(run / "corpus" / "test.jsonl", encoding="utf-8")]
    assert docs and res["tasks"]["lm"]["items"] == len(docs)
    for name, path in (("llama", tiny_models["llama_bpe"]), ("neox", tiny_models["neox_unigram"])):
        model = AutoModelForCausalLM.from_pretrained(path).eval()
        tok = AutoTokenizer.from_pretrained(path)
        nll = tokens = nbytes = 0
        for d in docs:
            a, b = _direct_nll(model, tok, d["text"])
            nll, tokens = nll + a, tokens + b
            nbytes += len(d["text"].encode("utf-8"))
        rows = {(r["metric"], r["group"]): r for r in res["rows"] if r["model"] == name}
        assert rows[("bpb", "all")]["value"] == pytest.approx(nll / math.log(2) / nbytes, rel=1e-6)
        assert rows[("bpb", "mixed")]["value"] == rows[("bpb", "all")]["value"]  # one domain
        assert rows[("ppl", "all")]["value"] == pytest.approx(math.exp(nll / tokens), rel=1e-6)
        assert rows[("bpb", "all")]["se"] > 0
    md = (run / "bench" / "results.md").read_text()
    assert "| llama |" in md and "| neox |" in md and "lm/all bpb" in md
    assert (run / "bench" / "results.png").read_bytes()[:4] == b"\x89PNG"
    assert (run / "bench" / "results.csv").read_text().startswith("model,task,group,metric")


def test_bench_resumes_from_its_cache(bench_recipe, caplog):
    assert main(["run", str(bench_recipe), "--stages", "corpus,bench"]) == 0
    run = bench_recipe.parent / "run"
    first = json.loads((run / "bench" / "results.json").read_text())["rows"]
    caplog.clear()
    with caplog.at_level("INFO"):
        assert main(["bench", str(bench_recipe)]) == 0
    assert "bench: complete and unchanged" in caplog.text and "cached" not in caplog.text
    # a lost result file is rebuilt from the cached scores, no model is run again
    (run / "bench" / "results.json").unlink()
    caplog.clear()
    with caplog.at_level("INFO"):
        assert main(["bench", str(bench_recipe)]) == 0
    assert caplog.text.count("all 1 task(s) cached") == 2
    assert json.loads((run / "bench" / "results.json").read_text())["rows"] == first
    # another task scores only what is missing
    caplog.clear()
    with caplog.at_level("INFO"):
        assert (
            main(
                ["bench", str(bench_recipe), "bench.tasks=[lm,arc_easy:rc_0shot]", "bench.limit=3"]
            )
            == 0
        )
    assert "on lm:" not in caplog.text and caplog.text.count("on arc_easy:rc_0shot: 3 items") == 2


def test_multiple_choice_scores_equal_direct_loglikelihoods(bench_recipe, tiny_models):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from fusellm.bench.tasks import load_task

    args = ["bench.tasks=[arc_easy:rc_0shot]", "bench.limit=6", "bench.models=[llama]"]
    assert main(["run", str(bench_recipe), "--stages", "corpus,bench", *args]) == 0
    run = bench_recipe.parent / "run"
    task = load_task("arc_easy:rc_0shot", 6, 0)
    (cache,) = (run / "bench" / "cache").glob("llama-*/arc_easy_rc_0shot.json")
    scores = json.loads(cache.read_text())["scores"]
    assert scores["ids"] == [it.id for it in task.items]
    model = AutoModelForCausalLM.from_pretrained(tiny_models["llama_bpe"]).eval()
    tok = AutoTokenizer.from_pretrained(tiny_models["llama_bpe"])
    correct = 0
    for it, lls in zip(task.items, scores["ll"], strict=True):
        direct = []
        for ctx, cont in it.requests:
            c = [tok.bos_token_id, *tok(ctx, add_special_tokens=False)["input_ids"]]
            ids = torch.tensor(
                [c + tok(ctx + cont, add_special_tokens=False)["input_ids"][len(c) - 1 :]]
            )
            with torch.no_grad():
                lp = model(ids).logits[0].log_softmax(-1)
            direct.append(float(lp[len(c) - 1 : -1].gather(-1, ids[0, len(c) :, None]).sum()))
        assert lls == pytest.approx(direct, abs=1e-4)
        correct += int(np.argmax(direct)) == it.gold
    res = json.loads((run / "bench" / "results.json").read_text())
    (acc,) = [r for r in res["rows"] if r["metric"] == "acc_raw"]
    assert acc["value"] == pytest.approx(correct / 6) and acc["n"] == 6
    assert res["tasks"]["arc_easy:rc_0shot"]["shots"] == 0


def test_request_tokenization_moves_trailing_space_and_keeps_continuation(tiny_models):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_models["llama_bpe"])
    a = request_unit(tok, "The quick brown ", "fox", 64)
    b = request_unit(tok, "The quick brown", " fox", 64)
    assert a.ids == b.ids and a.n == b.n >= 1
    assert tok.decode(a.ids[-a.n :]) == " fox"
    long = request_unit(tok, "word " * 200, "end", 16)  # context cut on the left
    assert len(long.ids) == 16 and tok.decode(long.ids[-long.n :]).strip() == "end"


@pytest.mark.parametrize("max_length", [4, 9, 1000])
def test_document_windows_score_every_token_once(tiny_models, max_length):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_models["neox_unigram"])
    text = "Knowledge fusion combines the distributions of several language models. " * 3
    full = [tok.bos_token_id, *tok(text, add_special_tokens=False)["input_ids"]]
    units = document_units(tok, text, max_length)
    assert all(len(u.ids) <= max_length for u in units)
    scored = [t for u in units for t in u.ids[len(u.ids) - u.n :]]
    assert scored == full[1:]
    assert (len(units) == 1) == (max_length >= len(full))


def test_batches_cover_all_units_within_the_token_budget():
    rng = np.random.default_rng(0)
    units = [Unit([1] * int(n), 1) for n in rng.integers(1, 50, 100)]
    seen = []
    for b in batches(units, 120):
        assert len(b) == 1 or max(len(units[i].ids) for i in b) * len(b) <= 120
        seen += b
    assert sorted(seen) == list(range(100))


def test_ensemble_is_the_mean_probability(tiny_models):
    from transformers import AutoModelForCausalLM

    a = AutoModelForCausalLM.from_pretrained(tiny_models["llama_bpe"]).eval()
    b = AutoModelForCausalLM.from_pretrained(tiny_models["llama_bpe"]).eval()
    with torch.no_grad():
        for p in b.parameters():
            p.add_(0.05 * torch.randn_like(p))
    ids = torch.tensor([[1, 5, 9, 12, 40, 7]])
    mask = torch.ones_like(ids)
    got = LogProbModel([a, b]).logprobs(ids, mask)
    with torch.no_grad():
        pa, pb = (m(ids).logits.float().softmax(-1) for m in (a, b))
    torch.testing.assert_close(got.exp(), (pa + pb) / 2, atol=1e-6, rtol=1e-5)
    same = LogProbModel([a, a]).logprobs(ids, mask)
    torch.testing.assert_close(same, LogProbModel([a]).logprobs(ids, mask), atol=1e-5, rtol=0)
    u = Unit([1, 5, 9, 12], 2)
    lp, n, _ = LogProbModel([a, b]).score([u, Unit([1, 5], 1)], pad_id=0)
    assert n.tolist() == [2, 1]
    assert lp[0] == pytest.approx(float(got[0, 1, 9] + got[0, 2, 12]), abs=1e-5)


def test_ensemble_of_different_tokenizers_is_refused(bench_recipe, capsys):
    over = ["bench.models=[{ensemble: [llama, neox]}]"]
    assert main(["run", str(bench_recipe), "--stages", "corpus,bench", *over]) == 2
    err = capsys.readouterr().err
    assert "different tokenizers" in err and "fusion" in err


def test_paired_differences_flag_noise():
    rng = np.random.default_rng(1)
    base = (rng.random(400) < 0.5).astype(float)
    flip = base.copy()
    flip[:3] = 1 - flip[:3]  # 3 of 400 items differ: within noise
    better = np.where(rng.random(400) < 0.3, 1.0, base)  # clearly better
    ones = np.ones(400)
    res = compare({"a": (base, ones), "b": (flip, ones), "c": (better, ones)}, "a", "k", 1000)
    assert "diff" not in res["a"] and res["a"]["se"] == pytest.approx(
        math.sqrt(base.mean() * (1 - base.mean()) / 400), rel=0.15
    )
    assert not res["b"]["significant"] and res["c"]["significant"] and res["c"]["diff"] > 0.1
    again = compare({"a": (base, ones), "b": (flip, ones)}, "a", "k", 1000)
    assert again["b"] == res["b"]  # resamples depend on the key only: reproducible


def test_mc_normalisations():
    rec = {
        "gold": [0, 1],
        "ll": [[-4.0, -3.0], [-9.0, -2.0]],
        "chars": [[8, 2], [10, 4]],
        "tokens": [[1, 1], [3, 1]],
    }
    m = item_metrics("mc", rec)
    assert m[("all", "acc_raw")][0].tolist() == [0.0, 1.0]  # -3 beats -4 for item 0
    assert m[("all", "acc_per_char")][0].tolist() == [1.0, 1.0]  # -0.5 beats -1.5; -0.5 beats -0.9
    assert m[("all", "acc_per_token")][0].tolist() == [0.0, 1.0]


def test_bench_names_unknown_model_and_unbuilt_stage(bench_recipe, capsys):
    assert main(["bench", str(bench_recipe), "bench.models=[nope]"]) == 2
    assert "bench.models.0: 'nope'" in capsys.readouterr().err
    assert main(["bench", str(bench_recipe), "bench.models=[fused]"]) == 2
    assert "train stage" in capsys.readouterr().err
    assert main(["bench", str(bench_recipe), "bench.tasks=[arc_easy:bogus]"]) == 2
    assert "unknown task 'arc_easy:bogus'" in capsys.readouterr().err


_opened: list[str] | None = None  # paths opened while a test listens (audit hooks stay)


def _listen(event: str, args: tuple) -> None:
    if _opened is not None and event == "open" and isinstance(args[0], (str, os.PathLike)):
        _opened.append(os.fspath(args[0]))


def test_items_found_in_the_training_corpus_are_dropped_and_the_index_is_reused(
    bench_recipe, tiny_models
):
    """An item whose question and answer sit in a training document (other case and
    punctuation, across the corpus stage's cuts) is dropped; a second bench run with other
    tasks reuses the index without opening train.jsonl; a changed train split rebuilds it."""
    global _opened
    from fusellm.bench.decontam import PREFIX
    from fusellm.bench.tasks import load_task, question_and_answer
    from fusellm.corpus.core import split_of

    task = "arc_easy:rc_0shot"
    planted = load_task(task, 5, 0).items[1]
    text = question_and_answer(planted)  # 26 words: "Question: If you bounce a rubber ball ..."
    mangled = re.sub(r"\W+", " -- ", text).upper()
    doc_id = next(f"leak{i}" for i in range(100) if split_of(f"leak{i}", 0.2, 0.2) == "train")
    data = bench_recipe.parent / "data.jsonl"
    clean = data.read_text(encoding="utf-8")
    leak = "A long page of notes before it. " * 8 + mangled + " And more notes after it." * 8
    data.write_text(clean + json.dumps({"id": doc_id, "text": leak}) + "\n", encoding="utf-8")
    args = [f"bench.tasks=[{task}]", "bench.limit=5", "bench.models=[llama]"]
    assert main(["run", str(bench_recipe), "--stages", "corpus,bench", *args]) == 0
    run = bench_recipe.parent / "run"
    train = run / "corpus" / "train.jsonl"
    assert sum(doc_id in line for line in open(train)) > 1  # the leak was cut into chunks

    def results():
        res = json.loads((run / "bench" / "results.json").read_text())
        (cache,) = (run / "bench" / "cache").glob(f"llama-*/{task.replace(':', '_')}.json")
        return res["tasks"], json.loads(cache.read_text())["scores"]["ids"]

    meta, ids = results()
    assert meta[task]["contaminated_dropped"] == 1 and meta[task]["items"] == 5
    assert planted.id not in ids
    (index,) = (run / "corpus").glob(PREFIX + "*")
    stamp = (index / "ngrams.npy").stat().st_mtime_ns
    # another task set: the index is reused, the training split never opened
    if not getattr(sys, "_fusellm_listen", False):
        sys.addaudithook(_listen)
        sys._fusellm_listen = True
    _opened = []
    try:
        more = [f"bench.tasks=[{task},piqa:rc_0shot]", "bench.limit=5", "bench.models=[llama]"]
        assert main(["bench", str(bench_recipe), *more]) == 0
        opened = list(_opened)
    finally:
        _opened = None
    assert str(index / "ngrams.npy") in opened and str(train) not in opened
    assert list((run / "corpus").glob(PREFIX + "*")) == [index]
    assert (index / "ngrams.npy").stat().st_mtime_ns == stamp
    # the leak removed from the corpus: a new train split, a new index, the item is back
    data.write_text(clean, encoding="utf-8")
    assert main(["corpus", str(bench_recipe), "--force"]) == 0
    assert main(["bench", str(bench_recipe), *args]) == 0
    meta, ids = results()
    assert meta[task]["contaminated_dropped"] == 0 and planted.id in ids
    (rebuilt,) = (run / "corpus").glob(PREFIX + "*")
    assert rebuilt != index


def test_lm_bootstrap_resamples_documents_not_chunks():
    rec = {
        "ids": ["a#0", "a#1", "b#0"],
        "group": ["a", "a", "b"],
        "domain": ["x", "x", "y"],
        "nll": [1.0, 2.0, 4.0],
        "bytes": [10, 10, 10],
        "tokens": [1, 1, 1],
    }
    num, den = item_metrics("lm", rec)[("all", "bpb")]
    assert len(num) == 2 and den.tolist() == [20.0, 10.0]
    assert num * math.log(2) == pytest.approx([3.0, 4.0])
    assert item_metrics("lm", rec)[("y", "bpb")][1].tolist() == [10.0]


def test_an_empty_split_is_an_error_not_a_perfect_score(tmp_path):
    from fusellm.bench.tasks import load_lm

    (tmp_path / "test.jsonl").write_text("")
    with pytest.raises(ValueError, match="no documents"):
        load_lm(tmp_path, "test", None, 0)


def test_a_single_unit_has_no_error_bar_and_no_significance():
    one = (np.array([1.0]), np.array([2.0]))
    res = compare({"a": one, "b": (np.array([3.0]), np.array([2.0]))}, "a", "k", 200)
    assert res["a"]["se"] is None and res["b"]["diff"] == 1.0 and not res["b"]["significant"]


def test_a_task_without_unconditional_requests_loads():
    """boolq:rc_5shot's config gives uncond_docid_offset null (it has no unconditional
    requests): the old loader compared doc ids with None and failed."""
    from fusellm.bench.tasks import load_task

    task = load_task("boolq:rc_5shot", 5, 0)
    assert len(task.items) == 5 and all(len(it.requests) == 2 for it in task.items)
    assert task.shots == 5
