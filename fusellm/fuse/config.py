"""Typed config of the fuse stage (recipe section ``fuse:``)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator


class FuseConfig(BaseModel):
    """How the aligned distributions of the sources become one target distribution."""

    model_config = ConfigDict(extra="forbid", strict=True)

    method: str = Field("min_ce", description="a registered fuser: min_ce, avg_ce, ...")
    level: Literal["sequence", "token"] = "sequence"
    criterion: Literal["nll_per_byte", "ce_per_token"] = Field(
        "nll_per_byte",
        description="how candidates' CE is compared: NLL per byte of the same text, or the "
        "paper's mean CE per token of each model's own tokenization",
    )
    temperature: float = Field(1.0, gt=0.0, description="τ of avg_ce: weights softmax(−CE/τ)")
    top_k: int | None = Field(
        None, ge=1, description="entries kept per position (default: extract.top_k)"
    )
    sources: list[str] | None = Field(None, description="default: the recipe's sources")

    @field_validator("method")
    @classmethod
    def _known(cls, v: str) -> str:
        from fusellm.fuse.core import FUSERS

        if v not in FUSERS:
            raise ValueError(f"unknown fusion method '{v}'; registered: {sorted(FUSERS)}")
        return v
