"""Recipe loading: every shipped recipe validates; bad keys/types/values name the key path."""

from __future__ import annotations

from pathlib import Path

import pytest

from fusellm.recipe import RecipeError, config_hash, load_recipe, redact

RECIPES = sorted((Path(__file__).parent.parent / "recipes").glob("*.yaml"))

BASE = """
name: t
run_dir: /tmp/run
models:
  a: {path: /models/a}
  b: {path: org/b}
target: a
sources: [a, b]
corpus:
  inputs: [{path: data.jsonl}]
  block_size: 128
"""


def load_text(tmp_path: Path, text: str, overrides=()):
    p = tmp_path / "r.yaml"
    p.write_text(text)
    return load_recipe(p, overrides)


@pytest.mark.parametrize("path", RECIPES, ids=[p.name for p in RECIPES])
def test_every_shipped_recipe_loads(path):
    r = load_recipe(path)
    assert r.target in r.models and r.sources


def test_shipped_recipes_exist():
    names = {p.name for p in RECIPES}
    assert {"quickstart.yaml", "fusellm-7b.yaml"} <= names


def test_paper_recipe_settings():
    r = load_recipe(Path(__file__).parent.parent / "recipes" / "fusellm-7b.yaml")
    assert r.target == "llama2" and len(r.sources) == 3
    assert r.corpus.block_size == 2048
    assert r.train["lm_weight"] == 0.9 and r.train["learning_rate"] == 1e-5
    assert r.extract.top_k == 10
    # every difference in the bench table is from CLM-only; the paper's tasks by lm-eval name
    assert r.bench.models[:3] == ["clm_only", "target", "fused"]
    assert {"lm", "harness:bbh", "harness:arc_challenge", "harness:hellaswag"} <= set(r.bench.tasks)


def test_valid_recipe_and_defaults(tmp_path):
    r = load_text(tmp_path, BASE)
    assert r.all_models == ["a", "b"]
    assert r.corpus.on_error == "error" and r.tracking.mode == "auto"


def test_unknown_key_names_path_and_file(tmp_path):
    with pytest.raises(RecipeError) as e:
        load_text(tmp_path, BASE.replace("block_size: 128", "block_size: 128\n  blok_size: 3"))
    msg = str(e.value)
    assert "r.yaml" in msg and "corpus.blok_size" in msg and "unknown key" in msg


def test_unknown_nested_key_in_list(tmp_path):
    with pytest.raises(RecipeError, match=r"corpus\.inputs\.0\.txt_field: unknown key"):
        load_text(tmp_path, BASE.replace("{path: data.jsonl}", "{path: data.jsonl, txt_field: x}"))


def test_wrong_type_names_key(tmp_path):
    with pytest.raises(
        RecipeError, match=r"corpus\.block_size: Input should be a valid integer.*'128'"
    ):
        load_text(tmp_path, BASE.replace("block_size: 128", "block_size: '128'"))


def test_out_of_range_names_key(tmp_path):
    with pytest.raises(
        RecipeError, match=r"corpus\.block_size: Input should be greater than or equal to 16"
    ):
        load_text(tmp_path, BASE.replace("block_size: 128", "block_size: 4"))
    with pytest.raises(RecipeError, match=r"corpus: .*valid_fraction \+ test_fraction"):
        load_text(tmp_path, BASE + "  valid_fraction: 0.6\n  test_fraction: 0.5\n")


def test_literal_choice_error(tmp_path):
    with pytest.raises(RecipeError, match=r"corpus\.on_error: Input should be 'error' or 'skip'"):
        load_text(tmp_path, BASE + "  on_error: ignore\n")


def test_unknown_model_reference(tmp_path):
    with pytest.raises(RecipeError, match=r"sources\.1: 'c' is not one of models \['a', 'b'\]"):
        load_text(tmp_path, BASE.replace("sources: [a, b]", "sources: [a, c]"))
    with pytest.raises(RecipeError, match=r"target: 'z'"):
        load_text(tmp_path, BASE.replace("target: a", "target: z"))


def test_overrides_apply_and_are_typed(tmp_path):
    r = load_text(
        tmp_path,
        BASE,
        ["corpus.block_size=512", "seed=7", "sources=[b]", "corpus.inputs.0.domain=web"],
    )
    assert r.corpus.block_size == 512 and r.seed == 7 and r.sources == ["b"]
    assert r.corpus.inputs[0].domain == "web"


def test_override_unknown_key_says_override(tmp_path):
    with pytest.raises(RecipeError, match=r"corpus\.blocksize: unknown key.*command-line override"):
        load_text(tmp_path, BASE, ["corpus.blocksize=1"])
    with pytest.raises(RecipeError, match="expected key=value"):
        load_text(tmp_path, BASE, ["corpus.block_size"])


def test_interpolation_follows_overrides(tmp_path):
    text = BASE.replace("{path: data.jsonl}", "{path: '${run_dir}/data.jsonl'}")
    assert load_text(tmp_path, text).corpus.inputs[0].path == "/tmp/run/data.jsonl"
    r = load_text(tmp_path, text, ["run_dir=/scratch/x"])
    assert r.corpus.inputs[0].path == "/scratch/x/data.jsonl"


def test_interpolation_whole_value_keeps_type(tmp_path):
    r = load_text(tmp_path, BASE + "seed: ${corpus.block_size}\n")
    assert r.seed == 128


def test_interpolation_env_missing_and_cycle(tmp_path, monkeypatch):
    monkeypatch.setenv("FUSELLM_TEST_DIR", "/data")
    r = load_text(tmp_path, BASE.replace("/tmp/run", "${env:FUSELLM_TEST_DIR}/run"))
    assert r.run_dir == "/data/run"
    with pytest.raises(RecipeError, match=r"r\.yaml: \$\{nope\.x\}: no such key"):
        load_text(tmp_path, BASE.replace("/tmp/run", "${nope.x}"))
    with pytest.raises(RecipeError, match="circular"):
        load_text(
            tmp_path, BASE.replace("name: t", "name: ${run_dir}").replace("/tmp/run", "${name}")
        )
    monkeypatch.delenv("FUSELLM_UNSET_VAR", raising=False)
    with pytest.raises(RecipeError, match="FUSELLM_UNSET_VAR is not set"):
        load_text(tmp_path, BASE.replace("/tmp/run", "${env:FUSELLM_UNSET_VAR}"))


def test_scientific_floats_are_floats(tmp_path):
    r = load_text(tmp_path, BASE + "train: {learning_rate: 1e-5, weight_decay: 3e-2}\n")
    assert r.train["learning_rate"] == 1e-5 and isinstance(r.train["weight_decay"], float)


def test_train_section_checked_against_training_arguments(tmp_path):
    with pytest.raises(RecipeError, match=r"train\.warmup_ratio: unknown key"):
        load_text(tmp_path, BASE + "train: {warmup_ratio: 0.1}\n")
    with pytest.raises(RecipeError, match=r"lm_weight must be in \[0, 1\]"):
        load_text(tmp_path, BASE + "train: {lm_weight: 1.5}\n")
    with pytest.raises(RecipeError, match=r"train\.output_dir: set by fusellm"):
        load_text(tmp_path, BASE + "train: {output_dir: /x}\n")


def test_duplicate_keys_refused(tmp_path):
    with pytest.raises(RecipeError, match=r"r\.yaml:\d+: .*duplicate key 'seed'"):
        load_text(tmp_path, BASE + "seed: 1\nseed: 2\n")


def test_missing_file_and_non_mapping(tmp_path):
    with pytest.raises(RecipeError, match="cannot read recipe"):
        load_recipe(tmp_path / "nope.yaml")
    with pytest.raises(RecipeError, match="must be a YAML mapping"):
        load_text(tmp_path, "- a\n- b\n")


def test_redact_and_hash(monkeypatch):
    monkeypatch.setenv("WANDB_API_KEY", "sekrit-123")
    cfg = {"tracking": {"api_key": "abc"}, "note": "key is sekrit-123", "max_tokens": 5}
    red = redact(cfg)
    assert red["tracking"]["api_key"] == "<redacted>" and "sekrit" not in str(red)
    assert red["max_tokens"] == 5
    assert (
        config_hash({"a": 1, "b": 2})
        == config_hash({"b": 2, "a": 1})
        != config_hash({"a": 2, "b": 2})
    )


def test_deepspeed_config_with_scheduler_is_refused(tmp_path):
    import json

    good = Path(__file__).parent.parent / "recipes" / "deepspeed" / "zero2.json"
    for f in sorted(good.parent.glob("*.json")):  # the shipped configs carry neither block
        assert not {"scheduler", "optimizer"} & set(json.loads(f.read_text()))
    load_text(tmp_path, BASE + f"train: {{deepspeed: {good}}}\n")
    bad = tmp_path / "ds.json"
    bad.write_text(
        json.dumps({**json.loads(good.read_text()), "scheduler": {"type": "WarmupDecayLR"}})
    )
    with pytest.raises(
        RecipeError, match=r"train\.deepspeed: .*'scheduler' block.*lr_scheduler_type"
    ):
        load_text(tmp_path, BASE + f"train: {{deepspeed: {bad}}}\n")
    with pytest.raises(RecipeError, match=r"train\.deepspeed: no such file"):
        load_text(tmp_path, BASE + f"train: {{deepspeed: {tmp_path / 'nope.json'}}}\n")


def test_extends_merges_a_base_recipe_under_this_one(tmp_path):
    (tmp_path / "base.yaml").write_text(BASE + "align: {vocab_method: em, strict: true}\n")
    child = tmp_path / "child.yaml"
    child.write_text(
        "extends: base.yaml\nname: child\nalign: {vocab_method: min_ed}\nsources: [a]\n"
    )
    r = load_recipe(child, ["align.max_distance=3"])
    assert r.name == "child" and r.sources == ["a"]  # replaced
    assert r.align.vocab_method == "min_ed" and r.align.strict  # merged key by key
    assert r.align.max_distance == 3 and r.corpus.block_size == 128
    (tmp_path / "base.yaml").write_text(BASE.replace("name: t", "extends: child.yaml\nname: t"))
    with pytest.raises(RecipeError, match="cycle"):
        load_recipe(child)
    child.write_text("extends: nowhere.yaml\n")
    with pytest.raises(RecipeError, match="nowhere.yaml: cannot read recipe"):
        load_recipe(child)


def test_paper_variants_differ_from_their_recipe_only_in_the_papers_choices():
    root = Path(__file__).parent.parent / "recipes"
    for ours, paper in [
        ("fusellm-7b.yaml", "fusellm-7b-paper.yaml"),
        ("quickstart.yaml", "quickstart-paper.yaml"),
    ]:
        a, b = load_recipe(root / ours), load_recipe(root / paper)
        assert (b.align.vocab_method, b.align.seq_method, b.align.gold_span) == (
            "min_ed",
            "dp",
            False,
        )
        assert b.fuse.criterion == "ce_per_token" and b.train["packing"] == "stream"
        assert a.align.vocab_method == "next_token" and a.fuse.criterion == "nll_per_byte"
        assert a.models == b.models and a.corpus == b.corpus and a.extract == b.extract
