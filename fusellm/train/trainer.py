"""``FusionTrainer``: a ``transformers.Trainer`` whose only change is ``compute_loss``.

The loss is a token *sum* divided by ``num_items_in_batch``, the number of valid tokens
in the whole gradient-accumulation window (across processes when
``average_tokens_across_devices``), so gradient accumulation and world size do not change
it. A callback stops training on a non-finite gradient before the optimizer step.
"""

from __future__ import annotations

import logging
import re
import shutil
import time
from pathlib import Path

import torch
from transformers import Trainer, TrainerCallback

from fusellm.heads import OutputHead, head_error, last_hidden, no_logits
from fusellm.manifest import CHECKPOINT_COMPLETE, verify_files
from fusellm.storage import atomic_write_json, file_record, write_failure_names
from fusellm.train.loss import chunked_fusion_loss_sums, fusion_loss_sums

log = logging.getLogger(__name__)

COMPLETE = CHECKPOINT_COMPLETE


class NonFiniteError(FloatingPointError):
    """Training hit a NaN/Inf loss or gradient; raised before any optimizer step uses it."""


AUTO_CHUNK_VOCAB = 65_536  # chunk the loss's output head from this many rows up
CHUNK_LOGIT_BYTES = 1 << 27  # fp32 logits per chunk when chunking automatically (128 MiB)


def head_chunk_tokens(setting: int, vocab_rows: int) -> int:
    """Positions per output-head chunk of the loss, 0 for the unchunked loss.

    ``setting`` (``train.head_chunk_tokens``): a positive count; 0 never chunks; -1 (the
    default) chunks vocabularies of :data:`AUTO_CHUNK_VOCAB` rows or more (Llama-3, Qwen,
    Gemma; a [B, T, V] fp32 tensor of 2,048 positions there is 0.5-2 GB, kept three times
    over in backward) into chunks of about :data:`CHUNK_LOGIT_BYTES` of fp32 logits, and
    leaves smaller ones (Llama-2's 32k) to the faster unchunked loss."""
    if setting >= 0:
        return setting
    if vocab_rows < AUTO_CHUNK_VOCAB:
        return 0
    return max(128, CHUNK_LOGIT_BYTES // (4 * vocab_rows))


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
        self._checked = False
        self.head = OutputHead.of(self.model)
        self.chunk_tokens = head_chunk_tokens(self.args.head_chunk_tokens, self.head.rows)
        if self.chunk_tokens:
            log.info(
                "train: loss over the %d-row output head in chunks of %d positions",
                self.head.rows,
                self.chunk_tokens,
            )

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        args = self.args
        if not self._checked:  # every rank, on its first micro-batch
            if self.is_deepspeed_enabled:
                guard_deepspeed_step(self.accelerator.deepspeed_engine_wrapped.engine, self.state)
            exact = not (args.bf16 or args.fp16)
            if "position_ids" in inputs:
                check_packing(model, inputs, exact)
            if self.chunk_tokens:
                check_head(model, self.head, inputs, exact)
            self._checked = True
        targets = [inputs[k] for k in ("shift_labels", "fused_ids", "fused_logprobs", "fused_mask")]
        terms = dict(
            lm_weight=args.lm_weight,
            temperature=args.teacher_temperature,
            tail=args.tail,
            kind=args.fusion_loss,
        )
        if self.chunk_tokens:
            out = student_forward(model, inputs, hidden=True)
            s = chunked_fusion_loss_sums(
                last_hidden(out), self.head, *targets, self.chunk_tokens, **terms
            )
        else:
            out = student_forward(model, inputs)
            s = fusion_loss_sums(out.logits, *targets, **terms)
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


def student_forward(model, inputs: dict[str, torch.Tensor], hidden: bool = False):
    """The student's forward pass over a collated batch: its output with ``logits``
    ``[B, L, V]``, or with ``hidden``, with no logits and ``hidden_states`` whose last entry
    is the final hidden states ``[B, L, H]`` (for the chunked loss).

    Packed blocks (``position_ids`` present) go without an attention mask, so that
    transformers derives the document boundaries from the restarting positions: a
    block-causal mask for sdpa/eager. Flash attention reads them only from a single row,
    so there the batch is flattened to ``[1, B·L]`` (its varlen kernels then never cross a
    document) and the outputs are reshaped back.
    """
    ids = inputs["input_ids"]
    kw: dict = {"use_cache": False}
    if "position_ids" in inputs:
        kw["position_ids"] = inputs["position_ids"]
    else:
        kw["attention_mask"] = inputs["attention_mask"]
    config = getattr(getattr(model, "module", model), "config", None)
    flat = "position_ids" in kw and "flash" in str(getattr(config, "_attn_implementation", ""))
    B, L = ids.shape
    if flat:
        ids, kw["position_ids"] = ids.reshape(1, -1), kw["position_ids"].reshape(1, -1)
    if hidden:
        kw.update(logits_to_keep=no_logits(ids), output_hidden_states=True)
    out = model(input_ids=ids, **kw)
    if flat and hidden:
        out.hidden_states = (out.hidden_states[-1].reshape(B, L, -1),)
    elif flat:
        out.logits = out.logits.reshape(B, L, -1)
    return out


class PackingUnsupported(ValueError):
    """The model lets packed documents attend to each other (it ignores ``position_ids``
    for its attention mask)."""


@torch.no_grad()
def packing_error(model, inputs: dict[str, torch.Tensor], row: int = 0) -> float:
    """Largest difference of the logits of one packed row from those of its documents run
    on their own (one padded batch), relative to the largest logit. ~1e-6 in fp32 where
    packing works; of order 1 where documents see each other."""
    ids, pos = inputs["input_ids"][row], inputs["position_ids"][row]
    n = int(inputs["attention_mask"][row].sum())
    starts = torch.nonzero(pos[:n] == 0).flatten().tolist() + [n]
    docs = [ids[a:b] for a, b in zip(starts[:-1], starts[1:], strict=True)]
    width = max(len(d) for d in docs)
    batch = torch.zeros(len(docs), width, dtype=ids.dtype, device=ids.device)
    mask = torch.zeros_like(batch)
    for i, d in enumerate(docs):
        batch[i, : len(d)], mask[i, : len(d)] = d, 1
    was_training = model.training
    model.eval()  # dropout would differ between the two runs
    try:
        packed = student_forward(model, {"input_ids": ids[None], "position_ids": pos[None]})
        alone = model(input_ids=batch, attention_mask=mask, use_cache=False).logits.float()
        packed = packed.logits[0, :n].float()
    finally:
        model.train(was_training)
    alone = torch.cat([alone[i, : len(d)] for i, d in enumerate(docs)])
    return float((packed - alone).abs().max() / packed.abs().max().clamp(min=1e-6))


def check_packing(model, inputs: dict[str, torch.Tensor], exact: bool = True) -> None:
    """Refuse to train packed blocks on a model whose documents would see each other.

    ``exact``: fp32 weights without mixed precision (differences ~1e-6); otherwise bf16
    arithmetic alone moves logits by up to ~2% between the two runs."""
    err = packing_error(model, inputs)
    tol = 1e-3 if exact and next(model.parameters()).dtype == torch.float32 else 5e-2
    if err > tol:
        name = type(getattr(model, "module", model)).__name__
        raise PackingUnsupported(
            f"train: {name} does not restart attention at packed document boundaries "
            f"(relative logit difference {err:.3g} from the documents run alone): it ignores "
            "position_ids for its attention mask. Set train.packing: none (one document per "
            "block)"
        )


class HeadMismatch(ValueError):
    """The model post-processes its logits in a way :class:`fusellm.heads.OutputHead` does
    not reproduce, so the chunked loss would train on other logits than the model's."""


def check_head(model, head: OutputHead, inputs: dict[str, torch.Tensor], exact: bool) -> None:
    """Refuse the chunked loss on a model whose logits ``head(hidden)`` does not reproduce
    (checked on the first 64 positions of one row, in eval mode)."""
    probe = {k: v[:1, :64] for k, v in inputs.items() if k in ("input_ids", "position_ids")}
    if "position_ids" not in probe:
        probe["attention_mask"] = inputs["attention_mask"][:1, :64]
    was_training = model.training
    model.eval()
    name = type(getattr(model, "module", model)).__name__
    try:
        err = head_error(
            model, head, probe, lambda x: last_hidden(student_forward(model, x, hidden=True))
        )
    except (TypeError, ValueError) as e:  # remote code without logits_to_keep / hidden states
        raise HeadMismatch(
            f"train: {name} cannot run without its output head (logits_to_keep, "
            f"output_hidden_states): {e}. Set train.head_chunk_tokens: 0"
        ) from e
    finally:
        model.train(was_training)
    if err > (1e-4 if exact else 2e-2):
        raise HeadMismatch(
            f"train: {name}'s logits are not its output embedding's (relative difference "
            f"{err:.3g}): it transforms them in a way fusellm does not reproduce, so the loss "
            "cannot be computed in chunks. Set train.head_chunk_tokens: 0"
        )


class NonFiniteGradStop(TrainerCallback):
    """Raise before the optimizer step when any gradient is NaN/Inf, naming the step.
    (Without DeepSpeed; under DeepSpeed see :func:`guard_deepspeed_step`.)"""

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        for name, p in model.named_parameters():
            if p.grad is not None and not torch.isfinite(p.grad).all():
                raise NonFiniteError(
                    f"non-finite gradient in '{name}' at step {state.global_step + 1}; "
                    "stopped before the optimizer step"
                )


def guard_deepspeed_step(engine, state) -> None:
    """Make ``engine.step`` raise :class:`NonFiniteError` when the gradients it is about to
    apply hold a NaN/Inf, naming the step, before the optimizer (and so any checkpoint)
    sees them.

    Under DeepSpeed, accelerate runs ``engine.backward`` and ``engine.step`` together
    inside ``accelerator.backward``: the Trainer's ``on_pre_optimizer_step`` comes after
    the step, and ZeRO has moved the gradients out of ``param.grad`` by then. With bf16
    there is no loss scaler either, and ZeRO-1/2/3 apply a NaN gradient (fp32/fp16 skip
    the step silently). So the check wraps the engine's own step, at the accumulation
    boundary, on the reduced gradient partitions, all-reduced over the ranks.
    """
    step = engine.step

    def checked_step(*args, **kwargs):
        if engine.is_gradient_accumulation_boundary() and not _deepspeed_grads_finite(engine):
            raise NonFiniteError(
                f"non-finite gradient at step {state.global_step + 1} (DeepSpeed ZeRO-"
                f"{engine.zero_optimization_stage()}: a NaN/Inf in the reduced gradients); "
                "stopped before the optimizer step, nothing of this step was saved"
            )
        return step(*args, **kwargs)

    engine.step = checked_step


def _deepspeed_grads_finite(engine) -> bool:
    """Whether every rank's share of the accumulated gradients is finite (a collective)."""
    import torch.distributed as dist

    opt = engine.optimizer
    if hasattr(opt, "has_overflow"):  # ZeRO-1/2/3: the flat partitions, all-reduced inside
        return not opt.has_overflow(partition_gradients=getattr(opt, "partition_gradients", True))
    if hasattr(opt, "get_grads_for_norm"):  # the bf16 optimizer without ZeRO partitions
        grads = opt.get_grads_for_norm(for_clipping=True)
    else:  # plain data parallelism: the gradients are in the parameters
        grads = [p.grad for p in engine.module.parameters() if p.grad is not None]
    bad = torch.tensor([float(any(not torch.isfinite(g).all() for g in grads))])
    if dist.is_available() and dist.is_initialized():
        bad = bad.to(engine.device)
        dist.all_reduce(bad, op=dist.ReduceOp.MAX)
    return not bool(bad.item())


class CompletionMarker(TrainerCallback):
    """Write a marker into each checkpoint after the Trainer has fully saved it, with the
    sha256, size and mtime of every file in it: a checkpoint without the marker (killed
    mid-save) or with a file that no longer matches is never resumed from. Then keep the
    newest ``keep`` complete checkpoints (``train.save_total_limit``) and delete older ones:
    only once the new one is whole, so a run killed while saving still has the previous
    one to resume from. (The Trainer's own rotation deletes before that; it is off, see
    :class:`~fusellm.train.config.FusionTrainingArguments`.)

    A 7B ZeRO checkpoint is ~100 GB: every rank hashes a share of the files of about equal
    bytes (after a barrier: each rank writes its own optimizer partition) and rank 0 writes
    the marker. Assumes a filesystem all ranks share, as resuming ZeRO checkpoints does;
    DeepSpeed's asynchronous checkpoint engines (files still being written after save
    returns) are not supported.
    """

    def __init__(self, keep: int | None = None):
        self.keep = keep

    def on_save(self, args, state, control, **kwargs):
        from fusellm.distributed import Rank, all_gather, barrier, on_rank0

        ckpt = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        barrier()
        rank = Rank.from_env()
        # rank 0's listing for all: on a shared filesystem another node's may lag behind
        sizes = on_rank0(
            lambda: {
                p.relative_to(ckpt).as_posix(): p.stat().st_size
                for p in ckpt.rglob("*")
                if p.is_file() and p.name != COMPLETE
            }
        )
        mine = {n: file_record(ckpt / n) for n in share_by_bytes(sizes, rank.world)[rank.rank]}
        if rank.rank == 0:
            files = {k: v for share in all_gather(mine) for k, v in share.items()}
            atomic_write_json(ckpt / COMPLETE, {"global_step": state.global_step, "files": files})
            if self.keep:
                for old in complete_checkpoints(Path(args.output_dir))[: -self.keep]:
                    log.info("train: deleting %s (train.save_total_limit %d)", old, self.keep)
                    shutil.rmtree(old)
        else:
            all_gather(mine)


def share_by_bytes(sizes: dict[str, int], world: int) -> list[list[str]]:
    """Split files into ``world`` shares of about equal bytes (largest first, each to the
    lightest share): a ZeRO checkpoint holds a few files of GBs beside many small ones."""
    shares: list[list[str]] = [[] for _ in range(world)]
    load = [0] * world
    for name, size in sorted(sizes.items(), key=lambda kv: (-kv[1], kv[0])):
        r = load.index(min(load))
        shares[r].append(name)
        load[r] += size
    return shares


def complete_checkpoints(output_dir: Path) -> list[Path]:
    """The checkpoints with a completion marker, oldest first."""
    return [p for _, p in sorted(checkpoints(output_dir).items()) if (p / COMPLETE).exists()]


def checkpoint_problems(ckpt: Path) -> list[tuple[str, Path]]:
    """Missing or altered files of a complete checkpoint (see :class:`CompletionMarker`)."""
    return verify_files(ckpt, COMPLETE)


def checkpoint_step(path: Path) -> int | None:
    """The step of a Trainer's ``checkpoint-<step>`` directory (None for another name)."""
    m = re.fullmatch(r"checkpoint-(\d+)", Path(path).name)
    return int(m.group(1)) if m else None


def checkpoints(output_dir: Path) -> dict[int, Path]:
    """The Trainer's ``checkpoint-<step>`` directories by step."""
    return {
        step: p
        for p in Path(output_dir).glob("checkpoint-*")
        if (step := checkpoint_step(p)) is not None and p.is_dir()
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
