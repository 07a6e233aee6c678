"""Typed config of the align stage (recipe section ``align:``)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class AlignConfig(BaseModel):
    """Vocabulary mapping and sequence alignment of every source onto the target."""

    model_config = ConfigDict(extra="forbid", strict=True)

    vocab_method: Literal["next_token", "min_ed", "em"] = Field(
        "next_token",
        description="next_token: the target token its tokenizer emits first for the source "
        "token's text; min_ed: the paper's nearest token string; em: exact bytes only",
    )
    max_distance: int | None = Field(
        None,
        ge=0,
        description="min_ed only: drop entries farther than this many byte edits (their "
        "probability leaves the row; the manifest reports how much)",
    )
    seq_method: Literal["offsets", "dp"] = Field(
        "offsets",
        description="offsets: contexts that end at the same byte; dp: the paper's MinED DTW "
        "over token strings, kept where both contexts end at the same byte",
    )
    strict: bool = Field(False, description="also require the next tokens to cover the same text")
    gold_span: bool = Field(
        True,
        description="the source's own next token goes to the target's next token over the "
        "same text, with the source's probability of that text; false: through the "
        "vocabulary map like every other entry (the paper)",
    )
    top_k: int | None = Field(
        None, ge=1, description="entries per aligned position (default: extract.top_k)"
    )

    @model_validator(mode="after")
    def _distance_needs_min_ed(self) -> AlignConfig:
        if self.max_distance is not None and self.vocab_method != "min_ed":
            raise ValueError(
                f"align.max_distance applies to vocab_method min_ed, not '{self.vocab_method}'"
            )
        return self
