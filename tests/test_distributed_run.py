"""`fusellm run` under torchrun: every stage of a recipe on 2 CPU processes (gloo)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

SECTIONS = """align: {vocab_method: min_ed}
fuse: {method: min_ce}
train:
  lm_weight: 0.5
  block_size: 48
  per_device_train_batch_size: 2
  learning_rate: 1.0e-3
  max_steps: 2
  logging_steps: 1
  save_steps: 2
  use_cpu: true
bench: {models: [clm_only, fused], tasks: [lm], bootstrap: 100}
"""
TWO = ["extract.models=[llama_bpe,neox_unigram]", "sources=[llama_bpe,neox_unigram]"]


def _shard_shas(run) -> dict[str, str]:
    out = {}
    for stage in ("extract/llama_bpe", "extract/neox_unigram", "align/neox_unigram", "fuse"):
        man = json.loads((run / stage / "manifest.json").read_text())
        assert man["complete"], stage
        out.update({f"{stage}/{k}": v["sha256"] for k, v in man["files"].items()})
    return out


@pytest.mark.distributed
def test_fusellm_run_on_two_processes_equals_one(ext_recipe, tmp_path):
    """torchrun --nproc_per_node 2 -m fusellm.cli run: no rank starts a stage before every
    rank finished the previous one (a rank reading an incomplete manifest would exit 2),
    rank 0 alone reads the corpus and builds the vocabulary map, and every sharded output
    is byte-identical to a one-process run of the same recipe."""
    from conftest import torchrun

    ext_recipe.write_text(ext_recipe.read_text() + SECTIONS)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # the same kernels in both runs
    one = tmp_path / "one"
    cmd = [sys.executable, "-m", "fusellm.cli", "run", "--stages", "corpus,extract,align,fuse"]
    r = subprocess.run(
        [*cmd, str(ext_recipe), *TWO, f"run_dir={one}", "tracking.backend=none"],
        env=env,
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    two = tmp_path / "two"
    r = torchrun(
        "-m",
        "fusellm.cli",
        "run",
        str(ext_recipe),
        *TWO,
        f"run_dir={two}",
        "tracking.backend=wandb",
        "tracking.mode=offline",
        env=env,
        timeout=600,
    )
    assert r.returncode == 0, r.stderr[-4000:]
    assert _shard_shas(two) == _shard_shas(one)
    # one vocabulary map, built by rank 0 (a log line per build)
    assert r.stderr.count("min_ed vocabulary map") == 1, r.stderr[-4000:]
    for stage in ("corpus", "train", "clm_only", "bench"):
        assert json.loads((two / stage / "manifest.json").read_text())["complete"], stage
    # both ranks trained: a step saw both ranks' blocks (2 processes × 2 per device)
    state = json.loads((two / "train/checkpoints/checkpoint-2/trainer_state.json").read_text())
    assert state["global_step"] == 2 and state["train_batch_size"] == 2
    # one W&B run per stage and model, from rank 0 only: corpus, 2 extract, align, fuse,
    # train, clm_only, bench
    assert len(list((two / "wandb").glob("offline-run-*"))) == 8
