"""``fusellm plan``: its estimates against what real runs write and what autograd keeps."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import write_recipe
from reliability.pipeline import make_recipe

from fusellm.cli import main
from fusellm.plan import core
from fusellm.plan.check import compare, written
from fusellm.plan.runner import Settings, build
from fusellm.plan.shapes import model_config, shape_of
from fusellm.recipe import ModelSpec, load_recipe
from fusellm.shards import DocDist, encode_shard

USAGE = "usage.jsonl"  # written by fusellm.cli after each stage that did work

STAGES = "corpus,extract,align,fuse,train"


def _plan(recipe_path, run_dir) -> dict:
    over = [f"run_dir={run_dir}"]
    return build(
        load_recipe(str(recipe_path), over), Settings(1, None, None, [str(recipe_path), *over])
    )


def test_plan_of_the_tiny_pipeline_is_within_20_percent_of_what_it_wrote(tmp_path, tiny_models):
    recipe = make_recipe(tmp_path, tiny_models)
    run = tmp_path / "run"
    assert main(["run", str(recipe), "--stages", STAGES]) == 0
    # before anything ran (token counts from the input file) and with the run at hand
    for run_dir in (tmp_path / "empty", run):
        res = compare(_plan(recipe, run_dir), run)
        assert set(res["disk"]) == set(written(run)), run_dir
        assert {
            "corpus/train/valid/test.jsonl",
            "extract/llama",
            "extract/neox",
            "align/neox",
            "align/maps",
            "fuse/shards",
            "train/model",
            "train/checkpoints",
        } <= set(res["disk"])
        bad = {k: v for k, v in res["disk"].items() if not v["ok"]}
        assert bad == {}, (run_dir, bad)
    records = [json.loads(x) for x in (run / USAGE).read_text().splitlines()]
    assert [r["stage"] for r in records] == STAGES.split(",")
    assert all(r["rank"] == 0 and r["peak_rss_bytes"] > 0 and r["seconds"] >= 0 for r in records)
    # a rerun finds everything done: no stage did work, nothing is recorded
    assert main(["run", str(recipe), "--stages", STAGES]) == 0
    assert [json.loads(x) for x in (run / USAGE).read_text().splitlines()] == records


@pytest.mark.parametrize("kind", ["extract", "align", "fuse"])
@pytest.mark.parametrize("vocab", [320, 70_000])
def test_shard_bytes_are_the_format_s(kind, vocab):
    """The plan's shard arithmetic gives the size encode_shard writes, header included."""
    rng = np.random.default_rng(0)
    docs, k = [], 8
    for i in range(37):
        n = int(rng.integers(1, 60))
        extra = kind != "extract"
        docs.append(
            DocDist(
                f"doc-{i}:ü#{i % 3}",
                rng.integers(0, vocab, n).astype(np.int32),
                np.stack([np.arange(n), np.arange(n) + 3], 1).astype(np.int32),
                rng.integers(0, vocab, (n, k)).astype(np.int32),
                torch.randn(n, k).to(torch.float16),
                rng.random(n).astype(np.float32),
                np.ones(n, bool) if extra else None,
                0.5 if kind == "align" else None,
                rng.random(n).astype(np.float32) if kind == "align" else None,
                np.arange(n, dtype=np.int32) if kind == "align" else None,
            )
        )
    meta = {
        "extract": {"model": "m", "top_k": "8"},
        "align": {"source": "s", "target": "t", "top_k": "8"},
    }
    meta = meta.get(kind, {"level": "sequence", "method": "min_ce"})
    data = encode_shard(docs, vocab, meta)
    fmt = core.ShardFormat(kind, vocab, k, "float16", tuple(meta.items()))
    id_bytes = sum(core.id_header_bytes(d.doc_id) for d in docs) / len(docs)
    tokens = sum(len(d.input_ids) for d in docs)
    assert abs(fmt.stage_bytes(tokens, len(docs), len(docs), id_bytes) - len(data)) <= 16


def test_shapes_count_the_parameters_the_model_has(tiny_models):
    from transformers import AutoModelForCausalLM

    for path in tiny_models.values():
        cfg, where = model_config(ModelSpec(path=str(path)), "m")
        s = shape_of(cfg, where)
        model = AutoModelForCausalLM.from_pretrained(path)
        assert s.params == sum(p.numel() for p in model.parameters())
        assert s.vocab_rows == model.get_output_embeddings().weight.shape[0]
        assert s.tied == (
            model.get_output_embeddings().weight is model.get_input_embeddings().weight
        )


def test_the_paper_s_models_are_planned_from_their_bundled_configs_offline(hf_cache):
    # the published sizes: Llama-2-7B 6.74B parameters, MPT-7B 6.65B (tied embedding)
    for hub_id, params, rows in (
        ("meta-llama/Llama-2-7b-hf", 6_738_415_616, 32_000),
        ("openlm-research/open_llama_7b_v2", 6_738_415_616, 32_000),
        ("mosaicml/mpt-7b", 6_649_286_656, 50_432),
    ):
        cfg, where = model_config(ModelSpec(path=hub_id), "m")
        s = shape_of(cfg, where)
        assert where.startswith("bundled public config") and "hub unreachable" in where
        assert (s.params, s.vocab_rows, s.layers, s.hidden) == (params, rows, 32, 4096)


@pytest.mark.parametrize("mode", ["autocast", "bf16"])
def test_activation_formula_counts_what_autograd_keeps(mode):
    """The per-layer activation bytes against the tensors autograd saves in a Llama
    forward (fusellm trains float32 weights under bf16 autocast without DeepSpeed, bf16
    weights under DeepSpeed)."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    from fusellm.train.trainer import student_forward

    cfg = LlamaConfig(
        hidden_size=256,
        intermediate_size=688,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=512,
        tie_word_embeddings=True,
    )
    dtype = torch.float32 if mode == "autocast" else torch.bfloat16
    model = AutoModelForCausalLM.from_config(cfg, dtype=dtype).train()
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    w_shapes = {tuple(p.shape) for p in model.parameters()} | {
        tuple(p.shape)[::-1] for p in model.parameters()
    }
    saved: dict[int, int] = {}

    def keep(t):
        st = t.untyped_storage()
        is_weight_copy = t.dim() == 2 and tuple(t.shape) in w_shapes and t.shape[0] != B * T
        if st.data_ptr() not in weights and not is_weight_copy:
            saved[st.data_ptr()] = st.nbytes()
        return t

    B, T = 2, 96  # unlike any weight dimension: weight copies are told apart by shape
    ids = torch.randint(0, 512, (B, T))
    with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=mode == "autocast"):
            student_forward(
                model, {"input_ids": ids, "position_ids": torch.arange(T).repeat(B, 1)}, hidden=True
            )
    s = shape_of(cfg, "test")
    resid = 4 if mode == "autocast" else 2
    planned = core.activation_bytes(s, B * T, 2, resid, checkpointing=False)
    assert 0.9 <= planned / sum(saved.values()) <= 1.1


def test_plan_cli_prints_one_json_object_and_skips_what_the_recipe_lacks(tiny_recipe, capsys):
    assert main(["plan", str(tiny_recipe), "--json"]) == 0
    out = capsys.readouterr().out
    plan = json.loads(out)
    assert any("no train: section" in n for n in plan["notes"])
    assert plan["memory"] == [] and {r["stage"] for r in plan["disk"]} == {"corpus"}
    assert [r["item"] for r in plan["tokens"]] == [
        "train (llama tokens)",
        "valid (llama tokens)",
        "test (llama tokens)",
    ]
    assert all(r["value"] > 0 for r in plan["tokens"])


def test_plan_names_a_model_whose_config_is_missing(tmp_path, tiny_recipe, capsys):
    bad = write_recipe(
        tmp_path / "bad.yaml",
        tiny_recipe.read_text().replace("llama: {path: ", f"llama: {{path: {tmp_path}/nowhere"),
    )
    assert main(["plan", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "model 'llama'" in err and "nowhere" in err
