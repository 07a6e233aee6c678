"""The plan's time section (with ``--device``): seconds of extraction per model and of
training. On a GPU from the FLOPs at the device's peak × an assumed MFU; on a CPU from a
forward pass measured here."""

from __future__ import annotations

from collections.abc import Callable

from fusellm.plan import core
from fusellm.plan.context import Context
from fusellm.plan.core import Row
from fusellm.plan.machine import cpu_tokens_per_second
from fusellm.stages import CLM_ONLY, EXTRACT, PAIRWISE, TRAIN

# (seconds or None: unknown, how) of extracting ``tokens`` with a model / training on them
Extract = Callable[[str, float | None], tuple[float | None, str]]
Train = Callable[[float | None], tuple[float | None, str]]


def time_rows(ctx: Context) -> tuple[list[Row], dict[str, float]]:
    """The rows and their total ``seconds``; nothing without ``--device``."""
    if ctx.settings.device is None:
        return [], {}
    dev = core.DEVICES[ctx.settings.device]
    extract, train = _cpu(ctx) if dev.peak_flops is None else _gpu(ctx, dev)
    r = ctx.recipe
    rows = []
    if ctx.wanted(EXTRACT):
        for name in ctx.extract_models:
            rows.append(Row(EXTRACT, name, *extract(name, ctx.model_tokens(name))))
    if r.train is not None:
        for stage in (TRAIN, CLM_ONLY):
            if ctx.wanted(stage):
                rows.append(Row(stage, r.target, *train(ctx.train_tokens)))
        if ctx.wanted(PAIRWISE):  # one training run per pair
            from fusellm.train.pairwise import pair_sources

            for src in pair_sources(r):
                rows.append(Row(PAIRWISE, f"{src}/train", *train(ctx.train_tokens)))
    return rows, {"seconds": sum(x.value for x in rows if x.value is not None)}


def _gpu(ctx: Context, dev: core.Device) -> tuple[Extract, Train]:
    n = ctx.settings.gpus
    of = f"of {dev.peak_flops / 1e12:.0f} TFLOPS × {n} {dev.name}"

    def extract(name: str, tokens: float | None) -> tuple[float | None, str]:
        how = f"2·N·tokens at {dev.infer_mfu:.0%} {of}"
        if tokens is None:
            return None, how
        flops = core.infer_flops(ctx.shapes[name].params, tokens)
        return core.seconds(flops, dev.peak_flops, dev.infer_mfu, n), how

    def train(tokens: float | None) -> tuple[float | None, str]:
        checkpointing = ctx.args.gradient_checkpointing
        how = f"{'8' if checkpointing else '6'}·N·tokens at {dev.train_mfu:.0%} {of}"
        if tokens is None:
            return None, how
        flops = core.train_flops(ctx.shapes[ctx.recipe.target].params, tokens, 1, checkpointing)
        return core.seconds(flops, dev.peak_flops, dev.train_mfu, n), how

    return extract, train


def _cpu(ctx: Context) -> tuple[Extract, Train]:
    rates: dict[str, float | None] = {}

    def rate(name: str) -> float | None:
        """Tokens per second of a forward pass, measured once per model."""
        if name not in rates:
            rates[name] = cpu_tokens_per_second(ctx.recipe, name)
        return rates[name]

    def extract(name: str, tokens: float | None) -> tuple[float | None, str]:
        r = rate(name)
        if not r:
            return None, "model not at hand here (not converted/downloaded): unknown"
        return (
            None if tokens is None else tokens / r,
            f"forward pass measured here: {r:,.0f} tokens/s",
        )

    def train(tokens: float | None) -> tuple[float | None, str]:
        r = rate(ctx.recipe.target)
        if not r:
            return None, "model not at hand here: unknown"
        factor = 4 if ctx.args.gradient_checkpointing else 3
        how = f"{factor}× the measured forward time per token (backward ≈ 2 forwards)"
        return None if tokens is None else tokens * factor / r, how

    return extract, train
