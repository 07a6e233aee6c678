"""Pure corpus core: hash splits are stable; cuts tile the text and fit every tokenizer."""

from __future__ import annotations

import re

import pytest
from conftest import ADVERSARIAL, TEXT

from fusellm.corpus.core import Fitter, cut_spans, split_of


def ws_spans(text):
    return [m.span() for m in re.finditer(r"\S+", text)]


WS = Fitter("ws", ws_spans, 0)


def test_split_is_deterministic_and_independent_of_other_docs():
    ids = [f"doc-{i}" for i in range(5000)]
    a = {i: split_of(i, 0.1, 0.2) for i in ids}
    b = {i: split_of(i, 0.1, 0.2) for i in reversed(ids + [f"new-{j}" for j in range(100)])}
    assert all(a[i] == b[i] for i in ids)
    frac = {s: sum(v == s for v in a.values()) / len(ids) for s in ("train", "valid", "test")}
    assert abs(frac["test"] - 0.2) < 0.03 and abs(frac["valid"] - 0.1) < 0.03


def test_split_salt_changes_assignment():
    ids = [f"d{i}" for i in range(200)]
    assert [split_of(i, 0.3, 0.3) for i in ids] != [split_of(i, 0.3, 0.3, "other") for i in ids]


def test_zero_fractions_everything_trains():
    assert {split_of(f"d{i}", 0.0, 0.0) for i in range(100)} == {"train"}


@pytest.mark.parametrize("block", [16, 17, 40, 1000])
def test_cuts_tile_text_and_fit_whitespace_tokenizer(block):
    text = " ".join(TEXT)
    spans = cut_spans(text, [WS], block)
    assert "".join(text[a:b] for a, b in spans) == text
    assert all(b > a for a, b in spans) and all(
        spans[i][1] == spans[i + 1][0] for i in range(len(spans) - 1)
    )
    assert all(len(ws_spans(text[a:b])) <= block for a, b in spans)
    if len(ws_spans(text)) > block:
        # greedy: no cut wastes more than half a block
        assert all(len(ws_spans(text[a:b])) >= block // 2 - 1 for a, b in spans[:-1])


def test_cuts_prefer_paragraph_breaks():
    para = "word " * 10
    text = "\n\n".join(para.strip() for _ in range(6))
    spans = cut_spans(text, [WS], 25)
    for a, b in spans[:-1]:
        assert text[a:b].endswith("\n\n")


def test_special_tokens_reserve_room():
    text = " ".join(["w"] * 100)
    spans = cut_spans(text, [Fitter("ws+2", ws_spans, 2)], 20)
    assert all(len(ws_spans(text[a:b])) <= 18 for a, b in spans)


def test_empty_text_has_no_spans():
    assert cut_spans("", [WS], 16) == []


def test_cuts_fit_real_tokenizers_of_every_kind(tiny_models):
    from transformers import AutoTokenizer

    from fusellm.corpus.runner import _fitter

    fitters = [_fitter(n, AutoTokenizer.from_pretrained(p)) for n, p in tiny_models.items()]
    for text in ["\n\n".join(TEXT[:30]), "".join(ADVERSARIAL) * 5, "東京" * 200, "😀" * 150]:
        spans = cut_spans(text, fitters, 16)
        assert "".join(text[a:b] for a, b in spans) == text
        for f in fitters:
            for a, b in spans:
                assert len(f.spans(text[a:b])) + f.n_special <= 16, (f.name, text[a:b])
