"""The plan's tokens section: tokens per corpus split, per extracted model, through align
and fuse (the target's), and trained on."""

from __future__ import annotations

from fusellm.plan.context import Context
from fusellm.plan.core import Row
from fusellm.stages import ALIGN, CORPUS, EXTRACT, FUSE, TRAIN


def token_rows(ctx: Context) -> list[Row]:
    rows = []
    r = ctx.recipe
    if ctx.corpus is not None:
        for s, st in ctx.corpus.splits.items():
            rows.append(
                Row(
                    CORPUS,
                    f"{s} ({r.target} tokens)",
                    ctx.tokens.per_model[r.target][s],
                    f"{st['docs']:,.0f} documents, {ctx.chunks([s]) or 0:,.0f} chunks, "
                    f"{st['chars']:,.0f} characters; {ctx.corpus.basis}",
                )
            )
    if ctx.wanted(EXTRACT):
        splits = "+".join(ctx.extract_splits)
        for name in r.all_models:
            if name in ctx.extract_models:
                basis = f"{splits}: {ctx.tokens.basis[name]}"
                rows.append(Row(EXTRACT, name, ctx.model_tokens(name), basis))
    target_tokens = ctx.model_tokens(r.target)
    if ctx.wanted(ALIGN):
        for src in r.sources:
            if src != r.target:
                rows.append(Row(ALIGN, src, target_tokens, f"the target's ({r.target})"))
    if ctx.wanted(FUSE):
        rows.append(Row(FUSE, r.target, target_tokens, "the target's"))
    if r.train is not None:
        steps, _, blocks, how = ctx.steps
        args = ctx.args
        batch = (
            f"{args.per_device_train_batch_size}×{args.gradient_accumulation_steps}"
            f"×{ctx.settings.gpus}"
        )
        rows.append(
            Row(
                TRAIN,
                f"{args.train_split} × {args.num_train_epochs:g} epoch(s)",
                ctx.train_tokens,
                f"{blocks or 0:,.0f} blocks of {args.block_size} ({how}); "
                f"{steps or 0:,} steps of {batch} blocks",
            )
        )
    return rows
