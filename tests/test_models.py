"""Model/tokenizer loading from local directories, hub ids offline, vocab size from embeddings."""

from __future__ import annotations

import pytest
import torch

from fusellm.models import (
    ModelLoadError,
    load_model,
    load_tokenizer,
    locate,
    model_vocab_size,
    special_token_overhead,
    tokenizer_fingerprint,
)
from fusellm.recipe import ModelSpec


@pytest.mark.parametrize("name", ["llama_bpe", "neox_unigram", "gpt2_wordpiece", "mpt_bpe"])
def test_load_tiny_models_of_each_family(tiny_models, name):
    from conftest import TINY

    arch, _, tok_vocab, model_vocab = TINY[name]
    spec = ModelSpec(path=str(tiny_models[name]))
    tok = load_tokenizer(spec, name)
    model = load_model(spec, name)
    assert tok.is_fast and len(tok) <= tok_vocab < model_vocab or tok_vocab == model_vocab
    assert model_vocab_size(model) == model_vocab  # padded rows count, len(tokenizer) does not
    assert not model.training and model.dtype == torch.float32
    enc = tok("hello world 😀", return_offsets_mapping=True)
    out = model(torch.tensor([enc["input_ids"]]))
    assert out.logits.shape[-1] == model_vocab
    assert locate(spec, name).kind == "dir"


def test_tokenizer_fingerprints_differ_and_are_stable(tiny_models):
    fps = {
        n: tokenizer_fingerprint(load_tokenizer(ModelSpec(path=str(p)), n))
        for n, p in tiny_models.items()
    }
    assert len(set(fps.values())) == len(fps)
    assert fps["llama_bpe"] == tokenizer_fingerprint(
        load_tokenizer(ModelSpec(path=str(tiny_models["llama_bpe"])), "x")
    )


def test_special_token_overhead(tiny_models):
    tok = load_tokenizer(ModelSpec(path=str(tiny_models["llama_bpe"])), "llama")
    assert special_token_overhead(tok) == len(tok("a")["input_ids"]) - len(
        tok("a", add_special_tokens=False)["input_ids"]
    )


def test_dtype_from_spec(tiny_models):
    m = load_model(ModelSpec(path=str(tiny_models["llama_bpe"]), dtype="bfloat16"), "llama")
    assert m.dtype == torch.bfloat16


def test_hub_id_offline_names_model_and_suggests_local_path(monkeypatch, hf_cache):
    """A hub id that is not in the local cache: its revision cannot be resolved offline, so
    even ``locate`` (which stage fingerprints call) fails naming the model."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    spec = ModelSpec(path="meta-llama/Llama-2-7b-hf")
    for call in (locate, load_tokenizer, load_model):
        with pytest.raises(ModelLoadError) as e:
            call(spec, "llama2")
        msg = str(e.value)
        assert "model 'llama2'" in msg and "meta-llama/Llama-2-7b-hf" in msg
        assert "HF_HUB_OFFLINE" in msg and "models.llama2.path" in msg


def test_missing_local_path_and_package(tmp_path):
    with pytest.raises(ModelLoadError, match=r"model 'm': no such file or directory: .*nope"):
        locate(ModelSpec(path=str(tmp_path / "nope")), "m")
    with pytest.raises(
        ModelLoadError,
        match=r"model 'g': cannot resolve path 'pkg:no_such_pkg_xyz/m.gguf'.*not installed",
    ):
        locate(ModelSpec(path="pkg:no_such_pkg_xyz/m.gguf"), "g")


def test_max_positions_names_the_key_config_json_uses(tiny_models):
    """Length errors tell the user which config key holds the limit (GPT-2 aliases
    ``n_positions`` as ``max_position_embeddings``; MPT calls it ``max_seq_len``)."""
    from transformers import AutoConfig

    from fusellm.models import max_positions, spec_max_positions

    got = {n: max_positions(AutoConfig.from_pretrained(p)) for n, p in tiny_models.items()}
    assert got == {
        "llama_bpe": (512, "max_position_embeddings"),
        "neox_unigram": (512, "max_position_embeddings"),
        "gpt2_wordpiece": (512, "n_positions"),
        "mpt_bpe": (512, "max_seq_len"),
    }
    spec = ModelSpec(path=str(tiny_models["gpt2_wordpiece"]))
    assert spec_max_positions(spec, "gpt2") == (512, "n_positions")
