"""Conversations: reading them, rendering them in a model's own chat template, and where
each assistant response sits in a rendering (the pure core of chat fusion).

A conversation is a list of :class:`Turn` (``system`` first if any, then ``user`` and
``assistant`` alternating, at least one assistant turn), read from OpenAI-style
``messages: [{role, content}]`` or ShareGPT ``conversations: [{from, value}]``.
Each turn's content is stripped of leading and trailing whitespace on reading: templates
differ in whether they trim it, and the same content must appear in every rendering.

Each model renders the conversation with its own chat template, so the strings differ
between models; the assistant responses do not. :func:`render` finds every response's
character span in a rendering by rendering again with that response replaced by a
sentinel: the text before the sentinel and after it must be identical in both, and the
span between must be the response exactly; a template that rewrites responses (drops a
reasoning block, inserts text) is refused, naming the model and the turn. Positions of two
renderings then correspond when their contexts end at the same byte of the same
response (:func:`fusellm.align.core.response_coordinates`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

ROLES = {"system": "system", "user": "user", "assistant": "assistant"}
SHAREGPT_ROLES = {
    "system": "system",
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
}
SENTINEL = "FuSeLlMsEnTiNeL"  # no spaces: nothing a template trims or a tokenizer merges across


class ConversationError(ValueError):
    """A malformed conversation; the message says where and why."""


@dataclass(frozen=True)
class Turn:
    role: str  # system | user | assistant
    content: str


def conversation(record: dict[str, Any], where: str) -> list[Turn]:
    """The turns of one record (``messages`` or ``conversations``), checked."""
    if "messages" in record:
        raw, role_key, text_key, roles = record["messages"], "role", "content", ROLES
    elif "conversations" in record:
        raw, role_key, text_key, roles = record["conversations"], "from", "value", SHAREGPT_ROLES
    else:
        raise ConversationError(f"{where}: no 'messages' or 'conversations' field")
    if not isinstance(raw, list) or not raw:
        raise ConversationError(f"{where}: the conversation is not a non-empty list")
    turns = []
    for i, m in enumerate(raw):
        at = f"{where}: turn {i}"
        if not isinstance(m, dict) or role_key not in m or text_key not in m:
            raise ConversationError(f"{at}: not an object with '{role_key}' and '{text_key}'")
        role = roles.get(m[role_key]) if isinstance(m[role_key], str) else None
        if role is None:
            raise ConversationError(f"{at}: unknown role {m[role_key]!r} (known: {sorted(roles)})")
        if not isinstance(m[text_key], str) or not m[text_key].strip():
            raise ConversationError(f"{at}: empty {role} turn")
        turns.append(Turn(role, m[text_key].strip()))
    body = turns[1:] if turns[0].role == "system" else turns
    for i, t in enumerate(body):
        want = "user" if i % 2 == 0 else "assistant"
        if t.role != want:
            k = i + (len(turns) - len(body))
            raise ConversationError(
                f"{where}: turn {k} is {t.role}, expected {want} (after an optional system "
                "turn, user and assistant alternate, starting with user)"
            )
    if not any(t.role == "assistant" for t in turns):
        raise ConversationError(f"{where}: no assistant turn (nothing to learn from)")
    return turns


@dataclass(frozen=True)
class Rendering:
    """One model's rendering of a conversation: ``text`` and, per assistant turn in
    order, the ``[start, end)`` character span of its content in ``text``."""

    text: str
    spans: tuple[tuple[int, int], ...]


def _apply(tok, turns: Sequence[Turn]) -> str:
    msgs = [{"role": t.role, "content": t.content} for t in turns]
    return tok.apply_chat_template(msgs, tokenize=False)


def render(tok, turns: Sequence[Turn], model: str) -> Rendering:
    """``turns`` in ``tok``'s chat template, with every assistant response located."""
    if not getattr(tok, "chat_template", None):
        raise ConversationError(
            f"model '{model}': its tokenizer has no chat template; name one with "
            f"models.{model}.chat_template"
        )
    text = _apply(tok, turns)
    spans = []
    for k, t in enumerate(turns):
        if t.role != "assistant":
            continue
        alt = _apply(tok, [*turns[:k], Turn(t.role, SENTINEL), *turns[k + 1 :]])
        start = alt.find(SENTINEL)
        tail = alt[start + len(SENTINEL) :]
        end = len(text) - len(tail)
        if (
            start < 0
            or alt.count(SENTINEL) != 1
            or text[:start] != alt[:start]
            or not text.endswith(tail)
            or text[start:end] != t.content
        ):
            raise ConversationError(
                f"model '{model}': its chat template does not keep assistant turn {k} as "
                "written (it rewrites, drops or repeats a response), so the response cannot "
                "be found in its rendering"
            )
        spans.append((start, end))
    return Rendering(text, tuple(spans))


def rendering_ids(tok, text: str, offsets: bool = False):
    """A rendering's tokens: its template's special tokens are special (unlike document
    text, see :func:`fusellm.models.encode`), and nothing is added around it (the template
    writes its own BOS). ``offsets``: also the character span of every token."""
    enc = tok(
        text,
        add_special_tokens=False,
        split_special_tokens=False,
        return_offsets_mapping=offsets,
    )
    return (enc["input_ids"], enc["offset_mapping"]) if offsets else enc["input_ids"]


def response_labels(starts: np.ndarray, spans: Sequence[tuple[int, int]]) -> np.ndarray:
    """bool ``[T]``: whether token ``t`` carries loss as a label: it starts inside a
    response's content, or right at its end (the template's end of turn, so that the model
    learns to stop). Template and prompt tokens never do."""
    out = np.zeros(len(starts), dtype=bool)
    for start, end in spans:
        out |= (starts >= start) & (starts <= end)
    return out
