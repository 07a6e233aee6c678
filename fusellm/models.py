"""Model and tokenizer loading: the one place every stage gets its models from.

A :class:`~fusellm.recipe.ModelSpec` ``path`` can be

* a local HF directory (``config.json`` + weights + tokenizer files);
* a hub id (``org/name``): its ``revision`` (a branch, tag or commit; default ``main``) is
  resolved to a commit sha once per process (through the hub where reachable, else from the
  local HF cache's ``refs/``), recorded in the identity as ``hub:org/name@<sha>``, and every
  load (model, tokenizer, config) asks for exactly that commit, so a branch that moves during
  a run cannot mix commits, and a moved branch changes the identity (stages refuse to
  resume). A revision that cannot be resolved, or a commit not in the cache offline, fails
  with :class:`ModelLoadError` naming the model and suggesting a local path;
* a ``.gguf`` file, or ``pkg:MODULE/file.gguf`` inside an installed package, or
  ``gguf-parts:MODULE`` for a package shipping a GGUF in parts (``MODULE.assemble``).

GGUF files are converted once (dequantised by transformers' GGUF loader, slow: 15 s to
2 min) into a plain HF directory under the cache (``$FUSELLM_CACHE``, default
``~/.cache/fusellm``) keyed by the file's sha256; later loads take well under a second.

A fast tokenizer loaded from a directory (or hub snapshot) that ships a SentencePiece
model (``tokenizer.model``) is checked once against it (:func:`fusellm.faithful_tokenizer.check_sentencepiece`). One
that encodes differently (OpenLLaMA's keeps the whitespace its model collapses;
transformers' ``LlamaTokenizer`` drops a leading space) is replaced, with a warning, by a
fast tokenizer converted from ``tokenizer.model`` through transformers' generic
SentencePiece conversion, given the shipped tokenizer's special and added tokens, the BOS/EOS
it adds around a text and its maximum length, verified, and cached under the cache keyed by
the tokenizer files' hashes. Every stage gets that tokenizer (fingerprints record it; train
saves it with the trained model). Where no faithful one can be built (the two disagree on the
vocabulary, or the conversion differs too) loading fails naming the model.

``trust_remote_code`` is passed only when the recipe sets it for that model. The
vocabulary size is the number of rows of the model's output embedding
(:func:`model_vocab_size`), never ``len(tokenizer)``: padded vocabularies (Qwen-style,
or the tiny test models) have more rows than tokens.

Bad model input, and what every stage does with it (errors are :class:`ModelInputError`,
a ``ValueError``, so the CLI exits with 2; each names the model and the token or limit):

* **No pad token.** Nothing uses ``pad_token``: batches are right-padded with any valid id
  and the padding is masked by the attention mask (and by the labels in training), so
  stored top-k, CE and the training loss are the same with, without, or with
  ``pad = eos`` (tested). fusellm never sets ``pad_token`` itself.
* **No BOS / EOS.** Extraction and training use the tokenizer's own encoding (no special
  tokens added if it has none). ``bench`` and ``evolve`` score a document's first token
  after a BOS (else EOS) prefix; a tokenizer with neither is an error naming the missing
  tokens (and, in bench, the model) rather than a guessed prefix.
* **More embedding rows than tokens** (padded vocabularies). Extraction stores the model's
  distribution over *all* rows, so a padded row can appear in a stored top-k when the
  model gives it mass (random models do; trained ones give it ~0) with its exact
  full-vocabulary log-prob. ``align`` never maps a row without a token, so a source's mass
  there joins the tail; the target's own rows exist in the student, so its fused top-k may
  keep them. Vocabulary sizes always come from the embedding.
* **A token id beyond the embedding** (a tokenizer larger than the model): an error naming
  the model, the token and its id before the forward pass (never an index error inside).
* **Different maximum lengths.** A model's maximum is ``max_position_embeddings`` /
  ``n_positions`` / ``max_seq_len`` of its config (:func:`max_positions`). The corpus
  stage refuses a ``corpus.block_size`` above the maximum of any model it fits
  (``fit_models``), extraction refuses a document longer than the model's maximum, and
  bench refuses windows longer than it, and train a ``train.block_size`` above the
  target's: each before the forward pass, naming the model and its maximum. Nothing is
  clamped silently.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib
import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from fusellm.packages import PKG_PREFIX, resolve_pkg_path
from fusellm.recipe import ModelSpec
from fusellm.storage import cache_root, cached_sha256

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

log = logging.getLogger(__name__)
PARTS_PREFIX = "gguf-parts:"


class ModelLoadError(RuntimeError):
    """A model or tokenizer that cannot be loaded; the message names the recipe model."""


class ModelInputError(ValueError):
    """A model that cannot take its input as configured (too long for its positions, a
    token id beyond its embedding, no BOS/EOS where one is needed). The message names the
    recipe model and the token or limit, so the user knows which setting to change."""


POSITION_ATTRS = ("max_position_embeddings", "n_positions", "max_seq_len")


@dataclass(frozen=True)
class Located:
    """Where a model's files are after resolving the spec."""

    kind: str  # "dir" | "hub" | "gguf"
    location: str  # directory, hub id, or gguf file path
    identity: str  # what the model *is*: a content hash or hub id@commit sha
    revision: str | None = None  # hub: the commit sha every load asks for


def locate(spec: ModelSpec, name: str) -> Located:
    """Resolve ``spec.path`` to a local directory, a GGUF file or a hub id (no loading)."""
    p = spec.path
    try:
        if p.startswith(PARTS_PREFIX):
            module = p[len(PARTS_PREFIX) :]
            out = cache_root() / "gguf" / f"{module}.gguf"
            path = Path(importlib.import_module(module).assemble(out))
            return Located("gguf", str(path), "sha256:" + cached_sha256(path))
        path = resolve_pkg_path(p)
    except (ImportError, FileNotFoundError, ValueError) as e:
        raise ModelLoadError(f"model '{name}': cannot resolve path '{p}': {e}") from None
    if spec.gguf_file:
        path = path / spec.gguf_file
    if path.is_file() and path.suffix == ".gguf":
        return Located("gguf", str(path), "sha256:" + cached_sha256(path))
    if path.is_dir():
        return Located("dir", str(path), "dir-sha256:" + _dir_identity(path))
    # Hub ids are "name" or "org/name"; anything else that does not exist is a bad path.
    if p.startswith((PKG_PREFIX, "/", ".", "~")) or p.endswith(".gguf") or p.count("/") > 1:
        raise ModelLoadError(f"model '{name}': no such file or directory: {path}")
    commit = _hub_commit(spec, name)
    return Located("hub", p, f"hub:{p}@{commit}", commit)


def _hub_commit(spec: ModelSpec, name: str) -> str:
    """The commit sha that ``spec.revision`` (a branch, tag or sha; default branch when
    unset) names now, resolved once per process: later loads in this process get the same
    commit even if the branch moves meanwhile."""
    from huggingface_hub import constants

    if (spec.path, spec.revision) in _PINNED:
        return _PINNED[(spec.path, spec.revision)]
    try:
        return _resolve_commit(spec.path, spec.revision, constants.HF_HUB_CACHE)
    except Exception as e:
        raise _hub_error(name, spec, f"revision '{spec.revision or 'main'}' of", e) from None


_PINNED: dict[tuple[str, str | None], str] = {}  # (hub id, revision) -> commit, from rank 0


def pin_hub_revisions(models: dict[str, ModelSpec]) -> None:
    """Under a launch: rank 0 resolves every model's location (a hub id's revision to its
    commit) and every rank uses its commits, so no two ranks load different commits of a
    branch pushed to while they start. Call on every rank (a collective)."""
    from fusellm.distributed import on_rank0

    def resolve() -> dict[str, str]:
        return {n: loc.revision for n, s in models.items() if (loc := locate(s, n)).kind == "hub"}

    for name, commit in on_rank0(resolve).items():
        _PINNED[(models[name].path, models[name].revision)] = commit


@functools.cache
def _resolve_commit(repo_id: str, revision: str | None, cache_dir: str) -> str:
    # One `repo_info` call where the hub is reachable; with HF_HUB_OFFLINE or no network,
    # the cache's refs/<revision> (written by every download); raises when neither knows
    # it. A 40-hex sha is returned as is (from_pretrained then finds its snapshot or fails
    # naming the model).
    from huggingface_hub import constants, resolve_revision

    return resolve_revision(
        repo_id, revision=revision, cache_dir=cache_dir, local_files_only=constants.HF_HUB_OFFLINE
    ).resolved


def _dir_identity(path: Path) -> str:
    """Identity of an HF directory: a hash of the contents of its files.

    Weight files are hashed once and memoised by path, size and mtime (a 7B model costs
    ~30 s the first time, nothing after), so a model re-saved with the same weights keeps
    its identity and downstream stages are not invalidated by a mere rewrite.
    """
    h = hashlib.sha256()
    for f in sorted(path.iterdir()):
        if f.is_file():
            h.update(f.name.encode())
            if f.suffix == ".json" and f.stat().st_size < 50_000_000:
                h.update(f.read_bytes())
            else:
                h.update(cached_sha256(f).encode())
    return h.hexdigest()


def _hub_error(name: str, spec: ModelSpec, what: str, e: Exception) -> ModelLoadError:
    offline = (
        os.environ.get("HF_HUB_OFFLINE") == "1" or os.environ.get("TRANSFORMERS_OFFLINE") == "1"
    )
    why = "HF_HUB_OFFLINE is set" if offline else "the hub is unreachable or the id is wrong"
    rev = f" --revision {spec.revision}" if spec.revision else ""
    return ModelLoadError(
        f"model '{name}': cannot load {what} '{spec.path}' from the Hugging Face hub ({why}): "
        f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}\n"
        f"  Download it where the hub is reachable (e.g. `hf download {spec.path}{rev} "
        f"--local-dir DIR`) and set models.{name}.path to that local directory."
    )


def converted_dir(loc: Located, part: str) -> Path:
    """The HF directory a GGUF model's ``part`` (model or tokenizer) is converted into."""
    return cache_root() / "hf" / loc.identity.split(":", 1)[1][:24] / part


def _convert_gguf(loc: Located, name: str, part: str) -> Path:
    """Convert a GGUF file's tokenizer or model once into an HF directory (cached)."""
    out = converted_dir(loc, part)
    if (out / "fusellm-converted.json").exists():
        return out
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = Path(loc.location)
    log.info("converting %s of model '%s' from %s (once; cached at %s)", part, name, gguf, out)
    tmp = out.with_name(f"{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        if part == "tokenizer":
            AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name).save_pretrained(
                tmp
            )
        else:
            import torch

            model = AutoModelForCausalLM.from_pretrained(
                str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32
            )
            # The GGUF loader dequantises to fp32 but marks the model as quantised, which
            # blocks save_pretrained; the weights in memory are plain tensors.
            model.hf_quantizer = None
            model.is_quantized = False
            if hasattr(model.config, "quantization_config"):
                del model.config.quantization_config
            model.save_pretrained(tmp)
        (tmp / "fusellm-converted.json").write_text(
            json.dumps({"from": str(gguf), "identity": loc.identity})
        )
        out.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.replace(tmp, out)
        except OSError:  # another process converted it first
            if not (out / "fusellm-converted.json").exists():
                raise
    except Exception as e:
        raise ModelLoadError(f"model '{name}': cannot convert GGUF {part} from {gguf}: {e}") from e
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def _from_pretrained(cls, loc: Located, spec: ModelSpec, name: str, part: str, **kwargs):
    """``cls.from_pretrained`` on the resolved location (a hub id at its pinned commit),
    errors naming the model."""
    src = str(_convert_gguf(loc, name, part)) if loc.kind == "gguf" else loc.location
    try:
        return cls.from_pretrained(
            src,
            revision=loc.revision,
            trust_remote_code=spec.trust_remote_code,
            **kwargs,
        )
    except Exception as e:
        if loc.kind == "hub":
            raise _hub_error(name, spec, part, e) from None
        raise ModelLoadError(f"model '{name}': cannot load {part} from {src}: {e}") from e


def load_tokenizer(spec: ModelSpec, name: str) -> PreTrainedTokenizerBase:
    """The model's tokenizer (fast, with offsets): the one it ships, or a faithful one
    converted from the SentencePiece model it ships when the shipped one encodes differently
    (:func:`fusellm.faithful_tokenizer.check_sentencepiece`). Pad/BOS/EOS are left as the model ships them: fusellm
    never relies on ``pad_token`` (padding is masked by attention masks)."""
    from transformers import AutoTokenizer

    if spec.chat_template:
        path = Path(spec.chat_template)
        if not path.is_file():
            raise ModelLoadError(f"model '{name}': chat_template: no such file: {path}")
        tok = load_tokenizer(spec.model_copy(update={"chat_template": None}), name)
        tok.chat_template = path.read_text(encoding="utf-8")
        return tok
    if spec.tokenizer:
        sub = ModelSpec(
            path=spec.tokenizer, revision=spec.revision, trust_remote_code=spec.trust_remote_code
        )
        return load_tokenizer(sub, name)
    loc = locate(spec, name)
    tok = _from_pretrained(AutoTokenizer, loc, spec, name, "tokenizer")
    if not getattr(tok, "is_fast", False):
        raise ModelLoadError(
            f"model '{name}': tokenizer {type(tok).__name__} is not a fast tokenizer; fusellm needs "
            "character offsets (install `tokenizers` or provide tokenizer.json)"
        )
    from fusellm.faithful_tokenizer import check_sentencepiece

    return check_sentencepiece(tok, loc, name)


def resolve_dtype(spec: ModelSpec, device: str | torch.device = "cpu") -> torch.dtype:
    """``auto``: bf16 on CUDA devices that support it, fp32 elsewhere (CPU)."""
    import torch

    if spec.dtype != "auto":
        return getattr(torch, spec.dtype)
    if (
        str(device).startswith("cuda")
        and torch.cuda.is_available()
        and torch.cuda.is_bf16_supported()
    ):
        return torch.bfloat16
    return torch.float32


def load_model(spec: ModelSpec, name: str, device: str | torch.device = "cpu") -> PreTrainedModel:
    """A causal LM in eval mode on ``device``; GGUF files go through the conversion cache."""
    from transformers import AutoModelForCausalLM

    loc = locate(spec, name)
    model = _from_pretrained(
        AutoModelForCausalLM, loc, spec, name, "model", dtype=resolve_dtype(spec, device)
    )
    return model.to(device).eval()


def model_vocab_size(model: PreTrainedModel) -> int:
    """Rows of the output embedding (the logits' last dimension), not ``len(tokenizer)``."""
    emb = model.get_output_embeddings() or model.get_input_embeddings()
    return int(emb.weight.shape[0])


def max_positions(config) -> tuple[int, str] | None:
    """A model's maximum sequence length and the config attribute it comes from, or None.

    Learned position tables (GPT-2, MPT) fail with an index or shape error beyond it;
    rotary models (Llama, GPT-NeoX) run on but were never trained there. Either way fusellm
    treats it as a hard limit.
    """
    cfg = config.get_text_config() if hasattr(config, "get_text_config") else config
    for attr in POSITION_ATTRS:
        v = getattr(cfg, attr, None)
        if isinstance(v, int) and not isinstance(v, bool) and v > 0:
            # The key as config.json spells it (GPT-2 aliases n_positions, for example).
            return v, getattr(cfg, "attribute_map", {}).get(attr, attr)
    return None


def spec_max_positions(spec: ModelSpec, name: str) -> tuple[int, str] | None:
    """:func:`max_positions` from the model's config alone (no weights are loaded).

    None when the config is not at hand without heavy work (a GGUF model not converted
    yet, a hub commit whose config cannot be fetched): the model-loading stages check again.
    """
    loc = locate(spec, name)
    if loc.kind == "gguf":
        d = converted_dir(loc, "model")
        if not (d / "config.json").exists():
            return None
        src = str(d)
    else:
        src = loc.location
    from transformers import AutoConfig

    try:
        cfg = AutoConfig.from_pretrained(
            src,
            revision=loc.revision,
            trust_remote_code=spec.trust_remote_code,
        )
    except Exception:  # the model load reports it, with the full story
        return None
    return max_positions(cfg)


def check_positions(
    name: str, limit: tuple[int, str] | None, length: int, what: str, fix: str | None = None
) -> None:
    """Refuse ``length`` tokens for model ``name`` when it exceeds the model's maximum.

    ``what`` names the setting or document; ``fix`` says what to change (default: lower
    ``what`` to the maximum).
    """
    if limit is not None and length > limit[0]:
        fix = fix or f"lower {what} to at most {limit[0]}"
        raise ModelInputError(
            f"model '{name}': {what} is {length} tokens, more than its maximum of "
            f"{limit[0]} positions (config.{limit[1]}); {fix}"
        )


def tokenizer_fingerprint(tok: PreTrainedTokenizerBase) -> str:
    """sha256 of the tokenizer's full serialisation (vocab, merges, normaliser, specials)."""
    with contextlib.suppress(AttributeError):
        return hashlib.sha256(tok.backend_tokenizer.to_str().encode()).hexdigest()
    vocab = json.dumps(sorted(tok.get_vocab().items()), ensure_ascii=False)
    return hashlib.sha256(vocab.encode()).hexdigest()


ENCODING = "split-special-tokens/1"
"""How :func:`encode` encodes (recorded in fingerprints: stored tokens depend on it)."""


def encode(
    tok: PreTrainedTokenizerBase,
    texts: list[str],
    add_special_tokens: bool = False,
    offsets: bool = False,
):
    """Encode ``texts`` as every stage does (a ``BatchEncoding``: ``input_ids``, and
    ``offset_mapping`` with ``offsets``): the literal text of a special token inside a
    document (``</s>``, ``<|endoftext|>``) stays text and never becomes that special
    mid-document; the specials the tokenizer adds around a text (BOS/EOS) are its own."""
    return tok(
        list(texts),
        add_special_tokens=add_special_tokens,
        split_special_tokens=True,
        return_offsets_mapping=offsets,
    )


def special_token_overhead(tok: PreTrainedTokenizerBase) -> int:
    """How many tokens ``tok`` adds around a sequence (BOS/EOS) when encoding."""
    with_special, without = (encode(tok, ["a"], add)["input_ids"][0] for add in (True, False))
    return len(with_special) - len(without)
