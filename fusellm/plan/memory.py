"""The plan's memory section: per rank while training (model states, activations, the
loss term; on a CPU the framework measured here) and per extraction process."""

from __future__ import annotations

from fusellm.plan import core
from fusellm.plan.context import Context
from fusellm.plan.core import ModelShape, Row
from fusellm.plan.machine import gguf_conversion
from fusellm.stages import EXTRACT, TRAIN

MEASURED = "measured in a subprocess"


def memory_rows(ctx: Context) -> tuple[list[Row], dict[str, float]]:
    """The rows, and the totals ``train_{cpu_rss,gpu}_per_rank`` and
    ``extract_peak_per_process`` of the stages the recipe runs."""
    rows: list[Row] = []
    totals = {}
    if ctx.recipe.train is not None:
        train = _train(ctx)
        rows += train
        totals[f"train_{'cpu_rss' if ctx.on_cpu else 'gpu'}_per_rank"] = train[-1].value
    if ctx.wanted(EXTRACT):
        extract, totals["extract_peak_per_process"] = _extract(ctx)
        rows += extract
    return rows, totals


def _train(ctx: Context) -> list[Row]:
    """One training rank: its parts, then their total (the last row)."""
    args = ctx.args
    t = ctx.recipe.target
    s = ctx.shapes[t]
    zero = ctx.zero[0]
    module = ctx.weight_bytes(t) if zero else 4  # the weights as the module holds them
    act = 2 if ctx.mixed else module  # activations and logits
    rows = _model_states(ctx, s)
    tokens = args.per_device_train_batch_size * args.block_size
    bt = f"B·T {args.per_device_train_batch_size}·{args.block_size}"
    on = args.gradient_checkpointing
    a_on = core.activation_bytes(s, tokens, act, module, on)
    a_off = core.activation_bytes(s, tokens, act, module, not on)
    per_token = core.human_bytes(core.layer_activation_bytes(s, act, module))
    rows.append(
        Row(
            TRAIN,
            f"activations (gradient checkpointing {'on' if on else 'off'})",
            a_on,
            f"{bt}; per layer and token {per_token} "
            f"({act}-byte activations, {module}-byte residual)",
        )
    )
    from fusellm.train.trainer import head_chunk_tokens

    chunk = head_chunk_tokens(args.head_chunk_tokens, s.vocab_rows)
    loss = core.loss_bytes(min(chunk, tokens) if chunk else tokens, s.vocab_rows, act)
    rows.append(
        Row(
            TRAIN,
            "loss [B, T, V] term",
            loss,
            (
                f"chunked: {chunk} rows × V {s.vocab_rows:,}"
                if chunk
                else f"unchunked: {bt} × V {s.vocab_rows:,}"
            )
            + f" × {act + 8 if act != 4 else 8} B",
        )
    )
    if ctx.on_cpu:
        base = ctx.baseline
        rows.append(Row(TRAIN, "framework (every stage's imports)", base["framework"], MEASURED))
        if t in base["tokenizers"]:
            rows.append(Row(TRAIN, f"tokenizer {t}", base["tokenizers"][t], MEASURED))
    total = sum(r.value for r in rows)
    other = total - a_on + a_off
    not_counted = (
        "what earlier stages of one process leave resident"
        if ctx.on_cpu
        else "CUDA context, ZeRO buckets"
    )
    rows.append(
        Row(
            TRAIN,
            f"total {'CPU RSS' if ctx.on_cpu else 'GPU memory'} per rank",
            total,
            f"{'without' if on else 'with'} gradient checkpointing {core.human_bytes(other)}; "
            f"not counted: {not_counted}",
        )
    )
    return rows


def _model_states(ctx: Context, s: ModelShape) -> list[Row]:
    """Weights, gradients and optimizer states of one rank."""
    zero, off_opt, off_param = ctx.zero
    world = ctx.settings.gpus
    if zero:
        states, how = zero_model_states(s, zero, world, off_opt, off_param)
        return [Row(TRAIN, f"model states, ZeRO-{zero} over {world} rank(s)", states, how)]
    how = f"{core.human_count(s.params)} params (no DeepSpeed)"
    parts = core.plain_model_states(s.params, s.linear_params, ctx.mixed)
    return [Row(TRAIN, item, b, how) for item, b in parts.items()]


def zero_model_states(
    s: ModelShape, stage: int, world: int, off_opt: bool, off_param: bool
) -> tuple[int, str]:
    """Per-rank parameters, gradients and optimizer states under ZeRO: DeepSpeed's own
    estimator where DeepSpeed is installed (without its 1.5× CPU buffer factor, which is
    for the host side), else the ZeRO paper's formula."""
    try:
        from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
        from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs
    except ImportError:
        return core.zero_paper_model_states(
            s.params, stage, world
        ), "ZeRO paper: (2 + 2 + 12) B/param, partitioned (DeepSpeed not installed)"
    if stage == 3:
        _, gpu, _ = estimate_zero3_model_states_mem_needs(
            s.params,
            s.largest_layer_params,
            num_gpus_per_node=world,
            cpu_offload=off_opt,
            cpu_offload_params=off_param,
        )
        return int(gpu), "DeepSpeed's estimate_zero3_model_states_mem_needs"
    _, gpu = estimate_zero2_model_states_mem_needs(
        s.params, num_gpus_per_node=world, cpu_offload=off_opt
    )
    return int(gpu), "DeepSpeed's estimate_zero2_model_states_mem_needs (also for ZeRO-1)"


def _extract(ctx: Context) -> tuple[list[Row], float]:
    """One extraction process per model (+ a GGUF model's first-run conversion), and the
    largest of them."""
    ext = ctx.recipe.extract
    where = "CPU RSS" if ctx.on_cpu else "GPU memory"
    rows = []
    peak = 0.0
    for name in ctx.extract_models:
        s = ctx.shapes[name]
        parts = core.extract_memory(
            s, ctx.weight_bytes(name), ext.batch_tokens, ext.head_chunk_tokens
        )
        total = sum(parts.values())
        basis = " + ".join(f"{k} {core.human_bytes(v)}" for k, v in parts.items())
        if ctx.on_cpu:
            base = ctx.baseline
            total += base["framework"] + base["tokenizers"].get(name, 0)
            basis += f" + framework {core.human_bytes(base['framework'])} + tokenizer (measured)"
        rows.append(Row(EXTRACT, f"{name} ({where})", total, basis))
        peak = max(peak, total)
        if gguf_conversion(ctx.recipe, name) is False:
            c = core.GGUF_CONVERSION_FACTOR * 4 * s.params + (
                ctx.baseline["framework"] if ctx.on_cpu else 0
            )
            rows.append(
                Row(
                    EXTRACT,
                    f"{name}: GGUF conversion (first run only, CPU)",
                    c,
                    f"{core.GGUF_CONVERSION_FACTOR:g} × float32 weights + framework",
                )
            )
            peak = max(peak, c)
    return rows, peak
