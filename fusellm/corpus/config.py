"""Typed config of the corpus stage (recipe section ``corpus:``)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class CorpusInput(BaseModel):
    """One input: a file/directory/glob (``path``) or a named dataset (``builtin``).

    ``path`` may start with ``pkg:MODULE/`` for files inside an installed package.
    Formats: ``jsonl`` (optionally ``.gz``), ``parquet``, ``text`` (one document per file,
    or per blank-line paragraph with ``text_unit: paragraph``), ``disk`` (a
    ``datasets`` dataset saved with ``save_to_disk``), ``chat`` (jsonl of conversations:
    OpenAI ``messages`` or ShareGPT ``conversations``, see :mod:`fusellm.chat`). ``auto``
    decides by extension (never ``chat``).
    """

    model_config = ConfigDict(extra="forbid", strict=True)

    path: str | None = None
    builtin: str | None = None
    format: Literal["auto", "jsonl", "parquet", "text", "disk", "chat"] = "auto"
    text_field: str = "text"
    id_field: str | None = None
    domain: str | None = None
    text_unit: Literal["file", "paragraph"] = "file"
    max_docs: int | None = Field(None, ge=1)

    @model_validator(mode="after")
    def _one_origin(self) -> CorpusInput:
        if (self.path is None) == (self.builtin is None):
            raise ValueError("give exactly one of 'path' or 'builtin'")
        return self


class CorpusConfig(BaseModel):
    """Read text, split by document id, cut long documents to fit every model's block."""

    model_config = ConfigDict(extra="forbid", strict=True)

    inputs: list[CorpusInput] = Field(min_length=1)
    valid_fraction: float = Field(0.05, ge=0.0, le=1.0)
    test_fraction: float = Field(0.05, ge=0.0, le=1.0)
    split_salt: str = ""
    block_size: int = Field(2048, ge=16)
    fit_models: list[str] | None = Field(
        None, description="models whose tokenization must fit block_size (default: all)"
    )
    min_chars: int = Field(1, ge=1)
    on_error: Literal["error", "skip"] = "error"
    num_proc: int = Field(
        0, ge=0, description="processes that cut documents (0: one per core, at most 8)"
    )

    @model_validator(mode="after")
    def _fractions(self) -> CorpusConfig:
        if self.valid_fraction + self.test_fraction >= 1.0:
            raise ValueError(
                "valid_fraction + test_fraction must be < 1 (nothing left to train on)"
            )
        return self
