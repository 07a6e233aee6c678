"""W&B tracking runs offline under run_dir without a key and never writes secrets."""

from __future__ import annotations

from fusellm.recipe import load_recipe
from fusellm.tracking import resolve_mode, start_run


def test_auto_mode(monkeypatch):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    assert resolve_mode("auto") == "offline"
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    assert resolve_mode("auto") == "online"
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert resolve_mode("auto") == "disabled"
    assert resolve_mode("offline") == "offline"


def test_offline_run_under_run_dir_without_secrets(tiny_recipe, monkeypatch, tmp_path):
    secret = "sekrit-" + "9" * 33
    monkeypatch.setenv("WANDB_API_KEY", secret)
    monkeypatch.setenv("HF_TOKEN", "hf_" + "7" * 30)
    r = load_recipe(tiny_recipe, ["tracking.mode=offline"])
    config = {"note": f"token {secret}", "hf": {"token": "abc"}, "lr": 1e-5}
    with start_run(r, "corpus", config) as t:
        t.log({"loss": 1.5}, step=1)
        t.log_table("tbl", ["a", "b"], [[1, 2]])
        t.summary({"docs": 3})
    run_dir = tmp_path / "run"
    runs = list((run_dir / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and any(runs[0].rglob("*.wandb"))
    assert (run_dir / "corpus" / "metrics.jsonl").read_text().count("\n") == 2
    for f in run_dir.rglob("*"):
        if f.is_file():
            data = f.read_bytes()
            assert secret.encode() not in data and b"hf_7777777" not in data, f


def test_backend_none_writes_only_local_metrics(tiny_recipe, tmp_path):
    r = load_recipe(tiny_recipe, ["tracking.backend=none"])
    with start_run(r, "corpus", {}) as t:
        t.log({"x": 1})
    assert not (tmp_path / "run" / "wandb").exists()
    assert (tmp_path / "run" / "corpus" / "metrics.jsonl").exists()
