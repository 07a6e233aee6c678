"""CMA-ES merge search: finds a known optimum, resumes exactly; merge/evolve stages end to
end on tiny models."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import write_recipe

pytest.importorskip("mergekit")
pytest.importorskip("cma")

from fusellm.cli import main  # noqa: E402
from fusellm.merge.core import merge  # noqa: E402
from fusellm.merge.search import search  # noqa: E402


def _pair():
    g = torch.Generator().manual_seed(0)
    a = {
        "model.layers.0.w": torch.randn(8, 8, generator=g),
        "model.norm.weight": torch.randn(8, generator=g),
    }
    b = {k: torch.randn(v.shape, generator=g) for k, v in a.items()}
    return {"a": a, "b": b}


def _fitness(states):
    def f(x):  # how far the linear merge is from source b (optimum: all weight on b)
        out = merge(states, "linear", {"a": {"weight": float(x[0])}, "b": {"weight": float(x[1])}})
        return float(sum(((out[k] - states["b"][k]) ** 2).mean() for k in out))

    return f


def test_cma_es_recovers_the_weight_that_reproduces_one_source():
    states = _pair()
    st = search(_fitness(states), [0.5, 0.5], ([0.0, 0.05], [1.0, 1.0]), 0.3, 25, seed=1, popsize=8)
    wa, wb = st.best_x
    assert wa / (wa + wb) < 0.03, st.best_x
    assert st.best_f < 0.01 * _fitness(states)(np.array([0.5, 0.5]))
    assert [h["generation"] for h in st.history] == list(range(1, 26))
    assert st.evaluations == 25 * 8


def test_every_seed_is_reproducible_including_zero():
    f = _fitness(_pair())
    runs = [
        search(f, [0.5, 0.5], ([0.0, 0.05], [1.0, 1.0]), 0.3, 3, seed=0, popsize=4) for _ in "ab"
    ]
    assert runs[0].best_x == runs[1].best_x and runs[0].history == runs[1].history


def test_a_killed_search_resumes_to_the_same_result(tmp_path):
    states = _pair()
    f = _fitness(states)
    args = ([0.5, 0.5], ([0.0, 0.05], [1.0, 1.0]), 0.3)
    ref = search(f, *args, 8, seed=3, popsize=6)

    calls = {"n": 0}

    def dies(x):
        calls["n"] += 1
        if calls["n"] == 6 * 3 + 2:  # inside generation 4
            raise KeyboardInterrupt
        return f(x)

    path = tmp_path / "search.json"
    with pytest.raises(KeyboardInterrupt):
        search(dies, *args, 8, seed=3, popsize=6, state_path=path)
    resumed = search(f, *args, 8, seed=3, popsize=6, state_path=path)
    assert resumed.best_x == ref.best_x and resumed.best_f == ref.best_f
    assert [h["gen_mean"] for h in resumed.history] == [h["gen_mean"] for h in ref.history]


@pytest.fixture()
def pair_recipe(tiny_recipe, tiny_models, tmp_path):
    """llama plus a perturbed copy (same tokenizer) and neox (another architecture)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = tiny_models["llama_bpe"]
    m = AutoModelForCausalLM.from_pretrained(src)
    torch.manual_seed(0)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.02 * torch.randn_like(p))
    m.save_pretrained(tmp_path / "llama_ft")
    AutoTokenizer.from_pretrained(src).save_pretrained(tmp_path / "llama_ft")
    text = tiny_recipe.read_text().replace(
        "  neox:", f"  llama_ft: {{path: {tmp_path / 'llama_ft'}}}\n  neox:"
    )
    text += """
merge:
  lin: {method: linear, dtype: bfloat16, models: [{model: llama, weight: 0.25}, {model: llama_ft, weight: 0.75}]}
  ties: {method: ties, base: llama, models: [{model: llama_ft, weight: 1.0, density: 0.5}]}
evolve:
  method: task_arithmetic
  base: llama
  models: [llama_ft]
  generations: 2
  popsize: 4
  max_docs: 4
bench:
  models: [llama, llama_ft, merge:lin, merge:ties, evolve]
  tasks: [lm]
"""
    return write_recipe(tiny_recipe, text)


def test_merge_evolve_bench_end_to_end(pair_recipe, tmp_path, tiny_models):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    assert main(["run", str(pair_recipe), "--stages", "corpus,merge,evolve,bench"]) == 0
    run = tmp_path / "run"
    a = AutoModelForCausalLM.from_pretrained(tmp_path / "llama_ft")
    base = AutoModelForCausalLM.from_pretrained(tiny_models["llama_bpe"])
    lin = load_file(run / "merge" / "lin" / "model" / "model.safetensors")
    for k, v in lin.items():
        exp = 0.25 * base.state_dict()[k] + 0.75 * a.state_dict()[k]
        assert v.dtype == torch.bfloat16  # saved in the merge's dtype
        torch.testing.assert_close(v.float(), exp, atol=1e-2, rtol=1e-2)
    assert "merge_method: linear" in (run / "merge" / "lin" / "mergekit.yaml").read_text()
    ev = json.loads((run / "evolve" / "manifest.json").read_text())
    assert ev["stats"]["generations"] == 2 and ev["stats"]["evaluations"] == 8
    assert ev["stats"]["best_fitness"] <= ev["stats"]["reference_fitness"] + 1.0
    # today's fitness: dev bits per byte alone
    assert ev["stats"]["best_objectives"] == {"lm": ev["stats"]["best_fitness"]}
    rows = _rows(run / "evolve" / "generations.csv")
    assert len(rows) == 2 and list(rows[0])[:7] == [
        "generation",
        "evaluations",
        "gen_best",
        "gen_median",
        "gen_mean",
        "best",
        "best:lm",
    ]
    assert _png_width(run / "evolve" / "fitness.png") == round(3.6 * 110)  # one panel
    res = json.loads((run / "bench" / "results.json").read_text())
    assert res["models"] == ["llama", "llama_ft", "merge:lin", "merge:ties", "evolve"]
    # the bench chart: lm bpb panels (all, one domain), then the evolve search's fitness
    assert _png_width(run / "bench" / "results.png") == round((2.2 + 2 * 2.0 + 3.0) * 110)
    # a longer search continues from the finished generations; the objectives of the
    # replayed generations' best candidates (not in the checkpoint) are scored again
    assert main(["evolve", str(pair_recipe), "evolve.generations=3"]) == 0
    ev = json.loads((run / "evolve" / "manifest.json").read_text())
    assert ev["stats"]["generations"] == 3 and ev["stats"]["evaluations"] == 12
    longer = _rows(run / "evolve" / "generations.csv")
    assert [r["best:lm"] for r in longer[:2]] == [r["best:lm"] for r in rows]
    # task accuracy as fitness: a weighted sum with the dev bits per byte
    over = ["evolve.fitness={lm: 1.0, arc_easy:rc_0shot: 0.5}", "evolve.task_items=3"]
    assert main(["evolve", str(pair_recipe), *over, "--force"]) == 0
    ev = json.loads((run / "evolve" / "manifest.json").read_text())["stats"]
    objs = ev["best_objectives"]
    assert ev["dev_items"] == {"lm": 4, "arc_easy:rc_0shot": 3}
    assert ev["best_fitness"] == pytest.approx(objs["lm"] - 0.5 * objs["arc_easy:rc_0shot"])
    last = _rows(run / "evolve" / "generations.csv")[-1]
    assert float(last["best:arc_easy:rc_0shot"]) == objs["arc_easy:rc_0shot"]
    assert _png_width(run / "evolve" / "fitness.png") == round(3 * 3.6 * 110)  # + objectives


def _rows(path) -> list[dict]:
    import csv

    with open(path, encoding="utf-8") as f:
        return list(csv.DictReader(f))


def _png_width(path) -> int:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return int.from_bytes(data[16:20], "big")


def test_merging_different_architectures_is_refused(pair_recipe, capsys):
    over = ["merge={bad: {method: linear, models: [{model: llama}, {model: neox}]}}"]
    assert main(["merge", str(pair_recipe), *over]) == 2
    err = capsys.readouterr().err
    assert "neox" in err and "fusion" in err


PS_DFS = """
evolve:
  ps: {method: linear, models: [llama, llama_ft], generations: 2, popsize: 4, max_docs: 4}
  dfs:
    space: dfs
    models: [evolve:ps, llama_ft]
    repeats: 2
    generations: 2
    popsize: 6
    sigma0: 0.6
    max_docs: 4
bench:
  models: [llama, "evolve:ps", "evolve:dfs"]
  tasks: [lm]
"""


def test_ps_then_dfs_in_one_recipe_and_the_saved_path_scores_as_searched(pair_recipe, tmp_path):
    """Named searches run in order: a data-flow search over the parameter-space merge and
    a source (PS+DFS). The saved path (an ordinary Llama directory, scales folded) scores
    on the dev split as its candidate did in the search, and bench reads it by name."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from fusellm.merge.fitness import Fitness
    from fusellm.recipe import load_recipe

    text = pair_recipe.read_text()
    pair_recipe.write_text(text[: text.index("evolve:")] + PS_DFS)
    assert main(["run", str(pair_recipe), "--stages", "corpus,evolve,bench"]) == 0
    run = tmp_path / "run"
    for name in ("ps", "dfs"):
        man = json.loads((run / "evolve" / name / "manifest.json").read_text())
        assert man["complete"] and man["stats"]["generations"] == 2
    dfs = json.loads((run / "evolve" / "dfs" / "manifest.json").read_text())["stats"]
    path = json.loads((run / "evolve" / "dfs" / "path.json").read_text())
    assert path["embeddings_from"] == "evolve:ps" and path["path"]
    assert {s["model"] for s in path["path"]} <= {"evolve:ps", "llama_ft"}
    model = AutoModelForCausalLM.from_pretrained(run / "evolve" / "dfs" / "model")
    assert model.config.num_hidden_layers == len(path["path"])
    r = load_recipe(pair_recipe)
    tok = AutoTokenizer.from_pretrained(run / "evolve" / "dfs" / "model")
    saved, _ = Fitness.for_evolve(r, r.evolve["dfs"], tok).score(model.eval())
    assert abs(saved - dfs["best_fitness"]) < 1e-4 * dfs["best_fitness"], (saved, dfs)
    res = json.loads((run / "bench" / "results.json").read_text())
    assert res["models"] == ["llama", "evolve:ps", "evolve:dfs"]


def test_a_killed_dfs_search_resumes_to_the_identical_result(pair_recipe, tmp_path):
    import shutil
    import subprocess
    import sys

    text = pair_recipe.read_text()
    pair_recipe.write_text(text[: text.index("evolve:")] + PS_DFS)
    assert main(["run", str(pair_recipe), "--stages", "corpus,evolve"]) == 0
    run = tmp_path / "run"
    want = {f: (run / "evolve" / "dfs" / f).read_bytes() for f in ("best.json", "path.json")}
    shutil.rmtree(run / "evolve" / "dfs")
    # killed in generation 2 (after generation 1's checkpoint), then rerun
    killer = (
        "import os, signal, sys\n"
        "from fusellm.merge.fitness import Fitness\n"
        "real, n = Fitness.score, [0]\n"
        "def score(*a, **k):\n"
        "    n[0] += 1\n"
        "    if n[0] == 1 + 6 + 3: os.kill(os.getpid(), signal.SIGKILL)\n"
        "    return real(*a, **k)\n"
        "Fitness.score = score\n"
        "from fusellm.cli import main\n"
        "sys.exit(main(sys.argv[1:]))\n"
    )
    r = subprocess.run(
        [sys.executable, "-c", killer, "evolve", str(pair_recipe)], capture_output=True, text=True
    )
    assert r.returncode == -9, r.stderr[-2000:]
    saved = json.loads((run / "evolve" / "dfs" / "search.json").read_text())
    assert len(saved["generations"]) == 1
    assert main(["evolve", str(pair_recipe)]) == 0
    assert {f: (run / "evolve" / "dfs" / f).read_bytes() for f in want} == want


def test_a_dfs_search_never_returns_worse_than_its_start(pair_recipe, tmp_path, tiny_models):
    """The start (the embeddings source's own layers) is scored as the reference: when no
    sampled path beats it (wild steps here), the saved model is that start, stated."""
    from safetensors.torch import load_file

    text = pair_recipe.read_text()
    wild = (
        "evolve:\n  space: dfs\n  models: [llama, llama_ft]\n  sigma0: 2.0\n"
        "  generations: 1\n  popsize: 3\n  max_docs: 4\n"
    )
    pair_recipe.write_text(text[: text.index("evolve:")] + wild)
    assert main(["run", str(pair_recipe), "--stages", "corpus,evolve"]) == 0
    run = tmp_path / "run" / "evolve"
    stats = json.loads((run / "manifest.json").read_text())["stats"]
    assert stats["best_is_start"] and stats["best_fitness"] == stats["reference_fitness"]
    assert stats["best_candidate_fitness"] > stats["reference_fitness"]
    assert json.loads((run / "best.json").read_text())["is_start"]
    saved = load_file(run / "model" / "model.safetensors")
    llama = load_file(tiny_models["llama_bpe"] / "model.safetensors")
    assert saved.keys() == llama.keys()
    assert all(torch.equal(saved[k], llama[k]) for k in llama)
