"""Reliability: bad corpus input and bad model input (issue 8).

Corpus: a malformed jsonl line, a missing text field, an empty document, non-UTF-8 bytes,
a wrong parquet schema stop the corpus stage naming file and line in ``error`` mode and
are counted per reason (exactly what was injected) in ``skip`` mode; a document longer
than the block is cut, deterministically, into chunks that fit every model.

Models: a tokenizer without pad/BOS/EOS, a model with more embedding rows than tokens, a
tokenizer larger than its model, models of different maximum lengths: deterministic,
documented handling (see :mod:`fusellm.models`) or an error naming the model and the
token or limit, never an index error mid-forward and never a pad token that changes what
is stored or the loss.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TEXT, _tiny_model, shas, write_recipe

from fusellm.cli import main
from fusellm.corpus import runner as corpus_runner
from fusellm.corpus.readers import CorpusInputError
from fusellm.models import ModelInputError
from fusellm.recipe import load_recipe
from fusellm.shards import iter_docs

# --------------------------------------------------------------------------- helpers


def corpus_recipe(
    tmp_path: Path,
    models: dict[str, Path],
    inputs: str,
    *,
    block: int = 48,
    valid: float = 0.2,
    test: float = 0.2,
    corpus_extra: str = "",
    sections: str = "",
):
    """A recipe whose corpus fits every model in ``models`` (the first is the target)."""
    listed = "\n".join(f"  {n}: {{path: {p}}}" for n, p in models.items())
    body = f"""
name: bad
run_dir: {tmp_path / "run"}
models:
{listed}
target: {next(iter(models))}
sources: [{", ".join(models)}]
tracking: {{backend: none}}
corpus:
  inputs:
{inputs}
  valid_fraction: {valid}
  test_fraction: {test}
  block_size: {block}
{corpus_extra}
{sections}
"""
    return load_recipe(write_recipe(tmp_path / "bad.yaml", body))


def three(tiny_models) -> dict[str, Path]:
    return {n: tiny_models[n] for n in ("llama_bpe", "neox_unigram", "gpt2_wordpiece")}


def tokenizer_variant(
    tiny_models, root: Path, name: str, *, pad: str | None, bos_eos: bool, adds_specials: bool
) -> Path:
    """The llama_bpe model with a tokenizer that has (or lacks) pad/BOS/EOS.

    ``adds_specials``: encoding wraps the text as ``<s> … </s>`` (so EOS occurs inside the
    sequences: a pad = EOS mix-up would mask a real token).
    """
    from tokenizers import Tokenizer, processors
    from transformers import PreTrainedTokenizerFast

    src = tiny_models["llama_bpe"]
    out = root / name
    out.mkdir(parents=True)
    for f in src.iterdir():  # the model files only; the tokenizer is written below
        if f.name in ("config.json", "generation_config.json") or f.suffix == ".safetensors":
            shutil.copy2(f, out / f.name)
    backend = Tokenizer.from_file(str(src / "tokenizer.json"))
    if adds_specials:
        backend.post_processor = processors.TemplateProcessing(
            single="<s> $A </s>",
            special_tokens=[
                ("<s>", backend.token_to_id("<s>")),
                ("</s>", backend.token_to_id("</s>")),
            ],
        )
    specials = {"unk_token": "<unk>"}
    if bos_eos:
        specials |= {"bos_token": "<s>", "eos_token": "</s>"}
    if pad is not None:
        specials["pad_token"] = pad
    PreTrainedTokenizerFast(tokenizer_object=backend, **specials).save_pretrained(out)
    return out


def write_jsonl(path: Path, rows: list) -> Path:
    with open(path, "wb") as f:
        for r in rows:
            if isinstance(r, bytes):
                f.write(r + b"\n")
            else:
                f.write((r if isinstance(r, str) else json.dumps(r)).encode() + b"\n")
    return path


# --------------------------------------------------------------------------- bad corpus input

# One record per reason; line numbers are positions in this list + 1.
BAD_JSONL = [
    {"text": "fine"},
    "{not json",  # 2 malformed_json
    {"body": "no text field"},  # 3 missing_field
    {"text": "   "},  # 4 empty
    {"text": 42},  # 5 not_a_string
    b'{"text": "caf\xe9"}',  # 6 non_utf8 (latin-1 byte)
    [1, 2],  # 7 not_an_object
    {"text": "also fine"},
]
JSONL_REASONS = {
    2: "malformed_json",
    3: "missing_field",
    4: "empty",
    5: "not_a_string",
    6: "non_utf8",
    7: "not_an_object",
}


def write_bad_parquet(tmp_path: Path) -> tuple[Path, Path]:
    """Two parquet files with a wrong schema: no text column; a text column of ints."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"body": ["x", "y"]}), tmp_path / "nocol.parquet")
    pq.write_table(pa.table({"text": [1, 2, 3]}), tmp_path / "ints.parquet")
    return tmp_path / "nocol.parquet", tmp_path / "ints.parquet"


@pytest.mark.parametrize("lineno,reason", sorted(JSONL_REASONS.items()))
def test_error_mode_names_file_and_line_of_bad_jsonl(tmp_path, tiny_models, lineno, reason):
    """Each kind of bad line, alone among good lines, stops the stage with file:line: reason
    and publishes nothing."""
    rows = [BAD_JSONL[0]] + [""] * (lineno - 2) + [BAD_JSONL[lineno - 1], BAD_JSONL[-1]]
    path = write_jsonl(tmp_path / "bad.jsonl", rows)
    r = corpus_recipe(tmp_path, three(tiny_models), f"    - {{path: {path}}}")
    with pytest.raises(CorpusInputError, match=rf"bad\.jsonl:{lineno}: {reason}: "):
        corpus_runner.run(r)
    assert not (tmp_path / "run" / "corpus" / "manifest.json").exists()
    assert not list((tmp_path / "run" / "corpus").glob("*.tmp-*"))


@pytest.mark.parametrize(
    "file,detail",
    [
        ("nocol.parquet", r"missing column\(s\) \['text'\]"),
        ("ints.parquet", r"column 'text' has type int64, not string"),
    ],
)
def test_error_mode_names_parquet_file_with_wrong_schema(tmp_path, tiny_models, file, detail):
    """A parquet file without a string text column is one error naming the file (``:0``:
    the schema, not a row) and the columns, before any row is read."""
    write_bad_parquet(tmp_path)
    r = corpus_recipe(tmp_path, three(tiny_models), f"    - {{path: {tmp_path / file}}}")
    with pytest.raises(CorpusInputError, match=rf"{file}:0: bad_schema: {detail}"):
        corpus_runner.run(r)


def test_skip_mode_counts_each_reason_exactly_as_injected(tmp_path, tiny_models):
    """Every injected bad record is counted once under its reason (a wrong parquet schema
    once per file, not per row); good documents, and an over-long one, are all kept."""
    bad = write_jsonl(tmp_path / "bad.jsonl", BAD_JSONL)
    nocol, ints = write_bad_parquet(tmp_path)
    long_doc = write_jsonl(tmp_path / "long.jsonl", [{"text": " ".join(TEXT[:16])}])
    inputs = "\n".join(f"    - {{path: {p}}}" for p in (bad, nocol, ints, long_doc))
    r = corpus_recipe(tmp_path, three(tiny_models), inputs, corpus_extra="  on_error: skip")
    man = corpus_runner.run(r)
    injected = {reason: 1 for reason in JSONL_REASONS.values()} | {"bad_schema": 2}
    assert man["stats"]["skipped"] == injected
    assert set(man["stats"]["skip_examples"]) == set(injected)
    assert "bad.jsonl:6: non_utf8" in man["stats"]["skip_examples"]["non_utf8"]
    splits = man["stats"]["splits"]
    assert sum(splits[s]["documents"] for s in splits) == 3  # 2 good lines + the long one
    assert sum(splits[s]["chunks"] for s in splits) > 3  # the long one was cut, not skipped


def test_long_document_is_cut_to_fit_every_model_deterministically(tmp_path, tiny_models):
    """A document many blocks long (prose, and text without spaces) becomes chunks that
    every fitted model tokenizes, special tokens included, into at most block_size tokens;
    the chunks reassemble it exactly and a rerun writes byte-identical files."""
    from transformers import AutoTokenizer

    models = dict(tiny_models)  # all four families, plus one that adds <s> … </s>
    models["wrapped"] = tokenizer_variant(
        tiny_models, tmp_path / "m", "wrapped", pad="<pad>", bos_eos=True, adds_specials=True
    )
    prose = "\n\n".join(TEXT[:24])
    cjk = "東京京都日本語のテキストと中文文本😀" * 40
    data = write_jsonl(
        tmp_path / "long.jsonl", [{"id": "prose", "text": prose}, {"id": "cjk", "text": cjk}]
    )
    block = 24
    inputs = f"    - {{path: {data}, id_field: id}}"
    r = corpus_recipe(tmp_path, models, inputs, block=block, test=0.0)
    man = corpus_runner.run(r)
    corpus = tmp_path / "run" / "corpus"
    chunks: dict[str, list[dict]] = {}
    for split in ("train", "valid", "test"):
        for line in (corpus / f"{split}.jsonl").read_text(encoding="utf-8").splitlines():
            rec = json.loads(line)
            chunks.setdefault(rec["parent"], []).append(rec)
    assert "".join(c["text"] for c in chunks["prose"]) == prose
    assert "".join(c["text"] for c in chunks["cjk"]) == cjk
    assert [c["id"] for c in chunks["prose"]] == [f"prose#{i}" for i in range(len(chunks["prose"]))]
    assert len(chunks["prose"]) > 10 and len(chunks["cjk"]) > 3
    for name, path in models.items():
        tok = AutoTokenizer.from_pretrained(path)
        lengths = [len(tok(c["text"])["input_ids"]) for cs in chunks.values() for c in cs]
        assert max(lengths) <= block, name
    assert man["stats"]["skipped"] == {}
    again = corpus_runner.run(r, force=True)
    assert shas(again["files"]) == shas(man["files"])  # same sha256 for every split file


# --------------------------------------------------------------------------- bad model input


def pipeline_recipe(tmp_path: Path, model: Path, tag: str) -> Path:
    """corpus → extract → fuse → train of one model (its own fused teacher) on a few docs."""
    data = tmp_path / "data.jsonl"
    if not data.exists():
        write_jsonl(data, [{"id": f"d{i}", "text": t} for i, t in enumerate(TEXT[:10])])
    body = f"""
name: pad-{tag}
run_dir: {tmp_path / ("run-" + tag)}
models:
  m: {{path: {model}}}
target: m
sources: [m]
tracking: {{backend: none}}
corpus:
  inputs: [{{path: {data}, id_field: id}}]
  valid_fraction: 0.0
  test_fraction: 0.0
  block_size: 24
extract: {{top_k: 5, docs_per_shard: 4, batch_tokens: 96, max_batch_size: 4}}
align: {{}}
fuse: {{method: min_ce}}
train:
  lm_weight: 0.5
  block_size: 24
  per_device_train_batch_size: 4
  learning_rate: 1.0e-2
  max_steps: 3
  logging_steps: 1
  save_steps: 3
  use_cpu: true
"""
    return write_recipe(tmp_path / f"pad-{tag}.yaml", body)


def run_pipeline(tmp_path: Path, model: Path, tag: str, batch: int = 4) -> tuple[list, list[float]]:
    """(stored extraction per document, per-step training losses) of one pipeline run;
    ``batch`` documents at most per extraction batch (1: no padding at all)."""
    recipe = pipeline_recipe(tmp_path, model, tag)
    recipe.write_text(recipe.read_text().replace("max_batch_size: 4", f"max_batch_size: {batch}"))
    assert main(["run", str(recipe), "--stages", "corpus,extract,align,fuse,train"]) == 0
    run = tmp_path / f"run-{tag}"
    docs = [
        (d.doc_id, d.input_ids, d.topk_ids, d.topk_logprobs.float().numpy(), d.ce)
        for d in iter_docs(sorted((run / "extract" / "m" / "train").glob("shard-*.safetensors")))
    ]
    state = json.loads((run / "train/checkpoints/checkpoint-3/trainer_state.json").read_text())
    return docs, [h["loss"] for h in state["log_history"] if "loss" in h]


def test_pad_token_absent_or_equal_to_eos_never_changes_stored_topk_ce_or_loss(
    tmp_path, tiny_models
):
    """Padding is only ever masked: with the tokenizer's own pad, with no pad token, and with
    pad = EOS (where EOS is a real token of every sequence), extraction stores the same
    top-k, log-probs and CE, and training has the same per-step losses."""
    results = {}
    for pad in ("<pad>", None, "</s>"):
        tag = {"<pad>": "pad", None: "nopad", "</s>": "eos"}[pad]
        model = tokenizer_variant(
            tiny_models, tmp_path / "m", tag, pad=pad, bos_eos=True, adds_specials=True
        )
        results[tag] = run_pipeline(tmp_path, model, tag)
    ref_docs, ref_losses = results["pad"]
    eos = 2
    assert all(ids[-1] == eos for _, ids, *_ in ref_docs)  # EOS really is in every sequence
    assert len(ref_losses) == 3 and all(np.isfinite(ref_losses))
    for tag in ("nopad", "eos"):
        docs, losses = results[tag]
        assert len(docs) == len(ref_docs), tag
        for (i0, t0, k0, l0, c0), (i1, t1, k1, l1, c1) in zip(ref_docs, docs, strict=True):
            assert i0 == i1 and np.array_equal(t0, t1), (tag, i0)
            assert np.array_equal(k0, k1) and np.array_equal(l0, l1), (tag, i0)
            assert np.array_equal(c0, c1, equal_nan=True), (tag, i0)
        assert losses == ref_losses, tag
    # and padding is masked: one document per batch (no padding anywhere) stores the same
    # distributions up to float summation order
    model = tmp_path / "m" / "pad"
    docs, losses = run_pipeline(tmp_path, model, "single", batch=1)
    for (i0, t0, _k0, l0, c0), (i1, t1, _k1, l1, c1) in zip(ref_docs, docs, strict=True):
        assert i0 == i1 and np.array_equal(t0, t1)
        np.testing.assert_allclose(c1, c0, atol=2e-3, rtol=1e-3, equal_nan=True, err_msg=i0)
        np.testing.assert_allclose(l1[:, 0], l0[:, 0], atol=2e-2, err_msg=i0)
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-3)


def test_tokenizer_without_pad_bos_eos_runs_and_bench_names_the_missing_token(
    tmp_path, tiny_models, capsys
):
    """With none of pad/BOS/EOS, extraction and training run on the plain encoding; bench,
    which needs a BOS (else EOS) to predict a text's first token, stops naming the model
    and the missing token instead of guessing a prefix."""
    model = tokenizer_variant(
        tiny_models, tmp_path / "m", "bare", pad=None, bos_eos=False, adds_specials=False
    )
    docs, losses = run_pipeline(tmp_path, model, "bare")
    assert docs and len(losses) == 3 and all(np.isfinite(losses))
    recipe = pipeline_recipe(tmp_path, model, "bare")
    recipe.write_text(
        recipe.read_text().replace("test_fraction: 0.0", "test_fraction: 0.5")
        + "bench: {models: [m], tasks: [lm], max_length: 64}\n"
    )
    assert main(["run", str(recipe), "--stages", "corpus,bench", "--force"]) == 2
    err = capsys.readouterr().err
    assert "bench m lm" in err and "no BOS and no EOS" in err


def test_padded_embedding_rows_are_stored_with_exact_logprobs_and_never_aligned(
    ext_recipe, tiny_models
):
    """Ids at or beyond len(tokenizer) (padded rows) may appear in a stored top-k with
    their exact full-vocabulary log-prob (the model's own distribution); align never maps
    one: a source's aligned ids are always real target tokens."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from fusellm.stages import ALIGN

    ext_recipe.write_text(ext_recipe.read_text() + "align: {}\n")
    args = ["extract.models=[llama_bpe,neox_unigram]", "sources=[llama_bpe,neox_unigram]"]
    assert main(["run", str(ext_recipe), "--stages", "corpus,extract,align", *args]) == 0
    run = ext_recipe.parent / "run"
    text = {
        json.loads(x)["id"]: json.loads(x)["text"] for x in open(run / "corpus" / "train.jsonl")
    }
    name = "neox_unigram"  # 256 embedding rows, a smaller tokenizer
    tok = AutoTokenizer.from_pretrained(tiny_models[name])
    model = AutoModelForCausalLM.from_pretrained(tiny_models[name]).eval()
    n_padded = 0
    for d in iter_docs(sorted((run / "extract" / name / "train").glob("shard-*.safetensors"))):
        x = torch.tensor([tok(text[d.doc_id])["input_ids"]])
        with torch.no_grad():
            lp = torch.log_softmax(model(x).logits[0].float(), -1)
        ids = torch.from_numpy(d.topk_ids).long()
        assert int(ids.max()) < 256
        n_padded += int((ids >= len(tok)).sum())
        torch.testing.assert_close(d.topk_logprobs.float(), lp.gather(1, ids), atol=2e-3, rtol=1e-3)
    assert n_padded > 0  # the case is exercised: this random model gives padded rows mass
    target_tok = AutoTokenizer.from_pretrained(tiny_models["llama_bpe"])
    (maps,) = (run / ALIGN / "maps").glob("vocab-map-*.npy")
    id_map = np.load(maps)
    assert id_map.shape == (256,)
    assert (id_map[len(tok) :] == -1).all()  # padded source rows: unmapped
    assert (id_map < len(target_tok)).all()  # padded target rows: never a destination
    aligned = sorted((run / ALIGN / name / "train").glob("shard-*.safetensors"))
    assert aligned
    for d in iter_docs(aligned):
        live = np.isfinite(d.topk_logprobs.float().numpy())
        assert (d.topk_ids[live] < len(target_tok)).all()


def test_tokenizer_larger_than_its_model_is_an_error_naming_model_and_token(tmp_path, tiny_models):
    """A token id beyond the model's embedding rows stops extraction before the forward
    pass, naming the model, the token and its id (not an index error inside the model)."""
    small = tmp_path / "small"
    _tiny_model("llama", 64).save_pretrained(small)  # 64 rows, fewer than the tokenizer's
    for f in tiny_models["llama_bpe"].glob("*token*"):
        shutil.copy2(f, small / f.name)
    recipe = pipeline_recipe(tmp_path, small, "small")
    r = load_recipe(recipe)
    corpus_runner.run(r)
    from fusellm.extract import runner as extract_runner

    with pytest.raises(
        ModelInputError,
        match=r"model 'm': extract: document 'd\d+#0' has token '.+' \(id \d+\) beyond the model's 64 embedding rows",
    ):
        extract_runner.run(r)


def short_gpt2(tiny_models, root: Path, n_positions: int = 64) -> Path:
    """A GPT-2 (learned positions: an index error beyond them) of ``n_positions`` positions
    with the WordPiece tokenizer of the ``gpt2_wordpiece`` fixture."""
    from transformers import AutoModelForCausalLM, GPT2Config

    out = root / "short"
    cfg = GPT2Config(
        n_embd=16, n_layer=1, n_head=2, n_positions=n_positions, vocab_size=200, bos_token_id=1
    )
    cfg.eos_token_id = 2
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(out)
    for f in tiny_models["gpt2_wordpiece"].glob("*token*"):
        shutil.copy2(f, out / f.name)
    return out


def test_block_size_beyond_a_models_maximum_fails_at_corpus_naming_model_and_maximum(
    tmp_path, tiny_models
):
    """corpus.block_size above a fitted model's maximum positions is refused before any
    input is read, naming the model and its maximum (not an index error in a later forward
    pass); a model left out of fit_models is refused by extract, naming the model, the
    chunk and its maximum, before that chunk's forward pass."""
    data = write_jsonl(tmp_path / "a.jsonl", [{"text": " ".join(TEXT[:40])}])
    models = {"llama": tiny_models["llama_bpe"], "short": short_gpt2(tiny_models, tmp_path)}
    inputs = f"    - {{path: {data}}}"
    r = corpus_recipe(tmp_path, models, inputs, block=128)
    with pytest.raises(
        ModelInputError,
        match=r"model 'short': corpus.block_size is 128 tokens, more than its maximum "
        r"of 64 positions \(config.n_positions\); lower corpus.block_size to at most 64",
    ):
        corpus_runner.run(r)
    assert not (tmp_path / "run" / "corpus" / "manifest.json").exists()
    r = corpus_recipe(
        tmp_path,
        models,
        inputs,
        block=128,
        valid=0.0,
        test=0.0,
        corpus_extra="  fit_models: [llama]",
        sections="extract: {models: [short], top_k: 2}",
    )
    corpus_runner.run(r)
    from fusellm.extract import runner as extract_runner

    with pytest.raises(
        ModelInputError,
        match=r"model 'short': extract: document '.*#0' is \d+ tokens, more than its "
        r"maximum of 64 positions.*corpus.fit_models",
    ):
        extract_runner.run(r)
    assert not list((tmp_path / "run" / "extract").rglob("*.safetensors"))


def test_bench_window_beyond_a_models_maximum_is_refused_before_the_forward_pass(tiny_models):
    """bench.max_length above a model's maximum (MPT: 512) is an error naming the model and
    its maximum, not a shape error in the attention bias."""
    from transformers import AutoModelForCausalLM

    from fusellm.bench.score import LogProbModel, Unit

    model = AutoModelForCausalLM.from_pretrained(tiny_models["mpt_bpe"]).eval()
    lpm = LogProbModel([model], names=["mpt"])
    with pytest.raises(
        ModelInputError, match=r"model 'mpt': a bench window is 600 tokens.*512 positions"
    ):
        lpm.score([Unit([5] * 600, 10)], pad_id=0)
    lp, n, _ = lpm.score([Unit([5] * 512, 10)], pad_id=0)  # at the maximum: fine
    assert n[0] == 10 and np.isfinite(lp[0])
