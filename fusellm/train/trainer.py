"""``FusionTrainer``: a ``transformers.Trainer`` whose only change is ``compute_loss``.

The loss is a token *sum* divided by ``num_items_in_batch``, the number of valid tokens
in the whole gradient-accumulation window (across processes when
``average_tokens_across_devices``), so gradient accumulation and world size do not change
it. A callback stops training on a non-finite gradient before the optimizer step.
"""

from __future__ import annotations

import logging
import re
import time
from pathlib import Path

import torch
from transformers import Trainer, TrainerCallback

from fusellm.manifest import CHECKPOINT_COMPLETE, verify_files
from fusellm.storage import atomic_write_json, file_record, write_failure_names
from fusellm.train.loss import fusion_loss_sums

log = logging.getLogger(__name__)

COMPLETE = CHECKPOINT_COMPLETE


class NonFiniteError(FloatingPointError):
    """Training hit a NaN/Inf loss or gradient; raised before any optimizer step uses it."""


class FusionTrainer(Trainer):
    loss_is_scaled_for_ga = True  # compute_loss already divides by the window's token count

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        # Makes the training loop count valid tokens over the accumulation window
        # (from ``shift_labels``) and pass the count to compute_loss.
        self.model_accepts_loss_kwargs = True
        self._terms = {"loss_clm": 0.0, "loss_fusion": 0.0, "fused_fraction": 0.0}
        self._micro = 0
        self._terms_since = 0  # global step of the last log (the Trainer's own counter moves first)
        self._tokens = 0
        self._t_log = time.time()

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        args = self.args
        out = model(
            input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], use_cache=False
        )
        s = fusion_loss_sums(
            out.logits,
            inputs["shift_labels"],
            inputs["fused_ids"],
            inputs["fused_logprobs"],
            inputs["fused_mask"],
            args.lm_weight,
            args.teacher_temperature,
            args.tail,
            args.fusion_loss,
        )
        n = num_items_in_batch if num_items_in_batch is not None else s.n_clm
        n = torch.as_tensor(n, device=s.total.device).clamp(min=1)
        loss = s.total / n
        if not torch.isfinite(loss):
            raise NonFiniteError(
                f"non-finite loss ({loss.item()}) at step {self.state.global_step + 1}, micro-batch "
                f"{self._micro} of the accumulation window; no optimizer step was taken"
            )
        if args.average_tokens_across_devices and num_items_in_batch is not None:
            loss = loss * self.accelerator.num_processes  # DDP averages gradients over processes
        with torch.no_grad():
            self._terms["loss_clm"] += float(s.clm / n)
            self._terms["loss_fusion"] += float(s.fusion / n)
            self._terms["fused_fraction"] += float(s.n_fusion) / max(float(s.n_clm), 1.0)
        self._micro += 1
        self._tokens += int(inputs["attention_mask"].sum())
        return (loss, out) if return_outputs else loss

    def _save_checkpoint(self, model, trial):
        # torch.save / safetensors report a full disk without the path: name it.
        with write_failure_names(
            Path(self.args.output_dir) / f"checkpoint-{self.state.global_step}"
        ):
            super()._save_checkpoint(model, trial)

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs and self._micro:
            steps = max(self.state.global_step - self._terms_since, 1)
            self._terms_since = self.state.global_step
            logs["loss_clm"] = self._terms["loss_clm"] / steps
            logs["loss_fusion"] = self._terms["loss_fusion"] / steps
            logs["fused_fraction"] = self._terms["fused_fraction"] / self._micro
            logs["lm_weight"] = self.args.lm_weight
            now = time.time()
            logs["tokens_per_s"] = (
                self._tokens * self.args.world_size / max(now - self._t_log, 1e-9)
            )
            self._terms = dict.fromkeys(self._terms, 0.0)
            self._micro, self._tokens, self._t_log = 0, 0, now
        super().log(logs, start_time)


class NonFiniteGradStop(TrainerCallback):
    """Raise before the optimizer step when any gradient is NaN/Inf, naming the step."""

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        for name, p in model.named_parameters():
            if p.grad is not None and not torch.isfinite(p.grad).all():
                raise NonFiniteError(
                    f"non-finite gradient in '{name}' at step {state.global_step + 1}; "
                    "stopped before the optimizer step"
                )


class CompletionMarker(TrainerCallback):
    """Write a marker into each checkpoint after the Trainer has fully saved it, with the
    sha256, size and mtime of every file in it: a checkpoint without the marker (killed
    mid-save) or with a file that no longer matches is never resumed from.

    A 7B ZeRO checkpoint is ~100 GB: every rank hashes a share of the files (after a
    barrier: each rank writes its own optimizer partition) and rank 0 writes the marker.
    Assumes a filesystem all ranks share, as resuming ZeRO checkpoints does; DeepSpeed's
    asynchronous checkpoint engines (files still being written after save returns) are not
    supported.
    """

    def on_save(self, args, state, control, **kwargs):
        import torch.distributed as dist

        ckpt = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        multi = dist.is_available() and dist.is_initialized()
        if multi:
            dist.barrier()
        rank, world = (dist.get_rank(), dist.get_world_size()) if multi else (0, 1)
        names = sorted(
            p.relative_to(ckpt).as_posix()
            for p in ckpt.rglob("*")
            if p.is_file() and p.name != COMPLETE
        )
        mine = {n: file_record(ckpt / n) for i, n in enumerate(names) if i % world == rank}
        shares = [mine]
        if multi:
            shares = [None] * world
            dist.all_gather_object(shares, mine)
        if rank == 0:
            files = {k: v for share in shares for k, v in share.items()}
            atomic_write_json(ckpt / COMPLETE, {"global_step": state.global_step, "files": files})


def checkpoint_problems(ckpt: Path) -> list[tuple[str, Path]]:
    """Missing or altered files of a complete checkpoint (see :class:`CompletionMarker`)."""
    return verify_files(ckpt, COMPLETE)


def checkpoints(output_dir: Path) -> dict[int, Path]:
    """The Trainer's ``checkpoint-<step>`` directories by step."""
    return {
        int(m.group(1)): p
        for p in Path(output_dir).glob("checkpoint-*")
        if (m := re.fullmatch(r"checkpoint-(\d+)", p.name)) and p.is_dir()
    }


def latest_complete_checkpoint(output_dir: Path) -> Path | None:
    """The newest checkpoint that is complete and intact; damaged ones are reported (path,
    expected and actual sha256) and skipped, so training resumes from an earlier one."""
    for _, ckpt in sorted(checkpoints(output_dir).items(), reverse=True):
        if not (ckpt / COMPLETE).exists():
            continue
        bad = checkpoint_problems(ckpt)
        if not bad:
            return ckpt
        for problem, _ in bad:
            log.warning("train: %s; not resuming from %s", problem, ckpt.name)
    return None
