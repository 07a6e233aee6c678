"""The train config: ``transformers.TrainingArguments`` plus the fusion fields only.

Everything else (bf16, gradient checkpointing, DeepSpeed, schedulers, accumulation,
logging/saving cadence) is a TrainingArguments field, set by the same name in the
recipe's ``train:`` section.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from pydantic import ValidationError
from transformers import TrainingArguments

# Set by the runner from the recipe/run_dir, not by the train: section.
RUNNER_OWNED = ("output_dir", "run_name", "report_to", "remove_unused_columns", "hub_token")


@dataclass
class FusionTrainingArguments(TrainingArguments):
    """TrainingArguments + FuseLLM's objective ``λ·CLM + (1−λ)·H(p_fused, q)``."""

    lm_weight: float = field(default=0.9, metadata={"help": "λ: weight of the CLM term"})
    teacher_temperature: float = field(default=1.0, metadata={"help": "τ of the fused targets"})
    fusion_loss: str = field(default="ce", metadata={"help": "ce or kl"})
    tail: str = field(
        default="renormalize", metadata={"help": "renormalize the top-k, or keep a tail bucket"}
    )
    block_size: int = field(default=2048, metadata={"help": "tokens per training block"})
    packing: str = field(
        default="documents",
        metadata={
            "help": "documents: whole documents per block, attention never crosses one; "
            "none: one document per block; stream: the reference one-stream layout "
            "(attention across documents, documents cut at block edges; ablation only)"
        },
    )
    train_split: str = field(
        default="train", metadata={"help": "corpus split of the fused shards to train on"}
    )
    save_total_limit: int | None = field(
        default=2,
        metadata={
            "help": "complete checkpoints kept while training (the newest; an older one is "
            "deleted only once a newer one is complete); None keeps all"
        },
    )
    keep_checkpoints_when_done: bool = field(
        default=True,
        metadata={
            "help": "keep the checkpoints once the model is saved (the final one re-saves a "
            "damaged model; they continue training by hand); false deletes them then"
        },
    )
    # fusellm rotates checkpoints itself (fusellm.train.trainer.CompletionMarker), after a
    # new checkpoint is complete: the Trainer's rotation runs before that, and a run killed
    # in between would be left with no checkpoint to resume from. __post_init__ moves
    # save_total_limit here and leaves the Trainer's None.
    checkpoint_limit: int | None = field(default=None, init=False)
    head_chunk_tokens: int = field(
        default=-1,
        metadata={
            "help": "positions per output-head chunk of the loss (never all [B, T, V] logits "
            "at once); 0: unchunked; -1: chunked from a 65,536-row vocabulary up"
        },
    )

    def __post_init__(self):
        super().__post_init__()
        if self.save_total_limit is not None and self.save_total_limit < 1:
            raise ValueError(f"save_total_limit must be >= 1, got {self.save_total_limit}")
        self.checkpoint_limit, self.save_total_limit = self.save_total_limit, None
        if not 0.0 <= self.lm_weight <= 1.0:
            raise ValueError(f"lm_weight must be in [0, 1], got {self.lm_weight}")
        if self.teacher_temperature <= 0:
            raise ValueError(f"teacher_temperature must be > 0, got {self.teacher_temperature}")
        if self.fusion_loss not in ("ce", "kl"):
            raise ValueError(f"fusion_loss must be 'ce' or 'kl', got '{self.fusion_loss}'")
        if self.tail not in ("renormalize", "bucket"):
            raise ValueError(f"tail must be 'renormalize' or 'bucket', got '{self.tail}'")
        if self.tail == "bucket" and self.teacher_temperature != 1.0:
            raise ValueError(
                "tail: bucket keeps the stored tail mass, which needs teacher_temperature 1.0"
            )
        from fusellm.train.data import PACKING

        if self.packing not in PACKING:
            raise ValueError(f"packing must be one of {', '.join(PACKING)}, got '{self.packing}'")
        if self.block_size < 2:
            raise ValueError(f"block_size must be >= 2, got {self.block_size}")
        if self.head_chunk_tokens < -1:
            raise ValueError(
                f"head_chunk_tokens must be -1 (auto), 0 (off) or a count, got {self.head_chunk_tokens}"
            )


_SIMPLE = {"int": (int,), "float": (int, float), "bool": (bool,), "str": (str,)}
_FUSION_FIELDS = (
    "lm_weight",
    "teacher_temperature",
    "fusion_loss",
    "tail",
    "block_size",
    "packing",
)


def TrainSection(section: Any) -> dict[str, Any]:  # noqa: N802 - named as the type it checks
    """Validate the ``train:`` section at recipe load: unknown keys, simple type errors and
    bad fusion values, each reported under its key (a pydantic ``ValidationError``). The
    full ``TrainingArguments`` is built by the runner: its checks depend on the machine
    (bf16 needs a GPU, for example) and a recipe must load anywhere."""
    if not isinstance(section, dict):
        raise _errors([((), f"expected a mapping of TrainingArguments fields, got {section!r}")])
    fields = {f.name: f for f in dataclasses.fields(FusionTrainingArguments)}
    problems: list[tuple[tuple, str]] = []
    for key, value in section.items():
        if key not in fields:
            problems.append(((key,), "unknown key (not a TrainingArguments or fusion field)"))
            continue
        if key in RUNNER_OWNED:
            problems.append(((key,), "set by fusellm from run_dir and tracking; remove it"))
            continue
        ann = (
            fields[key].type
            if isinstance(fields[key].type, str)
            else getattr(fields[key].type, "__name__", "")
        )
        ok = _SIMPLE.get(ann)
        if (
            ok
            and value is not None
            and (not isinstance(value, ok) or (ann != "bool" and isinstance(value, bool)))
        ):
            problems.append(((key,), f"expected {ann}, got {value!r}"))
    if isinstance(section.get("deepspeed"), str) and (
        why := _deepspeed_json_problem(section["deepspeed"])
    ):
        problems.append((("deepspeed",), why))
    if not problems:
        probe = {k: section[k] for k in _FUSION_FIELDS if k in section}
        try:
            FusionTrainingArguments(
                output_dir="/nonexistent-fusellm-check", report_to=[], use_cpu=True, **probe
            )
        except (TypeError, ValueError) as e:
            problems.append(((), str(e)))
    if problems:
        raise _errors(problems)
    return section


def _errors(problems: list[tuple[tuple, str]]) -> ValidationError:
    return ValidationError.from_exception_data(
        "train",
        [
            {"type": "value_error", "loc": loc, "input": None, "ctx": {"error": ValueError(msg)}}
            for loc, msg in problems
        ],
    )


def _deepspeed_json_problem(path: str) -> str | None:
    """A DeepSpeed ``scheduler`` block would silently replace the recipe's schedule (the
    reference FuseLLM's WarmupDecayLR did): refuse it."""
    import json
    from pathlib import Path

    p = Path(path)
    if not p.exists():
        return f"no such file {path}"
    try:
        cfg = json.loads(p.read_text())
    except json.JSONDecodeError as e:
        return f"{path} is not valid JSON ({e})"
    if "scheduler" in cfg:
        return (
            f"{path} has a 'scheduler' block, which would override the recipe's "
            "lr_scheduler_type/warmup_steps; remove it (see recipes/deepspeed/README.md)"
        )
    return None
