"""Extraction: exact top-k and CE, compact shards, kill/resume, corruption, drift, 2 processes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import shas, torchrun

from fusellm.cli import main
from fusellm.manifest import StageInputsChanged
from fusellm.recipe import load_recipe
from fusellm.shards import (
    decode_shard,
    id_width,
    iter_docs,
    pack_ids,
    read_metadata,
    unpack_ids,
)

ROOT = Path(__file__).parent.parent


def shard_bytes(run: Path, model: str) -> dict[str, bytes]:
    return {
        p.relative_to(run).as_posix(): p.read_bytes()
        for p in sorted((run / "extract" / model).glob("*/shard-*.safetensors"))
    }


def test_id_packing_roundtrip():
    rng = np.random.default_rng(0)
    for vocab in (2, 300, 65536, 65537, 262144, 1 << 24, (1 << 24) + 1, 2**31 - 1):
        w = id_width(vocab)
        ids = rng.integers(0, vocab, size=(50, 7)).astype(np.int32)
        ids[0, 0] = vocab - 1
        packed = pack_ids(ids, w)
        assert packed.dtype == np.uint8 and packed.shape == (50, 7, w)
        assert np.array_equal(unpack_ids(packed), ids)
    assert (id_width(49152), id_width(262144)) == (2, 3)


def test_stored_topk_and_ce_equal_direct_computation(ext_recipe, tiny_models):
    assert main(["run", str(ext_recipe), "--stages", "corpus,extract"]) == 0
    run = ext_recipe.parent / "run"
    r = load_recipe(ext_recipe)
    corpus = {
        json.loads(x)["id"]: json.loads(x)["text"] for x in open(run / "corpus" / "train.jsonl")
    }
    from transformers import AutoModelForCausalLM, AutoTokenizer

    for name, path in tiny_models.items():
        man = json.loads((run / "extract" / name / "manifest.json").read_text())
        assert man["complete"] and man["stats"]["documents"] == len(corpus)
        assert man["stats"]["bytes_per_token"] <= 64
        model = AutoModelForCausalLM.from_pretrained(path).eval()
        tok = AutoTokenizer.from_pretrained(path)
        from fusellm.extract.runner import model_shards

        shards = model_shards(r, name, "train")  # the reader API: complete shards, in order
        assert shards == sorted((run / "extract" / name / "train").glob("shard-*.safetensors"))
        assert read_metadata(shards[0]) == decode_shard(shards[0].read_bytes())[1]
        n = 0
        for d in iter_docs(shards):
            enc = tok(corpus[d.doc_id], return_offsets_mapping=True)
            assert d.input_ids.tolist() == enc["input_ids"]
            assert d.offsets.tolist() == [list(o) for o in enc["offset_mapping"]]
            x = torch.tensor([enc["input_ids"]])
            with torch.no_grad():
                lp = torch.log_softmax(model(x).logits[0].float(), -1)
                loss = model(x, labels=x).loss.item() if x.shape[1] > 1 else float("nan")
            vals, idx = lp.topk(r.extract.top_k)
            # Random tiny models have near-tied logits whose order can flip between a
            # batched and an unbatched forward; so check that the stored ids carry their
            # direct log-probs and that those are the direct top-k values.
            stored_ids = torch.from_numpy(d.topk_ids).long()
            assert d.topk_logprobs.dtype == torch.float16
            assert torch.allclose(
                d.topk_logprobs.float(), lp.gather(1, stored_ids), atol=2e-3, rtol=1e-3
            )
            assert torch.allclose(d.topk_logprobs.float(), vals, atol=2e-3, rtol=1e-3)
            assert (stored_ids == idx).float().mean() > 0.95, (name, d.doc_id)
            if x.shape[1] > 1:
                assert abs(d.seq_ce - loss) < 1e-4
                gold = lp[torch.arange(x.shape[1] - 1), x[0, 1:]]
                assert np.allclose(d.ce[:-1], -gold.numpy(), atol=1e-5)
            assert np.isnan(d.ce[-1])
            n += 1
        assert n == len(corpus)


def test_rerun_skips_and_drift_is_refused(ext_recipe):
    assert main(["run", str(ext_recipe), "--stages", "corpus,extract"]) == 0
    run = ext_recipe.parent / "run"
    stamps = {p: p.stat().st_mtime_ns for p in run.glob("extract/*/*/shard-*")}
    assert main(["extract", str(ext_recipe)]) == 0
    assert stamps == {p: p.stat().st_mtime_ns for p in run.glob("extract/*/*/shard-*")}
    r = load_recipe(ext_recipe, ["extract.top_k=5"])
    from fusellm.extract.runner import run as extract

    with pytest.raises(StageInputsChanged, match=r"differs: config\.top_k"):
        extract(r)
    # speed-only settings do not invalidate finished shards
    assert main(["extract", str(ext_recipe), "extract.batch_tokens=64"]) == 0
    assert stamps == {p: p.stat().st_mtime_ns for p in run.glob("extract/*/*/shard-*")}
    assert (
        main(
            ["extract", str(ext_recipe), "extract.top_k=5", "--force", "extract.models=[llama_bpe]"]
        )
        == 0
    )
    docs, meta = decode_shard(
        (run / "extract/llama_bpe/train/shard-00000.safetensors").read_bytes()
    )
    assert meta["top_k"] == "5" and docs[0].topk_ids.shape[1] == 5


KILLER = """
import os, signal, sys
import fusellm.storage as storage
calls = {"n": 0}
real = os.replace
def replace(src, dst):
    if str(dst).endswith(".safetensors"):
        calls["n"] += 1
        if calls["n"] == int(os.environ["KILL_AT"]):
            os.kill(os.getpid(), signal.SIGKILL)   # temp file written, not yet renamed
    return real(src, dst)
storage.os.replace = replace
from fusellm.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_sigkill_mid_run_then_resume_is_byte_identical(ext_recipe, tmp_path):
    ref = tmp_path / "ref"
    assert (
        main(
            [
                "run",
                str(ext_recipe),
                "--stages",
                "corpus,extract",
                f"run_dir={ref}",
                "extract.models=[neox_unigram]",
            ]
        )
        == 0
    )
    run = ext_recipe.parent / "run"
    assert main(["corpus", str(ext_recipe)]) == 0
    env = {**os.environ, "KILL_AT": "4"}
    p = subprocess.run(
        [sys.executable, "-c", KILLER, "extract", str(ext_recipe), "extract.models=[neox_unigram]"],
        env=env,
        capture_output=True,
        text=True,
    )
    assert p.returncode == -9, p.stderr[-2000:]
    model_dir = run / "extract" / "neox_unigram"
    assert list(model_dir.rglob("*.tmp-*")), "the kill should leave a temp file behind"
    done = sorted(model_dir.glob("train/shard-*.safetensors"))
    assert len(done) == 3 and not (model_dir / "manifest.json").exists()
    stamps = {q: q.stat().st_mtime_ns for q in done}
    assert main(["extract", str(ext_recipe), "extract.models=[neox_unigram]"]) == 0
    assert not list(model_dir.rglob("*.tmp-*"))
    assert stamps == {q: q.stat().st_mtime_ns for q in done}, "complete shards were rewritten"
    assert shard_bytes(run, "neox_unigram") == shard_bytes(ref, "neox_unigram")
    a = json.loads((model_dir / "manifest.json").read_text())["files"]
    b = json.loads((ref / "extract/neox_unigram/manifest.json").read_text())["files"]
    assert shas(a) == shas(b)


def test_corrupt_shard_reported_and_only_it_recomputed(ext_recipe, capsys, caplog):
    args = ["run", str(ext_recipe), "--stages", "corpus,extract", "extract.models=[gpt2_wordpiece]"]
    assert main(args) == 0
    run = ext_recipe.parent / "run"
    good = shard_bytes(run, "gpt2_wordpiece")
    d = run / "extract/gpt2_wordpiece/train"
    truncated, altered = d / "shard-00001.safetensors", d / "shard-00003.safetensors"
    truncated.write_bytes(truncated.read_bytes()[:-100])
    data = bytearray(altered.read_bytes())
    data[-5] ^= 0xFF
    altered.write_bytes(bytes(data))
    others = {
        q: q.stat().st_mtime_ns
        for q in d.glob("shard-*.safetensors")
        if q not in (truncated, altered)
    }
    capsys.readouterr()
    assert main(["verify", str(run)]) == 1
    out = capsys.readouterr().out
    expected = json.loads((d.parent / "manifest.json").read_text())["files"]
    for q in (truncated, altered):
        assert (
            f"{q}: sha256 " in out and f"!= expected {expected['train/' + q.name]['sha256']}" in out
        )
    assert out.count("!= expected") == 2
    assert main(args) == 0
    assert (
        "shard-00001.safetensors: sha256" in caplog.text and "truncated or altered" in caplog.text
    )
    assert others == {q: q.stat().st_mtime_ns for q in others}
    assert shard_bytes(run, "gpt2_wordpiece") == good
    assert main(["verify", str(run)]) == 0


@pytest.mark.distributed
def test_two_processes_write_the_same_shards(ext_recipe, tmp_path):
    one = tmp_path / "one"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # same kernels in both runs
    recipe, base = (
        str(ext_recipe),
        ["extract.models=[llama_bpe,mpt_bpe]", "extract.docs_per_shard=3"],
    )
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "fusellm.cli",
            "run",
            "--stages",
            "corpus,extract",
            recipe,
            f"run_dir={one}",
            *base,
        ],
        env=env,
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    two = tmp_path / "two"
    r = subprocess.run(
        [sys.executable, "-m", "fusellm.cli", "corpus", recipe, f"run_dir={two}", *base],
        env=env,
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    r = torchrun(
        "-m",
        "fusellm.cli",
        "extract",
        recipe,
        f"run_dir={two}",
        *base,
        env=env,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    for m in ("llama_bpe", "mpt_bpe"):
        a, b = shard_bytes(one, m), shard_bytes(two, m)
        assert len(a) > 4 and a.keys() == b.keys()
        assert all(a[k] == b[k] for k in a)
        ma = json.loads((one / "extract" / m / "manifest.json").read_text())
        mb = json.loads((two / "extract" / m / "manifest.json").read_text())
        assert shas(ma["files"]) == shas(mb["files"]) and mb["complete"]


def test_literal_special_token_text_stays_text(tmp_path, tiny_models):
    """A document that contains the literal text of a special token ('</s>', '<s>') is
    encoded as that text: the special never appears mid-document, in extraction, in the
    corpus stage's fit, or in bench scoring."""
    from transformers import AutoTokenizer

    from fusellm.bench.score import document_units

    text = "Before </s> the end <s> and <pad> or <unk> appear as plain text."
    data = tmp_path / "data.jsonl"
    data.write_text(
        "\n".join(json.dumps({"id": f"d{i}", "text": text * (1 + i % 2)}) for i in range(6)) + "\n"
    )
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        f"""
name: literal
run_dir: {tmp_path / "run"}
models:
  m: {{path: {tiny_models["llama_bpe"]}}}
target: m
sources: [m]
tracking: {{backend: none}}
corpus:
  inputs: [{{path: {data}, id_field: id}}]
  valid_fraction: 0.0
  test_fraction: 0.0
  block_size: 128
extract: {{top_k: 4}}
"""
    )
    assert main(["run", str(recipe), "--stages", "corpus,extract"]) == 0
    tok = AutoTokenizer.from_pretrained(tiny_models["llama_bpe"])
    special = set(tok.all_special_ids)
    docs = list(iter_docs(sorted((tmp_path / "run/extract/m/train").glob("shard-*.safetensors"))))
    assert len(docs) == 6
    for d in docs:
        assert not special & set(d.input_ids.tolist()), tok.convert_ids_to_tokens(d.input_ids)
        assert tok.decode(d.input_ids) in (text, text * 2)
    for u in document_units(tok, text, 64):
        assert not special & set(u.ids[1:])  # only the prefix token is special


def test_bf16_model_logits_are_not_rounded_before_the_log_softmax(tiny_models):
    """A bf16 model's stored log-probs and CE are those of its float32 head over its own
    (bf16) hidden states: its logits of magnitude ~20 are not rounded to bf16 first
    (which moves them by up to 0.06)."""
    from transformers import AutoModelForCausalLM

    from fusellm.extract.core import TopKScorer

    model = AutoModelForCausalLM.from_pretrained(tiny_models["llama_bpe"]).eval()
    with torch.no_grad():  # logits of magnitude ~20, where bf16's spacing is 0.125
        model.lm_head.weight.mul_(4.0 / model.lm_head.weight.norm(dim=1, keepdim=True))
    model = model.to(torch.bfloat16)
    ids = torch.randint(3, 300, (2, 16))
    mask = torch.ones_like(ids)
    mask[1, 10:] = 0
    scorer = TopKScorer(model, k=8, head_chunk_tokens=5)
    assert scorer.split_head
    got = scorer(ids, mask)
    with torch.no_grad():
        hidden = model.model(input_ids=ids, attention_mask=mask).last_hidden_state
        ref = torch.log_softmax(hidden.float() @ model.lm_head.weight.float().T, -1)
    assert ref.abs().max() > 10
    for row, sc in enumerate(got):
        n = int(mask[row].sum())
        want = ref[row, :n].gather(1, sc.topk_ids.long())
        assert torch.allclose(sc.topk_logprobs, want, atol=1e-4), (
            (sc.topk_logprobs - want).abs().max()
        )
        gold = ref[row, torch.arange(n - 1), ids[row, 1:n]]
        assert torch.allclose(sc.ce[:-1], -gold, atol=1e-4)


def test_one_host_copy_per_batch(tiny_models, monkeypatch):
    """The scorer moves a batch's top-k, log-probs and CE to the host in one copy each (on
    a GPU every copy is a sync point; the old scorer made 3 per sequence)."""
    from transformers import AutoModelForCausalLM

    from fusellm.extract.core import TopKScorer

    model = AutoModelForCausalLM.from_pretrained(tiny_models["llama_bpe"]).eval()
    scorer = TopKScorer(model, k=4, head_chunk_tokens=7)
    ids = torch.randint(3, 300, (6, 20))
    mask = torch.ones_like(ids)
    mask[2, 9:] = 0
    copies = []
    real = torch.Tensor.cpu
    monkeypatch.setattr(torch.Tensor, "cpu", lambda t, *a, **k: copies.append(1) or real(t))
    out = scorer(ids, mask)
    assert len(out) == 6 and len(out[2].ce) == 9 and len(copies) == 3
