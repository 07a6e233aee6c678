"""The real CLI: help texts, errors and exit codes, show and verify."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from fusellm.cli import main
from fusellm.stages import STAGES


def cli(*args, env=None):
    return subprocess.run(
        [sys.executable, "-m", "fusellm.cli", *args], capture_output=True, text=True, env=env
    )


def test_help_lists_every_stage():
    r = cli("--help")
    assert r.returncode == 0
    for name in ["run", "show", "verify", *STAGES]:
        assert name in r.stdout


@pytest.mark.parametrize("stage", list(STAGES))
def test_each_stage_has_help(stage):
    r = cli(stage, "--help")
    assert r.returncode == 0 and STAGES[stage].help.split()[0] in r.stdout


def test_bad_recipe_exits_2_with_key(tiny_recipe, capsys):
    assert main(["corpus", str(tiny_recipe), "corpus.block_size=wide"]) == 2
    assert "corpus.block_size" in capsys.readouterr().err


def test_show_prints_resolved_recipe(tiny_recipe, capsys):
    assert main(["show", str(tiny_recipe), "corpus.block_size=64"]) == 0
    assert "block_size: 64" in capsys.readouterr().out


def test_shown_recipes_load_again_unchanged(tmp_path):
    """`show` output is itself a valid recipe (aliases such as merge's `lambda` kept)."""
    from fusellm.recipe import load_recipe

    root = Path(__file__).parent.parent / "recipes"
    for name in ("quickstart.yaml", "fusion-vs-merge.yaml", "fusellm-7b.yaml"):
        # a fresh process, where first imports print (transformers announces W&B offline)
        r = cli("show", str(root / name), env={**os.environ, "WANDB_MODE": "offline"})
        assert r.returncode == 0, r.stderr
        shown = tmp_path / name
        shown.write_text(r.stdout)
        assert load_recipe(shown) == load_recipe(root / name)


def test_verify_reports_altered_file(tiny_recipe, tmp_path, capsys):
    assert main(["corpus", str(tiny_recipe), "tracking.backend=none"]) == 0
    assert main(["verify", str(tmp_path / "run")]) == 0
    f = tmp_path / "run" / "corpus" / "train.jsonl"
    f.write_text(f.read_text() + "tampered\n")
    assert main(["verify", str(tmp_path / "run")]) == 1
    out = capsys.readouterr().out
    assert "train.jsonl: sha256" in out and "!= expected" in out


def test_unknown_stage_in_stages(tiny_recipe, capsys):
    assert main(["run", str(tiny_recipe), "--stages", "corpus,fusion"]) == 2
    assert "unknown stage(s) ['fusion']" in capsys.readouterr().err


def test_a_launchers_local_rank_argument_is_ignored(tiny_recipe):
    """The deepspeed launcher (without --no_local_rank) appends --local_rank=N; the rank is
    in LOCAL_RANK too. The CLI refused it as an unknown argument."""
    assert main(["corpus", str(tiny_recipe), "tracking.backend=none", "--local_rank=0"]) == 0
    assert main(["show", "--local_rank", "1", str(tiny_recipe)]) == 0
