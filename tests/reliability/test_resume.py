"""Kill −9 at a random write of each long stage, then rerun: the outputs equal an
uninterrupted run byte for byte, no temp file remains, finished work is kept. A rerun of a
finished pipeline recomputes nothing."""

from __future__ import annotations

import json
import os
import random
import time

import pytest
from pipeline import (
    STAGES,
    copy_upstream,
    manifests,
    reference,
    run_cli,
    same_outputs,
    stamps,
    temp_files,
)

from fusellm.cli import main

__all__ = ["reference"]  # a fixture

pytest.importorskip("cma")

# CI runs one fixed kill point per stage; FUSELLM_KILL_SEED=<n> draws others.
SEED = int(os.environ.get("FUSELLM_KILL_SEED", "0"))
LONG_STAGES = ["extract", "align", "fuse", "train", "evolve", "bench"]


BOOKKEEPING = {"fingerprint.json"}  # rewritten (same content) whenever a stage starts


def finished(stage_dir, rel: str) -> bool:
    """Whether ``rel`` is a unit of work that counts as done on its own: a shard with its
    sidecar (written after it), a file of a checkpoint with its completion marker, a
    cached bench score. Anything else (a saved model, tables) counts only once the
    stage's manifest is written, so a rerun may write it again."""
    p = stage_dir / rel
    if p.name.startswith("shard-") and p.suffix == ".safetensors":
        return p.with_name(p.name + ".json").exists()
    parts = rel.split("/")
    if "checkpoints" in parts:
        ckpt = stage_dir.joinpath(*parts[: parts.index("checkpoints") + 2])
        return (ckpt / "fusellm-complete.json").exists()
    return stage_dir.name == "bench" and rel.startswith("cache/")


@pytest.mark.parametrize("stage", LONG_STAGES)
def test_sigkill_at_a_random_write_then_rerun_equals_an_uninterrupted_run(
    reference, tmp_path, caplog, stage
):
    recipe, ref, counts = reference
    assert counts[stage] >= 3, counts
    kill_at = random.Random(f"{SEED}:{stage}").randint(1, counts[stage])
    run = tmp_path / "run"
    copy_upstream(ref, run, stage)
    args = [stage, str(recipe), f"run_dir={run}"]
    p = run_cli(args, kill_at, run / stage)
    assert p.returncode == -9, (kill_at, p.stdout[-2000:], p.stderr[-3000:])
    assert manifests(run / stage) == {} or stage == "extract"  # not complete (one model may be)
    # what was finished before the kill, byte-equal to the uninterrupted run's file
    done = {
        rel: st
        for rel, st in stamps(run / stage).items()
        if ".tmp-" not in rel
        and rel.rsplit("/", 1)[-1] not in BOOKKEEPING
        and finished(run / stage, rel)
        and (ref / stage / rel).is_file()
        and (ref / stage / rel).read_bytes() == (run / stage / rel).read_bytes()
    }
    # finished work that lives inside a file: generations of the search, training steps
    search = run / stage / "search.json"
    gens = len(json.loads(search.read_text())["generations"]) if search.exists() else 0
    ckpts = sorted(
        run.glob("train/checkpoints/checkpoint-*/fusellm-complete.json"),
        key=lambda m: int(m.parent.name.split("-")[1]),
    )
    with caplog.at_level("INFO"):
        assert main(args) == 0
    if gens:
        assert f"search: resumed after generation {gens} " in caplog.text
    if stage == "train" and ckpts:
        assert f"train: resuming from {ckpts[-1].parent}" in caplog.text
    assert temp_files(run) == []
    assert same_outputs(run / stage, ref / stage, {str(ref): str(run)}), kill_at
    after = stamps(run / stage)
    rewritten = [rel for rel, st in done.items() if after.get(rel) != st]
    assert rewritten == [], f"finished work redone after a kill at write {kill_at}: {rewritten}"
    print(f"{stage}: killed at write {kill_at}/{counts[stage]}, {len(done)} finished file(s) kept")


def test_rerun_of_a_finished_pipeline_recomputes_nothing(reference, monkeypatch, caplog):
    recipe, run, _ = reference
    before = stamps(run)

    def no_model(*a, **k):
        raise AssertionError("a finished pipeline loaded a model")

    import fusellm.models

    monkeypatch.setattr(fusellm.models, "load_model", no_model)
    for mod in ("extract", "align", "fuse", "train", "merge", "bench"):
        m = __import__(f"fusellm.{mod}.runner", fromlist=["x"])
        if hasattr(m, "load_model"):
            monkeypatch.setattr(m, "load_model", no_model)
    t0 = time.time()
    with caplog.at_level("INFO"):
        assert main(["run", str(recipe)]) == 0
    print(f"rerun of the finished pipeline: {time.time() - t0:.1f}s")
    assert stamps(run) == before
    for s in STAGES:
        assert f"== stage {s}\n" in caplog.text
