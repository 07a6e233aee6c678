"""The chat path end to end on tiny models with two different chat templates: each model
extracts its own rendering; a source distribution lands only where the target's context
ends inside a response; prompt and template tokens carry no loss; a source fused with
itself reproduces its own rows."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from test_chat_core import CHATML, GEMMA

from fusellm.chat import Turn, render
from fusellm.cli import main
from fusellm.models import load_tokenizer
from fusellm.recipe import load_recipe
from fusellm.shards import read_shard

QUESTIONS = [
    ("What is 東京?", "Tokyo 😀, Japan's capital."),
    ("Add 2 and 3.", "2 + 3 = 5."),
    ("Name a colour.", "Blue, like the sea."),
    ("Say hello in French.", "Bonjour !"),
]


def _conversations(n: int) -> list[dict]:
    out = []
    for i in range(n):
        q1, a1 = QUESTIONS[i % 4]
        q2, a2 = QUESTIONS[(i + 1) % 4]
        msgs = [{"role": "user", "content": f"{q1} ({i})"}, {"role": "assistant", "content": a1}]
        if i % 2:  # multi-turn
            msgs += [{"role": "user", "content": q2}, {"role": "assistant", "content": a2 * 2}]
        out.append({"id": f"c{i}", "messages": msgs})
    return out


@pytest.fixture()
def chat_run(tmp_path, tiny_models):
    """A chat recipe: llama (ChatML) is the target, neox (Gemma turns) and twin (a copy of
    llama, same template) the sources; corpus → extract → align → fuse → train."""
    data = tmp_path / "chats.jsonl"
    data.write_text("".join(json.dumps(c) + "\n" for c in _conversations(16)), encoding="utf-8")
    (tmp_path / "chatml.jinja").write_text(CHATML)
    (tmp_path / "gemma.jinja").write_text(GEMMA)
    shutil.copytree(tiny_models["llama_bpe"], tmp_path / "twin")
    chatml, gemma = tmp_path / "chatml.jinja", tmp_path / "gemma.jinja"
    body = f"""
name: chat
run_dir: {tmp_path / "run"}
models:
  llama: {{path: {tiny_models["llama_bpe"]}, chat_template: {chatml}}}
  twin: {{path: {tmp_path / "twin"}, chat_template: {chatml}}}
  neox: {{path: {tiny_models["neox_unigram"]}, chat_template: {gemma}}}
target: llama
sources: [llama, neox, twin]
tracking: {{mode: disabled}}
corpus:
  inputs: [{{path: {data}, format: chat, id_field: id, domain: chat}}]
  valid_fraction: 0.0
  test_fraction: 0.0
  block_size: 320
extract: {{top_k: 8, docs_per_shard: 8}}
align: {{vocab_method: em}}  # identical vocabularies map onto themselves
fuse: {{method: min_ce}}
train:
  lm_weight: 0.5
  block_size: 320
  per_device_train_batch_size: 2
  learning_rate: 1.0e-3
  max_steps: 2
  save_steps: 2
  use_cpu: true
"""
    path = tmp_path / "chat.yaml"
    path.write_text(body)
    assert main(["run", str(path), "--stages", "corpus,extract,align,fuse,train"]) == 0
    return load_recipe(path), tmp_path / "run"


def _docs(run, stage):
    return [d for p in sorted((run / stage).rglob("shard-*.safetensors")) for d in read_shard(p)[0]]


def _target_keys(recipe, doc, turns):
    """The target rendering and the key of each of its positions (-1: a template or
    prompt context), as alignment computes them."""
    from align import byte_spans
    from fusellm.align.core import response_coordinates, tokenizer_vocab

    tok = load_tokenizer(recipe.models["llama"], "llama")
    r = render(tok, turns, "llama")
    vocab = tokenizer_vocab(tok, 320)
    sp = byte_spans(r.text, [vocab.canon[i] for i in doc.input_ids], np.asarray(doc.offsets))
    return r, response_coordinates(r.text, r.spans, sp)[1]


def _turns(run):
    rows = [json.loads(x) for x in (run / "corpus" / "train.jsonl").read_text().splitlines()]
    return {r["id"]: [Turn(m["role"], m["content"]) for m in r["messages"]] for r in rows}


def test_a_source_distribution_lands_only_inside_a_response(chat_run):
    recipe, run = chat_run
    turns = _turns(run)
    n_aligned = 0
    for d in _docs(run, "align/neox"):
        r, keys = _target_keys(recipe, d, turns[d.doc_id])
        # every aligned target position's context ends inside a response (never on a
        # prompt or template context)
        assert (keys[d.aligned] >= 0).all(), d.doc_id
        n_aligned += int(d.aligned.sum())
    assert n_aligned > 0


def test_prompt_and_template_tokens_carry_no_loss(chat_run):
    from fusellm.train.data import FusedBlocks
    from fusellm.train.loss import fusion_loss_sums

    recipe, run = chat_run
    turns = _turns(run)
    fused = _docs(run, "fuse")
    for d in fused:
        r, _ = _target_keys(recipe, d, turns[d.doc_id])
        starts = np.asarray(d.offsets)[:, 0]
        # labels: response text (and the end of turn after it), nothing of prompt/template
        in_response = np.array([any(a <= s <= b for a, b in r.spans) for s in starts])
        assert (d.labels == in_response).all(), d.doc_id
    blocks = FusedBlocks(sorted((run / "fuse").rglob("shard-*.safetensors")), 320)
    item = blocks[0]
    batch = {k: v[None] for k, v in item.items() if isinstance(v, torch.Tensor)}
    logits = torch.randn(1, 320, 320, generator=torch.Generator().manual_seed(0))
    args = [batch[k] for k in ("shift_labels", "fused_ids", "fused_logprobs", "fused_mask")]
    before = fusion_loss_sums(logits, *args, lm_weight=0.5)
    ignored = batch["shift_labels"] == -100
    assert ignored.any() and (~ignored).any()
    # another teacher row and another label wherever the next token is prompt/template
    ids = torch.where(ignored[..., None], (batch["fused_ids"] + 7) % 320, batch["fused_ids"])
    lps = torch.where(ignored[..., None], torch.full_like(args[2], -1.0), args[2])
    after = fusion_loss_sums(logits, args[0], ids, lps, args[3], lm_weight=0.5)
    for f in ("total", "clm", "fusion", "n_clm", "n_fusion"):
        torch.testing.assert_close(getattr(before, f), getattr(after, f))
    assert before.n_clm == (~ignored).sum()


def test_a_source_fused_with_itself_reproduces_its_own_rows(chat_run):
    recipe, run = chat_run
    turns = _turns(run)
    own = {d.doc_id: d for d in _docs(run, "extract/llama")}
    n_tokens = len(load_tokenizer(recipe.models["llama"], "llama"))
    checked = 0
    for d in _docs(run, "align/twin"):
        t = own[d.doc_id]
        _, keys = _target_keys(recipe, t, turns[d.doc_id])
        # the same tokenizer and template: every keyed (response) context is aligned ...
        assert (d.aligned == (keys >= 0)).all(), d.doc_id
        # ... with the target's own distribution there
        for p in np.flatnonzero(d.aligned):
            mine = dict(
                zip(t.topk_ids[p].tolist(), t.topk_logprobs[p].float().tolist(), strict=True)
            )
            got = dict(
                zip(d.topk_ids[p].tolist(), d.topk_logprobs[p].float().tolist(), strict=True)
            )
            # ids beyond the tokenizer are padded embedding rows: no token, never mapped
            real = {i for i in mine if i < n_tokens}
            common = real & set(got)
            # the row keeps the gold next token, which may push out the k-th entry
            assert len(common) >= len(real) - 1, (d.doc_id, p)
            for i in common:
                assert got[i] == pytest.approx(mine[i], abs=1e-5)
            gold = int(t.input_ids[p + 1]) if p + 1 < len(t.input_ids) else -1
            if gold >= 0 and np.isfinite(t.ce[p]):
                # exact, up to the shard dtype's rounding
                assert got[gold] == pytest.approx(-float(t.ce[p]), abs=1e-2)
            checked += 1
    assert checked > 0
