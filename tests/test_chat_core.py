"""Chat core: conversations read and checked; each response found in every model's own
rendering; positions keyed by (response, character); only response tokens are labels."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import _train_tokenizer

from fusellm.chat import (
    ConversationError,
    Turn,
    conversation,
    render,
    rendering_ids,
    response_labels,
)

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
GEMMA = (
    "{{ bos_token }}{% for m in messages %}{% set r = 'model' if m['role'] == 'assistant' "
    "else m['role'] %}<start_of_turn>{{ r }}\n{{ m['content'] | trim }}<end_of_turn>\n"
    "{% endfor %}"
)
CONV = [
    Turn("system", "You answer briefly."),
    Turn("user", "Wie heißt 東京 auf Englisch?"),
    Turn("assistant", "Tokyo 😀 — the capital."),
    Turn("user", "And 2+3?"),
    Turn("assistant", "2 + 3 = 5.\n\nThat's all."),
]


def _tok(kind: str, template: str):
    tok = _train_tokenizer(kind, 300)
    tok.chat_template = template
    if tok.bos_token is None:
        tok.bos_token = tok.eos_token or "<s>"
    return tok


def _ends(tok, text):
    enc = tok(text, return_offsets_mapping=True, add_special_tokens=False)
    off = np.asarray(enc["offset_mapping"], dtype=np.int64)
    return off[:, 0], off[:, 1]


@pytest.mark.parametrize("kind", ["bpe", "unigram", "wordpiece"])
@pytest.mark.parametrize("template", [CHATML, GEMMA], ids=["chatml", "gemma"])
def test_every_response_is_found_in_each_rendering(kind, template):
    r = render(_tok(kind, template), CONV, "m")
    responses = [t.content for t in CONV if t.role == "assistant"]
    assert [r.text[s:e] for s, e in r.spans] == responses


def test_keys_name_the_same_byte_of_the_same_response_in_both_renderings():
    from align import byte_spans
    from fusellm.align.core import response_coordinates, tokenizer_vocab

    responses = [t.content.encode() for t in CONV if t.role == "assistant"]
    seen = []
    for tok in (_tok("bpe", CHATML), _tok("unigram", GEMMA)):
        r = render(tok, CONV, "m")
        ids, off = rendering_ids(tok, r.text, offsets=True)
        vocab = tokenizer_vocab(tok, len(tok))
        sp = byte_spans(r.text, [vocab.canon[i] for i in ids], np.asarray(off))
        coords, keys = response_coordinates(r.text, r.spans, sp)
        assert (np.diff(keys[keys >= 0]) > 0).all()  # increasing, as match_keys needs
        assert (np.diff(coords.end) >= 0).all()  # response bytes, never decreasing
        # widths: response tokens only (template and prompt tokens add no bytes)
        assert (coords.end - coords.start).sum() <= sum(map(len, responses))
        got = {}
        cb = np.cumsum([0, *map(len, responses)])
        for p, key in enumerate(keys):
            if key < 0:
                continue
            c, pre = divmod(int(key), 2)  # pre: the context just before response k
            k = int(np.searchsorted(cb, c, side="left")) - (0 if pre else 1)
            # the bytes of the rendering before this context end, inside response k, are
            # that response's first bytes: the same for every rendering
            text_bytes = r.text.encode()
            start_k = len(r.text[: r.spans[k][0]].encode())
            assert text_bytes[start_k : sp.end[p]] == responses[k][: c - cb[k]]
            got[int(key)] = (k, c - int(cb[k]))
        assert len(got) == len(set(got.values()))
        seen.append(got)
    common = set(seen[0]) & set(seen[1])
    assert common and all(seen[0][k] == seen[1][k] for k in common)


def test_only_response_tokens_and_the_end_of_turn_are_labels():
    tok = _tok("bpe", CHATML)
    r = render(tok, CONV, "m")
    starts, _ = _ends(tok, r.text)
    lab = response_labels(starts, r.spans)
    for s, is_label in zip(starts, lab, strict=True):
        in_response = any(a <= s <= b for a, b in r.spans)
        assert is_label == in_response
    prompt = r.text.index("And 2+3?")
    assert not lab[(starts >= prompt) & (starts < prompt + 8)].any()


@pytest.mark.parametrize(
    "record, error",
    [
        ({"text": "x"}, "no 'messages' or 'conversations'"),
        ({"messages": []}, "not a non-empty list"),
        ({"messages": [{"role": "robot", "content": "x"}]}, "turn 0: unknown role 'robot'"),
        ({"messages": [{"role": "user", "content": " "}]}, "turn 0: empty user turn"),
        ({"messages": [{"role": "user", "content": "hi"}]}, "no assistant turn"),
        (
            {"messages": [{"role": "assistant", "content": "hi"}]},
            "turn 0 is assistant, expected user",
        ),
        (
            {"conversations": [{"from": "human", "value": "a"}, {"from": "human", "value": "b"}]},
            "turn 1 is user, expected assistant",
        ),
        ({"messages": [{"role": "user"}]}, "not an object with 'role' and 'content'"),
    ],
)
def test_malformed_conversations_are_named(record, error):
    with pytest.raises(ConversationError, match=error):
        conversation(record, "chats.jsonl:7")


def test_sharegpt_and_openai_forms_read_alike():
    a = conversation(
        {"conversations": [{"from": "human", "value": " hi "}, {"from": "gpt", "value": "yo\n"}]},
        "f:1",
    )
    b = conversation(
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]},
        "f:2",
    )
    assert a == b == [Turn("user", "hi"), Turn("assistant", "yo")]


def test_a_template_that_rewrites_responses_is_refused_naming_the_model():
    drops = CHATML.replace("{{ m['content'] }}", "{{ m['content'].split('\n')[0] }}")
    with pytest.raises(ConversationError, match="model 'm2'.*assistant turn 4"):
        render(_tok("bpe", drops), CONV, "m2")
    with pytest.raises(ConversationError, match="model 'm3': its tokenizer has no chat template"):
        render(_train_tokenizer("bpe", 300), CONV, "m3")


def _chat_recipe(tmp_path, tiny_models, lines, extra=""):
    import json

    data = tmp_path / "chats.jsonl"
    data.write_text("".join(json.dumps(x) + "\n" for x in lines), encoding="utf-8")
    (tmp_path / "chatml.jinja").write_text(CHATML)
    (tmp_path / "gemma.jinja").write_text(GEMMA)
    body = f"""
name: chat
run_dir: {tmp_path / "run"}
models:
  llama: {{path: {tiny_models["llama_bpe"]}, chat_template: {tmp_path / "chatml.jinja"}}}
  neox: {{path: {tiny_models["neox_unigram"]}, chat_template: {tmp_path / "gemma.jinja"}}}
target: llama
sources: [llama, neox]
tracking: {{mode: disabled}}
corpus:
  inputs: [{{path: {data}, format: chat, id_field: id, domain: chat}}]
  valid_fraction: 0.0
  test_fraction: 0.0
  block_size: 200
{extra}"""
    path = tmp_path / "chat.yaml"
    path.write_text(body)
    return path


def _conv(i, answer="Tokyo 😀 — the capital."):
    return {
        "id": f"c{i}",
        "messages": [
            {"role": "user", "content": f"Question {i}: 東京?"},
            {"role": "assistant", "content": answer},
        ],
    }


def test_the_corpus_keeps_conversations_whole_and_counts_bad_ones(tmp_path, tiny_models):
    import json

    from fusellm.cli import main

    lines = [_conv(0), {"id": "bad", "messages": [{"role": "user", "content": "x"}]}, _conv(1)]
    lines.append(_conv(2, answer="word " * 400))  # longer than block_size in every template
    recipe = _chat_recipe(tmp_path, tiny_models, lines, "  on_error: skip\n")
    assert main(["corpus", str(recipe)]) == 0
    rows = [json.loads(x) for x in (tmp_path / "run/corpus/train.jsonl").read_text().splitlines()]
    assert [r["id"] for r in rows] == ["c0#0", "c1#0"]
    assert rows[0]["text"] == "Tokyo 😀 — the capital."
    assert rows[0]["messages"][0] == {"role": "user", "content": "Question 0: 東京?"}
    man = json.loads((tmp_path / "run/corpus/manifest.json").read_text())
    assert man["stats"]["skipped"] == {"bad_conversation": 1, "too_long": 1}


def test_a_bad_conversation_stops_the_corpus_naming_file_and_line(tmp_path, tiny_models, capsys):
    from fusellm.cli import main

    lines = [_conv(0), {"id": "x", "messages": [{"role": "robot", "content": "beep"}]}]
    recipe = _chat_recipe(tmp_path, tiny_models, lines)
    assert main(["corpus", str(recipe)]) != 0
    assert (
        "chats.jsonl:2: bad_conversation: turn 0: unknown role 'robot'" in capsys.readouterr().err
    )
