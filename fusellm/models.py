"""Model and tokenizer loading: the one place every stage gets its models from.

A :class:`~fusellm.recipe.ModelSpec` ``path`` can be

* a local HF directory (``config.json`` + weights + tokenizer files);
* a hub id (``org/name``): loaded through ``from_pretrained`` where the hub is reachable;
  offline it fails with :class:`ModelLoadError` naming the model and suggesting a path;
* a ``.gguf`` file, or ``pkg:MODULE/file.gguf`` inside an installed package, or
  ``gguf-parts:MODULE`` for a package shipping a GGUF in parts (``MODULE.assemble``).

GGUF files are converted once (dequantised by transformers' GGUF loader, slow: 15 s to
2 min) into a plain HF directory under the cache (``$FUSELLM_CACHE``, default
``~/.cache/fusellm``) keyed by the file's sha256; later loads take well under a second.

``trust_remote_code`` is passed only when the recipe sets it for that model. The
vocabulary size is the number of rows of the model's output embedding
(:func:`model_vocab_size`), never ``len(tokenizer)``: padded vocabularies (Qwen-style,
or the tiny test models) have more rows than tokens.
"""

from __future__ import annotations

import contextlib
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
from fusellm.storage import sha256_file

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

log = logging.getLogger(__name__)
PARTS_PREFIX = "gguf-parts:"


class ModelLoadError(RuntimeError):
    """A model or tokenizer that cannot be loaded; the message names the recipe model."""


def cache_root() -> Path:
    return Path(os.environ.get("FUSELLM_CACHE", "~/.cache/fusellm")).expanduser()


@dataclass(frozen=True)
class Located:
    """Where a model's files are after resolving the spec."""

    kind: str  # "dir" | "hub" | "gguf"
    location: str  # directory, hub id, or gguf file path
    identity: str  # what the model *is*: a content hash or hub id@revision


def locate(spec: ModelSpec, name: str) -> Located:
    """Resolve ``spec.path`` to a local directory, a GGUF file or a hub id (no loading)."""
    p = spec.path
    try:
        if p.startswith(PARTS_PREFIX):
            module = p[len(PARTS_PREFIX) :]
            out = cache_root() / "gguf" / f"{module}.gguf"
            path = Path(importlib.import_module(module).assemble(out))
            return Located("gguf", str(path), "sha256:" + _cached_sha256(path))
        path = resolve_pkg_path(p)
    except (ImportError, FileNotFoundError, ValueError) as e:
        raise ModelLoadError(f"model '{name}': cannot resolve path '{p}': {e}") from None
    if spec.gguf_file:
        path = path / spec.gguf_file
    if path.is_file() and path.suffix == ".gguf":
        return Located("gguf", str(path), "sha256:" + _cached_sha256(path))
    if path.is_dir():
        return Located("dir", str(path), "dir-sha256:" + _dir_identity(path))
    # Hub ids are "name" or "org/name"; anything else that does not exist is a bad path.
    if p.startswith((PKG_PREFIX, "/", ".", "~")) or p.endswith(".gguf") or p.count("/") > 1:
        raise ModelLoadError(f"model '{name}': no such file or directory: {path}")
    return Located("hub", p, f"hub:{p}@{spec.revision or 'main'}")


def _cached_sha256(path: Path) -> str:
    """sha256 of a (large) file, memoised on disk by path, size and mtime."""
    st = path.stat()
    key = hashlib.sha256(f"{path.resolve()}\0{st.st_size}\0{st.st_mtime_ns}".encode()).hexdigest()[
        :32
    ]
    memo = cache_root() / "sha256" / key
    if memo.exists():
        return memo.read_text().strip()
    digest = sha256_file(path)
    memo.parent.mkdir(parents=True, exist_ok=True)
    memo.write_text(digest)
    return digest


def _dir_identity(path: Path) -> str:
    """Identity of an HF directory: hash of its config and the names/sizes of its weights.

    Hashing every weight byte of a 7B model on each run would cost minutes; config plus
    file sizes and mtimes changes whenever the weights are rewritten.
    """
    h = hashlib.sha256()
    for f in sorted(path.iterdir()):
        if f.is_file():
            h.update(f.name.encode())
            if f.suffix == ".json" and f.stat().st_size < 50_000_000:
                h.update(f.read_bytes())
            else:
                st = f.stat()
                h.update(f"{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()


def _hub_error(name: str, spec: ModelSpec, what: str, e: Exception) -> ModelLoadError:
    offline = (
        os.environ.get("HF_HUB_OFFLINE") == "1" or os.environ.get("TRANSFORMERS_OFFLINE") == "1"
    )
    why = "HF_HUB_OFFLINE is set" if offline else "the hub is unreachable or the id is wrong"
    return ModelLoadError(
        f"model '{name}': cannot load {what} '{spec.path}' from the Hugging Face hub ({why}): "
        f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}\n"
        f"  Download it where the hub is reachable (e.g. `hf download {spec.path} --local-dir DIR`) "
        f"and set models.{name}.path to that local directory."
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


def _from_pretrained(cls, spec: ModelSpec, name: str, part: str, **kwargs):
    """``cls.from_pretrained`` on the resolved location, errors naming the model."""
    loc = locate(spec, name)
    src = str(_convert_gguf(loc, name, part)) if loc.kind == "gguf" else loc.location
    try:
        return cls.from_pretrained(
            src,
            revision=spec.revision if loc.kind == "hub" else None,
            trust_remote_code=spec.trust_remote_code,
            **kwargs,
        )
    except Exception as e:
        if loc.kind == "hub":
            raise _hub_error(name, spec, part, e) from None
        raise ModelLoadError(f"model '{name}': cannot load {part} from {src}: {e}") from e


def load_tokenizer(spec: ModelSpec, name: str) -> PreTrainedTokenizerBase:
    """The model's tokenizer (fast, with offsets). Pad/BOS/EOS are left as the model ships
    them: fusellm never relies on ``pad_token`` (padding is masked by attention masks)."""
    from transformers import AutoTokenizer

    if spec.tokenizer:
        sub = ModelSpec(
            path=spec.tokenizer, revision=spec.revision, trust_remote_code=spec.trust_remote_code
        )
        return load_tokenizer(sub, name)
    tok = _from_pretrained(AutoTokenizer, spec, name, "tokenizer")
    if not getattr(tok, "is_fast", False):
        raise ModelLoadError(
            f"model '{name}': tokenizer {type(tok).__name__} is not a fast tokenizer; fusellm needs "
            "character offsets (install `tokenizers` or provide tokenizer.json)"
        )
    return tok


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

    model = _from_pretrained(
        AutoModelForCausalLM, spec, name, "model", dtype=resolve_dtype(spec, device)
    )
    return model.to(device).eval()


def model_vocab_size(model: PreTrainedModel) -> int:
    """Rows of the output embedding (the logits' last dimension), not ``len(tokenizer)``."""
    emb = model.get_output_embeddings() or model.get_input_embeddings()
    return int(emb.weight.shape[0])


def tokenizer_fingerprint(tok: PreTrainedTokenizerBase) -> str:
    """sha256 of the tokenizer's full serialisation (vocab, merges, normaliser, specials)."""
    with contextlib.suppress(AttributeError):
        return hashlib.sha256(tok.backend_tokenizer.to_str().encode()).hexdigest()
    vocab = json.dumps(sorted(tok.get_vocab().items()), ensure_ascii=False)
    return hashlib.sha256(vocab.encode()).hexdigest()


def special_token_overhead(tok: PreTrainedTokenizerBase) -> int:
    """How many tokens ``tok`` adds around a sequence (BOS/EOS) when encoding."""
    with_special = tok("a", add_special_tokens=True)["input_ids"]
    without = tok("a", add_special_tokens=False)["input_ids"]
    return len(with_special) - len(without)
