"""evolve fitness: task accuracy and bits per byte equal a direct computation; the weighted
sum; test-split tasks refused at recipe load; the fitness chart and its data."""

from __future__ import annotations

import json
import math
import struct

import numpy as np
import pytest
import torch
from conftest import TEXT, write_recipe

from fusellm.bench.tasks import load_lm, load_task
from fusellm.merge.fitness import (
    Fitness,
    combine,
    generations_csv,
    plot_fitness,
    read_curves,
)
from fusellm.merge.search import search
from fusellm.recipe import RecipeError, load_recipe

RAW, CHAR = "arc_easy:rc_0shot", "arc_challenge:rc_0shot"  # primary: acc_raw, acc_per_char
MAX_LENGTH = 512  # the tiny models' positions: no item is cut


@pytest.fixture(scope="module")
def llama(tiny_models):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = tiny_models["llama_bpe"]
    return AutoModelForCausalLM.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)


def _direct_choice_lls(model, tok, item) -> list[float]:
    """log p(continuation | BOS + context) of each choice, summed over its tokens."""
    out = []
    for ctx, cont in item.requests:
        c = [tok.bos_token_id, *tok(ctx, add_special_tokens=False)["input_ids"]]
        whole = tok(ctx + cont, add_special_tokens=False)["input_ids"]
        assert whole[: len(c) - 1] == c[1:]  # the context's tokens are a prefix here
        ids = torch.tensor([c + whole[len(c) - 1 :]])
        assert ids.shape[1] <= MAX_LENGTH  # nothing is cut off on the left
        with torch.no_grad():
            lp = model(ids).logits[0].log_softmax(-1)
        out.append(float(lp[len(c) - 1 : -1].gather(-1, ids[0, len(c) :, None]).sum()))
    return out


def _direct_accuracy(task, lls: list[list[float]], per_char: bool) -> float:
    right = 0
    for it, ll in zip(task.items, lls, strict=True):
        ll = np.array(ll)
        if per_char:
            ll = ll / np.array([len(cont) for _, cont in it.requests])
        right += int(np.argmax(ll)) == it.gold
    return right / len(task.items)


def _direct_bpb(model, tok, docs: list[str]) -> float:
    nll = nbytes = 0.0
    for text in docs:
        ids = torch.tensor([[tok.bos_token_id, *tok(text, add_special_tokens=False)["input_ids"]]])
        assert ids.shape[1] <= MAX_LENGTH
        with torch.no_grad():
            lp = model(ids).logits[0].float().log_softmax(-1)
        nll -= float(lp[:-1].gather(-1, ids[0, 1:, None]).sum())
        nbytes += len(text.encode("utf-8"))
    return nll / math.log(2) / nbytes


def test_task_accuracy_equals_a_direct_computation_with_the_primary_normalisation(llama):
    model, tok = llama
    for name, per_char in ((RAW, False), (CHAR, True)):
        task = load_task(name, 6, 0)
        assert task.primary == ("acc_per_char" if per_char else "acc_raw")
        f, values = Fitness({name: 1.0}, {name: task}, tok, MAX_LENGTH, 2048).score(model)
        lls = [_direct_choice_lls(model, tok, it) for it in task.items]
        direct = _direct_accuracy(task, lls, per_char)
        assert values == {name: pytest.approx(direct, abs=1e-12)}
        assert f == pytest.approx(-direct, abs=1e-12)  # accuracy is maximised
        # on these items the normalisation changes the answer: the wrong one would show
        assert direct != _direct_accuracy(task, lls, not per_char)


def test_weighted_sum_of_bits_per_byte_and_accuracies(llama, tmp_path):
    model, tok = llama
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    docs = TEXT[:8]
    with open(corpus / "valid.jsonl", "w", encoding="utf-8") as f:
        for i, t in enumerate(docs):
            f.write(json.dumps({"id": f"d{i}", "text": t, "domain": "x"}) + "\n")
    tasks = {
        "lm": load_lm(corpus, "valid", None, 0),
        RAW: load_task(RAW, 6, 0),
        CHAR: load_task(CHAR, 6, 0),
    }
    weights = {"lm": 0.7, RAW: 0.3, CHAR: 1.5}
    f, values = Fitness(weights, tasks, tok, MAX_LENGTH, 1024).score(model)
    assert values["lm"] == pytest.approx(_direct_bpb(model, tok, docs), rel=1e-6)
    alone = {
        k: Fitness({k: 1.0}, {k: tasks[k]}, tok, MAX_LENGTH, 1024).score(model)[1][k]
        for k in weights
    }
    assert values == pytest.approx(alone, rel=1e-6)
    expected = 0.7 * values["lm"] - 0.3 * values[RAW] - 1.5 * values[CHAR]
    assert f == pytest.approx(expected, rel=1e-12) and f == combine(weights, values)


def test_a_test_split_task_is_refused_at_recipe_load(tiny_recipe):
    body = tiny_recipe.read_text() + (
        "evolve:\n  method: linear\n  models: [llama]\n"
        "  fitness: {lm: 1.0, 'arc_easy:test_rc_5shot': 0.5}\n"
    )
    with pytest.raises(RecipeError) as e:
        load_recipe(write_recipe(tiny_recipe, body))
    msg = str(e.value)
    assert "evolve.fitness: 'arc_easy:test_rc_5shot'" in msg and "test split" in msg
    assert "arc_easy:rc_5shot" in msg  # a validation variant to use instead
    # GSM8K ships only its test split
    body = body.replace("'arc_easy:test_rc_5shot'", "'gsm8k:gold_bpb_5shot'")
    with pytest.raises(RecipeError, match=r"gsm8k:gold_bpb_5shot.*none \(only test items"):
        load_recipe(write_recipe(tiny_recipe, body))
    ok = load_recipe(write_recipe(tiny_recipe, body.replace("gsm8k:gold_bpb_5shot", RAW)))
    assert ok.evolve.fitness == {"lm": 1.0, RAW: 0.5} and ok.evolve.task_items == 64


def _png_size(path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", data[16:24])


def test_fitness_chart_draws_the_search_history(tmp_path):
    pytest.importorskip("cma")

    def objectives(x) -> dict[str, float]:  # two made-up objectives of a 2-D candidate
        return {"lm": float((x[0] - 0.3) ** 2 + 1.0), RAW: float(1.0 - abs(x[1] - 0.6))}

    weights = {"lm": 1.0, RAW: 0.5}
    st = search(
        lambda x: combine(weights, objectives(x)),
        [0.5, 0.5],
        ([0.0, 0.0], [1.0, 1.0]),
        0.3,
        6,
        seed=2,
        popsize=5,
    )
    # the median of each generation's recorded fitness values
    assert [h["gen_median"] for h in st.history] == [float(np.median(g["fs"])) for g in st.asked]
    best_objs = [objectives(h["best_x"]) for h in st.history]
    extra = [{"sigma": h["sigma"]} for h in st.history]
    csv_path = tmp_path / "generations.csv"
    csv_path.write_text(generations_csv(st.history, best_objs, extra))
    assert csv_path.read_text().splitlines()[0] == (
        "generation,evaluations,gen_best,gen_median,gen_mean,best,best:lm,best:" + RAW + ",sigma"
    )
    curves = read_curves(csv_path)
    drawn = plot_fitness(curves, tmp_path / "fitness.png")
    assert _png_size(tmp_path / "fitness.png")[0] == 3 * 3.6 * 110  # three panels
    combined, lm, acc = drawn.values()
    gens = np.arange(1, 7)
    for label, key in (
        ("best so far", "best"),
        ("generation best", "gen_best"),
        ("generation median", "gen_median"),
    ):
        x, y = combined[label]
        np.testing.assert_array_equal(x, gens)
        np.testing.assert_array_equal(y, [h[key] for h in st.history])
    np.testing.assert_array_equal(lm["best candidate"][1], [o["lm"] for o in best_objs])
    np.testing.assert_array_equal(acc["best candidate"][1], [o[RAW] for o in best_objs])
    # with today's fitness (lm alone) the combined value is its value: one panel
    only = generations_csv(st.history, [{"lm": h["best"]} for h in st.history], extra)
    csv_path.write_text(only)
    assert list(plot_fitness(read_curves(csv_path), tmp_path / "one.png")) == [
        "evolve: fitness (lower is better)"
    ]


def test_a_generations_csv_without_the_curves_is_named(tmp_path):
    p = tmp_path / "generations.csv"
    p.write_text("generation,evaluations,gen_best_bpb,gen_mean_bpb,best_bpb\n1,4,1.0,1.1,1.0\n")
    with pytest.raises(ValueError, match=r"generations.csv: no column \['best', 'gen_best'"):
        read_curves(p)
