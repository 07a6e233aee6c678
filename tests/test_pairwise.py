"""Pairwise fusion then merge (FuseChat-2): each source fused into its own copy of the
target, the copies merged with SCE; adding a source later reruns nothing else."""

from __future__ import annotations

import json

import pytest

from fusellm.cli import main

pytest.importorskip("mergekit")

SECTIONS = """
extract: {{top_k: 8}}
align: {{vocab_method: min_ed}}
fuse: {{method: min_ce}}
train:
  lm_weight: 0.5
  block_size: 48
  per_device_train_batch_size: 2
  learning_rate: 1.0e-3
  max_steps: 2
  save_steps: 2
  use_cpu: true
pairwise: {{sources: {pairs}}}
"""
MERGE = """merge:
  fusechat:
    method: sce
    base: target
    models: [{model: "pairwise:neox"}, {model: "pairwise:gpt2"}]
    parameters: {select_topk: 0.5}
"""


@pytest.fixture()
def three(tiny_recipe, tiny_models):
    """The tiny recipe with a third model, every model fitted by the corpus up front."""
    text = tiny_recipe.read_text().replace(
        "target: llama",
        f"  gpt2: {{path: {tiny_models['gpt2_wordpiece']}}}\ntarget: llama",
    )
    text = text.replace(
        "  block_size: 32\n", "  block_size: 32\n  fit_models: [llama, neox, gpt2]\n"
    )
    return tiny_recipe, text


def _manifests(run, stages) -> dict[str, int]:
    return {s: (run / s / "manifest.json").stat().st_mtime_ns for s in stages}


def _fused_shas(d) -> dict[str, str]:
    man = json.loads((d / "manifest.json").read_text())
    assert man["complete"]
    return {k: v["sha256"] for k, v in man["files"].items() if k.endswith(".safetensors")}


def test_each_pair_is_the_pipeline_over_the_target_and_that_source(three, tmp_path):
    path, text = three
    path.write_text(text + SECTIONS.format(pairs="[neox]"))
    run = tmp_path / "run"
    stages = "corpus,extract,align,pairwise"
    assert main(["run", str(path), "--stages", stages, "sources=[llama,neox]"]) == 0
    pair = run / "pairwise" / "neox"
    man = json.loads((pair / "fuse" / "manifest.json").read_text())
    assert man["config"]["sources"] == ["llama", "neox"]
    assert json.loads((pair / "train" / "manifest.json").read_text())["complete"]
    # the ordinary fuse stage over [target, neox] writes the same fused shards
    assert main(["fuse", str(path), "sources=[llama,neox]", "fuse.sources=[llama,neox]"]) == 0
    assert _fused_shas(pair / "fuse") == _fused_shas(run / "fuse")


def test_adding_a_source_runs_its_pair_and_the_merge_and_nothing_else(three, tmp_path):
    from transformers import AutoModelForCausalLM

    path, text = three
    run = tmp_path / "run"
    path.write_text(text + SECTIONS.format(pairs="[neox]"))
    first = "corpus,extract,align,pairwise"
    assert main(["run", str(path), "--stages", first, "sources=[llama,neox]"]) == 0
    kept = ["corpus", "extract/llama", "extract/neox", "align/neox"]
    kept += ["pairwise/neox/fuse", "pairwise/neox/train"]
    before = _manifests(run, kept)

    path.write_text(text + SECTIONS.format(pairs="[neox, gpt2]") + MERGE)
    stages = "corpus,extract,align,pairwise,merge"
    assert main(["run", str(path), "--stages", stages, "sources=[llama,neox,gpt2]"]) == 0
    assert _manifests(run, kept) == before  # nothing of the first pair was redone
    for new in ("extract/gpt2", "align/gpt2", "pairwise/gpt2/train", "merge/fusechat"):
        assert json.loads((run / new / "manifest.json").read_text())["complete"], new
    merged = AutoModelForCausalLM.from_pretrained(run / "merge" / "fusechat" / "model")
    assert merged.config.model_type == "llama"
    assert "merge_method: sce" in (run / "merge" / "fusechat" / "mergekit.yaml").read_text()


def test_pairwise_sources_are_checked(three, tmp_path, capsys):
    path, text = three
    path.write_text(text + SECTIONS.format(pairs="[llama]"))
    assert main(["pairwise", str(path), "sources=[llama,neox]"]) != 0
    assert "pairwise.sources.0: 'llama' is the target" in capsys.readouterr().err
    path.write_text(text + SECTIONS.format(pairs="[gpt2]"))
    assert main(["pairwise", str(path), "sources=[llama,neox]"]) != 0
    assert "pairwise.sources.0: 'gpt2' is not one of sources" in capsys.readouterr().err
    path.write_text(text + SECTIONS.format(pairs="[nobody]"))
    assert main(["pairwise", str(path)]) != 0
    assert "pairwise.sources.0: 'nobody' is not one of models" in capsys.readouterr().err


def test_plan_counts_each_pair_s_fused_shards_and_model(three, tmp_path):
    from fusellm.plan.check import compare, written
    from fusellm.plan.runner import Settings, build
    from fusellm.recipe import load_recipe

    path, text = three
    path.write_text(text + SECTIONS.format(pairs="[neox, gpt2]"))
    over = ["sources=[llama,neox,gpt2]"]
    stages = "corpus,extract,align,pairwise"
    assert main(["run", str(path), "--stages", stages, *over]) == 0
    run = tmp_path / "run"
    res = compare(build(load_recipe(str(path), over), Settings(1, None, None, [str(path)])), run)
    pairs = {f"pairwise/{s}/{x}" for s in ("neox", "gpt2") for x in ("fuse", "train/model")}
    assert pairs <= set(res["disk"]) and set(res["disk"]) == set(written(run))
    bad = {k: v for k, v in res["disk"].items() if not v["ok"]}
    assert bad == {}
