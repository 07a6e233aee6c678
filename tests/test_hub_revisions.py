"""Hub ids are pinned to a commit: resolved once per process from the local HF cache
(offline), recorded as ``hub:org/name@<sha>``, loaded at that commit, and a moved branch
is drift that stages refuse. The cache is a real huggingface_hub layout built here."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from conftest import TEXT, hub_snapshot, move_ref, write_recipe

from fusellm.models import (
    ModelLoadError,
    load_model,
    load_tokenizer,
    locate,
    spec_max_positions,
)
from fusellm.recipe import ModelSpec

REPO = "org/tiny"
SHA_A = "a" * 40
SHA_B = "b" * 40


def _weights(model) -> torch.Tensor:
    return model.get_input_embeddings().weight.detach().clone()


@pytest.fixture()
def two_commits(tmp_path, hf_cache, tiny_models) -> dict[str, torch.Tensor]:
    """``org/tiny`` cached at two commits with the same tokenizer and different weights:
    A is ``main``, B is tag ``v1``. Returns each commit's input embedding."""
    from transformers import AutoModelForCausalLM

    src = tiny_models["llama_bpe"]
    b = tmp_path / "commit-b"
    model = AutoModelForCausalLM.from_pretrained(src)
    with torch.no_grad():
        model.get_input_embeddings().weight.add_(1.0)
    model.save_pretrained(b)
    for f in src.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens")):
            shutil.copy(f, b / f.name)
    hub_snapshot(hf_cache, REPO, SHA_A, src, refs=("main",))
    hub_snapshot(hf_cache, REPO, SHA_B, b, refs=("v1",))
    a = _weights(AutoModelForCausalLM.from_pretrained(src))
    return {SHA_A: a, SHA_B: _weights(model)}


def test_transformers_loads_the_built_cache_offline(two_commits):
    """The layout is one transformers really reads: offline, by branch, tag and sha."""
    from transformers import AutoModelForCausalLM

    for rev, sha in (("main", SHA_A), ("v1", SHA_B), (SHA_A, SHA_A)):
        m = AutoModelForCausalLM.from_pretrained(REPO, revision=rev)
        assert torch.equal(_weights(m), two_commits[sha])


def test_branch_is_pinned_to_its_commit_for_the_whole_process(two_commits, hf_cache):
    spec = ModelSpec(path=REPO)
    loc = locate(spec, "tiny")
    assert loc.kind == "hub" and loc.identity == f"hub:{REPO}@{SHA_A}" and loc.revision == SHA_A
    assert torch.equal(_weights(load_model(spec, "tiny")), two_commits[SHA_A])
    # main moves mid-run: this process keeps loading the commit it resolved first
    move_ref(hf_cache, REPO, "main", SHA_B)
    assert locate(spec, "tiny").identity == f"hub:{REPO}@{SHA_A}"
    assert torch.equal(_weights(load_model(spec, "tiny")), two_commits[SHA_A])
    assert load_tokenizer(spec, "tiny").is_fast
    assert spec_max_positions(spec, "tiny") == (512, "max_position_embeddings")


def test_revision_may_be_a_tag_or_a_commit(two_commits):
    from fusellm.merge.runner import mergekit_location

    for rev, sha in (("v1", SHA_B), (SHA_A, SHA_A), (SHA_B, SHA_B)):
        spec = ModelSpec(path=REPO, revision=rev)
        assert locate(spec, "tiny").identity == f"hub:{REPO}@{sha}"
        assert torch.equal(_weights(load_model(spec, "tiny")), two_commits[sha])
        assert mergekit_location(spec, "tiny") == f"{REPO}@{sha}"  # what mergekit.yaml records


def test_revision_not_in_the_cache_names_the_model(two_commits):
    with pytest.raises(ModelLoadError) as e:
        locate(ModelSpec(path=REPO, revision="v2"), "tiny")
    msg = str(e.value)
    assert "model 'tiny'" in msg and "revision 'v2'" in msg and REPO in msg
    assert "HF_HUB_OFFLINE" in msg and "--revision v2" in msg and "models.tiny.path" in msg
    # a commit that was never downloaded: known by its sha, refused when loaded
    spec = ModelSpec(path=REPO, revision="c" * 40)
    with pytest.raises(ModelLoadError, match=r"model 'tiny'.*org/tiny"):
        load_model(spec, "tiny")


def test_moved_branch_is_refused_on_rerun(tmp_path, two_commits, hf_cache):
    """A multi-day run resumed after ``main`` moved: the new process resolves the new
    commit, so the model's identity (hence extract's fingerprint) differs and the stage
    refuses to mix shards of two commits."""
    data = tmp_path / "data.jsonl"
    data.write_text(
        "".join(json.dumps({"id": f"d{i}", "text": t}) + "\n" for i, t in enumerate(TEXT[:24]))
    )
    recipe = write_recipe(
        tmp_path / "hub.yaml",
        f"""
name: hub
run_dir: {tmp_path / "run"}
models:
  tiny: {{path: {REPO}}}
target: tiny
sources: [tiny]
tracking: {{backend: none}}
corpus:
  inputs: [{{path: {data}, id_field: id}}]
  valid_fraction: 0.1
  test_fraction: 0.1
  block_size: 48
extract: {{top_k: 5, docs_per_shard: 8}}
""",
    )
    env = {**os.environ, "HF_HUB_CACHE": str(hf_cache), "HF_HUB_OFFLINE": "1"}

    def cli(*args: str) -> subprocess.CompletedProcess:
        cmd = [sys.executable, "-m", "fusellm.cli", *args, str(recipe)]
        return subprocess.run(cmd, env=env, capture_output=True, text=True)

    p = cli("run", "--stages", "corpus,extract")
    assert p.returncode == 0, p.stderr[-3000:]
    fp = json.loads((tmp_path / "run/extract/tiny/fingerprint.json").read_text())
    assert fp["model"] == f"hub:{REPO}@{SHA_A}"
    move_ref(hf_cache, REPO, "main", SHA_B)
    p = cli("extract")
    assert p.returncode == 2, p.stderr[-3000:]
    assert "differs: model" in p.stderr and "extract[tiny]" in p.stderr
