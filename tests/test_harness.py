"""bench's lm-eval backend: harness tasks score as fusellm's own scoring core does, through
the real lm-eval (local task YAMLs over local jsonl files), on one process or several."""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import write_recipe

from fusellm.cli import main

pytest.importorskip("lm_eval")

MC = [
    ("The quick brown fox jumps over the lazy", ["dog.", "cat.", "river."], 0),
    ("Knowledge fusion combines the distributions of several", ["models.", "cities."], 0),
    ("In 1843, Ada Lovelace wrote the first published", ["algorithm.", "novel.", "song."], 0),
    ("Photosynthesis converts light energy into chemical", ["energy.", "poems."], 0),
    ("She said: I don't know! and left the", ["room.", "sky.", "table."], 0),
    ("Tokyo and Kyoto are cities in", ["Japan.", "plants."], 0),
    ("Tabs and double spaces and new paragraphs", ["matter.", "jump.", "fuse."], 0),
    ("def add(a, b): return a +", ["b", "fox", "light"], 0),
]
GEN = ["The quick brown fox", "Knowledge fusion", "In 1843, Ada", "Tokyo and"]


@pytest.fixture()
def task_dir(tmp_path) -> Path:
    """Local lm-eval task YAMLs over jsonl files: multiple choice, greedy generation,
    rolling log-likelihood over the corpus test split, and a group."""
    d = tmp_path / "lm_tasks"
    d.mkdir()
    cache = tmp_path / "hf-datasets"  # lm-eval builds each json dataset here, not in ~
    with open(d / "mc.jsonl", "w") as f:
        for q, choices, gold in MC:
            f.write(json.dumps({"question": q, "choices": choices, "label": gold}) + "\n")
    with open(d / "gen.jsonl", "w") as f:
        for p in GEN:
            f.write(json.dumps({"prompt": p, "answer": "x"}) + "\n")

    def data(path) -> str:
        return f"dataset_path: json\ndataset_kwargs:\n  data_files: {{test: {path}}}\n  cache_dir: {cache}\ntest_split: test\n"

    (d / "tiny_mc.yaml").write_text(
        "task: tiny_mc\n" + data(d / "mc.jsonl") + "output_type: multiple_choice\n"
        'doc_to_text: "Question: {{question}}\\nAnswer:"\n'
        "doc_to_choice: choices\ndoc_to_target: label\n"
        "metric_list:\n  - metric: acc\n  - metric: acc_norm\n"
    )
    (d / "tiny_mc_copy.yaml").write_text(
        (d / "tiny_mc.yaml").read_text().replace("task: tiny_mc", "task: tiny_mc_copy")
    )
    (d / "tiny_pair.yaml").write_text(
        "group: tiny_pair\ntask: [tiny_mc, tiny_mc_copy]\n"
        "aggregate_metric_list:\n  - {metric: acc, aggregation: mean, weight_by_size: true}\n"
    )
    (d / "tiny_gen.yaml").write_text(
        "task: tiny_gen\n" + data(d / "gen.jsonl") + "output_type: generate_until\n"
        "doc_to_text: prompt\ndoc_to_target: answer\n"
        "generation_kwargs: {until: ['.'], max_gen_toks: 6, do_sample: false}\n"
        "metric_list:\n  - metric: exact_match\n"
    )
    test_split = tmp_path / "run" / "corpus" / "test.jsonl"  # written by the corpus stage
    (d / "tiny_lm.yaml").write_text(
        "task: tiny_lm\n" + data(test_split) + "output_type: loglikelihood_rolling\n"
        "doc_to_text: ''\ndoc_to_target: text\nmetric_list:\n  - metric: bits_per_byte\n"
    )
    return d


@pytest.fixture()
def harness_recipe(tiny_recipe, task_dir) -> Path:
    text = tiny_recipe.read_text() + (
        f"\nbench:\n  models: [llama, neox]\n  tasks: [harness:tiny_mc]\n"
        f"  harness: {{include_path: [{task_dir}]}}\n"
    )
    return write_recipe(tiny_recipe, text)


def _model(path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)


def _cached(run: Path, model: str, task: str) -> dict:
    (p,) = (run / "bench" / "cache").glob(f"{model}-*/{task.replace(':', '_')}.json")
    return json.loads(p.read_text())["scores"]


def _rows(run: Path) -> dict:
    res = json.loads((run / "bench" / "results.json").read_text())
    return {(r["model"], r["task"], r["group"], r["metric"]): r for r in res["rows"]}


def test_multiple_choice_through_the_harness_equals_direct_scoring(harness_recipe, tiny_models):
    from fusellm.bench.score import LogProbModel, request_unit

    over = ["bench.models=[llama]", "bench.tasks=[harness:tiny_mc, harness:tiny_pair]"]
    assert main(["bench", str(harness_recipe), *over, "bench.limit=5"]) == 0
    run = harness_recipe.parent / "run"
    rec = _cached(run, "llama", "harness:tiny_mc")
    # bench.limit: a seeded subsample of the documents (recipe seed 0), in document order
    picked = sorted(int(i) for i in np.random.default_rng(0).permutation(len(MC))[:5])
    assert rec["ids"] == [f"tiny_mc:{i}" for i in picked]
    model, tok = _model(tiny_models["llama_bpe"])
    lpm = LogProbModel([model])
    acc, acc_norm = [], []
    for i, resps in zip(picked, rec["responses"], strict=True):
        q, choices, gold = MC[i]
        units = [request_unit(tok, f"Question: {q}\nAnswer:", " " + c, 1024) for c in choices]
        lp, _, _ = lpm.score(units, pad_id=0)
        assert [r[0][0] for r in resps] == pytest.approx(lp.tolist(), abs=1e-4)
        acc.append(float(np.argmax(lp) == gold))
        acc_norm.append(float(np.argmax(lp / np.array([len(c) for c in choices])) == gold))
    assert rec["num"]["acc"] == acc and rec["num"]["acc_norm"] == acc_norm
    assert len(set(acc)) == 2  # the random model gets some right and some wrong
    rows = _rows(run)
    r = rows[("llama", "harness:tiny_mc", "all", "acc_norm")]
    assert r["value"] == pytest.approx(np.mean(acc_norm)) and r["n"] == 5 and r["primary"]
    assert r["se"] > 0 and r["higher_is_better"]
    assert not rows[("llama", "harness:tiny_mc", "all", "acc")]["primary"]
    # a group: one value over both tasks' items, and each task's own row
    pair = _cached(run, "llama", "harness:tiny_pair")
    assert pair["group"] == ["tiny_mc"] * 5 + ["tiny_mc_copy"] * 5
    assert pair["num"]["acc"] == acc + acc
    assert rows[("llama", "harness:tiny_pair", "all", "acc")]["n"] == 10
    assert rows[("llama", "harness:tiny_pair", "tiny_mc_copy", "acc")]["value"] == pytest.approx(
        np.mean(acc)
    )
    md = (run / "bench" / "results.md").read_text()
    assert "harness:tiny_mc acc_norm" in md and "harness:tiny_pair acc_norm" in md


def test_rolling_loglikelihood_gives_the_bits_per_byte_of_the_lm_task(harness_recipe):
    """A harness rolling task over the corpus test split = bench's own `lm` task: the
    same documents scored by `document_units` (here in windows of 16 tokens)."""
    over = ["bench.tasks=[lm, harness:tiny_lm]", "bench.max_length=16", "bench.limit=null"]
    assert main(["run", str(harness_recipe), "--stages", "corpus,bench", *over]) == 0
    run = harness_recipe.parent / "run"
    rows = _rows(run)
    docs = (run / "corpus" / "test.jsonl").read_text().splitlines()
    for m in ("llama", "neox"):
        lm, h = rows[(m, "lm", "all", "bpb")], rows[(m, "harness:tiny_lm", "all", "bits_per_byte")]
        assert h["value"] == pytest.approx(lm["value"], rel=1e-9) and h["n"] == len(docs)
        assert not h["higher_is_better"] and h["primary"]
        rec = _cached(run, m, "harness:tiny_lm")
        nll = -np.array([r[0][0] for r in rec["responses"]]) / math.log(2)
        assert rec["num"]["bits_per_byte"] == pytest.approx(nll.tolist(), rel=1e-12)
        assert rec["den"]["bits_per_byte"] == [
            len(json.loads(d)["text"].encode("utf-8")) for d in docs
        ]
    # the second model is compared with the first, item by item
    assert "diff_lo" in rows[("neox", "harness:tiny_lm", "all", "bits_per_byte")]


def test_harness_scores_are_cached_per_model_and_task(harness_recipe, caplog):
    """A rerun scores only what is new: another task, or a task whose requests changed."""
    assert main(["bench", str(harness_recipe)]) == 0
    run = harness_recipe.parent / "run"
    first = _rows(run)
    caplog.clear()
    with caplog.at_level("INFO"):
        assert (
            main(["bench", str(harness_recipe), "bench.tasks=[harness:tiny_mc, harness:tiny_gen]"])
            == 0
        )
    assert "on harness:tiny_mc:" not in caplog.text
    assert caplog.text.count("on harness:tiny_gen: 4 items") == 2
    assert {k: v["value"] for k, v in _rows(run).items() if k[1] == "harness:tiny_mc"} == {
        k: v["value"] for k, v in first.items()
    }
    # fewer new tokens: other requests, so tiny_gen is scored again (and tiny_mc is not)
    caplog.clear()
    with caplog.at_level("INFO"):
        over = ["bench.tasks=[harness:tiny_mc, harness:tiny_gen]", "bench.harness.max_gen_toks=2"]
        assert main(["bench", str(harness_recipe), *over]) == 0
    assert "on harness:tiny_mc:" not in caplog.text
    assert caplog.text.count("on harness:tiny_gen: 4 items") == 2


def _instance(ctx: str, **gen):
    from lm_eval.api.instance import Instance

    return Instance("generate_until", {}, (ctx, gen), 0, ("t", 0, 1))


def _greedy_reference(model, tok, ctx: str, n: int) -> str:
    """Greedy decoding without a cache: the argmax of a full forward pass per token."""
    ids = [tok.bos_token_id, *tok(ctx, add_special_tokens=False)["input_ids"]]
    out = []
    with torch.no_grad():
        for _ in range(n):
            nxt = int(model(torch.tensor([ids + out])).logits[0, -1].argmax())
            if nxt == tok.eos_token_id:
                break
            out.append(nxt)
    return tok.decode(out, skip_special_tokens=True)


def test_generate_until_is_greedy_and_stops_at_the_stop_string(tiny_models):
    from fusellm.bench.harness_lm import HarnessLM
    from fusellm.bench.score import LogProbModel

    model, tok = _model(tiny_models["llama_bpe"])
    lm = HarnessLM(LogProbModel([model]), tok, max_length=64, batch_tokens=256)
    free = lm.generate_until([_instance(p, until=[], max_gen_toks=12) for p in GEN])
    # batched with left padding = each prompt alone without a cache
    assert free == [_greedy_reference(model, tok, p, 12) for p in GEN]
    text = free[0]
    stop = next(text[k : k + 2] for k in range(len(text) // 2, len(text) - 1) if text[k] != " ")
    cut = text[: text.index(stop)]
    assert 0 < len(cut) < len(text)
    assert lm.generate_until([_instance(GEN[0], until=[stop], max_gen_toks=12)]) == [cut]
    assert lm.generate_until([_instance(GEN[0], until=stop, max_gen_toks=3)]) == [
        _greedy_reference(model, tok, GEN[0], 3).split(stop)[0]
    ]
    # an ensemble of one model twice decodes on the same distribution
    pair = HarnessLM(LogProbModel([model, model]), tok, max_length=64, batch_tokens=256)
    assert pair.generate_until([_instance(GEN[0], until=[stop], max_gen_toks=12)]) == [cut]
    with pytest.raises(ValueError, match="do_sample is set"):
        lm.generate_until([_instance(GEN[0], do_sample=True)])
    with pytest.raises(ValueError, match="leaves no room for the context"):
        lm.generate_until([_instance(GEN[0], max_gen_toks=64)])


def _close(a, b, where) -> None:
    """Equal structure and strings; numbers equal within float noise."""
    if isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            _close(a[k], b[k], (*where, k))
    elif isinstance(a, list):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            _close(x, y, (*where, i))
    elif isinstance(a, float):
        assert a == pytest.approx(b, rel=1e-5, abs=1e-6), where
    else:
        assert a == b, where


def _scores(run: Path) -> dict:
    return {
        str(p.relative_to(run / "bench" / "cache")): json.loads(p.read_text())["scores"]
        for p in sorted((run / "bench" / "cache").rglob("*.json"))
    }


@pytest.mark.distributed
def test_two_processes_give_the_scores_of_one(harness_recipe, tmp_path):
    """`fusellm bench` under torchrun on 2 CPU processes (gloo): each rank scores a share
    of the batches; the cached per-item scores and the table equal a 1-process run."""
    from conftest import torchrun

    over = [
        "bench.tasks=[lm, harness:tiny_mc, harness:tiny_gen, harness:tiny_lm]",
        "bench.max_length=24",
        "bench.batch_tokens=64",  # many batches to share
    ]
    assert main(["run", str(harness_recipe), "--stages", "corpus,bench", *over]) == 0
    one = harness_recipe.parent / "run"
    two = tmp_path / "run2"
    # the local lm task reads run/corpus/test.jsonl: the same documents for both runs
    assert main(["corpus", str(harness_recipe), f"run_dir={two}"]) == 0
    r = torchrun(
        "-m",
        "fusellm.cli",
        "bench",
        str(harness_recipe),
        f"run_dir={two}",
        *over,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        timeout=600,
    )
    assert r.returncode == 0, r.stderr[-4000:]
    # each rank took its own share of every model's batches on every task
    shares = re.findall(r"bench (\S+) (\S+): rank (\d) of 2 takes (\d+) of (\d+) batches", r.stderr)
    taken: dict = {}
    for model, task, rank, k, n in shares:
        taken.setdefault((model, task, int(n)), {})[int(rank)] = int(k)
    assert {(m, t) for m, t, _ in taken} == {
        (m, t)
        for m in ("llama", "neox")
        for t in ("lm", "harness:tiny_mc", "harness:tiny_gen", "harness:tiny_lm")
    }
    for (_, _, n), k in taken.items():
        assert k.keys() == {0, 1} and k[0] + k[1] == n and min(k.values()) >= 1
    a, b = _scores(one), _scores(two)
    assert a.keys() == b.keys() and len(a) == 8
    _close(a, b, ())
    rows1, rows2 = _rows(one), _rows(two)
    assert rows1.keys() == rows2.keys()
    for k, row in rows1.items():
        assert row["value"] == pytest.approx(rows2[k]["value"], rel=1e-6), k


def test_bad_task_names_and_include_paths_name_the_key(harness_recipe, capsys):
    assert main(["show", str(harness_recipe), "bench.tasks=[lm, harness:tiny_mcq]"]) == 2
    err = capsys.readouterr().err
    assert "bench: tasks.1: unknown lm-eval task 'tiny_mcq'" in err and "close: tiny_mc" in err
    assert main(["show", str(harness_recipe), "bench.tasks=[harness:tiny_mc:fiveshot]"]) == 2
    assert "tasks.0: 'harness:tiny_mc:fiveshot': expected harness:TASK" in capsys.readouterr().err
    nowhere = harness_recipe.parent / "nowhere"
    assert main(["show", str(harness_recipe), f"bench.harness.include_path=[{nowhere}]"]) == 2
    err = capsys.readouterr().err
    assert "bench.harness.include_path: include_path.0: no such directory" in err
    assert str(nowhere) in err
    # lm-eval's own tasks are known offline, from its task index (no data is loaded)
    assert main(["show", str(harness_recipe), "bench.tasks=[harness:arc_easy:25shot]"]) == 0
