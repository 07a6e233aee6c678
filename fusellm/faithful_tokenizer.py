"""A fast tokenizer that encodes as the model's SentencePiece model does.

fusellm needs fast tokenizers (character offsets), but a model with a SentencePiece model
(``tokenizer.model``) was trained on SentencePiece's encoding, and the fast tokenizer
transformers converts from it can differ: OpenLLaMA's keeps the runs of whitespace its
model collapses, and transformers 5's ``LlamaTokenizer`` drops a leading space.
:func:`check_sentencepiece` compares the two on :data:`SP_CHECK_TEXTS` once (the verdict
is cached); where they differ it converts ``tokenizer.model`` through transformers'
generic SentencePiece conversion, gives it the shipped tokenizer's special and added
tokens, the BOS/EOS it adds, its maximum length, padding side and chat template, verifies
all of that, caches it, and returns it with a warning. Where no faithful tokenizer can be
built (the two disagree on the vocabulary, or the conversion differs too) it refuses,
naming the model.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import uuid
from pathlib import Path
from typing import TYPE_CHECKING

from fusellm.models import Located, ModelLoadError, encode
from fusellm.storage import atomic_write_json, cache_root, cached_sha256

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

log = logging.getLogger(__name__)


SP_CHECK_TEXTS = (
    "The quick brown fox jumps over the lazy dog.",
    "two  spaces, three   spaces and eight        spaces",
    " one leading space",
    "   three leading spaces",
    "trailing spaces   ",
    "line one\nline two\n\n\nafter blank lines\n",
    "tabs\tand\t\ttwo tabs",
    "digits 0123456789, 3.14159 and 1,000,000",
    "日本語のテキストと中文文本",
    "emoji 😀🚀 and 👩‍👩‍👧‍👦",
    "def f(x):\n    if x:\n        return x  # comment\n\treturn None\n",
)
"""Texts on which a fast tokenizer must encode as its SentencePiece model does: the
whitespace converters get wrong (runs, leading and trailing, newlines, tabs), digits, CJK,
emoji and code."""

TOKENIZER_FILES = (
    "tokenizer.model",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "config.json",  # AutoTokenizer picks the class from it when tokenizer_config does not
)


def check_sentencepiece(
    tok: PreTrainedTokenizerBase, loc: Located, name: str
) -> PreTrainedTokenizerBase:
    """The fast tokenizer to use for a model whose tokenizer files ship a SentencePiece model
    (``tokenizer.model``): ``tok`` when it encodes as that model does, else a faithful one
    converted from it (:func:`_convert_sentencepiece`, cached); :class:`ModelLoadError` when
    no faithful one can be built.

    The model was trained on SentencePiece's encoding; a fast tokenizer converted from it
    can differ (OpenLLaMA's keeps the runs of spaces its SentencePiece model collapses;
    transformers' ``LlamaTokenizer`` drops a leading space), and then every stage would feed
    the model token sequences it never saw. The ids of :data:`SP_CHECK_TEXTS` (as
    :func:`encode` gives them) must equal SentencePiece's. Both verdicts (``tok`` passes, or
    the converted directory) are cached, keyed by the tokenizer files' hashes and the
    library versions, so later loads cost a few ``stat`` calls.
    """
    sp_file = _sentencepiece_file(loc, name)
    if sp_file is None:
        return tok
    key = _check_key(sp_file.parent)
    memo = cache_root() / "tokenizer-check" / f"{key}.json"
    converted = cache_root() / "tokenizer-converted" / key
    if memo.exists():
        return tok
    if not (converted / CONVERTED_MARKER).exists():
        import sentencepiece

        try:
            sp = sentencepiece.SentencePieceProcessor(model_file=str(sp_file))
        except (RuntimeError, OSError):  # a tiktoken vocabulary of that name: no reference
            return tok
        difference = _first_difference(tok, sp, list(SP_CHECK_TEXTS))
        if difference is None:
            atomic_write_json(
                memo, {"model": name, "sentencepiece": str(sp_file), "same_ids": True}
            )
            log.info("model '%s': fast tokenizer encodes as %s (checked once)", name, sp_file)
            return tok
        _convert_sentencepiece(tok, sp, sp_file, converted, name, difference)
    return _load_converted(converted, name)


CONVERTED_MARKER = "fusellm-converted.json"


def _first_difference(tok, sp, texts: list[str]) -> dict | None:
    """The first of ``texts`` that ``tok`` encodes differently from SentencePiece ``sp``,
    with both tokenizations as pieces and ids; None when all are the same."""
    for text, fast, ref in zip(
        texts, encode(tok, texts)["input_ids"], sp.encode(texts), strict=True
    ):
        if fast != ref:
            return {
                "class": type(tok).__name__,
                "text": text,
                "fast": f"{tok.convert_ids_to_tokens(fast)} {fast}",
                "sentencepiece": f"{[sp.id_to_piece(i) for i in ref]} {ref}",
            }
    return None


def _difference_message(name: str, sp_file: Path, d: dict) -> str:
    return (
        f"model '{name}': its fast tokenizer ({d['class']}) encodes differently from the "
        f"SentencePiece model it ships ({sp_file}), which the model was trained with. On "
        f"{d['text']!r}:\n  fast tokenizer: {d['fast']}\n  SentencePiece:  {d['sentencepiece']}\n"
    )


def _convert_sentencepiece(
    tok: PreTrainedTokenizerBase, sp, sp_file: Path, out: Path, name: str, difference: dict
) -> None:
    """Convert ``sp_file`` once into a fast tokenizer directory ``out`` that encodes as
    SentencePiece ``sp`` does and has ``tok``'s special-token behaviour, or refuse.

    Built in a temp directory beside ``out`` and renamed into place, so ranks converting
    at the same time never see a half-written directory (the first rename wins)."""
    from transformers import PreTrainedTokenizerFast

    log.info("model '%s': converting a tokenizer from %s (once; cached at %s)", name, sp_file, out)
    # A name no other process (on any host sharing the cache) picks.
    tmp = out.with_name(f"{out.name}.tmp-{uuid.uuid4().hex}")
    tmp.mkdir(parents=True)
    try:
        shutil.copyfile(sp_file, tmp / "tokenizer.model")
        try:
            _sentencepiece_tokenizer(tok, sp, tmp).save_pretrained(tmp)
            # What later loads get is the saved directory: check that, not the object.
            why = _unfaithful(PreTrainedTokenizerFast.from_pretrained(tmp), tok, sp)
        except Exception as e:  # the generic conversion cannot take this model
            why = f"the conversion fails: {type(e).__name__}: {e}"
        if why:
            raise ModelLoadError(
                _difference_message(name, sp_file, difference)
                + f"  No faithful tokenizer can be converted from it either: {why}.\n"
                f"  fusellm needs a fast tokenizer (character offsets) that encodes as the "
                f"SentencePiece model does: set models.{name}.tokenizer to a directory whose "
                "tokenizer.json does, with a tokenizer_config.json naming tokenizer_class "
                "PreTrainedTokenizerFast."
            )
        (tmp / CONVERTED_MARKER).write_text(
            json.dumps({"model": name, "sentencepiece_model": str(sp_file), **difference})
        )
        try:
            os.replace(tmp, out)
        except OSError:  # another process converted it first
            if not (out / CONVERTED_MARKER).exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _sentencepiece_tokenizer(tok: PreTrainedTokenizerBase, sp, folder: Path):
    """A fast tokenizer from ``folder/tokenizer.model`` (SentencePiece ``sp``) through
    transformers' generic SentencePiece conversion (which follows the model's own
    normaliser), with ``tok``'s added and special tokens, the specials it adds around a
    text, maximum length, padding side and chat template."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    # legacy=True: a dummy prefix before a text that starts with a space too, as
    # SentencePiece does (legacy=False drops it, like LlamaTokenizer).
    generic = PreTrainedTokenizerFast.from_pretrained(folder, legacy=True)
    backend = json.loads(generic.backend_tokenizer.to_str())
    added = {t["content"]: t for t in backend["added_tokens"]}
    for i, t in sorted(tok.added_tokens_decoder.items()):
        if t.content in added:  # a control piece: keep tok's flag
            added[t.content]["special"] = t.special
        elif _added_beyond_sentencepiece(i, sp):
            # Ids follow the list order, so tok's ids when the vocabularies agree
            # (_unfaithful checks). Matched on the raw text, as the generic conversion
            # does for dummy-prefix models.
            added[t.content] = {**t.__getstate__(), "id": i, "normalized": False}
        # else a piece SentencePiece emits from text itself (user-defined ones whole)
    backend["added_tokens"] = list(added.values())
    backend["post_processor"] = _template(tok)
    kwargs = dict(tok.special_tokens_map)
    if tok.extra_special_tokens:
        kwargs["extra_special_tokens"] = [str(t) for t in tok.extra_special_tokens]
    if tok.chat_template is not None:
        kwargs["chat_template"] = tok.chat_template
    return PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(json.dumps(backend)),
        model_max_length=tok.model_max_length,
        padding_side=tok.padding_side,
        **kwargs,
    )


def _template(tok: PreTrainedTokenizerBase) -> dict:
    """A ``TemplateProcessing`` post-processor (as tokenizer.json spells it) adding the
    special tokens ``tok`` adds around one text and around a pair, with their type ids, read
    from ``tok``'s own encodings."""
    specials: dict[str, dict] = {}

    def layout(texts: tuple[str, ...]) -> list[dict]:
        enc = tok(*texts, split_special_tokens=True, return_token_type_ids=True)
        ids = enc["input_ids"]
        types = enc.get("token_type_ids") or [0] * len(ids)

        def added(start: int, end: int) -> list[dict]:
            out = []
            for i, t in zip(ids[start:end], types[start:end], strict=True):
                piece = tok.convert_ids_to_tokens(i)
                specials[piece] = {"id": piece, "ids": [i], "tokens": [piece]}
                out.append({"SpecialToken": {"id": piece, "type_id": t}})
            return out

        pieces: list[dict] = []
        at = 0
        for seq, text in zip("AB", texts, strict=False):
            own = encode(tok, [text])["input_ids"][0]
            start = _find(ids, own, at)
            if start is None:
                raise ValueError(f"{type(tok).__name__} does not keep the ids of {text!r} whole")
            pieces += added(at, start)
            pieces.append({"Sequence": {"id": seq, "type_id": types[start]}})
            at = start + len(own)
        return pieces + added(at, len(ids))

    single, pair = layout(("a",)), layout(("a", "b"))
    return {
        "type": "TemplateProcessing",
        "single": single,
        "pair": pair,
        "special_tokens": specials,
    }


def _find(ids: list[int], part: list[int], start: int = 0) -> int | None:
    """The first index from ``start`` where ``part`` occurs in ``ids``."""
    return next(
        (j for j in range(start, len(ids) - len(part) + 1) if ids[j : j + len(part)] == part),
        None,
    )


def _added_beyond_sentencepiece(i: int, sp) -> bool:
    """Whether added token id ``i`` is one SentencePiece ``sp`` never emits from text (a
    control or unknown piece, or beyond its vocabulary), so a tokenizer must add it itself."""
    return i >= sp.get_piece_size() or sp.is_control(i) or sp.is_unknown(i)


def _special_behaviour(tok: PreTrainedTokenizerBase, sp) -> dict:
    """What a converted tokenizer must keep: the special tokens and their ids, the added
    tokens SentencePiece ``sp`` does not emit itself (id, text, special flag), the maximum
    length, padding side and chat template."""
    return {
        "special tokens": {
            k: (v, getattr(tok, f"{k}_id")) for k, v in tok.special_tokens_map.items()
        },
        "all special tokens": sorted(zip(tok.all_special_tokens, tok.all_special_ids, strict=True)),
        "added tokens": {
            i: (t.content, t.special)
            for i, t in tok.added_tokens_decoder.items()
            if _added_beyond_sentencepiece(i, sp)
        },
        "model_max_length": tok.model_max_length,
        "padding side": tok.padding_side,
        "chat template": tok.chat_template,
    }


def _around(tok: PreTrainedTokenizerBase, text: str) -> tuple[list[int], list[int]] | None:
    """The ids ``tok`` adds before and after ``text`` (None if it does not keep the text's
    own ids whole)."""
    with_special, own = (encode(tok, [text], add)["input_ids"][0] for add in (True, False))
    j = _find(with_special, own)
    return None if j is None else (with_special[:j], with_special[j + len(own) :])


def _unfaithful(conv: PreTrainedTokenizerBase, tok: PreTrainedTokenizerBase, sp) -> str | None:
    """Why ``conv`` is not a faithful replacement of ``tok`` (None when it is): it must
    have ``tok``'s vocabulary and special tokens, encode :data:`SP_CHECK_TEXTS` as
    SentencePiece ``sp`` does, and add the same specials around them."""
    theirs, ours = tok.get_vocab(), conv.get_vocab()
    if ours != theirs:
        by_id = {i: t for t, i in theirs.items()}
        i = min(i for _, i in set(ours.items()) ^ set(theirs.items()))
        piece = sp.id_to_piece(i) if i < sp.get_piece_size() else None
        return (
            f"the tokenizer's vocabulary is not the SentencePiece model's ({len(theirs)} and "
            f"{len(ours)} tokens; id {i} is {by_id.get(i)!r} in the tokenizer, {piece!r} in "
            "tokenizer.model), so they disagree on what the model's ids mean"
        )
    texts = list(SP_CHECK_TEXTS)
    difference = _first_difference(conv, sp, texts)
    if difference is not None:
        return (
            f"it encodes {difference['text']!r} as {difference['fast']}, SentencePiece as "
            f"{difference['sentencepiece']}"
        )
    want, got = _special_behaviour(tok, sp), _special_behaviour(conv, sp)
    for k in want:
        if want[k] != got[k]:
            return f"its {k} differ: {got[k]}, the tokenizer's: {want[k]}"
    for text in texts:
        if _around(conv, text) != _around(tok, text):
            return (
                f"around {text!r} it adds {_around(conv, text)}, the tokenizer adds "
                f"{_around(tok, text)} (before, after)"
            )
    return None


def _load_converted(folder: Path, name: str) -> PreTrainedTokenizerBase:
    """The converted tokenizer in ``folder``, with a warning saying why it is used."""
    from transformers import PreTrainedTokenizerFast

    info = json.loads((folder / CONVERTED_MARKER).read_text())
    log.warning(
        "%s  Using a tokenizer converted from that tokenizer.model instead (same special "
        "tokens; cached at %s).",
        _difference_message(name, Path(info["sentencepiece_model"]), info),
        folder,
    )
    try:
        return PreTrainedTokenizerFast.from_pretrained(folder)
    except Exception as e:
        raise ModelLoadError(
            f"model '{name}': cannot load its converted tokenizer from {folder}: {e}"
        ) from e


def _sentencepiece_file(loc: Located, name: str) -> Path | None:
    """The ``tokenizer.model`` beside the model's tokenizer files, if it ships one."""
    if loc.kind == "dir":
        f = Path(loc.location) / "tokenizer.model"
        return f if f.is_file() else None
    if loc.kind == "hub":
        from huggingface_hub import hf_hub_download
        from huggingface_hub.errors import EntryNotFoundError

        try:  # from the pinned commit's snapshot; downloaded only where the hub is reachable
            return Path(hf_hub_download(loc.location, "tokenizer.model", revision=loc.revision))
        except EntryNotFoundError:  # not in the repo (or, offline, not in the cache)
            return None
        except Exception as e:
            raise ModelLoadError(
                f"model '{name}': cannot fetch tokenizer.model of '{loc.location}' at commit "
                f"{loc.revision} to check its fast tokenizer: {type(e).__name__}: {e}"
            ) from e
    # A GGUF tokenizer is converted from the vocabulary inside the GGUF file: there is no
    # SentencePiece model to compare it with, so GGUF models are not checked.
    return None


def _check_key(folder: Path) -> str:
    """Hash of the tokenizer files in ``folder``, the library versions and the check texts."""
    from importlib.metadata import version

    h = hashlib.sha256()
    for f in TOKENIZER_FILES:
        if (folder / f).is_file():
            h.update(f"{f}={cached_sha256(folder / f)}\0".encode())
    for pkg in ("transformers", "tokenizers", "sentencepiece"):
        h.update(f"{pkg}={version(pkg)}\0".encode())
    h.update("\0".join(SP_CHECK_TEXTS).encode())
    return h.hexdigest()[:32]
