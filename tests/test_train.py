"""FusionTrainer on a tiny fused pipeline: end to end, GAS invariance, resume, NaN stops."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch

from fusellm.cli import main
from fusellm.recipe import load_recipe

SECTIONS = """align: {}
fuse: {method: min_ce}
train:
  lm_weight: 0.5
  block_size: 48
  per_device_train_batch_size: 2
  learning_rate: 1.0e-3
  max_steps: 4
  logging_steps: 1
  save_steps: 2
  use_cpu: true
  report_to_placeholder: 1
"""
TWO = [
    "extract.models=[llama_bpe,neox_unigram]",
    "sources=[llama_bpe,neox_unigram]",
    "tracking.backend=none",
]


@pytest.fixture()
def fused(ext_recipe) -> Path:
    ext_recipe.write_text(
        ext_recipe.read_text() + SECTIONS.replace("  report_to_placeholder: 1\n", "")
    )
    assert main(["run", str(ext_recipe), "--stages", "corpus,extract,align,fuse", *TWO]) == 0
    return ext_recipe


def test_train_stage_saves_a_loadable_model(fused):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    assert main(["train", str(fused), *TWO, "train.logging_steps=2"]) == 0
    run = fused.parent / "run"
    man = json.loads((run / "train" / "manifest.json").read_text())
    assert man["complete"] and man["stats"]["global_steps"] == 4
    model = AutoModelForCausalLM.from_pretrained(run / "train" / "model")
    tok = AutoTokenizer.from_pretrained(run / "train" / "model")
    assert model(torch.tensor([tok("hello world")["input_ids"]])).logits.isfinite().all()
    assert any(p.name.endswith(".safetensors") for p in (run / "train" / "model").iterdir())
    hist = json.loads((run / "train/checkpoints/checkpoint-4/trainer_state.json").read_text())[
        "log_history"
    ]
    assert {
        "loss_clm",
        "loss_fusion",
        "lm_weight",
        "fused_fraction",
        "grad_norm",
        "tokens_per_s",
    } <= set(hist[0])
    assert not (run / "train" / "model" / "training_args.bin").exists()  # no pickle in the model
    for h in (h for h in hist if "loss" in h):  # the logged terms add up to the logged loss
        assert abs(h["loss"] - (0.5 * h["loss_clm"] + 0.5 * h["loss_fusion"])) < 2e-3 * h["loss"]
    assert main(["train", str(fused), *TWO, "train.logging_steps=2"]) == 0  # complete: skipped
    assert main(["train", str(fused), *TWO]) == 2  # another config: refused, naming the field


def make_trainer(recipe_path: Path, out: Path, callbacks=(), **over):
    from fusellm.manifest import load_manifest
    from fusellm.models import load_model
    from fusellm.sharded import shard_paths
    from fusellm.stages import FUSE as STAGE
    from fusellm.train.data import FusedBlocks, collate
    from fusellm.train.runner import build_args
    from fusellm.train.trainer import CompletionMarker, FusionTrainer, NonFiniteGradStop

    r = load_recipe(recipe_path, TWO + [f"train.{k}={v}" for k, v in over.items()])
    args = build_args(r, str(out), False)
    man = load_manifest(r.stage_dir(STAGE), STAGE)
    ds = FusedBlocks(shard_paths(r.stage_dir(STAGE), man, "train", STAGE), args.block_size)
    torch.manual_seed(0)
    model = load_model(r.models[r.target], r.target).train()
    return FusionTrainer(
        model=model,
        args=args,
        train_dataset=ds,
        data_collator=collate,
        callbacks=[NonFiniteGradStop(), CompletionMarker(args.checkpoint_limit), *callbacks],
    )


class GradGrab:
    def __init__(self):
        self.grads = None

    def on_pre_optimizer_step(self, args, state, control, model=None, **kw):
        if self.grads is None:
            self.grads = {
                n: p.grad.detach().clone()
                for n, p in model.named_parameters()
                if p.grad is not None
            }

    def __getattr__(self, name):  # every other callback event: no-op
        return lambda *a, **k: None


def test_gas_and_batch_size_do_not_change_loss_or_gradients(fused, tmp_path):
    res = {}
    for bs, gas in [(8, 1), (1, 8)]:
        grab = GradGrab()
        t = make_trainer(
            fused,
            tmp_path / f"{bs}x{gas}",
            [grab],
            per_device_train_batch_size=bs,
            gradient_accumulation_steps=gas,
            max_steps=1,
            max_grad_norm=0,
            save_steps=100,
            lm_weight=0.3,
        )
        out = t.train()
        res[(bs, gas)] = (out.training_loss, grab.grads)
    (l1, g1), (l8, g8) = res[(8, 1)], res[(1, 8)]
    # Packed blocks pad to the longest of each batch, so the two runs multiply matrices
    # of different shapes, whose fp32 sums round differently in the last bits (a few
    # ulps of the loss): equal to fp32 resolution, not bit for bit.
    assert math.isclose(l1, l8, rel_tol=1e-6), (l1, l8)
    assert g1.keys() == g8.keys()
    for n in g1:
        assert torch.allclose(g1[n], g8[n], atol=1e-6, rtol=1e-5), n


def losses(out: Path) -> dict[int, float]:
    last = max(out.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    hist = json.loads((last / "trainer_state.json").read_text())["log_history"]
    return {h["step"]: h["loss"] for h in hist if "loss" in h}


def test_nan_loss_stops_naming_the_step(fused, tmp_path):
    from fusellm.train.trainer import NonFiniteError

    t = make_trainer(fused, tmp_path / "nan", max_steps=3)
    calls = {"n": 0}

    def poison(module, inputs, output):
        calls["n"] += module.training  # not the packing check's forwards (in eval mode)
        if calls["n"] == 2:  # the second forward pass = step 2
            output.logits[0, 0, 0] = float("nan")
        return output

    t.model.register_forward_hook(poison)
    before = {n: p.detach().clone() for n, p in t.model.named_parameters()}
    with pytest.raises(NonFiniteError, match=r"non-finite loss .* at step 2"):
        t.train()
    assert t.state.global_step == 1  # step 1 applied, step 2 never reached the optimizer
    assert any(not torch.equal(before[n], p) for n, p in t.model.named_parameters())


def test_nan_gradient_stops_before_the_optimizer_step(fused, tmp_path):
    from fusellm.train.trainer import NonFiniteError

    t = make_trainer(fused, tmp_path / "nangrad", max_steps=2, max_grad_norm=0)
    p0 = next(t.model.parameters())
    p0.register_hook(lambda g: torch.full_like(g, float("nan")))
    before = {n: p.detach().clone() for n, p in t.model.named_parameters()}
    with pytest.raises(NonFiniteError, match=r"non-finite gradient in '.*' at step 1"):
        t.train()
    assert all(torch.equal(before[n], p) for n, p in t.model.named_parameters())


@pytest.mark.distributed
# ZeRO-3 with the loss's output head in chunks: each chunk gathers the head's weight, a
# collective every rank must enter as often as the others.
@pytest.mark.parametrize("zero,chunk", [("zero2", 0), ("zero3", 7)])
def test_deepspeed_zero_on_two_cpu_processes(fused, tmp_path, zero, chunk):
    """A real ZeRO run on 2 CPU processes (gloo), through torchrun and the CLI; its first
    step's loss equals a 1-process run on the same global batch."""

    from conftest import torchrun

    pytest.importorskip("deepspeed")
    ds = Path(__file__).parent.parent / "recipes" / "deepspeed" / f"{zero}.json"
    # A private extensions dir: a lock left by a killed JIT build elsewhere cannot hang this
    # run, and any build that does start (there should be none on CPU) is seen below.
    ext_dir = tmp_path / "torch_extensions"
    common = [
        *TWO,
        "train.max_steps=2",
        "train.save_steps=2",
        "train.logging_steps=1",
        "train.learning_rate=0.001",
    ]
    r = torchrun(
        "-m",
        "fusellm.cli",
        "train",
        str(fused),
        *common,
        f"train.deepspeed={ds}",
        "train.per_device_train_batch_size=2",
        f"train.head_chunk_tokens={chunk}",
        env={"TORCH_EXTENSIONS_DIR": str(ext_dir)},
        timeout=420,
    )
    assert r.returncode == 0, r.stderr[-4000:]
    assert not ext_dir.exists() or not any(ext_dir.iterdir()), "a DeepSpeed op was JIT-built"
    run = fused.parent / "run"
    man = json.loads((run / "train" / "manifest.json").read_text())
    assert man["complete"] and man["stats"]["global_steps"] == 2
    hist = json.loads((run / "train/checkpoints/checkpoint-2/trainer_state.json").read_text())[
        "log_history"
    ]
    ds_losses = [h["loss"] for h in hist if "loss" in h]
    from transformers import AutoModelForCausalLM

    assert AutoModelForCausalLM.from_pretrained(run / "train" / "model") is not None
    # the same 4 sequences per step in one process, without DeepSpeed
    ref = make_trainer(
        fused, tmp_path / "ref", per_device_train_batch_size=4, max_steps=1, save_steps=10
    )
    ref.train()
    ref_loss = [h["loss"] for h in ref.state.log_history if "loss" in h][0]
    assert len(ds_losses) == 2 and abs(ds_losses[0] - ref_loss) < 2e-3, (ds_losses, ref_loss)


KILL_AT_STEP = """
import os, signal, sys
import fusellm.train.trainer as tr
real = tr.CompletionMarker.on_step_end if hasattr(tr.CompletionMarker, "on_step_end") else None
def on_step_end(self, args, state, control, **kw):
    if state.global_step == int(os.environ["KILL_AT_STEP"]):
        os.kill(os.getpid(), signal.SIGKILL)
tr.CompletionMarker.on_step_end = on_step_end
from fusellm.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_sigkill_after_a_checkpoint_then_resume_through_the_cli(fused, tmp_path):
    import os
    import shutil
    import subprocess
    import sys

    over = ["train.max_steps=6", "train.save_steps=2", "train.logging_steps=1"]
    # a run_dir without fused data: a clear error (exit 2), not a traceback
    assert main(["train", str(fused), *TWO, *over, f"run_dir={tmp_path / 'full'}"]) == 2
    full_run = tmp_path / "full"
    shutil.copytree(fused.parent / "run", full_run, dirs_exist_ok=True)
    assert main(["train", str(fused), *TWO, *over, f"run_dir={full_run}"]) == 0
    env = {**os.environ, "KILL_AT_STEP": "3"}
    r = subprocess.run(
        [sys.executable, "-c", KILL_AT_STEP, "train", str(fused), *TWO, *over],
        env=env,
        capture_output=True,
        text=True,
    )
    assert r.returncode == -9, r.stderr[-2000:]
    ckpts = fused.parent / "run" / "train" / "checkpoints"
    assert (ckpts / "checkpoint-2" / "fusellm-complete.json").exists() and not (
        ckpts / "checkpoint-4"
    ).exists()
    assert main(["train", str(fused), *TWO, *over]) == 0  # resumes from checkpoint-2
    a = losses(full_run / "train" / "checkpoints")
    b = losses(ckpts)
    assert sorted(a) == list(range(1, 7)) and a == b


def test_whole_pipeline_in_one_process_with_wandb_offline(ext_recipe, monkeypatch):
    """corpus -> train in one process with W&B on (offline): the Trainer logs into the
    stage's run rather than starting its own (which would look for an API key)."""
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    ext_recipe.write_text(
        ext_recipe.read_text() + SECTIONS.replace("  report_to_placeholder: 1\n", "")
    )
    two = [a for a in TWO if not a.startswith("tracking")] + [
        "tracking.backend=wandb",
        "tracking.mode=auto",
    ]
    assert main(["run", str(ext_recipe), "--stages", "corpus,extract,align,fuse,train", *two]) == 0
    run = ext_recipe.parent / "run"
    assert json.loads((run / "train" / "manifest.json").read_text())["complete"]
    runs = list((run / "wandb").glob("offline-run-*"))
    assert len(runs) >= 5  # corpus, 2 extract, align, fuse, train
    assert (run / "train" / "metrics.jsonl").exists()
    usage = [json.loads(x) for x in (run / "usage.jsonl").read_text().splitlines()]
    assert [u["stage"] for u in usage] == ["corpus", "extract", "align", "fuse", "train"]
    assert all(u["seconds"] > 0 and u["peak_rss_bytes"] > 100e6 for u in usage), usage
    assert main(["run", str(ext_recipe), "--stages", "corpus,extract,align,fuse,train", *two]) == 0
    assert len((run / "usage.jsonl").read_text().splitlines()) == 5  # skipped: not recorded


def test_clm_only_baseline_is_the_same_run_with_lambda_one(fused, caplog):
    """The λ = 1 baseline sees the same blocks in the same order; `run` builds it only when
    bench compares against it, and bench then scores base, CLM-only and fused."""
    run = fused.parent / "run"
    with caplog.at_level("INFO"):
        assert main(["run", str(fused), *TWO]) == 0
    assert "stage bench: not configured" in caplog.text
    assert not (run / "clm_only").exists()  # no bench lists it: not built
    fused.write_text(fused.read_text() + "bench: {tasks: [lm]}\n")
    assert main(["run", str(fused), *TWO]) == 0
    cl = json.loads((run / "clm_only" / "manifest.json").read_text())
    tr = json.loads((run / "train" / "manifest.json").read_text())
    assert cl["config"]["lm_weight"] == 1.0 and tr["config"]["lm_weight"] == 0.5
    assert cl["stats"]["tokens"] == tr["stats"]["tokens"]
    assert cl["stats"]["global_steps"] == tr["stats"]["global_steps"]
    hist = json.loads((run / "clm_only/checkpoints/checkpoint-4/trainer_state.json").read_text())
    for h in (h for h in hist["log_history"] if "loss" in h):
        assert abs(h["loss"] - h["loss_clm"]) < 1e-3 * h["loss"]
    res = json.loads((run / "bench" / "results.json").read_text())
    assert res["models"] == ["target", "clm_only", "fused"]
    bpb = {r["model"]: r for r in res["rows"] if r["metric"] == "bpb" and r["group"] == "all"}
    assert len({round(r["value"], 9) for r in bpb.values()}) == 3  # three different models
    assert "diff" in bpb["fused"] and "diff" not in bpb["target"]


def test_student_sees_the_teachers_context_at_every_position(ext_recipe):
    """With the target as its own only source, the untrained target's log-probs in
    training, at the stored top-k ids of its training blocks, equal the stored ones at
    every position: block edges and document starts included (documents packed with
    attention that never crosses one, positions restarting, no document cut)."""
    from fusellm.manifest import load_manifest
    from fusellm.models import load_model
    from fusellm.sharded import shard_paths
    from fusellm.stages import FUSE as STAGE
    from fusellm.train.data import FusedBlocks, collate
    from fusellm.train.trainer import student_forward

    ext_recipe.write_text(
        ext_recipe.read_text() + "align: {}\nfuse: {method: min_ce, sources: [llama_bpe]}\n"
    )
    one = ["extract.models=[llama_bpe]", "sources=[llama_bpe]"]
    assert main(["run", str(ext_recipe), "--stages", "corpus,extract,align,fuse", *one]) == 0
    r = load_recipe(ext_recipe, one)
    man = load_manifest(r.stage_dir(STAGE), STAGE)
    ds = FusedBlocks(shard_paths(r.stage_dir(STAGE), man, "train", STAGE), 96)
    model = load_model(r.models[r.target], r.target)
    starts_inside = checked = 0
    for b in range(0, len(ds), 4):
        batch = collate([ds[i] for i in range(b, min(b + 4, len(ds)))])
        with torch.no_grad():
            lp = student_forward(model, batch).logits.float().log_softmax(-1)
        got = lp.gather(-1, batch["fused_ids"])
        want = batch["fused_logprobs"]
        real = batch["attention_mask"].bool()[..., None] & torch.isfinite(want)
        assert torch.allclose(got[real], want[real], atol=2e-3, rtol=2e-3), (
            (got - want)[real].abs().max()
        )
        checked += int(real.sum())
        starts_inside += int(
            ((batch["position_ids"] == 0) & batch["attention_mask"].bool())[:, 1:].sum()
        )
    assert starts_inside > 10 and checked > 1000  # packed: many documents start mid-block
    assert ds.padding_fraction < 0.5


def test_block_never_cuts_a_document_and_unpackable_models_are_refused(fused, tiny_models):
    import numpy as np
    from transformers import AutoModelForCausalLM

    from fusellm.train.data import pack
    from fusellm.train.trainer import PackingUnsupported, check_packing

    lengths = np.array([5, 9, 3, 0, 7, 8, 1, 10])
    blocks = pack(lengths, 10, window=2)
    assert sorted(d for b in blocks for d in b) == [0, 1, 2, 4, 5, 6, 7]  # empty doc left out
    assert all(lengths[b].sum() <= 10 for b in blocks)
    # a train block shorter than a document would cut its context: refused, named
    assert main(["train", str(fused), *TWO, "train.block_size=16"]) == 2
    ids = torch.randint(3, 200, (1, 12))
    batch = {
        "input_ids": ids,
        "position_ids": torch.tensor([[0, 1, 2, 3, 4, 0, 1, 2, 3, 4, 5, 6]]),
        "attention_mask": torch.ones_like(ids),
    }
    llama = AutoModelForCausalLM.from_pretrained(tiny_models["llama_bpe"])
    check_packing(llama, batch)  # attention restarts at the second document
    mpt = AutoModelForCausalLM.from_pretrained(tiny_models["mpt_bpe"])  # ignores position_ids
    with pytest.raises(PackingUnsupported, match="train.packing: none"):
        check_packing(mpt, batch)


def test_chunked_head_trains_exactly_as_full_logits(fused, tmp_path):
    """One step with the loss's output head in chunks of 3 positions gives the loss and
    gradients of the unchunked loss (packed blocks, padding, unaligned rows included)."""
    res = {}
    for chunk in (0, 3):
        grab = GradGrab()
        t = make_trainer(
            fused,
            tmp_path / f"c{chunk}",
            [grab],
            per_device_train_batch_size=4,
            max_steps=1,
            max_grad_norm=0,
            save_steps=100,
            head_chunk_tokens=chunk,
        )
        assert t.chunk_tokens == chunk
        res[chunk] = (t.train().training_loss, grab.grads)
    (l0, g0), (l3, g3) = res[0], res[3]
    assert math.isclose(l0, l3, rel_tol=1e-6), (l0, l3)
    for n in g0:
        assert torch.allclose(g0[n], g3[n], atol=1e-6, rtol=1e-5), n


def test_chunked_head_refuses_logits_it_cannot_reproduce():
    """Gemma's soft-capped logits are reproduced by the head; a model that transforms its
    logits otherwise is refused before training on other logits than its own."""
    from conftest import _tiny_model
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig, LlamaForCausalLM

    from fusellm.heads import OutputHead
    from fusellm.train.trainer import HeadMismatch, check_head

    class Tempered(LlamaForCausalLM):  # divides its logits by 2 after the head
        def forward(self, *a, **kw):
            out = super().forward(*a, **kw)
            out.logits = out.logits / 2
            return out

    ids = torch.randint(3, 90, (2, 12))
    batch = {"input_ids": ids, "position_ids": torch.arange(12).repeat(2, 1)}
    torch.manual_seed(0)
    gemma = Gemma3ForCausalLM(
        Gemma3TextConfig(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=1,
            head_dim=16,
            vocab_size=100,
            final_logit_softcapping=0.5,  # small: the cap changes these logits a lot
        )
    )
    head = OutputHead.of(gemma)
    assert head.softcap == 0.5
    check_head(gemma, head, batch, exact=True)
    with pytest.raises(HeadMismatch, match="head_chunk_tokens: 0"):
        check_head(gemma, OutputHead(gemma.lm_head), batch, exact=True)  # cap left out
    tempered = Tempered(_tiny_model("llama", 100).config)
    with pytest.raises(HeadMismatch, match="Tempered"):
        check_head(tempered, OutputHead.of(tempered), batch, exact=True)


def test_shuffled_blocks_read_only_their_rows(fused, monkeypatch):
    """Blocks visited in random order carry exactly their documents' rows (as a full
    decode of the shards gives them) and no shard is ever decoded whole: the old reader
    decoded a shard per block once the shuffle left its 4-shard cache."""
    import numpy as np

    import fusellm.shards
    from fusellm.manifest import load_manifest
    from fusellm.sharded import shard_paths
    from fusellm.stages import FUSE
    from fusellm.train.data import IGNORE, FusedBlocks

    r = load_recipe(fused, TWO)
    paths = shard_paths(r.stage_dir(FUSE), load_manifest(r.stage_dir(FUSE), FUSE), "train", FUSE)
    docs = {d.doc_id: d for d in fusellm.shards.iter_docs(paths)}
    decodes = []
    real = fusellm.shards.decode_shard
    monkeypatch.setattr(
        fusellm.shards, "decode_shard", lambda data: decodes.append(1) or real(data)
    )
    ds = FusedBlocks(paths, 48)
    names = [n for p in paths for n in fusellm.shards.RowReader(p).doc_ids]
    checked = 0
    for b in np.random.default_rng(0).permutation(len(ds)):
        item = ds[int(b)]
        pos = 0
        for d, lo, hi in ds.slices[ds.block_ptr[b] : ds.block_ptr[b + 1]]:
            want = docs[names[d]]
            n = hi - lo
            got = {k: v[pos : pos + n].numpy() for k, v in item.items() if k != "length"}
            assert (got["input_ids"] == want.input_ids[lo:hi]).all()
            assert (got["fused_ids"] == want.topk_ids[lo:hi]).all()
            assert np.array_equal(got["fused_logprobs"], want.topk_logprobs[lo:hi].float().numpy())
            assert (got["fused_mask"] == want.aligned[lo:hi]).all()
            labels = np.append(want.input_ids[1:], IGNORE)[lo:hi]
            assert (got["shift_labels"] == labels).all()
            pos += n
            checked += n
    assert checked == ds.total and not decodes


# torchrun runs this instead of the CLI: from step 2 on, rank 1's gradients of one weight
# become NaN (the loss stays finite), as an overflow in one process's backward would.
NAN_GRAD_AT_STEP_2 = """
import os, sys, torch
import fusellm.train.trainer as tr
real = tr.FusionTrainer.compute_loss
def compute_loss(self, model, inputs, *a, **kw):
    if self.state.global_step == 1 and os.environ["RANK"] == "1" and not hasattr(self, "_nan"):
        self._nan = next(self.model.parameters()).register_hook(lambda g: g * float("nan"))
    return real(self, model, inputs, *a, **kw)
tr.FusionTrainer.compute_loss = compute_loss
from fusellm.cli import entry
entry()
"""


@pytest.mark.distributed
def test_deepspeed_stops_on_a_nan_gradient_before_the_step_and_its_checkpoint(fused, tmp_path):
    """ZeRO-2 with bf16 on 2 CPU processes: a NaN gradient on one rank at step 2 stops
    the run naming step 2, before the optimizer step and before checkpoint-2 is written
    (DeepSpeed alone applies it under bf16, or skips the step silently under fp32)."""
    import os

    from conftest import torchrun

    pytest.importorskip("deepspeed")
    ds = Path(__file__).parent.parent / "recipes" / "deepspeed" / "zero2.json"
    script = tmp_path / "nan_grad.py"
    script.write_text(NAN_GRAD_AT_STEP_2)
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "TORCH_EXTENSIONS_DIR": str(tmp_path / "torch_extensions"),
    }
    r = torchrun(
        str(script),
        "train",
        str(fused),
        *TWO,
        f"train.deepspeed={ds}",
        "train.bf16=true",
        "train.max_steps=3",
        "train.save_steps=1",
        "train.logging_steps=1",
        env=env,
        timeout=420,
    )
    assert r.returncode != 0
    assert "non-finite gradient at step 2 (DeepSpeed ZeRO-2" in r.stderr, r.stderr[-3000:]
    ckpts = fused.parent / "run" / "train" / "checkpoints"
    assert (ckpts / "checkpoint-1" / "fusellm-complete.json").exists()
    assert not (ckpts / "checkpoint-2").exists()
    assert not (fused.parent / "run" / "train" / "manifest.json").exists()


def test_bf16_model_entry_trains_float32_masters_without_deepspeed(fused, tiny_models):
    """`dtype: bfloat16` in the target's entry (the 7B recipe's) and no DeepSpeed: the
    optimizer updates float32 weights, so the run takes exactly the float32 entry's steps
    (in bf16, most updates of lr 1e-5 round away); the final model is saved in bf16."""
    from safetensors.torch import load_file

    over = ["train.learning_rate=1.0e-5", "train.max_steps=2", "train.save_steps=2"]
    weights = {}
    for dtype in ("float32", "bfloat16"):
        run_dir = fused.parent / f"run-{dtype}"
        shutil.copytree(fused.parent / "run", run_dir)
        args = [*TWO, *over, f"models.llama_bpe.dtype={dtype}", f"run_dir={run_dir}"]
        assert main(["train", str(fused), *args]) == 0
        ckpt = run_dir / "train" / "checkpoints" / "checkpoint-2" / "model.safetensors"
        weights[dtype] = load_file(ckpt)
        saved = load_file(run_dir / "train" / "model" / "model.safetensors")
        assert {v.dtype for v in saved.values()} == {getattr(torch, dtype)}
    before = load_file(tiny_models["llama_bpe"] / "model.safetensors")
    moved = sum(int((weights["bfloat16"][k] != before[k]).sum()) for k in before)
    assert moved > 0.5 * sum(v.numel() for v in before.values())
    for k, v in weights["float32"].items():
        assert torch.equal(weights["bfloat16"][k], v), k


class CheckpointsSeen:
    """Records the complete checkpoints on disk after each save (after CompletionMarker)."""

    def __init__(self, out: Path):
        self.out, self.seen = out, []

    def on_save(self, args, state, control, **kw):
        from fusellm.train.trainer import complete_checkpoints

        self.seen.append([p.name for p in complete_checkpoints(self.out)])

    def __getattr__(self, name):
        return lambda *a, **k: None


def test_save_total_limit_deletes_only_after_a_newer_checkpoint_is_complete(fused, tmp_path):
    from fusellm.train.config import FusionTrainingArguments

    # a recipe that says nothing keeps 2 (the Trainer's own rotation is off)
    default = FusionTrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[])
    assert default.checkpoint_limit == 2 and default.save_total_limit is None
    out = tmp_path / "limit"
    seen = CheckpointsSeen(out)
    t = make_trainer(fused, out, [seen], max_steps=5, save_steps=1, save_total_limit=2)
    t.train()
    assert seen.seen == [
        ["checkpoint-1"],
        ["checkpoint-1", "checkpoint-2"],
        ["checkpoint-2", "checkpoint-3"],
        ["checkpoint-3", "checkpoint-4"],
        ["checkpoint-4", "checkpoint-5"],
    ]
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint-4", "checkpoint-5"]


# Runs the CLI and SIGKILLs itself in the middle of saving checkpoint-4: the Trainer has
# written its files, the completion marker is not written yet.
KILL_MID_SAVE = """
import os, signal, sys
import fusellm.train.trainer as tr
real = tr.CompletionMarker.on_save
def on_save(self, args, state, control, **kw):
    if state.global_step == 4:
        os.kill(os.getpid(), signal.SIGKILL)
    return real(self, args, state, control, **kw)
tr.CompletionMarker.on_save = on_save
from fusellm.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_a_run_killed_while_saving_keeps_the_checkpoint_before(fused, tmp_path):
    """save_total_limit 1: checkpoint-2 stays until checkpoint-4 is complete, so a kill in
    between resumes from it (the Trainer's rotation deleted it before the new one was
    whole, leaving nothing to resume from). Once done, keep_checkpoints_when_done: false
    deletes them."""
    import subprocess
    import sys

    over = ["train.max_steps=6", "train.save_steps=2", "train.save_total_limit=1"]
    r = subprocess.run(
        [sys.executable, "-c", KILL_MID_SAVE, "train", str(fused), *TWO, *over],
        capture_output=True,
        text=True,
    )
    assert r.returncode == -9, r.stderr[-2000:]
    ckpts = fused.parent / "run" / "train" / "checkpoints"
    assert (ckpts / "checkpoint-2" / "fusellm-complete.json").exists()
    assert not (ckpts / "checkpoint-4" / "fusellm-complete.json").exists()
    done = [*over, "train.keep_checkpoints_when_done=false"]
    assert main(["train", str(fused), *TWO, *done]) == 2  # another config: refused
    assert main(["train", str(fused), *TWO, *over]) == 0  # resumes from checkpoint-2
    assert sorted(p.name for p in ckpts.iterdir()) == ["checkpoint-6"]
    man = json.loads((fused.parent / "run" / "train" / "manifest.json").read_text())
    assert man["stats"]["global_steps"] == 6


def test_keep_checkpoints_when_done_false_leaves_none(fused):
    over = ["train.max_steps=2", "train.save_steps=1", "train.keep_checkpoints_when_done=false"]
    assert main(["train", str(fused), *TWO, *over]) == 0
    run = fused.parent / "run" / "train"
    assert json.loads((run / "manifest.json").read_text())["complete"]
    assert not list((run / "checkpoints").iterdir())


def test_checkpoint_files_are_hashed_in_shares_of_equal_bytes():
    from fusellm.train.trainer import share_by_bytes

    sizes = {"a.pt": 100, "b.pt": 90, "c.pt": 60, "d.json": 30, "e.json": 10, "f": 10}
    shares = share_by_bytes(sizes, 2)
    assert sorted(n for s in shares for n in s) == sorted(sizes)
    loads = [sum(sizes[n] for n in s) for s in shares]
    assert max(loads) - min(loads) <= 10  # by count, 3 files each could be 250 vs 50


def test_dataloader_workers_read_the_same_blocks(fused):
    """Worker processes (spawned: the dataset is pickled without its open files) give the
    blocks the main process gives."""
    from torch.utils.data import DataLoader

    from fusellm.manifest import load_manifest
    from fusellm.sharded import shard_paths
    from fusellm.stages import FUSE
    from fusellm.train.data import FusedBlocks, collate

    r = load_recipe(fused, TWO)
    paths = shard_paths(r.stage_dir(FUSE), load_manifest(r.stage_dir(FUSE), FUSE), "train", FUSE)
    ds = FusedBlocks(paths, 48)
    ds[0]  # opens files in this process
    loader = DataLoader(
        ds, batch_size=4, collate_fn=collate, num_workers=2, multiprocessing_context="spawn"
    )
    for i, batch in enumerate(loader):
        want = collate([ds[j] for j in range(4 * i, min(4 * i + 4, len(ds)))])
        assert batch.keys() == want.keys()
        assert all(torch.equal(batch[k], want[k]) for k in want)
