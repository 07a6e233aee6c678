"""A fast tokenizer converted from a SentencePiece model must encode as that model does.

The SentencePiece models are trained here with OpenLLaMA v1's whitespace handling: the
trainer's default normaliser, which collapses runs of whitespace and strips leading and
trailing spaces. transformers' Llama conversion does not reproduce it (the known OpenLLaMA
problem), while its generic SentencePiece conversion follows the model's own normaliser.
"""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import pytest
from conftest import ADVERSARIAL, TEXT, hub_snapshot

from fusellm.models import SP_CHECK_TEXTS, ModelLoadError, encode, load_tokenizer
from fusellm.recipe import ModelSpec

# OpenLLaMA v1: BPE with byte fallback and split digits, and the default normaliser
# (nmt_nfkc, remove_extra_whitespaces=true): "a    b" is "▁a ▁b" to SentencePiece.
OPENLLAMA_LIKE = dict(model_type="bpe", byte_fallback=True, split_digits=True)


@pytest.fixture(scope="module")
def sp_model() -> bytes:
    import sentencepiece as spm

    out = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(TEXT + ADVERSARIAL),
        model_writer=out,
        vocab_size=400,
        hard_vocab_limit=False,
        minloglevel=2,
        **OPENLLAMA_LIKE,
    )
    return out.getvalue()


def _tokenizer_dir(path: Path, sp_model: bytes, tokenizer_class: str) -> Path:
    """A tokenizer directory as such models ship it: tokenizer.model + tokenizer_config.json
    (no tokenizer.json: transformers converts the SentencePiece model on load)."""
    path.mkdir(parents=True)
    (path / "tokenizer.model").write_bytes(sp_model)
    config = {"tokenizer_class": tokenizer_class, "bos_token": "<s>", "eos_token": "</s>"}
    (path / "tokenizer_config.json").write_text(json.dumps({**config, "unk_token": "<unk>"}))
    return path


def _first_difference(d: Path) -> tuple[str, list[str], list[str]]:
    """Straight from transformers and sentencepiece: the first check text they encode
    differently, with both tokenizations as pieces."""
    import sentencepiece as spm
    from transformers import AutoTokenizer

    sp = spm.SentencePieceProcessor(model_file=str(d / "tokenizer.model"))
    fast = AutoTokenizer.from_pretrained(d)
    for text in SP_CHECK_TEXTS:
        ids = fast(text, add_special_tokens=False)["input_ids"]
        if ids != sp.encode(text):
            return text, fast.convert_ids_to_tokens(ids), sp.encode(text, out_type=str)
    raise AssertionError("transformers' conversion encodes every check text as sentencepiece")


def test_llama_conversion_that_differs_from_sentencepiece_is_refused(tmp_path, sp_model, cache_dir):
    d = _tokenizer_dir(tmp_path / "openllama", sp_model, "LlamaTokenizer")
    text, fast_pieces, sp_pieces = _first_difference(d)
    assert "  " in text  # a run of spaces, which SentencePiece collapses and the fast one keeps
    with pytest.raises(ModelLoadError) as e:
        load_tokenizer(ModelSpec(path=str(d)), "openllama")
    msg = str(e.value)
    assert msg.startswith("model 'openllama': its fast tokenizer (LlamaTokenizer)")
    assert repr(text) in msg and str(fast_pieces) in msg and str(sp_pieces) in msg
    assert str(d / "tokenizer.model") in msg and "models.openllama.tokenizer" in msg
    assert not (cache_dir / "tokenizer-check").exists()  # a refusal is never memoised


def test_faithful_conversion_passes_and_the_verdict_is_memoised(tmp_path, sp_model, cache_dir):
    """The same SentencePiece model through transformers' generic conversion encodes as
    sentencepiece does; pointing ``tokenizer`` at it is the fix the refusal suggests."""
    import sentencepiece as spm

    good = _tokenizer_dir(tmp_path / "generic", sp_model, "PreTrainedTokenizerFast")
    tok = load_tokenizer(ModelSpec(path=str(good)), "openllama")
    sp = spm.SentencePieceProcessor(model_file=str(good / "tokenizer.model"))
    texts = list(SP_CHECK_TEXTS)
    assert encode(tok, texts)["input_ids"] == sp.encode(texts)
    memos = list((cache_dir / "tokenizer-check").iterdir())
    assert len(memos) == 1 and json.loads(memos[0].read_text())["same_ids"] is True
    stamp = memos[0].stat().st_mtime_ns
    load_tokenizer(ModelSpec(path=str(good)), "openllama")
    assert list((cache_dir / "tokenizer-check").iterdir()) == memos
    assert memos[0].stat().st_mtime_ns == stamp
    bad = _tokenizer_dir(tmp_path / "openllama", sp_model, "LlamaTokenizer")
    assert load_tokenizer(ModelSpec(path=str(bad), tokenizer=str(good)), "openllama").is_fast
    # the verdict belongs to the files: another tokenizer.json beside them is checked anew
    tok.save_pretrained(good)
    load_tokenizer(ModelSpec(path=str(good)), "openllama")
    assert len(list((cache_dir / "tokenizer-check").iterdir())) == 2


def test_hub_snapshot_is_checked_too(tmp_path, sp_model, cache_dir, hf_cache, tiny_models):
    src = _tokenizer_dir(tmp_path / "openllama", sp_model, "LlamaTokenizer")
    shutil.copy(tiny_models["llama_bpe"] / "config.json", src)  # a model repo has one
    hub_snapshot(hf_cache, "org/openllama", "d" * 40, src, refs=("main",))
    with pytest.raises(ModelLoadError) as e:
        load_tokenizer(ModelSpec(path="org/openllama"), "ol")
    msg = str(e.value)
    assert msg.startswith("model 'ol': its fast tokenizer")
    assert f"snapshots/{'d' * 40}/tokenizer.model" in msg
