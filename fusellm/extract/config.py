"""Typed config of the extract stage (recipe section ``extract:``)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

# Fields that change what is stored; the rest (batching, device) only change speed, so a
# resumed run may use another GPU or batch size without invalidating finished shards.
CONTENT_FIELDS = ("splits", "top_k", "logprob_dtype", "docs_per_shard", "add_special_tokens")


class ExtractConfig(BaseModel):
    """Which models to run, what to keep, how to batch."""

    model_config = ConfigDict(extra="forbid", strict=True)

    models: list[str] | None = Field(None, description="default: the target and every source")
    splits: list[Literal["train", "valid", "test"]] = Field(
        default_factory=lambda: ["train"], min_length=1
    )
    top_k: int = Field(10, ge=1, le=4096)
    logprob_dtype: Literal["float16", "bfloat16", "float32"] = "float16"
    docs_per_shard: int = Field(256, ge=1)
    add_special_tokens: bool = Field(
        True, description="encode as the model's tokenizer does by default (BOS/EOS)"
    )
    batch_tokens: int = Field(4096, ge=16, description="padded tokens per forward batch")
    max_batch_size: int = Field(32, ge=1)
    head_chunk_tokens: int = Field(
        1024, ge=1, description="positions per output-head chunk (bounds V-sized memory)"
    )
    device: str = Field("auto", description="auto: cuda:LOCAL_RANK when available, else cpu")
