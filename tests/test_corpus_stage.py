"""Corpus stage end to end on tiny tokenizers: formats, errors by file:line, resume."""

from __future__ import annotations

import json

import pytest
from conftest import TEXT, shas, write_recipe

from fusellm.corpus import runner
from fusellm.corpus.readers import CorpusInputError
from fusellm.manifest import StageInputsChanged
from fusellm.recipe import load_recipe
from fusellm.storage import read_json


def recipe_for(tmp_path, tiny_models, inputs: str, extra: str = "", block: int = 48):
    body = f"""
name: c
run_dir: {tmp_path / "run"}
models:
  llama: {{path: {tiny_models["llama_bpe"]}}}
  neox: {{path: {tiny_models["neox_unigram"]}}}
  gpt2: {{path: {tiny_models["gpt2_wordpiece"]}}}
target: llama
sources: [llama, neox, gpt2]
tracking: {{backend: none}}
corpus:
  inputs:
{inputs}
  valid_fraction: 0.2
  test_fraction: 0.2
  block_size: {block}
{extra}
"""
    return load_recipe(write_recipe(tmp_path / "c.yaml", body))


def read_split(run_dir, split):
    with open(run_dir / "corpus" / f"{split}.jsonl", encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def write_jsonl(path, rows):
    with open(path, "w", encoding="utf-8") as f:
        for r in rows:
            f.write((r if isinstance(r, str) else json.dumps(r)) + "\n")
    return path


def test_all_formats_split_and_fit(tmp_path, tiny_models):
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq
    from transformers import AutoTokenizer

    write_jsonl(
        tmp_path / "a.jsonl", [{"id": f"j{i}", "text": t * 4} for i, t in enumerate(TEXT[:16])]
    )
    pq.write_table(pa.table({"text": TEXT[:8], "k": list(range(8))}), tmp_path / "b.parquet")
    (tmp_path / "txt").mkdir()
    (tmp_path / "txt" / "one.txt").write_text("\n\n".join(TEXT[:12]))
    datasets.Dataset.from_dict({"body": TEXT[:5]}).save_to_disk(str(tmp_path / "ds"))
    inputs = f"""    - {{path: {tmp_path / "a.jsonl"}, id_field: id, domain: web}}
    - {{path: {tmp_path / "b.parquet"}}}
    - {{path: {tmp_path / "txt"}, text_unit: paragraph}}
    - {{path: {tmp_path / "ds"}, text_field: body}}"""
    r = recipe_for(tmp_path, tiny_models, inputs)
    man = runner.run(r)
    run_dir = tmp_path / "run"
    rows = {s: read_split(run_dir, s) for s in ("train", "valid", "test")}
    parents = {s: {x["parent"] for x in rows[s]} for s in rows}
    assert not (parents["train"] & parents["test"]) and not (parents["train"] & parents["valid"])
    n_docs = sum(man["stats"]["splits"][s]["documents"] for s in rows)
    n_paragraphs = len("\n\n".join(TEXT[:12]).split("\n\n"))
    assert n_docs == 16 + 8 + n_paragraphs + 5
    assert {x["domain"] for s in rows for x in rows[s]} == {"web", "b", "one", "ds"}
    # chunks of each document reassemble it exactly, in order
    chunks = {}
    for s in rows:
        for x in rows[s]:
            chunks.setdefault(x["parent"], []).append(x)
    assert "".join(c["text"] for c in chunks["j3"]) == TEXT[3] * 4
    # every chunk fits the block for every listed tokenizer, specials included
    for name, path in tiny_models.items():
        if name == "mpt_bpe":
            continue
        tok = AutoTokenizer.from_pretrained(path)
        for s in rows:
            assert all(len(tok(x["text"])["input_ids"]) <= 48 for x in rows[s])
    # manifest: hashes and row counts of every file
    for s in rows:
        rec = man["files"][f"{s}.jsonl"]
        assert rec["rows"] == len(rows[s]) and len(rec["sha256"]) == 64


def test_split_is_reproducible_across_runs(tmp_path, tiny_models):
    write_jsonl(tmp_path / "a.jsonl", [{"text": t} for t in TEXT[:40]])
    inputs = f"    - {{path: {tmp_path / 'a.jsonl'}}}"
    r1 = recipe_for(tmp_path, tiny_models, inputs)
    m1 = runner.run(r1)
    m2 = runner.run(r1, force=True)
    assert shas(m1["files"]) == shas(m2["files"])


# Bad records of every kind (jsonl lines, parquet schemas) in error and skip mode are
# tested in tests/reliability/test_bad_input.py.


def test_duplicate_ids_name_both_lines(tmp_path, tiny_models):
    write_jsonl(tmp_path / "d.jsonl", [{"id": 1, "text": "a b"}, {"id": 1, "text": "c d"}])
    r = recipe_for(tmp_path, tiny_models, f"    - {{path: {tmp_path / 'd.jsonl'}, id_field: id}}")
    with pytest.raises(
        CorpusInputError, match=r"d\.jsonl:2: duplicate_id: id '1' already used at .*d\.jsonl:1"
    ):
        runner.run(r)


def test_missing_input_file(tmp_path, tiny_models):
    r = recipe_for(tmp_path, tiny_models, f"    - {{path: {tmp_path / 'nope.jsonl'}}}")
    with pytest.raises(CorpusInputError, match="nope.jsonl: no such file"):
        runner.run(r)


def test_resume_skip_refuse_force(tmp_path, tiny_models):
    data = write_jsonl(tmp_path / "a.jsonl", [{"text": t} for t in TEXT[:20]])
    inputs = f"    - {{path: {data}}}"
    r = recipe_for(tmp_path, tiny_models, inputs)
    assert runner.run(r) is not None
    train = tmp_path / "run" / "corpus" / "train.jsonl"
    mtime = train.stat().st_mtime_ns
    assert runner.run(r) is None  # complete and unchanged: skipped
    assert train.stat().st_mtime_ns == mtime
    write_jsonl(data, [{"text": t} for t in TEXT[:21]])  # input drift
    with pytest.raises(StageInputsChanged, match=r"differs: inputs\.inputs\.0.*--force"):
        runner.run(r)
    r2 = recipe_for(tmp_path, tiny_models, inputs, block=64)  # config drift
    with pytest.raises(StageInputsChanged, match=r"config\.block_size"):
        runner.run(r2)
    man = runner.run(r2, force=True)
    assert man["fingerprint"]["config"]["block_size"] == 64
    assert read_json(tmp_path / "run" / "corpus" / "manifest.json")["complete"] is True


def test_worker_processes_write_the_same_corpus(tmp_path, tiny_models):
    """Documents cut in 3 worker processes give byte-identical splits and manifest records
    to one process (num_proc changes speed only: not part of the stage's identity)."""
    data = tmp_path / "d.jsonl"
    with open(data, "w", encoding="utf-8") as f:
        for i in range(300):  # more than one batch, long enough to be cut
            f.write(json.dumps({"id": f"d{i}", "text": " ".join(TEXT[i % 8 : i % 8 + 4])}) + "\n")
    out = {}
    for n in (1, 3):
        (tmp_path / f"n{n}").mkdir()
        inputs = f"    - {{path: {data}, id_field: id}}"
        r = recipe_for(tmp_path / f"n{n}", tiny_models, inputs, extra=f"  num_proc: {n}")
        runner.run(r)
        man = read_json(r.stage_dir("corpus") / "manifest.json")
        out[n] = (shas(man["files"]), man["fingerprint"], man["stats"])
    assert out[1] == out[3]
    assert out[1][2]["splits"]["train"]["chunks"] > out[1][2]["splits"]["train"]["documents"]


def test_a_rerun_does_not_hash_the_inputs_again(tmp_path, tiny_models, monkeypatch):
    """The inputs' identity is memoised by path, size and mtime: checking a finished corpus
    stage reads no input file (a 6 GB MiniPile was hashed on every call)."""
    import fusellm.storage

    data = tmp_path / "d.jsonl"
    data.write_text(
        "".join(json.dumps({"id": f"d{i}", "text": t}) + "\n" for i, t in enumerate(TEXT[:20]))
    )
    r = recipe_for(tmp_path, tiny_models, f"    - {{path: {data}, id_field: id}}")
    runner.run(r)
    hashed = []
    real = fusellm.storage.sha256_file
    monkeypatch.setattr(
        fusellm.storage, "sha256_file", lambda p, *a: hashed.append(p) or real(p, *a)
    )
    assert runner.run(r) is None  # complete: skipped
    assert str(data) not in map(str, hashed)
    data.write_text(data.read_text() + json.dumps({"id": "new", "text": "more"}) + "\n")
    with pytest.raises(StageInputsChanged):  # a changed file is hashed again: drift found
        runner.run(r)
