"""Pure arithmetic of ``fusellm plan``: model shapes, format widths and settings in, byte,
token, memory and time estimates out. Nothing here reads a file or loads a model (the
runner does); every formula says where it comes from.

Conventions: sizes in bytes, ``tokens`` are real tokens (no padding), ``P`` is a model's
parameter count (tied embeddings counted once), ``B·T`` the tokens of one micro-batch.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass

from fusellm.shards import FORMAT, id_width

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
_ST_DTYPE = {"float32": "F32", "bfloat16": "BF16", "float16": "F16"}


@dataclass(frozen=True)
class ModelShape:
    """A causal LM's shapes, from its config alone (see :mod:`fusellm.plan.shapes`)."""

    params: int  # every parameter once (a tied output embedding is the input one)
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int  # MLP width
    gated: bool  # gate and up projections (SwiGLU/GeGLU): 4 saved MLP tensors, not 2
    vocab_rows: int  # output embedding rows (the logits' width)
    tied: bool
    largest_layer_params: int  # the largest module's own parameters (ZeRO-3's estimator)
    linear_params: int  # parameters of matmul layers (autocast keeps 16-bit copies of them)
    norm_width: int  # Σ per-token widths of one decoder layer's norms
    rms_norm_width: int  # ... of those that normalise in float32 (HF's RMSNorms)
    weights_header: int  # bytes of a safetensors header of the state dict
    config_bytes: int  # bytes of its config.json
    max_positions: int | None
    config_from: str  # where the config came from (said in the output)


@dataclass(frozen=True)
class Row:
    """One line of a plan section: what, how much, and how it was estimated."""

    stage: str
    item: str
    value: float | None  # None: unknown (``basis`` says why)
    basis: str
    detail: dict | None = None  # the parts of ``value``, for --json readers


# ------------------------------------------------------------------------------ tokens


def tokens_from_chars(chars: float, tokens_per_char: float, chunks: float, specials: int) -> float:
    """Tokens of a split whose text has ``chars`` characters in ``chunks`` documents: the
    text at the sampled rate, plus the special tokens the tokenizer adds per document."""
    return chars * tokens_per_char + chunks * specials


def train_steps(
    blocks: int, micro_batch: int, world: int, accumulation: int, epochs: float, max_steps: int
) -> tuple[int, int]:
    """(optimizer steps, steps per epoch) as ``transformers.Trainer`` counts them: each
    process gets ``⌈blocks / world⌉`` blocks, batched, then grouped by the accumulation;
    ``max_steps > 0`` overrides the epochs."""
    batches = math.ceil(math.ceil(blocks / world) / micro_batch)
    per_epoch = max(batches // accumulation + int(batches % accumulation > 0), 1)
    if max_steps > 0:
        return max_steps, per_epoch
    return math.ceil(epochs * per_epoch), per_epoch


def saves(steps: int, strategy: str, save_steps: float, per_epoch: int) -> int:
    """Checkpoints written over a run: every ``save_steps`` (a float < 1 is a ratio of
    the total steps) and, for step-based saving, at the last step (transformers 5 saves
    there too); one per epoch for ``epoch``; none for ``no``."""
    if strategy == "no" or steps == 0:
        return 0
    if strategy == "epoch":
        return math.ceil(steps / per_epoch)
    every = math.ceil(save_steps * steps) if save_steps < 1 else int(save_steps)
    return steps // every + int(steps % every > 0)


# -------------------------------------------------------------------------------- disk


def id_header_bytes(doc_id: str) -> int:
    """Bytes one document id adds to a shard header: the ids are a JSON list stored as a
    JSON string (quotes escaped, non-ASCII as ``\\uXXXX``), plus its ``", "`` separator."""
    return len(json.dumps(json.dumps([doc_id], ensure_ascii=False))) - len('"[]"') + 2


@dataclass(frozen=True)
class ShardFormat:
    """The byte layout of one stage's shards (:mod:`fusellm.shards`).

    ``kind``: ``extract`` (the base fields), ``align`` (+ ``aligned``, ``cum_nll``,
    ``byte_end`` per token and ``doc_ce`` per document) or ``fuse`` (+ ``aligned``).
    ``meta``: the stage's own metadata entries (they are part of every header).
    """

    kind: str
    vocab_rows: int
    top_k: int
    logprob_dtype: str
    meta: tuple[tuple[str, str], ...]

    def token_bytes(self) -> int:
        """Bytes per stored token: its id (packed to the vocabulary's width), character
        start (int32) and length (uint16), k ids and k log-probs, CE (fp32), and the
        alignment fields."""
        w, k = id_width(self.vocab_rows), self.top_k
        b = w + 4 + 2 + k * (w + DTYPE_BYTES[self.logprob_dtype]) + 4
        if self.kind in ("align", "fuse"):
            b += 1  # aligned
        if self.kind == "align":
            b += 4 + 4  # cum_nll, byte_end
        return b

    def doc_bytes(self) -> int:
        """Bytes per document: its entry in ``doc_offsets`` (int64), ``doc_ce`` (align)."""
        return 8 + (4 if self.kind == "align" else 0)

    def _tensors(self, tokens: int, docs: int) -> dict[str, tuple[str, list[int]]]:
        w, k = id_width(self.vocab_rows), self.top_k
        t = {
            "doc_offsets": ("I64", [docs + 1]),
            "input_ids": ("U8", [tokens, w]),
            "char_start": ("I32", [tokens]),
            "char_len": ("U16", [tokens]),
            "topk_ids": ("U8", [tokens, k, w]),
            "topk_logprobs": (_ST_DTYPE[self.logprob_dtype], [tokens, k]),
            "ce": ("F32", [tokens]),
        }
        if self.kind in ("align", "fuse"):
            t["aligned"] = ("U8", [tokens])
        if self.kind == "align":
            t |= {
                "doc_ce": ("F32", [docs]),
                "cum_nll": ("F32", [tokens]),
                "byte_end": ("I32", [tokens]),
            }
        return t

    def header_bytes(self, tokens: int, docs: int, id_bytes: float) -> float:
        """The safetensors header of one shard (length prefix included), as
        :func:`fusellm.shards.canonical_safetensors` writes it: sorted compact JSON padded
        to 8 bytes; the document ids at ``id_bytes`` each (:func:`id_header_bytes`)."""
        size = {"I64": 8, "I32": 4, "F32": 4, "U16": 2, "F16": 2, "BF16": 2, "U8": 1}
        header: dict = {
            "__metadata__": {
                "format": FORMAT,
                "vocab_size": str(self.vocab_rows),
                "doc_ids": "[]",
                **dict(self.meta),
            }
        }
        pos = 0
        for name, (dt, shape) in sorted(self._tensors(tokens, docs).items()):
            n = size[dt] * math.prod(shape)
            header[name] = {"dtype": dt, "shape": shape, "data_offsets": [pos, pos + n]}
            pos += n
        text = len(json.dumps(header, sort_keys=True, separators=(",", ":")))
        text += max(docs * id_bytes - 2, 0)
        return 8 + math.ceil(text / 8) * 8

    def stage_bytes(
        self, tokens: float, docs: float, docs_per_shard: int, id_bytes: float
    ) -> float:
        """Bytes of all shards of ``tokens`` tokens in ``docs`` documents, ``docs_per_shard``
        to a shard (the last one partial)."""
        if docs <= 0:
            return 0.0
        shards = math.ceil(docs / docs_per_shard)
        per_shard = self.header_bytes(round(tokens / shards), round(docs / shards), id_bytes)
        return tokens * self.token_bytes() + docs * self.doc_bytes() + shards * (per_shard + 8)


def corpus_line_bytes(text_bytes: float, escape: float, chunks: float, per_chunk: float) -> float:
    """Bytes of the corpus jsonl: the text JSON-escaped (``escape`` = escaped / raw UTF-8
    bytes, from a sample) plus each chunk's id, parent, domain and JSON punctuation."""
    return text_bytes * escape + chunks * per_chunk


# Decontamination index (fusellm.bench.decontam): one uint64 per distinct word 13-gram
# and 8-gram of the train split, about two per word; the build keeps the sorted runs
# beside the merged index until it is written, so the disk peaks at twice the index.
DECONTAM_BYTES_PER_WORD = 2 * 8


def checkpoint_bytes(params: int, module_bytes: int, zero_stage: int) -> int:
    """One training checkpoint of the Trainer (``checkpoint-N/``), small files aside.

    Without DeepSpeed: ``model.safetensors`` in the trained dtype (fusellm trains float32
    masters, so ``module_bytes`` = 4) + ``optimizer.pt`` (AdamW's two moments in the
    parameters' dtype). With ZeRO-1/2: the HF weights and DeepSpeed's
    ``mp_rank_00_model_states.pt`` in the module dtype, plus the optimizer partitions of
    all ranks (float32 master weights and two moments: 12 bytes per parameter). ZeRO-3:
    the HF weights (gathered on save) and the optimizer partitions; its model-state files
    hold no weights.
    """
    if zero_stage == 0:
        return params * (module_bytes + 2 * module_bytes)
    hf = params * module_bytes
    module = params * module_bytes if zero_stage in (1, 2) else 0
    return hf + module + params * 12


def checkpoint_small_files(world: int, zero_stage: int, log_entries: int) -> int:
    """The rest of a checkpoint (sizes seen in fusellm's checkpoints): configs, scheduler,
    arguments and the completion marker (~13 kB), the trainer state (~200 B per logged
    step), an RNG state per rank (14 kB), and with DeepSpeed its ``zero_to_fp32.py`` and
    ``zero_to_torch.py`` (41 kB)."""
    return 13_000 + 200 * log_entries + 14_300 * world + (41_000 if zero_stage else 0)


def checkpoints_kept(n_saves: int, limit: int | None, keep_when_done: bool) -> tuple[int, int, int]:
    """(kept while training, most at once, kept after training) checkpoints: fusellm
    deletes the oldest only once a newer one is complete (:class:`~fusellm.train.trainer.
    CompletionMarker`), so one more exists while it is written; with
    ``keep_checkpoints_when_done: false`` none is left once the model is saved."""
    steady = n_saves if limit is None else min(n_saves, limit)
    peak = min(n_saves, steady + 1)
    return steady, peak, steady if keep_when_done else 0


def model_dir_bytes(shape: ModelShape, dtype_bytes: int, tokenizer_bytes: int) -> int:
    """An HF model directory: ``model.safetensors`` (weights + header), ``config.json``,
    ``generation_config.json`` (~0.2 kB) and the tokenizer's files."""
    return (
        shape.params * dtype_bytes
        + shape.weights_header
        + shape.config_bytes
        + 200
        + tokenizer_bytes
    )


# ------------------------------------------------------------------------------ memory


def layer_activation_bytes(s: ModelShape, act: int, resid: int) -> int:
    """Bytes one decoder layer keeps for backward, per token.

    Korthikanti et al. 2022 (*Reducing Activation Recomputation in Large Transformer
    Models*, §4.1) count ``34·h + 5·a·s`` bytes per token for a GPT layer in 16-bit. Here
    without dropout masks, with sdpa/flash attention (no ``s²`` scores: its output and a
    per-row log-sum-exp are kept instead), grouped KV heads and gated MLPs: ``act`` bytes ×
    (the attention's input, Q, K, V, its output and the output projection's input copy,
    the MLP's input and 4 MLP tensors of width ``I`` for a gated MLP: gate, up, activation,
    product; 2 for a plain one), plus each norm's input in the residual dtype ``resid``
    and, for RMSNorms that normalise in float32 as HF's do, the float32 normalised copy.
    Under autocast over float32 weights (``resid`` 4, ``act`` 2) every projection casts its
    input itself: Q, K and V keep three 16-bit copies of the attention's input, gate and
    up two of the MLP's (counted with ``torch.autograd.graph.saved_tensors_hooks`` on
    SmolLM2-135M: 31.7 kB per layer and token, this formula 31.5 kB).
    """
    q = s.heads * s.head_dim
    kv = s.kv_heads * s.head_dim
    casts = resid != act
    attn = (3 if casts else 1) * s.hidden + 3 * q + 2 * kv
    mlp = (2 if casts and s.gated else 1) * s.hidden + (4 if s.gated else 2) * s.intermediate
    return act * (attn + mlp) + resid * s.norm_width + 4 * s.rms_norm_width


def activation_bytes(s: ModelShape, tokens: int, act: int, resid: int, checkpointing: bool) -> int:
    """Activations kept for backward over a micro-batch of ``tokens`` (= B·T).

    Without gradient checkpointing every layer's (:func:`layer_activation_bytes`); with it
    (HF checkpoints each decoder layer) only each layer's input in the residual dtype, plus
    one layer recomputed during backward. Both add the final norm and the head's input."""
    tail = resid * s.hidden + 4 * s.hidden + act * s.hidden
    layer = layer_activation_bytes(s, act, resid)
    if checkpointing:
        return tokens * (s.layers * resid * s.hidden + layer + tail)
    return tokens * (s.layers * layer + tail)


def loss_bytes(rows: int, vocab: int, logits_bytes: int) -> int:
    """Peak memory of the loss's ``[rows, V]`` term (:func:`fusellm.train.loss.
    fusion_loss_sums`): the model's logits, their float32 copy (none when they are float32
    already) and the saved log-softmax in forward; in backward the log-softmax, the one
    V-sized gradient :class:`~fusellm.train.loss.GatherLogSoftmax` builds, and its cast
    back to the logits' dtype. ``rows`` = B·T unchunked, else the chunk's positions."""
    per = logits_bytes + 4 + (4 if logits_bytes != 4 else 0)
    return rows * vocab * per


def plain_model_states(params: int, linear_params: int, autocast16: bool) -> dict[str, int]:
    """Training without DeepSpeed (fusellm trains float32 weights; bf16/fp16 only through
    autocast): weights, gradients and AdamW's two moments in float32, and under autocast
    the 16-bit copies of the matmul weights that autocast makes in forward and autograd
    keeps for backward."""
    out = {
        "weights (fp32)": 4 * params,
        "gradients (fp32)": 4 * params,
        "AdamW moments (2 × fp32)": 8 * params,
    }
    if autocast16:
        out["16-bit weight copies (autocast)"] = 2 * linear_params
    return out


def zero_paper_model_states(params: int, stage: int, world: int) -> int:
    """Per-rank model states under ZeRO (Rajbhandari et al. 2020, §5: 2 + 2 + K bytes per
    parameter for 16-bit weights, 16-bit gradients and K = 12 bytes of Adam state with its
    float32 master), each partitioned over ``world`` from stage 1 (optimizer), 2
    (+ gradients), 3 (+ weights). Used when DeepSpeed's own estimator is not installed."""
    w, g, o = 2 * params, 2 * params, 12 * params
    if stage >= 1:
        o /= world
    if stage >= 2:
        g /= world
    if stage >= 3:
        w /= world
    return int(w + g + o)


def extract_memory(
    s: ModelShape, weight_bytes: int, batch_tokens: int, head_chunk: int
) -> dict[str, int]:
    """One extraction process per model (:class:`fusellm.extract.core.TopKScorer`, under
    ``inference_mode`` so only one layer's tensors live at a time): the weights, a float32
    copy of the output head for a 16-bit model, the widest layer's tensors for a batch of
    ``batch_tokens`` (hidden, Q/K/V/output, MLP: ``2h + 4·q + 3·I``), and the head chunk:
    ``head_chunk`` × V float32 logits plus log-sum-exp's temporary of the same size."""
    q = s.heads * s.head_dim
    out = {
        "weights": s.params * weight_bytes,
        "batch": batch_tokens * weight_bytes * (2 * s.hidden + 4 * q + 3 * s.intermediate),
        "head chunk": 8 * head_chunk * s.vocab_rows,
    }
    if weight_bytes != 4:
        out["fp32 head"] = 4 * s.vocab_rows * s.hidden
    return out


# Dequantising a GGUF file into float32 holds the dequantised tensors and the model built
# from them: twice the float32 weights (1.78× measured for SmolLM2-135M, transformers 5.25).
GGUF_CONVERSION_FACTOR = 2.0


# -------------------------------------------------------------------------------- time


@dataclass(frozen=True)
class Device:
    """A device kind's stated dense 16-bit peak and the utilisation assumed of it."""

    name: str
    peak_flops: float | None  # bf16 dense, per device
    train_mfu: float
    infer_mfu: float


DEVICES = {
    "a100-80gb": Device("A100-80GB", 312e12, 0.40, 0.50),
    "h100-80gb": Device("H100-80GB (SXM)", 989e12, 0.40, 0.50),
    "cpu": Device("CPU", None, 0.0, 0.0),
}


def train_flops(params: int, tokens: float, epochs: float, checkpointing: bool) -> float:
    """Training FLOPs ≈ 6·N per token (forward 2N, backward 4N; Kaplan et al. 2020), 8·N
    with gradient checkpointing (the forward runs twice)."""
    return (8 if checkpointing else 6) * params * tokens * epochs


def infer_flops(params: int, tokens: float) -> float:
    """A forward pass ≈ 2·N FLOPs per token."""
    return 2 * params * tokens


def seconds(flops: float, peak: float, mfu: float, devices: int) -> float:
    return flops / (peak * mfu * devices)


# ------------------------------------------------------------------------------ format


def human_bytes(n: float | None) -> str:
    if n is None:
        return "unknown"
    for unit, size in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.3g} {unit}"
    return f"{n:.0f} B"


def human_count(n: float | None) -> str:
    if n is None:
        return "unknown"
    for unit, size in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.3g}{unit}"
    return f"{n:.0f}"


def human_seconds(s: float | None) -> str:
    if s is None:
        return "unknown"
    if s >= 86400:
        return f"{s / 86400:.1f} d"
    if s >= 3600:
        return f"{s / 3600:.1f} h"
    if s >= 60:
        return f"{s / 60:.1f} min"
    return f"{s:.0f} s"
