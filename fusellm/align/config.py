"""Typed config of the align stage (recipe section ``align:``)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class AlignConfig(BaseModel):
    """Vocabulary mapping and sequence alignment of every source onto the target."""

    model_config = ConfigDict(extra="forbid", strict=True)

    vocab_method: Literal["min_ed", "em"] = "min_ed"
    seq_method: Literal["offsets", "dp"] = Field(
        "offsets", description="dp: the paper's MinED DTW over token strings"
    )
    strict: bool = Field(False, description="also require the next tokens to cover the same text")
    top_k: int | None = Field(
        None, ge=1, description="entries per aligned position (default: extract.top_k)"
    )
