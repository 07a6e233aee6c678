"""What the plan's sections share: the facts gathered about a recipe (shapes, tokenizers,
corpus, token counts) and the quantities derived from them once (splits, chunks, training
arguments, steps, ZeRO settings, bytes per weight, the measured framework memory)."""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING

from fusellm.plan import core
from fusellm.plan.core import DTYPE_BYTES, ModelShape
from fusellm.plan.counts import Corpus, Tokens, split_chunks
from fusellm.plan.machine import measure_baseline
from fusellm.recipe import Recipe
from fusellm.stages import STAGES

if TYPE_CHECKING:
    from fusellm.plan.runner import Settings

# TrainingArguments fields whose checks depend on the machine that trains.
MACHINE_DEPENDENT = (
    "bf16",
    "fp16",
    "bf16_full_eval",
    "fp16_full_eval",
    "tf32",
    "deepspeed",
    "use_cpu",
)


@dataclass
class Context:
    """The facts about a recipe that every section reads, and what they derive (computed
    on first use, once)."""

    recipe: Recipe
    settings: Settings
    shapes: dict[str, ModelShape]
    toks: dict
    corpus: Corpus | None
    tokens: Tokens

    # ------------------------------------------------------------------ corpus, tokens

    @property
    def extract_splits(self) -> list[str]:
        return list(self.recipe.extract.splits) if self.recipe.extract else ["train"]

    @property
    def extract_models(self) -> list[str]:
        """The models the extract stage runs (needs an ``extract:`` section)."""
        return self.recipe.extract.models or self.recipe.all_models

    def model_tokens(self, name: str, splits: list[str] | None = None) -> float | None:
        counts = self.tokens.per_model[name]
        vals = [counts[s] for s in splits or self.extract_splits]
        return None if any(v is None for v in vals) else sum(vals)

    def chunks(self, splits: list[str] | None = None) -> float | None:
        vals = [
            split_chunks(self.recipe, self.corpus, self.tokens, s)
            for s in splits or self.extract_splits
        ]
        return None if any(v is None for v in vals) else sum(vals)

    @cached_property
    def id_bytes(self) -> float:
        """Mean bytes of a document id's entry in a shard header."""
        ids = (
            [i for i, _ in self.corpus.sample]
            if self.corpus and self.corpus.sample
            else ["x" * 24 + "#0"]
        )
        return sum(core.id_header_bytes(i) for i in ids) / len(ids)

    def wanted(self, stage: str) -> bool:
        st = STAGES[stage]
        return getattr(self.recipe, st.section_name) is not None and st.wanted(self.recipe)

    # ------------------------------------------------------------------- the machine

    @property
    def on_cpu(self) -> bool:
        if self.settings.device is not None:
            return self.settings.device == "cpu"
        return bool(self.train.get("use_cpu")) or (
            self.recipe.extract is not None and self.recipe.extract.device == "cpu"
        )

    def weight_bytes(self, name: str) -> int:
        """Bytes per weight as the model entry loads: its dtype; ``auto`` is bf16 on a GPU,
        float32 on a CPU (:func:`fusellm.models.resolve_dtype`)."""
        d = self.recipe.models[name].dtype
        if d == "auto":
            return 4 if self.on_cpu else 2
        return DTYPE_BYTES[d]

    @cached_property
    def baseline(self) -> dict:
        """The framework's and each tokenizer's resident memory (measured)."""
        return measure_baseline(self.recipe, self.settings.recipe_args, list(self.toks))

    @cached_property
    def tokenizer_bytes(self) -> int:
        """Bytes of the target's tokenizer as saved beside a model (0: none loads here)."""
        tok = self.toks.get(self.recipe.target)
        if tok is None:
            return 0
        with tempfile.TemporaryDirectory() as d:
            tok.save_pretrained(d)
            return sum(p.stat().st_size for p in Path(d).iterdir())

    # ---------------------------------------------------------------------- training

    @property
    def train(self) -> dict:
        return self.recipe.train or {}

    @cached_property
    def args(self):
        """The recipe's training arguments, built as the train stage builds them but
        without the settings whose checks need the training machine (bf16 needs a GPU,
        DeepSpeed its config): :attr:`mixed` and :attr:`zero` read those."""
        from fusellm.train.runner import build_args

        keep = {k: v for k, v in self.train.items() if k not in MACHINE_DEPENDENT}
        recipe = self.recipe.model_copy(update={"train": {**keep, "use_cpu": True}})
        return build_args(recipe, "/nonexistent-fusellm-plan", False)

    @property
    def mixed(self) -> bool:
        """bf16 or fp16 training (autocast without DeepSpeed)."""
        return bool(self.train.get("bf16") or self.train.get("fp16"))

    @cached_property
    def zero(self) -> tuple[int, bool, bool]:
        """(ZeRO stage (0: no DeepSpeed), optimizer offloaded, parameters offloaded)."""
        ds = self.train.get("deepspeed")
        if ds is None:
            return 0, False, False
        if isinstance(ds, str):
            ds = json.loads(Path(ds).read_text())
        z = ds.get("zero_optimization", {})

        def offloaded(key: str) -> bool:
            return (z.get(key) or {}).get("device", "none") not in ("none", None)

        return int(z.get("stage", 0)), offloaded("offload_optimizer"), offloaded("offload_param")

    @cached_property
    def blocks(self) -> tuple[float | None, str]:
        """Training blocks of the train split, and how they were counted."""
        args = self.args
        n = self.model_tokens(self.recipe.target, [args.train_split])
        if n is None:
            return None, "unknown tokens"
        block = args.block_size
        if args.packing == "stream":
            return n / block, "one token stream cut into blocks"
        if args.packing == "none":
            return self.chunks([args.train_split]), "one document per block"
        lengths = self.tokens.chunk_tokens.get(self.recipe.target)
        if not lengths:
            return n / block, "assumed full: document lengths unknown"
        import numpy as np

        from fusellm.train.data import pack

        # a sampled document longer than the block is cut into about equal chunks
        lens = np.asarray([n // c for n in lengths for c in [-(-n // block)] for _ in range(c)])
        fill = lens.sum() / (len(pack(lens, block)) * block)
        return n / (block * fill), f"documents packed first-fit {fill:.1%} full (sampled lengths)"

    @cached_property
    def steps(self) -> tuple[int | None, int | None, float | None, str]:
        """(optimizer steps, steps per epoch, blocks, how blocks were counted)."""
        args = self.args
        blocks, how = self.blocks
        if blocks is None:
            return None, None, None, how
        steps, per_epoch = core.train_steps(
            max(round(blocks), 1),
            args.per_device_train_batch_size,
            self.settings.gpus,
            args.gradient_accumulation_steps,
            args.num_train_epochs,
            args.max_steps,
        )
        return steps, per_epoch, blocks, how

    @cached_property
    def train_tokens(self) -> float | None:
        """Tokens trained on: the train split × epochs (or the steps × batch tokens that
        ``max_steps`` allows)."""
        args = self.args
        n = self.model_tokens(self.recipe.target, [args.train_split])
        if n is None:
            return None
        steps, per_epoch, _, _ = self.steps
        return n * steps / per_epoch if per_epoch else n * args.num_train_epochs
