"""Top-k distribution shards: the on-disk format of extract (and later align/fuse).

One shard is a safetensors file (no pickle; memory-mappable) holding a run of documents
with only their *real* tokens (never padding), concatenated. With ``T`` tokens, ``D``
documents and top-k ``k``:

=================  ===========================  ===========================================
tensor             dtype / shape                meaning
=================  ===========================  ===========================================
``doc_offsets``    int64 ``[D+1]``              token ranges of the documents
``input_ids``      uint8 ``[T, w]``             token ids, packed little-endian in ``w`` bytes
``char_start``     int32 ``[T]``                character offset of each token in its text
``char_len``       uint16 ``[T]``               character length (end = start + len)
``topk_ids``       uint8 ``[T, k, w]``          ids of the k most likely *next* tokens
``topk_logprobs``  fp16/bf16/fp32 ``[T, k]``    their log-probs (log-softmax over the full
                                                vocabulary, so tail mass = 1 − Σ exp)
``ce``             fp32 ``[T]``                 −log p(gold next token) under the model whose
                                                rows these are; NaN at the last token of
                                                each document (nothing follows). Fused
                                                rows come from several models: there the
                                                column is ``target_ce``, the target's own
``aligned``        uint8 ``[T]`` (optional)     align/fuse: 1 = a real distribution, 0 = the
                                                one-hot fallback on the gold next token
``doc_ce``         fp32 ``[D]`` (optional)      align: the source's sequence CE per document
``cum_nll``        fp32 ``[T]`` (optional)      align: the source's NLL of the text up to
                                                this position's context end (NaN: not
                                                aligned); differences are per-span NLL
``byte_end``       int32 ``[T]`` (optional)     align: byte where the target context ends
=================  ===========================  ===========================================

Padding entries of a top-k row (fewer than k after merging) have id 0 and log-prob −inf.

``w`` is the smallest byte width holding the model's vocabulary (2 up to 65,536 ids, 3 up
to 16.7 M, else 4): at k = 10 that is 52 B/token for a 49k vocabulary and 63 B/token for
Gemma's 262k, against ~100 B per padded position in the reference layout. Readers always
get int32 ids back. Document ids and the vocabulary size live in the safetensors metadata.

Each shard is written to a temporary name and renamed, then a sidecar ``<shard>.json``
records its sha256, documents and tokens: a shard counts as done only with a sidecar
whose sha256 matches.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from fusellm.manifest import CorruptArtifact
from fusellm.storage import (
    atomic_write_bytes,
    atomic_write_json,
    file_record,
    read_json,
    record_problem,
)

FORMAT = "fusellm-topk/1"


def id_width(vocab_size: int) -> int:
    """Bytes needed per token id for a vocabulary of ``vocab_size``."""
    for w in (2, 3, 4):
        if vocab_size <= 1 << (8 * w):
            return w
    raise ValueError(f"vocabulary of {vocab_size} does not fit 32-bit ids")


def pack_ids(ids: np.ndarray, width: int) -> np.ndarray:
    """int ``[...]`` -> uint8 ``[..., width]`` (little-endian low bytes)."""
    a = np.ascontiguousarray(ids, dtype="<u4")
    return np.ascontiguousarray(a.view(np.uint8).reshape(*a.shape, 4)[..., :width])


def unpack_ids(packed: np.ndarray) -> np.ndarray:
    """uint8 ``[..., width]`` -> int32 ``[...]``."""
    width = packed.shape[-1]
    full = np.zeros((*packed.shape[:-1], 4), dtype=np.uint8)
    full[..., :width] = packed
    return full.view("<i4")[..., 0]


@dataclass
class DocDist:
    """One document's stored distributions (all arrays have the document's T rows)."""

    doc_id: str
    input_ids: np.ndarray  # int32 [T]
    offsets: np.ndarray  # int32 [T, 2] character (start, end)
    topk_ids: np.ndarray  # int32 [T, k]
    topk_logprobs: torch.Tensor  # fp16/bf16/fp32 [T, k]
    ce: np.ndarray  # float32 [T], NaN at the last position (fused shards: the target's CE)
    aligned: np.ndarray | None = None  # bool [T]: a real (not fallback) distribution (align/fuse)
    doc_ce: float | None = None  # sequence CE of the model the row came from (align)
    cum_nll: np.ndarray | None = None  # float32 [T]: source NLL up to the context end (align)
    byte_end: np.ndarray | None = None  # int32 [T]: byte where each context ends (align)
    # bool [T]: the token carries loss as a label (a conversation's: its responses and
    # ends of turn, see fusellm.chat.response_labels); None: every token does
    labels: np.ndarray | None = None

    @property
    def seq_ce(self) -> float:
        """Mean CE over positions that have a next token (the sequence CE of MinCE)."""
        if self.doc_ce is not None:
            return self.doc_ce
        v = self.ce[:-1]
        return float(v.mean()) if len(v) else float("nan")


def encode_shard(
    docs: list[DocDist], vocab_size: int, meta: dict[str, str], ce_name: str = "ce"
) -> bytes:
    """Serialise documents into one shard (bytes of a safetensors file); ``ce_name`` names
    the CE column (``target_ce`` in fused shards)."""
    w = id_width(vocab_size)
    lengths = [len(d.input_ids) for d in docs]
    cat = lambda xs: np.concatenate(xs) if xs else np.zeros((0,))  # noqa: E731
    k = docs[0].topk_ids.shape[1] if docs else 0
    offsets = np.concatenate([d.offsets for d in docs]) if docs else np.zeros((0, 2), np.int32)
    char_len = offsets[:, 1] - offsets[:, 0]
    if len(char_len) and (char_len.min() < 0 or char_len.max() > np.iinfo(np.uint16).max):
        raise ValueError("token character spans must be within [0, 65535]")
    tensors = {
        "doc_offsets": torch.from_numpy(np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)),
        "input_ids": torch.from_numpy(pack_ids(cat([d.input_ids for d in docs]), w)),
        "char_start": torch.from_numpy(offsets[:, 0].astype(np.int32)),
        "char_len": torch.from_numpy(char_len.astype(np.uint16)),
        "topk_ids": torch.from_numpy(
            pack_ids(np.concatenate([d.topk_ids for d in docs]) if docs else np.zeros((0, k)), w)
        ),
        "topk_logprobs": torch.cat([d.topk_logprobs for d in docs]) if docs else torch.zeros(0, k),
        ce_name: torch.from_numpy(cat([d.ce for d in docs]).astype(np.float32)),
    }
    if docs and all(d.aligned is not None for d in docs):
        tensors["aligned"] = torch.from_numpy(
            np.concatenate([d.aligned for d in docs]).astype(np.uint8)
        )
    if docs and all(d.doc_ce is not None for d in docs):
        tensors["doc_ce"] = torch.tensor([d.doc_ce for d in docs], dtype=torch.float32)
    if any(d.labels is not None for d in docs):  # a shard with a conversation in it
        tensors["labels"] = torch.from_numpy(
            np.concatenate(
                [
                    d.labels if d.labels is not None else np.ones(len(d.input_ids), bool)
                    for d in docs
                ]
            ).astype(np.uint8)
        )
    for name, dtype in (("cum_nll", np.float32), ("byte_end", np.int32)):
        if docs and all(getattr(d, name) is not None for d in docs):
            tensors[name] = torch.from_numpy(
                np.concatenate([getattr(d, name) for d in docs]).astype(dtype)
            )
    metadata = {
        "format": FORMAT,
        "vocab_size": str(vocab_size),
        "doc_ids": json.dumps([d.doc_id for d in docs], ensure_ascii=False),
        **meta,
    }
    return canonical_safetensors(st_save(tensors, metadata=metadata))


def canonical_safetensors(data: bytes) -> bytes:
    """Rewrite a safetensors header with sorted keys so equal content gives equal bytes.

    safetensors serialises its header from a hash map whose order varies between
    processes; byte-identical shards (resume, N processes) need a canonical header. Data
    offsets are relative to the end of the header, so only the header changes.
    """
    n = int.from_bytes(data[:8], "little")
    header = json.dumps(json.loads(data[8 : 8 + n]), sort_keys=True, separators=(",", ":")).encode()
    header += b" " * (-len(header) % 8)  # keep the data 8-byte aligned
    return len(header).to_bytes(8, "little") + header + data[8 + n :]


def decode_shard(data: bytes) -> tuple[list[DocDist], dict[str, str]]:
    """Inverse of :func:`encode_shard`."""
    t = st_load(data)
    meta = _metadata(data)
    bounds = t["doc_offsets"].numpy()
    ids = unpack_ids(t["input_ids"].numpy())
    start = t["char_start"].numpy()
    offsets = np.stack([start, start + t["char_len"].numpy().astype(np.int32)], axis=1)
    topk = unpack_ids(t["topk_ids"].numpy())
    lp = t["topk_logprobs"]
    ce = (t["ce"] if "ce" in t else t["target_ce"]).numpy()
    aligned = t["aligned"].numpy().astype(bool) if "aligned" in t else None
    doc_ce = t["doc_ce"].tolist() if "doc_ce" in t else None
    cum = t["cum_nll"].numpy() if "cum_nll" in t else None
    byte_end = t["byte_end"].numpy() if "byte_end" in t else None
    labels = t["labels"].numpy().astype(bool) if "labels" in t else None
    docs = [
        DocDist(
            doc_id,
            ids[a:b],
            offsets[a:b],
            topk[a:b],
            lp[a:b],
            ce[a:b],
            aligned[a:b] if aligned is not None else None,
            doc_ce[n] if doc_ce is not None else None,
            cum[a:b] if cum is not None else None,
            byte_end[a:b] if byte_end is not None else None,
            labels[a:b] if labels is not None else None,
        )
        for n, (doc_id, a, b) in enumerate(
            zip(json.loads(meta["doc_ids"]), bounds[:-1], bounds[1:], strict=True)
        )
    ]
    return docs, meta


def _metadata(data: bytes) -> dict[str, str]:
    n = int.from_bytes(data[:8], "little")
    return json.loads(data[8 : 8 + n]).get("__metadata__", {})


def read_metadata(path: Path) -> dict[str, str]:
    """A shard's ``__metadata__`` from its header alone (no tensor bytes read)."""
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        return json.loads(f.read(n)).get("__metadata__", {})


def shard_name(index: int) -> str:
    return f"shard-{index:05d}.safetensors"


def write_shard(path: Path, data: bytes, docs: int, tokens: int, extra: dict | None = None) -> dict:
    """Atomically write a shard, then its sidecar; returns the sidecar record.

    ``extra`` keys (prefixed ``x_``) are per-shard statistics that the manifest sums."""
    atomic_write_bytes(path, data)
    rec = {**file_record(path), "docs": docs, "tokens": tokens}
    rec.update({f"x_{k}": v for k, v in (extra or {}).items()})
    atomic_write_json(sidecar(path), rec)
    return rec


def sidecar(path: Path) -> Path:
    return path.with_name(path.name + ".json")


def shard_problem(path: Path, full: bool = False) -> str | None:
    """Why ``path`` is not a valid finished shard (None when it is); ``full`` re-hashes it
    even when its size and mtime are the recorded ones."""
    sc = sidecar(path)
    if not path.exists():
        return f"{path}: missing"
    if not sc.exists():
        return f"{path}: no sidecar (unfinished)"
    return record_problem(path, read_json(sc), full)


def read_shard(path: Path, verify: bool = True) -> tuple[list[DocDist], dict[str, str]]:
    """Read one shard; with ``verify`` its sha256 must match the sidecar."""
    if verify and (problem := shard_problem(path)):
        raise CorruptArtifact(problem)
    return decode_shard(path.read_bytes())


class RowReader:
    """Rows of one shard read in place: only the bytes of the rows asked for are read
    (safetensors slices of a memory-mapped file), nothing is decoded beyond them.

    For random access into thousands of shards (shuffled training): decoding a whole shard
    to use one document of it costs the shard's size per document. The caller checks the
    shard's integrity first (:func:`shard_problem`). Not shared across processes: a
    dataloader worker opens its own (see :meth:`rows`).
    """

    def __init__(self, path: Path):
        from safetensors import safe_open

        self.path = path
        self._f = safe_open(str(path), framework="pt")
        self.fields = set(self._f.keys())

    @property
    def doc_offsets(self) -> np.ndarray:
        """int64 ``[D+1]``: the token rows of each document."""
        return self._f.get_tensor("doc_offsets").numpy()

    @property
    def doc_ids(self) -> list[str]:
        return json.loads(self._f.metadata()["doc_ids"])

    @property
    def k(self) -> int:
        return int(self._f.get_slice("topk_logprobs").get_shape()[1])

    def rows(self, a: int, b: int) -> dict[str, np.ndarray]:
        """Token rows ``[a, b)``: ``input_ids`` int64 ``[n]``, ``topk_ids`` int64 ``[n, k]``,
        ``topk_logprobs`` float32 ``[n, k]``, ``aligned`` bool ``[n]`` (all True for a
        shard without the field: an extraction), ``labels`` bool ``[n]`` (all True for a
        shard without conversations)."""
        f = self._f
        out = {
            "input_ids": unpack_ids(f.get_slice("input_ids")[a:b].numpy()).astype(np.int64),
            "topk_ids": unpack_ids(f.get_slice("topk_ids")[a:b].numpy()).astype(np.int64),
            "topk_logprobs": f.get_slice("topk_logprobs")[a:b].float().numpy(),
        }
        for flag in ("aligned", "labels"):  # optional per-token flags, True when absent
            out[flag] = (
                f.get_slice(flag)[a:b].numpy().astype(bool)
                if flag in self.fields
                else np.ones(b - a, dtype=bool)
            )
        return out


def iter_docs(shards: list[Path], verify: bool = True) -> Iterator[DocDist]:
    """Stream documents of a shard range; memory is bounded by one shard."""
    for p in shards:
        docs, _ = read_shard(p, verify)
        yield from docs
