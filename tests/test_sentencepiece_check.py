"""A model's fast tokenizer must encode as the SentencePiece model (``tokenizer.model``) it
ships; where it does not, fusellm converts a faithful one from ``tokenizer.model``.

Two SentencePiece models are trained here. OpenLLaMA-like: v1's trainer defaults, whose
normaliser collapses runs of whitespace and strips leading and trailing spaces. Llama-2-like:
the identity normaliser, whitespace kept, a dummy prefix. Saved as Llama ships them (class
``LlamaTokenizer``, BOS added), transformers 5 rebuilds their pre-tokenizer and encodes both
differently (the first keeps the runs, the second drops a leading space), while its generic
SentencePiece conversion follows the model's own normaliser.
"""

from __future__ import annotations

import io
import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import ADVERSARIAL, TEXT, _tiny_model, hub_snapshot, write_recipe

from align import byte_spans
from fusellm.align.core import tokenizer_vocab
from fusellm.faithful_tokenizer import SP_CHECK_TEXTS
from fusellm.models import ModelLoadError, encode, load_tokenizer, tokenizer_fingerprint
from fusellm.recipe import ModelSpec

# OpenLLaMA v1: BPE with byte fallback and split digits, and the default normaliser
# (nmt_nfkc, remove_extra_whitespaces=true): "a    b" is "▁a ▁b" to SentencePiece.
OPENLLAMA_LIKE = dict(model_type="bpe", byte_fallback=True, split_digits=True)
# Llama-2: the same, with the identity normaliser and whitespace kept.
LLAMA2_LIKE = dict(
    OPENLLAMA_LIKE,
    normalization_rule_name="identity",
    remove_extra_whitespaces=False,
    allow_whitespace_only_pieces=True,
)
# What Llama-2's tokenizer_config.json says (add_bos_token, legacy), plus what a fine-tune
# adds: a pad token beyond the SentencePiece vocabulary and a chat template.
LLAMA_CONFIG = {"tokenizer_class": "LlamaTokenizer", "add_bos_token": True, "legacy": False}
EXTRAS = {
    "openllama": {},
    "llama2": {"pad_token": "<pad>", "chat_template": "{% for m in messages %}{{ m.content }}"},
}
# The texts on which the Llama class differs first (v5.25): a run of spaces that
# SentencePiece collapses; a leading space that SentencePiece keeps with the dummy prefix.
FIRST_DIFFERENCE = {
    "openllama": "two  spaces, three   spaces and eight        spaces",
    "llama2": " one leading space",
}
CORPUS = list(SP_CHECK_TEXTS) + TEXT[:8] + ADVERSARIAL


def _train(**kwargs) -> bytes:
    import sentencepiece as spm

    out = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(TEXT + ADVERSARIAL),
        model_writer=out,
        vocab_size=400,
        hard_vocab_limit=False,
        minloglevel=2,
        **kwargs,
    )
    return out.getvalue()


@pytest.fixture(scope="module")
def sp_models() -> dict[str, bytes]:
    return {"openllama": _train(**OPENLLAMA_LIKE), "llama2": _train(**LLAMA2_LIKE)}


def _tokenizer_dir(path: Path, sp_model: bytes, config: dict) -> Path:
    """A tokenizer directory as such models ship it: tokenizer.model + tokenizer_config.json
    (no tokenizer.json: transformers converts the SentencePiece model on load)."""
    path.mkdir(parents=True)
    (path / "tokenizer.model").write_bytes(sp_model)
    specials = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}
    (path / "tokenizer_config.json").write_text(json.dumps({**specials, **config}))
    return path


def _llama_dir(path: Path, sp_models: dict, kind: str) -> Path:
    return _tokenizer_dir(path, sp_models[kind], {**LLAMA_CONFIG, **EXTRAS[kind]})


def _sp(d: Path):
    import sentencepiece as spm

    return spm.SentencePieceProcessor(model_file=str(d / "tokenizer.model"))


def _first_difference(d: Path) -> tuple[str, list[str], list[str]]:
    """Straight from transformers and sentencepiece: the first check text they encode
    differently, with both tokenizations as pieces."""
    from transformers import AutoTokenizer

    sp = _sp(d)
    fast = AutoTokenizer.from_pretrained(d)
    for text in SP_CHECK_TEXTS:
        ids = fast(text, add_special_tokens=False)["input_ids"]
        if ids != sp.encode(text):
            return text, fast.convert_ids_to_tokens(ids), sp.encode(text, out_type=str)
    raise AssertionError("transformers' conversion encodes every check text as sentencepiece")


def _specials(tok) -> dict:
    return {
        "map": tok.special_tokens_map,
        "ids": {k: getattr(tok, f"{k}_id") for k in tok.special_tokens_map},
        "all": sorted(tok.all_special_ids),
        "added": {i: (t.content, t.special) for i, t in tok.added_tokens_decoder.items()},
        "max": tok.model_max_length,
        "padding": tok.padding_side,
        "chat": tok.chat_template,
    }


@pytest.mark.parametrize("kind", ["openllama", "llama2"])
def test_llama_tokenizer_that_differs_is_replaced_by_a_faithful_conversion(
    tmp_path, sp_models, cache_dir, caplog, kind
):
    from transformers import AutoTokenizer

    d = _llama_dir(tmp_path / kind, sp_models, kind)
    text, fast_pieces, sp_pieces = _first_difference(d)
    assert text == FIRST_DIFFERENCE[kind]
    shipped = AutoTokenizer.from_pretrained(d)
    with caplog.at_level(logging.INFO, logger="fusellm.models"):
        tok = load_tokenizer(ModelSpec(path=str(d)), kind)
    sp = _sp(d)
    ref = sp.encode(CORPUS)
    assert encode(tok, CORPUS)["input_ids"] == ref
    # the shipped tokenizer adds BOS (and nothing else); so does the converted one
    assert shipped.bos_token_id == 1
    assert encode(shipped, CORPUS, True)["input_ids"] == [
        [1, *ids] for ids in encode(shipped, CORPUS)["input_ids"]
    ]
    assert encode(tok, CORPUS, True)["input_ids"] == [[1, *ids] for ids in ref]
    assert tok("a", "b")["input_ids"] == shipped("a", "b")["input_ids"]
    assert _specials(tok) == _specials(shipped)
    if kind == "llama2":  # the added pad token beyond the SentencePiece vocabulary
        assert tok.pad_token_id == sp.get_piece_size()
    assert tokenizer_fingerprint(tok) != tokenizer_fingerprint(shipped)
    [warning] = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warning.startswith(f"model '{kind}': its fast tokenizer (LlamaTokenizer)")
    assert repr(text) in warning and str(fast_pieces) in warning and str(sp_pieces) in warning
    assert str(d / "tokenizer.model") in warning
    assert "a tokenizer converted from that tokenizer.model instead" in warning
    assert not (cache_dir / "tokenizer-check").exists()  # the shipped one did not pass


def test_second_load_reuses_the_converted_tokenizer(tmp_path, sp_models, cache_dir, caplog):
    from transformers import AutoTokenizer

    from fusellm.faithful_tokenizer import _convert_sentencepiece

    d = _llama_dir(tmp_path / "openllama", sp_models, "openllama")
    first = load_tokenizer(ModelSpec(path=str(d)), "ol")
    [converted] = (cache_dir / "tokenizer-converted").iterdir()  # no temp dir left behind
    stamps = {f.name: f.stat().st_mtime_ns for f in converted.iterdir()}
    with caplog.at_level(logging.INFO, logger="fusellm.models"):
        again = load_tokenizer(ModelSpec(path=str(d)), "ol")
    assert "converting" not in caplog.text and "converted from" in caplog.text
    assert list((cache_dir / "tokenizer-converted").iterdir()) == [converted]
    assert {f.name: f.stat().st_mtime_ns for f in converted.iterdir()} == stamps
    assert tokenizer_fingerprint(again) == tokenizer_fingerprint(first)
    # a rank that found no converted directory when it looked converts too: its rename
    # loses to the first, which stays as it was
    shipped = AutoTokenizer.from_pretrained(d)
    marker = json.loads((converted / "fusellm-converted.json").read_text())
    _convert_sentencepiece(shipped, _sp(d), d / "tokenizer.model", converted, "ol", marker)
    assert list((cache_dir / "tokenizer-converted").iterdir()) == [converted]
    assert {f.name: f.stat().st_mtime_ns for f in converted.iterdir()} == stamps
    # the cache belongs to the files: another tokenizer.model is converted anew
    other = _llama_dir(tmp_path / "llama2", sp_models, "llama2")
    load_tokenizer(ModelSpec(path=str(other)), "l2")
    assert len(list((cache_dir / "tokenizer-converted").iterdir())) == 2


# Where the OpenLLaMA-like normaliser deletes a character (\x01), SentencePiece gives it to
# the piece before; the fast tokenizer's offsets leave it out.
OFFSETS_DIFFER = {"openllama": {ADVERSARIAL[8]}, "llama2": set()}
# align.byte_spans (not the tokenizer) places a lone "▁" that stands for a run of
# whitespace SentencePiece collapsed (or a deleted character) at the run's first byte,
# where its bytes fit, although the offsets say where it ends.
SPANS_DIFFER = {
    "openllama": {ADVERSARIAL[6], ADVERSARIAL[8], SP_CHECK_TEXTS[-1]},
    "llama2": set(),
}


@pytest.mark.parametrize("kind", ["openllama", "llama2"])
def test_converted_offsets_end_where_sentencepiece_pieces_end(tmp_path, sp_models, cache_dir, kind):
    """fusellm aligns on the byte where each token's context ends (``byte_spans`` over the
    tokens and their character offsets). SentencePiece's own piece offsets are the ground
    truth: every piece that covers text (for a character's byte pieces, the last) must end
    at the same byte, in the tokenizer's offsets and in byte_spans."""
    from align.sequence import char_to_byte

    d = _llama_dir(tmp_path / kind, sp_models, kind)
    tok = load_tokenizer(ModelSpec(path=str(d)), kind)
    sp = _sp(d)
    vocab = tokenizer_vocab(tok, len(tok))
    offsets_differ, spans_differ = set(), set()
    for text in CORPUS:
        enc = encode(tok, [text], offsets=True)
        ids, offsets = (
            enc["input_ids"][0],
            np.array(enc["offset_mapping"][0], dtype=np.int64).reshape(-1, 2),
        )
        pieces = sp.encode(text, return_type="proto").pieces
        assert ids == [p.id for p in pieces]
        assert (np.diff(offsets[:, 0]) >= 0).all() and (offsets <= len(text)).all()
        spans = byte_spans(text, [vocab.canon[i] for i in ids], offsets)
        assert (np.diff(spans.end) >= 0).all() and (spans.end <= len(text.encode())).all()
        # offsets of a piece that covers no text (a lone dummy prefix) are the next one's
        covers = [p.end > p.begin for p in pieces]
        ends = char_to_byte(text)[offsets[:, 1]]
        if [e for e, p, c in zip(ends, pieces, covers, strict=True) if c] != [
            p.end for p, c in zip(pieces, covers, strict=True) if c
        ]:
            offsets_differ.add(text)
        # byte_spans ends every piece where its context ends, inside a character too
        ended = [c or not sp.is_byte(p.id) for p, c in zip(pieces, covers, strict=True)]
        if [e for e, c in zip(spans.end, ended, strict=True) if c] != [
            p.end for p, c in zip(pieces, ended, strict=True) if c
        ]:
            spans_differ.add(text)
    assert offsets_differ == OFFSETS_DIFFER[kind]
    assert spans_differ == SPANS_DIFFER[kind]


def test_trained_model_ships_the_faithful_tokenizer(tmp_path, sp_models, cache_dir, tiny_models):
    """The pipeline on a target whose shipped tokenizer differs: every stage records the
    converted tokenizer's fingerprint, and train saves it beside the trained model."""
    from transformers import AutoTokenizer

    from fusellm.cli import main

    d = _llama_dir(tmp_path / "sp_llama", sp_models, "openllama")
    shipped = AutoTokenizer.from_pretrained(d)
    _tiny_model("llama", len(shipped)).save_pretrained(d)
    data = tmp_path / "data.jsonl"
    docs = [t * (1 + i % 3) for i, t in enumerate(TEXT[:24])] + [a for a in ADVERSARIAL if a]
    data.write_text(
        "".join(json.dumps({"id": f"d{i}", "text": t}) + "\n" for i, t in enumerate(docs))
    )
    recipe = write_recipe(
        tmp_path / "sp.yaml",
        f"""
name: sp
run_dir: {tmp_path / "run"}
models:
  sp_llama: {{path: {d}}}
  llama_bpe: {{path: {tiny_models["llama_bpe"]}}}
target: sp_llama
sources: [sp_llama, llama_bpe]
tracking: {{backend: none}}
corpus:
  inputs: [{{path: {data}, id_field: id}}]
  valid_fraction: 0.1
  test_fraction: 0.1
  block_size: 48
extract: {{top_k: 5, docs_per_shard: 8}}
align: {{}}
fuse: {{method: min_ce}}
train: {{block_size: 48, per_device_train_batch_size: 2, max_steps: 2, use_cpu: true}}
""",
    )
    assert main(["run", str(recipe), "--stages", "corpus,extract,align,fuse,train"]) == 0
    run = tmp_path / "run"
    faithful = load_tokenizer(ModelSpec(path=str(d)), "sp_llama")
    fp = json.loads((run / "extract/sp_llama/fingerprint.json").read_text())
    assert fp["tokenizer"] == tokenizer_fingerprint(faithful) != tokenizer_fingerprint(shipped)
    trained = AutoTokenizer.from_pretrained(run / "train/model")
    ref = _sp(d).encode(CORPUS)
    assert encode(trained, CORPUS, True)["input_ids"] == [[1, *ids] for ids in ref]
    assert _specials(trained) == _specials(shipped)
    assert tokenizer_fingerprint(load_tokenizer(ModelSpec(path=str(run / "train/model")), "t")) == (
        tokenizer_fingerprint(faithful)
    )


def test_faithful_tokenizer_passes_and_the_verdict_is_memoised(tmp_path, sp_models, cache_dir):
    """The same SentencePiece model through transformers' generic conversion encodes as
    sentencepiece does: it is used as is, and nothing is converted."""
    good = _tokenizer_dir(
        tmp_path / "generic", sp_models["openllama"], {"tokenizer_class": "PreTrainedTokenizerFast"}
    )
    tok = load_tokenizer(ModelSpec(path=str(good)), "openllama")
    texts = list(SP_CHECK_TEXTS)
    assert encode(tok, texts)["input_ids"] == _sp(good).encode(texts)
    memos = list((cache_dir / "tokenizer-check").iterdir())
    assert len(memos) == 1 and json.loads(memos[0].read_text())["same_ids"] is True
    stamp = memos[0].stat().st_mtime_ns
    load_tokenizer(ModelSpec(path=str(good)), "openllama")
    assert list((cache_dir / "tokenizer-check").iterdir()) == memos
    assert memos[0].stat().st_mtime_ns == stamp
    assert not (cache_dir / "tokenizer-converted").exists()
    bad = _llama_dir(tmp_path / "openllama", sp_models, "openllama")
    assert load_tokenizer(ModelSpec(path=str(bad), tokenizer=str(good)), "openllama").is_fast
    assert not (cache_dir / "tokenizer-converted").exists()
    # the verdict belongs to the files: another tokenizer.json beside them is checked anew
    tok.save_pretrained(good)
    load_tokenizer(ModelSpec(path=str(good)), "openllama")
    assert len(list((cache_dir / "tokenizer-check").iterdir())) == 2


def test_vocabulary_not_from_the_sentencepiece_model_is_refused(tmp_path, sp_models, cache_dir):
    """tokenizer.json made from one SentencePiece model, tokenizer.model another (a stale
    file): the two disagree on what the model's ids mean, and nothing tells which one the
    embedding was trained with, so no tokenizer can be faithful to the model."""
    from transformers import AutoTokenizer

    d = _llama_dir(tmp_path / "stale", sp_models, "llama2")
    AutoTokenizer.from_pretrained(d).save_pretrained(d)  # tokenizer.json from llama2's model
    (d / "tokenizer.model").write_bytes(sp_models["openllama"])
    with pytest.raises(ModelLoadError) as e:
        load_tokenizer(ModelSpec(path=str(d)), "stale")
    msg = str(e.value)
    assert msg.startswith("model 'stale': its fast tokenizer (LlamaTokenizer) encodes differently")
    assert "No faithful tokenizer can be converted from it either" in msg
    assert "vocabulary is not the SentencePiece model's" in msg and "models.stale.tokenizer" in msg
    assert not (cache_dir / "tokenizer-converted").exists() or not any(
        (cache_dir / "tokenizer-converted").iterdir()
    )  # a refusal is never cached, and no temp directory is left behind
    assert not (cache_dir / "tokenizer-check").exists()


def test_model_the_conversion_gets_wrong_too_is_refused(tmp_path, cache_dir):
    """A SentencePiece model with the whitespace mark after a word
    (treat_whitespace_as_suffix): transformers' conversions put it before, the generic one
    too, so there is nothing faithful to convert to."""
    sp_model = _train(**OPENLLAMA_LIKE, treat_whitespace_as_suffix=True)
    d = _tokenizer_dir(tmp_path / "suffix", sp_model, LLAMA_CONFIG)
    with pytest.raises(ModelLoadError) as e:
        load_tokenizer(ModelSpec(path=str(d)), "suffix")
    msg = str(e.value)
    assert msg.startswith("model 'suffix': its fast tokenizer (LlamaTokenizer)")
    assert "No faithful tokenizer can be converted from it either: it encodes" in msg
    assert str(d / "tokenizer.model") in msg


def test_hub_snapshot_is_converted_too(tmp_path, sp_models, cache_dir, hf_cache, tiny_models):
    src = _llama_dir(tmp_path / "openllama", sp_models, "openllama")
    shutil.copy(tiny_models["llama_bpe"] / "config.json", src)  # a model repo has one
    hub_snapshot(hf_cache, "org/openllama", "d" * 40, src, refs=("main",))
    tok = load_tokenizer(ModelSpec(path="org/openllama"), "ol")
    assert encode(tok, CORPUS)["input_ids"] == _sp(src).encode(CORPUS)
    [converted] = (cache_dir / "tokenizer-converted").iterdir()
    marker = json.loads((converted / "fusellm-converted.json").read_text())
    assert marker["sentencepiece_model"].endswith(f"snapshots/{'d' * 40}/tokenizer.model")
