"""A tiny whole pipeline (corpus → extract → align → fuse → train → evolve → bench) and the
tools the reliability tests share: a reference run, copies of it, a subprocess that is
killed with SIGKILL at a chosen write, and file snapshots."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import ADVERSARIAL, TEXT, write_recipe

from fusellm.cli import main

# pipeline order; each stage's output directory under run_dir
STAGES = ["corpus", "extract", "align", "fuse", "train", "evolve", "bench"]


def make_recipe(
    root: Path, tiny_models: dict[str, Path], tracking: str = "{backend: none}"
) -> Path:
    """Two tiny models of different families and tokenizers; every long stage configured."""
    data = root / "data.jsonl"
    docs = [t * (1 + i % 3) for i, t in enumerate(TEXT[:24])] + [
        a for a in ADVERSARIAL if a.strip()
    ]
    with open(data, "w", encoding="utf-8") as f:
        for i, t in enumerate(docs):
            f.write(json.dumps({"id": f"d{i}", "text": t}) + "\n")
    body = f"""
name: rel
run_dir: {root / "run"}
models:
  llama: {{path: {tiny_models["llama_bpe"]}}}
  neox: {{path: {tiny_models["neox_unigram"]}}}
target: llama
sources: [llama, neox]
tracking: {tracking}
corpus:
  inputs: [{{path: {data}, id_field: id}}]
  valid_fraction: 0.15
  test_fraction: 0.15
  block_size: 48
extract: {{top_k: 8, docs_per_shard: 4, batch_tokens: 128, max_batch_size: 4}}
align: {{}}
fuse: {{method: min_ce}}
train:
  lm_weight: 0.5
  block_size: 48
  per_device_train_batch_size: 2
  learning_rate: 1.0e-3
  max_steps: 6
  logging_steps: 1
  save_steps: 2
  use_cpu: true
evolve:
  method: linear
  models: [target, fused]
  generations: 3
  popsize: 3
  max_docs: 4
bench:
  models: [target, fused, evolve]
  tasks: [lm]
  bootstrap: 100
"""
    return write_recipe(root / "rel.yaml", body)


def files(root: Path, skip_volatile: bool = True) -> dict[str, bytes]:
    """Every file under ``root`` by relative path → bytes (logs and W&B left out)."""
    out = {}
    for p in sorted(root.rglob("*")):
        if not p.is_file():
            continue
        rel = p.relative_to(root).as_posix()
        if skip_volatile and (rel.startswith("wandb/") or p.name == "metrics.jsonl"):
            continue
        out[rel] = p.read_bytes()
    return out


def stamps(root: Path) -> dict[str, tuple[int, int]]:
    """(mtime_ns, size) of every file under ``root``: what a rerun must not touch."""
    return {
        p.relative_to(root).as_posix(): (p.stat().st_mtime_ns, p.stat().st_size)
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def temp_files(root: Path) -> list[Path]:
    return [p for p in root.rglob("*.tmp-*")]


def outputs(stage_dir: Path) -> dict:
    """What a stage produced, as its manifest records it (sha256 per file)."""
    return json.loads((stage_dir / "manifest.json").read_text())["files"]


def copy_upstream(ref_run: Path, dst_run: Path, stage: str) -> None:
    """``dst_run`` = the reference run with ``stage`` and every later stage removed (and
    its W&B runs, which belong to the reference)."""
    shutil.copytree(ref_run, dst_run)
    for s in [*STAGES[STAGES.index(stage) :], "wandb"]:
        shutil.rmtree(dst_run / s, ignore_errors=True)


# Runs the CLI and SIGKILLs itself at the KILL_AT-th write event in KILL_DIR: an atomic
# rename (temp file written, not yet renamed) or a torch.save (a checkpoint mid-save).
# KILL_AT=0 only counts the events and prints the count.
KILLER = r"""
import os, signal, sys
kill_at, kill_dir = int(os.environ["KILL_AT"]), os.environ["KILL_DIR"]
n = 0
def event(dst):
    global n
    if str(dst).startswith(kill_dir):
        n += 1
        if n == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
real_replace = os.replace
def replace(src, dst, *a, **k):
    event(dst)
    return real_replace(src, dst, *a, **k)
os.replace = replace
import torch
real_save = torch.save
def save(obj, f, *a, **k):
    event(f)
    return real_save(obj, f, *a, **k)
torch.save = save
from fusellm.cli import main
rc = main(sys.argv[1:])
print(f"WRITE_EVENTS={n}")
sys.exit(rc)
"""


def run_cli(args: list[str], kill_at: int, kill_dir: Path, **kw) -> subprocess.CompletedProcess:
    env = {**os.environ, "KILL_AT": str(kill_at), "KILL_DIR": str(kill_dir)}
    return subprocess.run(
        [sys.executable, "-c", KILLER, *args], env=env, capture_output=True, text=True, **kw
    )


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_models):
    """An uninterrupted run of the whole pipeline, and how many write events (atomic
    renames, torch.save calls) each stage made: the points a kill may hit."""
    root = tmp_path_factory.mktemp("reference")
    recipe = make_recipe(root, tiny_models)
    run = root / "run"
    events: list[str] = []
    real_replace, real_save = os.replace, torch.save

    def replace(src, dst, *a, **k):
        events.append(str(dst))
        return real_replace(src, dst, *a, **k)

    def save(obj, f, *a, **k):
        events.append(str(f))
        return real_save(obj, f, *a, **k)

    mp = pytest.MonkeyPatch()
    mp.setattr(os, "replace", replace)
    mp.setattr(torch, "save", save)
    try:
        assert main(["run", str(recipe)]) == 0
    finally:
        mp.undo()
    counts = {s: sum(e.startswith(str(run / s) + "/") for e in events) for s in STAGES}
    return recipe, run, counts


def manifests(stage_dir) -> dict[str, dict]:
    """Every manifest's file records (sha256 per output file) under a stage directory."""
    import json

    return {
        m.relative_to(stage_dir).as_posix(): json.loads(m.read_text())["files"]
        for m in sorted(stage_dir.rglob("manifest.json"))
    }


def same_outputs(got, want, paths: dict[str, str]) -> bool:
    """Every output that ``want``'s manifests list exists in ``got`` with the same bytes
    (absolute paths of the other run directory, e.g. in mergekit.yaml, mapped)."""
    assert manifests(got).keys() == manifests(want).keys()
    differ = []
    for m, recs in manifests(want).items():
        for rel in recs:
            f = (want / m).parent / rel
            exp = f.read_bytes()
            for a, b in paths.items():
                exp = exp.replace(a.encode(), b.encode())
            if (got / f.relative_to(want)).read_bytes() != exp:
                differ.append(f.relative_to(want).as_posix())
    assert differ == [], f"outputs differ from the uninterrupted run: {differ}"
    return True
