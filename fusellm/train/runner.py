"""``fusellm train``: continue training the target on its fused data.

Reads ``run_dir/fuse/<train_split>`` shards, trains the target (loaded through
:mod:`fusellm.models`) with :class:`FusionTrainer`, keeps checkpoints under
``run_dir/train/checkpoints`` (resumed from the latest *complete* one), and saves the
final model as a plain HF directory (safetensors + tokenizer) at ``run_dir/train/model``,
loadable with ``AutoModelForCausalLM``. Metrics go to the stage's W&B run.
"""

from __future__ import annotations

import logging
import pickle
import shutil
import time
from pathlib import Path

from fusellm.distributed import Rank, on_rank0
from fusellm.manifest import CorruptArtifact, StageDir, load_manifest, outputs_hash
from fusellm.models import (
    check_positions,
    load_model,
    load_tokenizer,
    locate,
    max_positions,
    spec_max_positions,
)
from fusellm.recipe import Recipe
from fusellm.sharded import shard_paths
from fusellm.stages import CLM_ONLY, FUSE, TRAIN
from fusellm.storage import write_failure_names
from fusellm.tracking import start_run, wandb_env

log = logging.getLogger(__name__)


def build_args(
    recipe: Recipe, output_dir: str, report_wandb: bool, stage: str = TRAIN, **overrides
):
    from fusellm.train.config import FusionTrainingArguments

    section = {**recipe.train, **overrides}
    section.setdefault("seed", recipe.seed)
    return FusionTrainingArguments(
        output_dir=output_dir,
        run_name=f"{recipe.name}/{stage}",
        report_to=["wandb"] if report_wandb else [],
        remove_unused_columns=False,
        **section,
    )


def run(recipe: Recipe, force: bool = False) -> dict | None:
    return _run(recipe, force, TRAIN, {})


def run_clm_only(recipe: Recipe, force: bool = False) -> dict | None:
    """The paper's CLM baseline: the ``train:`` run with λ = 1 (no fusion term), on the
    same fused blocks in the same order, saved at ``run_dir/clm_only/model``."""
    return _run(recipe, force, CLM_ONLY, {"lm_weight": 1.0})


def _run(recipe: Recipe, force: bool, stage: str, overrides: dict) -> dict | None:
    if recipe.train is None:
        raise ValueError("the recipe has no 'train:' section")
    fuse_dir = recipe.stage_dir(FUSE)
    fuse_man = load_manifest(fuse_dir, FUSE)
    spec = recipe.models[recipe.target]
    config = {**recipe.train, **overrides}
    fingerprint = {
        "config": config,
        "fused": outputs_hash(fuse_man),
        "model": locate(spec, recipe.target).identity,
    }
    sd = StageDir(stage, recipe.stage_dir(stage), fingerprint)
    split = recipe.train.get("train_split", "train")
    with wandb_env(recipe, stage) as wandb_on:
        args = build_args(recipe, str(sd.path / "checkpoints"), wandb_on, stage, **overrides)
        # Reading args.device sets up the process group now (TrainingArguments does it
        # lazily): ZeRO-3 partitions the weights inside from_pretrained and needs the world
        # size, and only rank 0 may touch the stage directory (ranks racing in prepare()
        # delete each other's temporary files).
        log.info("%s: %d process(es), device %s", stage, args.world_size, args.device)
        # Checkpoints are partial work that a rerun resumes: keep them unless inputs changed.
        ckpts = sd.path / "checkpoints"
        todo, previous = on_rank0(
            lambda: (
                sd.prepare(force, can_regenerate=lambda old: _cannot_resave(old, ckpts)),
                sd.previous,
            )
        )
        if not todo:
            log.info("%s: complete and unchanged at %s (skipped)", stage, sd.path)
            return None
        with start_run(
            recipe, stage, {"train": config, **fingerprint}, enabled=Rank.from_env().rank == 0
        ) as tracker:
            if previous is not None:  # a finished run whose model was damaged
                out_dir = on_rank0(lambda: _resave(recipe, args, sd))
                stats = {**previous["stats"], "resaved_from_checkpoint": True}
            else:
                paths = shard_paths(fuse_dir, fuse_man, split, FUSE)
                stats, out_dir = _train(recipe, args, sd, paths)
            tracker.summary(stats)
    if args.process_index != 0:
        return None
    files = {
        f"model/{p.name}": sd.file_record(f"model/{p.name}")
        for p in sorted(out_dir.iterdir())
        if p.is_file()
    }
    manifest = sd.finish(files, stats, config)
    if not args.keep_checkpoints_when_done:
        # Resume points of a finished run; only now that its manifest records it (killed
        # before, a rerun resumes from them instead of training from the start).
        from fusellm.train.trainer import checkpoints

        for p in checkpoints(sd.path / "checkpoints").values():
            log.info("%s: deleting %s (the run is finished)", stage, p)
            shutil.rmtree(p)
    return manifest


def _train(recipe: Recipe, args, sd: StageDir, paths: list) -> tuple[dict, Path]:
    """Train on this process; returns the run's stats and the saved model directory."""

    from fusellm.train.data import FusedBlocks, collate
    from fusellm.train.trainer import (
        CompletionMarker,
        FusionTrainer,
        NonFiniteGradStop,
    )

    spec = recipe.models[recipe.target]
    dataset = FusedBlocks(paths, args.block_size, args.packing)
    log.info(
        "%s: %d blocks of %d tokens (%s packing, %.1f%% padding)",
        sd.stage,
        len(dataset),
        args.block_size,
        args.packing,
        100 * dataset.padding_fraction,
    )
    if _deepspeed(args):
        from fusellm.train import safe_load

        safe_load.install()  # a ZeRO resume then loads with weights_only=True
    if _deepspeed(args) and args.world_size > 1:
        import deepspeed

        # On CPU, accelerate sets up torch.distributed but not deepspeed.comm, whose
        # world size ZeRO-3's zero.Init reads while loading the model.
        if args.device.type == "cpu":
            # DeepSpeed would JIT-compile an optional shared-memory allreduce op here,
            # behind a file lock that a killed build leaves held forever (every later
            # run then hangs). gloo does the collectives without it.
            # (Not `import deepspeed.comm.torch as m`: that resolves the attribute
            # deepspeed.comm.torch, which is the torch package itself.)
            import importlib

            importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None
        deepspeed.init_distributed(dist_backend="gloo" if args.device.type == "cpu" else "nccl")
    tok = load_tokenizer(spec, recipe.target)
    # GPT-2/MPT position tables fail inside the first forward beyond their maximum; rotary
    # models run on silently where they were never trained. Refuse before loading weights.
    limit = spec_max_positions(spec, recipe.target)
    check_positions(recipe.target, limit, args.block_size, "train.block_size")
    # Without DeepSpeed the optimizer updates the very weights it is given: in bf16 an
    # update of lr 1e-5 is below the weights' resolution (2^-8 relative) and mostly
    # vanishes. So train float32 weights (bf16/fp16 compute comes from train.bf16/fp16
    # autocast); DeepSpeed keeps float32 master weights of bf16 ones itself.
    masters = spec if _deepspeed(args) else spec.model_copy(update={"dtype": "float32"})
    model = load_model(masters, recipe.target, "cpu").train()
    if limit is None:  # config was not at hand without loading (GGUF, hub)
        check_positions(
            recipe.target, max_positions(model.config), args.block_size, "train.block_size"
        )
    if args.gradient_checkpointing:
        model.config.use_cache = False
    t0 = time.time()
    trainer = FusionTrainer(
        model=model,
        args=args,
        train_dataset=dataset,
        data_collator=collate,
        callbacks=[NonFiniteGradStop(), CompletionMarker(args.checkpoint_limit)],
    )
    ckpts = sd.path / "checkpoints"
    resume = on_rank0(lambda: _resume_point(ckpts))
    try:
        result = trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    except pickle.UnpicklingError as e:  # weights_only loading refused a file
        raise CorruptArtifact(
            f"train: {resume or 'the model'} holds a file that is not a safe checkpoint (a pickle that "
            f"would run code?); refused without loading it: {str(e).splitlines()[0]}"
        ) from e
    out_dir = sd.path / "model"
    # Written in place (every rank takes part in gathering ZeRO-3 weights): the manifest,
    # written after it, is what makes it count.
    if (dtype := _save_dtype(spec, args)) is not None:
        model.to(dtype)  # saved as the recipe's model entry says
    with write_failure_names(out_dir):
        trainer.save_model(str(out_dir))
        if args.process_index == 0:
            tok.save_pretrained(str(out_dir))
            # A pickle of the arguments; the recipe and manifest already record them.
            (out_dir / "training_args.bin").unlink(missing_ok=True)
    secs = time.time() - t0
    stats = {
        "train_loss": result.training_loss,
        "global_steps": result.global_step,
        "blocks": len(dataset),
        "tokens": dataset.total,
        "padding_fraction": round(dataset.padding_fraction, 4),
        "seconds": round(secs, 1),
        "tokens_per_s": round(dataset.total * args.num_train_epochs / max(secs, 1e-9), 1),
    }
    return stats, out_dir


def _deepspeed(args) -> bool:
    """Whether training runs under DeepSpeed: set in the recipe (``train.deepspeed``) or by
    an accelerate config (``accelerate launch`` with DeepSpeed sets a plugin instead)."""
    return bool(args.deepspeed) or getattr(args, "deepspeed_plugin", None) is not None


def _save_dtype(spec, args):
    """The dtype the trained model is saved in when it is not the one it trained in: the
    entry's bf16/fp16 for float32 masters trained without DeepSpeed; else None."""
    import torch

    if not _deepspeed(args) and spec.dtype in ("bfloat16", "float16"):
        return getattr(torch, spec.dtype)
    return None


def _resave(recipe: Recipe, args, sd: StageDir) -> Path:
    """Save a finished run's model again from the weights its final checkpoint holds
    (``trainer.save_model`` wrote the same ones there), without a Trainer: resuming a run
    at its last step would train one step more."""
    from transformers import AutoModelForCausalLM

    from fusellm.train.trainer import latest_complete_checkpoint

    spec = recipe.models[recipe.target]
    final = latest_complete_checkpoint(sd.path / "checkpoints")
    log.info("%s: re-saving the model from %s", sd.stage, final)
    model = AutoModelForCausalLM.from_pretrained(
        final, dtype=_save_dtype(spec, args) or "auto", trust_remote_code=spec.trust_remote_code
    )
    out_dir = sd.path / "model"
    with write_failure_names(out_dir):
        model.save_pretrained(out_dir)
        load_tokenizer(spec, recipe.target).save_pretrained(out_dir)
    return out_dir


def _cannot_resave(old_manifest: dict, ckpts: Path) -> str | None:
    """A finished run's damaged model is re-saved from its final checkpoint; without an
    intact one at the final step, regenerating would mean training again (days at 7B):
    that needs --force, not a rerun."""
    from fusellm.train.trainer import checkpoint_step, latest_complete_checkpoint

    final = old_manifest["stats"]["global_steps"]
    ck = latest_complete_checkpoint(ckpts)
    if ck is None or checkpoint_step(ck) != final:
        return f"train: no intact checkpoint at the final step {final} to re-save the model from"
    return None


def _resume_point(ckpts: Path) -> Path | None:
    """The newest intact checkpoint. Later ones are moved out of the Trainer's way (it
    would write into them, and could rotate a good one out in their favour): one killed
    mid-save is deleted, a damaged one is kept aside as ``damaged-checkpoint-N``."""
    from fusellm.train.trainer import (
        COMPLETE,
        checkpoint_step,
        checkpoints,
        latest_complete_checkpoint,
    )

    resume = latest_complete_checkpoint(ckpts)
    step = checkpoint_step(resume) if resume else 0
    for n, p in checkpoints(ckpts).items():
        if n <= step:
            continue
        if (p / COMPLETE).exists():
            aside = p.with_name(f"damaged-{p.name}")
            shutil.rmtree(aside, ignore_errors=True)
            p.rename(aside)
            # no longer a record `fusellm verify` checks: the damage is already known
            (aside / COMPLETE).rename(aside / f"{COMPLETE}.damaged")
            log.warning("train: moved damaged %s aside to %s", p.name, aside)
        else:
            log.warning("train: removing %s (incomplete: killed while saving)", p)
            shutil.rmtree(p)
    if resume:
        log.info("train: resuming from %s", resume)
    return resume
