"""Inputs that change after a partial run are refused, naming the manifest field that
differs; ``--force`` recomputes with the new inputs."""

from __future__ import annotations

import json
import shutil

import pytest
from pipeline import make_recipe, run_cli, temp_files

from fusellm.cli import main


def _corpus_file(root, recipe):
    with open(root / "data.jsonl", "a", encoding="utf-8") as f:
        f.write(json.dumps({"id": "new", "text": "A document added after the run."}) + "\n")
    return []


def _model_weights(root, recipe):
    from safetensors.torch import load_file, save_file

    f = root / "models/neox_unigram/model.safetensors"
    sd = load_file(f)
    k = next(iter(sd))
    sd[k] = sd[k] + 0.01
    save_file(sd, f, metadata={"format": "pt"})
    return []


def _tokenizer(root, recipe):
    from transformers import AutoTokenizer

    d = root / "models/neox_unigram"
    tok = AutoTokenizer.from_pretrained(d)
    tok.add_tokens(["fusion"])
    tok.save_pretrained(d)
    return []


# (what changes, the stage killed part way, the kill point, where the refusal comes from,
#  the field it must name, the change)
DRIFT = [
    ("corpus file", "extract", 10, "corpus", "inputs.inputs.0", _corpus_file),
    ("model weights", "extract", 30, "extract[neox]", "model", _model_weights),
    ("tokenizer", "extract", 10, "corpus", "tokenizers.neox", _tokenizer),
    ("top-k", "extract", 10, "extract[llama]", "config.top_k", lambda r, c: ["extract.top_k=6"]),
    ("fusion method", "fuse", 8, "fuse", "config.method", lambda r, c: ["fuse.method=avg_ce"]),
]


@pytest.mark.parametrize(
    "what,stage,kill_at,refuser,field,change", DRIFT, ids=[d[0] for d in DRIFT]
)
def test_changed_input_after_a_partial_run_is_refused_then_forced(
    tmp_path, tiny_models, capsys, what, stage, kill_at, refuser, field, change
):
    models = {}
    for name in ("llama_bpe", "neox_unigram"):  # private copies: this test changes them
        models[name] = tmp_path / "models" / name
        shutil.copytree(tiny_models[name], models[name])
    recipe = make_recipe(tmp_path, models)
    run = tmp_path / "run"
    upstream = {"extract": "corpus", "fuse": "corpus,extract,align"}[stage]
    assert main(["run", str(recipe), "--stages", upstream]) == 0
    p = run_cli([stage, str(recipe)], kill_at, run / stage)
    assert p.returncode == -9, p.stderr[-3000:]
    partial = sorted(run.rglob("shard-*.safetensors"))

    overrides = change(tmp_path, recipe)
    stages = ["--stages", f"{upstream},{stage}"]
    capsys.readouterr()
    assert main(["run", str(recipe), *stages, *overrides]) == 2
    err = capsys.readouterr().err
    assert f"fusellm: error: {refuser}: " in err and f"(differs: {field}" in err, err
    assert "--force" in err
    assert sorted(run.rglob("shard-*.safetensors")) == partial  # nothing was deleted

    assert main(["run", str(recipe), *stages, *overrides, "--force"]) == 0
    assert temp_files(run) == []
    man = json.loads(next((run / stage).rglob("manifest.json")).read_text())
    assert man["complete"]
    if what == "top-k":
        from fusellm.shards import read_shard

        docs, _ = read_shard(next((run / "extract/llama/train").glob("shard-*.safetensors")))
        assert docs[0].topk_ids.shape[1] == 6
    if what == "fusion method":
        assert man["config"]["method"] == "avg_ce"
