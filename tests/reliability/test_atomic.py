"""Every artifact is written to a temp name in its directory and renamed; a stage's
completion marker (manifest.json) is the last thing it writes. Proved by watching every
file write of a whole pipeline run through Python's audit hooks."""

from __future__ import annotations

import os
import sys

import pytest
from pipeline import make_recipe

from fusellm.cli import main

pytest.importorskip("cma")

_events: list[tuple[str, str]] | None = None


def _hook(event: str, args: tuple) -> None:
    if _events is None:
        return
    if event == "open":
        path, mode, flags = args
        writing = (isinstance(mode, str) and any(c in mode for c in "wax+")) or (
            mode is None
            and isinstance(flags, int)
            and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND)
        )
        if writing and isinstance(path, (str, os.PathLike)):
            _events.append(("write", os.fspath(path)))
    elif event == "os.rename":
        _events.append(("rename", os.fspath(args[1])))


# Written in place on purpose, each made whole by a marker written after it (checkpoint:
# fusellm-complete.json; the trained model: the stage's manifest), or a log.
IN_PLACE = ("train/checkpoints/checkpoint-", "train/model/", "wandb/")
LOGS = ("metrics.jsonl", "usage.jsonl")


def _native(real):
    def save(obj, f, *a, **k):
        if _events is not None and isinstance(f, (str, os.PathLike)):
            _events.append(("write", os.fspath(f)))
        return real(obj, f, *a, **k)

    return save


@pytest.fixture()
def writes(tmp_path, tiny_models, monkeypatch):
    global _events
    import safetensors.torch
    import torch
    import transformers.modeling_utils

    if not getattr(sys, "_fusellm_audit", False):  # audit hooks cannot be removed
        sys.addaudithook(_hook)
        sys._fusellm_audit = True
    monkeypatch.setattr(torch, "save", _native(torch.save))
    st_save = _native(safetensors.torch.save_file)
    monkeypatch.setattr(safetensors.torch, "save_file", st_save)
    monkeypatch.setattr(transformers.modeling_utils, "safe_save_file", st_save)
    recipe = make_recipe(tmp_path, tiny_models)
    _events = []
    try:
        assert main(["run", str(recipe)]) == 0
        yield tmp_path / "run", list(_events)
    finally:
        _events = None


def test_every_artifact_is_renamed_into_place_and_the_manifest_comes_last(writes):
    run, events = writes
    root = str(run) + "/"
    ours = [(kind, p[len(root) :]) for kind, p in events if p.startswith(root)]
    assert any(kind == "rename" for kind, _ in ours)
    assert any(p.endswith("model.safetensors") for _, p in ours)  # native writes are seen
    assert any(p.endswith("optimizer.pt") for _, p in ours)
    direct = sorted(
        {
            p
            for kind, p in ours
            if kind == "write"
            and ".tmp-" not in p
            and not p.startswith(IN_PLACE)
            and not p.endswith(LOGS)
        }
    )
    assert direct == [], f"written in place, not via a temp name + rename: {direct}"
    # per stage output directory (extract and align have one per model): nothing is
    # written there after its manifest
    manifests = [p for kind, p in ours if kind == "rename" and p.endswith("/manifest.json")]
    assert {m.split("/")[0] for m in manifests} >= {
        "corpus",
        "extract",
        "align",
        "fuse",
        "train",
        "evolve",
        "bench",
    }
    for m in manifests:
        d = m.rsplit("/", 1)[0] + "/"
        last = max(i for i, (_, p) in enumerate(ours) if p == m)
        later = [p for _, p in ours[last + 1 :] if p.startswith(d) and not p.endswith(LOGS)]
        assert later == [], f"written after {m}: {later}"
