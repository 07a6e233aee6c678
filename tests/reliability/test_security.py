"""Security guarantees (issue 8): nothing fusellm loads can run code, and secrets stay out.

* Checkpoints, model weights, shards, vocabulary maps and the evolve search state load
  without pickle (safetensors / ``torch.load(weights_only=True)`` / ``.npy`` without
  pickle / JSON). Each test offers a *live* pickle payload (one that demonstrably creates a
  sentinel file when unpickled) in the place of a real file and checks it is refused with
  a clear error and the sentinel never appears.
* A recipe's ``!!python/...`` tags are refused before they run.
* ``trust_remote_code`` reaches transformers only when the recipe sets it for that model.
* ``WANDB_API_KEY`` / ``HF_TOKEN`` / ``HUGGING_FACE_HUB_TOKEN`` values appear in no file
  under ``run_dir`` (manifests, fingerprints, configs, checkpoints, metrics, W&B offline
  files) and in no output of a whole pipeline run.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import secrets
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from pipeline import copy_upstream, make_recipe

from fusellm.cli import main
from fusellm.recipe import ModelSpec, RecipeError, load_recipe
from fusellm.storage import file_record

SECRET_VARS = ("WANDB_API_KEY", "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN")


class Payload:
    """Unpickling this runs a shell command that creates ``sentinel`` (a real exploit)."""

    def __init__(self, sentinel: Path):
        self.sentinel = str(sentinel)

    def __reduce__(self):
        return (os.system, (f"touch {shlex.quote(self.sentinel)}",))


def pickle_payload(sentinel: Path) -> bytes:
    """A raw pickle that creates ``sentinel`` when loaded."""
    return pickle.dumps(Payload(sentinel))


def torch_payload(path: Path, sentinel: Path) -> Path:
    """A ``torch.save`` file (zip format, like optimizer.pt) that creates ``sentinel``."""
    torch.save({"state": Payload(sentinel)}, path)
    return path


def test_the_payloads_are_live(tmp_path):
    """Without this the refusals below would prove nothing: unpickled naively, each
    payload does create its sentinel."""
    s1, s2 = tmp_path / "raw", tmp_path / "torch"
    pickle.loads(pickle_payload(s1))
    torch.load(torch_payload(tmp_path / "p.pt", s2), weights_only=False)
    assert s1.exists() and s2.exists()


# ------------------------------------------------------------------ a tiny pipeline


def secret_env() -> dict[str, str]:
    """Distinctive random values: a hit in a file can only be a leak."""
    return {
        "WANDB_API_KEY": "wk" + secrets.token_hex(19),
        "HF_TOKEN": "hf_" + secrets.token_hex(16),
        "HUGGING_FACE_HUB_TOKEN": "hf_" + secrets.token_hex(16),
    }


@pytest.fixture(scope="module")
def pipeline(tiny_models, tmp_path_factory) -> SimpleNamespace:
    """corpus -> extract -> align -> fuse -> train (2 steps, a checkpoint per step) with W&B
    offline, run as a real process with secrets in its environment; output captured."""
    root = tmp_path_factory.mktemp("sec")
    recipe = make_recipe(root, tiny_models, tracking="{backend: wandb, mode: offline}")
    env = secret_env()
    full = {**os.environ, **env, "HF_HUB_OFFLINE": "1"}
    full.pop("WANDB_MODE", None)  # the recipe's tracking.mode: offline must win over the key
    r = subprocess.run(
        [sys.executable, "-m", "fusellm.cli", "run", str(recipe)],
        env=full,
        capture_output=True,
        timeout=600,
    )
    assert r.returncode == 0, r.stderr[-3000:].decode(errors="replace")
    return SimpleNamespace(
        recipe=recipe, run=root / "run", env=env, stdout=r.stdout, stderr=r.stderr
    )


def leaks(values: dict[str, str], run_dir: Path, outputs: dict[str, bytes]) -> list[str]:
    """Every (file or output, variable) where a secret value occurs, as raw bytes."""
    found = []
    blobs = {str(p): p.read_bytes() for p in sorted(run_dir.rglob("*")) if p.is_file()}
    blobs.update(outputs)
    for name, data in blobs.items():
        for var, value in values.items():
            if value.encode() in data:
                found.append(f"{name}: {var}")
    return found


def test_secrets_appear_in_no_file_log_or_output(pipeline, monkeypatch, capsys, caplog):
    """Whole pipeline in a subprocess, then the train stage again in this process with
    logging at DEBUG: no secret value in any file under run_dir or any output."""
    run = pipeline.run
    # the run really wrote what must be scanned
    offline = list((run / "wandb").glob("offline-run-*"))
    assert len(offline) >= 5 and any(run.rglob("*.wandb")) and any(run.rglob("debug*.log"))
    assert (run / "train" / "manifest.json").exists() and (run / "fuse" / "manifest.json").exists()
    assert list(run.glob("train/checkpoints/checkpoint-*/trainer_state.json"))
    assert b"INFO" in pipeline.stderr  # the CLI logged at INFO

    for k, v in pipeline.env.items():
        monkeypatch.setenv(k, v)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    with caplog.at_level("DEBUG"):
        assert main(["train", str(pipeline.recipe), "--force"]) == 0
    out, err = capsys.readouterr()
    assert "train" in caplog.text
    outputs = {
        "<subprocess stdout>": pipeline.stdout,
        "<subprocess stderr>": pipeline.stderr,
        "<stdout>": out.encode(),
        "<stderr>": err.encode(),
        "<log records>": caplog.text.encode(),
    }
    assert leaks(pipeline.env, run, outputs) == []


def test_a_secret_interpolated_into_the_recipe_is_written_nowhere(
    pipeline, tmp_path, monkeypatch, capsys
):
    for k, v in pipeline.env.items():
        monkeypatch.setenv(k, v)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    run = tmp_path / "run"
    copy_upstream(pipeline.run, run, "train")
    recipe = tmp_path / "sec.yaml"
    text = pipeline.recipe.read_text()
    recipe.write_text(
        text.replace("\ntrain:\n", '\ntrain:\n  hub_model_id: "org/${env:HF_TOKEN}"\n')
    )
    # A recipe value lands in fingerprints, manifests, the Trainer's pickled arguments and
    # W&B's config: secrets are refused at load instead.
    capsys.readouterr()
    assert main(["train", str(recipe), f"run_dir={run}"]) == 2
    err = capsys.readouterr().err
    assert "${env:HF_TOKEN}: secrets may not be interpolated" in err
    assert pipeline.env["HF_TOKEN"] not in err
    assert leaks(pipeline.env, run, {}) == []


# ------------------------------------------------------------- training checkpoints


def _trainer(recipe: Path, run_dir: Path, out: Path):
    """A FusionTrainer built the way the train stage builds it, optimizer created."""
    from fusellm.manifest import load_manifest
    from fusellm.models import load_model
    from fusellm.sharded import shard_paths
    from fusellm.stages import FUSE as STAGE
    from fusellm.train.data import FusedBlocks, collate
    from fusellm.train.runner import build_args
    from fusellm.train.trainer import FusionTrainer

    r = load_recipe(recipe, [f"run_dir={run_dir}", "tracking.backend=none"])
    args = build_args(r, str(out), False)
    man = load_manifest(r.stage_dir(STAGE), STAGE)
    ds = FusedBlocks(shard_paths(r.stage_dir(STAGE), man, "train", STAGE), args.block_size)
    t = FusionTrainer(
        model=load_model(r.models[r.target], r.target).train(),
        args=args,
        train_dataset=ds,
        data_collator=collate,
    )
    t.create_optimizer_and_scheduler(num_training_steps=args.max_steps)
    return t


# checkpoint file -> the Trainer method that reads it on resume
CHECKPOINT_LOADS = {
    "optimizer.pt": "_load_optimizer_and_scheduler",
    "scheduler.pt": "_load_optimizer_and_scheduler",
    "rng_state.pth": "_load_rng_state",
    "pytorch_model.bin": "_load_from_checkpoint",  # weights saved without safetensors
}


def test_trainer_loads_every_checkpoint_file_without_pickle(pipeline, tmp_path):
    """The Trainer's own resume loaders accept the real checkpoint, and refuse each of its
    files replaced by a live pickle payload without running it. (The completion marker's
    hashes are not involved: this is the unpickling layer itself.)"""
    good = sorted(pipeline.run.glob("train/checkpoints/checkpoint-*"))[-1]
    t = _trainer(pipeline.recipe, pipeline.run, tmp_path / "out")
    for method in dict.fromkeys(CHECKPOINT_LOADS.values()):
        getattr(t, method)(str(good))  # the real files load
    for name, method in CHECKPOINT_LOADS.items():
        ck = tmp_path / f"ck-{name}"
        shutil.copytree(good, ck)
        if name == "pytorch_model.bin":
            (ck / "model.safetensors").unlink()
        sentinel = tmp_path / f"pwned-{name}"
        torch_payload(ck / name, sentinel)
        with pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):
            getattr(t, method)(str(ck))
        assert not sentinel.exists(), f"{name}: the payload ran"


def test_deepspeed_checkpoint_loads_refuse_a_pickle(tmp_path):
    """The loader DeepSpeed uses for a ZeRO resume, once fusellm's safe loader is installed
    (as the train stage does whenever DeepSpeed is on): a pickle payload must be refused
    without running."""
    pytest.importorskip("deepspeed")
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import (
        TorchCheckpointEngine,
    )

    from fusellm.train import safe_load

    safe_load.install()
    safe_load.install()  # idempotent
    sentinel = tmp_path / "pwned"
    path = torch_payload(tmp_path / "mp_rank_00_model_states.pt", sentinel)
    with pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):
        TorchCheckpointEngine().load(str(path))
    assert not sentinel.exists()


# torchrun runs this instead of the CLI: it logs every torch.load of a checkpoint file
# (path, weights_only) so the test sees which loader the resume really used.
LOG_CHECKPOINT_LOADS = """
import json, os, sys
import torch
real = torch.load
def load(f, *args, **kw):
    if "checkpoint-" in str(f):
        with open(os.environ["LOAD_LOG"], "a") as log:
            log.write(json.dumps([str(f), kw.get("weights_only")]) + "\\n")
    return real(f, *args, **kw)
torch.load = load
from fusellm.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.distributed
def test_a_zero2_run_resumes_through_the_safe_loader(pipeline, tmp_path):
    """A real ZeRO-2 run on 2 CPU processes (torchrun, gloo) saves a checkpoint per step; it
    is cut back to its first checkpoint and resumed through the CLI. Every checkpoint file
    loads with weights_only=True (DeepSpeed's global_step*/*.pt included), and the resumed
    steps' losses equal the uninterrupted run's (weights and optimizer state restored)."""
    pytest.importorskip("deepspeed")
    from conftest import torchrun

    run = tmp_path / "run"
    copy_upstream(pipeline.run, run, "train")
    script = tmp_path / "logged_cli.py"
    script.write_text(LOG_CHECKPOINT_LOADS)
    log = tmp_path / "loads.jsonl"
    ds = Path(__file__).parents[2] / "recipes" / "deepspeed" / "zero2.json"
    # No JIT-built DeepSpeed op (a lock left by a killed build elsewhere cannot hang this).
    env = {"TORCH_EXTENSIONS_DIR": str(tmp_path / "torch_extensions"), "LOAD_LOG": str(log)}
    over = [f"run_dir={run}", "tracking.backend=none", f"train.deepspeed={ds}"]
    over += ["train.max_steps=3", "train.save_steps=1", "train.save_total_limit=null"]

    def train(*entry: str) -> None:
        r = torchrun(*entry, "train", str(pipeline.recipe), *over, env=env, timeout=300)
        assert r.returncode == 0, r.stderr[-4000:]

    def losses() -> list[float]:
        state = json.loads((ckpts / "checkpoint-3" / "trainer_state.json").read_text())
        return [h["loss"] for h in state["log_history"] if "loss" in h]

    ckpts = run / "train" / "checkpoints"
    train("-m", "fusellm.cli")
    full = losses()
    assert len(full) == 3 and not log.exists()  # nothing was loaded: a fresh run
    # stopped after its first checkpoint: the next run resumes from checkpoint-1
    (run / "train" / "manifest.json").unlink()
    for n in (2, 3):
        shutil.rmtree(ckpts / f"checkpoint-{n}")
    train(str(script))

    loads = [json.loads(line) for line in log.read_text().splitlines()]
    # DeepSpeed's model states, and each rank its ZeRO partition
    assert {Path(f).name for f, _ in loads if "/global_step1/" in f} == {
        "mp_rank_00_model_states.pt",
        "zero_pp_rank_0_mp_rank_00_optim_states.pt",
        "zero_pp_rank_1_mp_rank_00_optim_states.pt",
    }, loads
    assert all(w is True for _, w in loads), loads
    assert losses() == pytest.approx(full, abs=1e-5)


def _rehash_marker(ck: Path, rel: str) -> None:
    """Record ``rel``'s current sha256/size/mtime in the checkpoint's completion marker (when the
    marker records hashes), so the resume reaches the unpickling layer."""
    from fusellm.train.trainer import COMPLETE

    marker = json.loads((ck / COMPLETE).read_text())
    rec = marker.get("files", {}).get(rel)
    if isinstance(rec, dict):
        rec.update(file_record(ck / rel))
        (ck / COMPLETE).write_text(json.dumps(marker))


def test_a_resumed_train_stage_refuses_a_pickled_checkpoint(pipeline, tmp_path, capsys):
    """Through the CLI: an unfinished train stage resumes from its newest checkpoint, whose
    optimizer state is a pickle payload (and whose training_args.bin, a pickle the
    Trainer writes but never reads, is one too). Refused, nothing ran."""
    run = tmp_path / "run"
    shutil.copytree(pipeline.run, run, ignore=shutil.ignore_patterns("wandb"))
    (run / "train" / "manifest.json").unlink()  # unfinished: the next run resumes
    ck = sorted((run / "train" / "checkpoints").glob("checkpoint-*"))[-1]
    sentinels = [tmp_path / "pwned-optimizer", tmp_path / "pwned-args"]
    torch_payload(ck / "optimizer.pt", sentinels[0])
    torch_payload(ck / "training_args.bin", sentinels[1])
    for rel in ("optimizer.pt", "training_args.bin"):
        _rehash_marker(ck, rel)
    over = [f"run_dir={run}", "tracking.backend=none"]
    assert main(["train", str(pipeline.recipe), *over]) == 2
    err = capsys.readouterr().err
    assert f"train: {ck} holds a file that is not a safe checkpoint" in err
    assert "Weights only load failed" in err
    assert not any(s.exists() for s in sentinels)


# ------------------------------------------------------------------- model weights


def test_a_pickled_pytorch_model_bin_is_refused(tiny_models, tmp_path):
    """A model directory whose only weights are a pickle payload named pytorch_model.bin:
    load_model fails naming the model, and the payload never runs."""
    from fusellm.models import ModelLoadError, load_model

    d = tmp_path / "evil"
    shutil.copytree(tiny_models["llama_bpe"], d)
    (d / "model.safetensors").unlink()
    sentinel = tmp_path / "pwned"
    torch_payload(d / "pytorch_model.bin", sentinel)
    with pytest.raises(ModelLoadError, match=r"model 'evil'.*Weights only load failed"):
        load_model(ModelSpec(path=str(d)), "evil")
    assert not sentinel.exists()


# ------------------------------------------------------- shards and vocabulary maps


def test_shards_refuse_a_pickle(tmp_path):
    """extract/align/fuse shards are safetensors: a pickle in a shard's place (with a
    sidecar that vouches for its hash) fails to parse and never runs."""
    from fusellm.shards import read_shard, shard_name, write_shard

    sentinel = tmp_path / "pwned"
    path = tmp_path / shard_name(0)
    write_shard(path, pickle_payload(sentinel), docs=1, tokens=1)
    with pytest.raises(Exception, match=r"(?i)header|safetensor") as e:
        read_shard(path)
    assert not isinstance(e.value, AssertionError)
    assert not sentinel.exists()


def test_vocab_map_cache_refuses_a_pickle(tmp_path):
    """The cached MinED/EM vocabulary map is .npy loaded without pickle: an object array
    or a raw pickle in its place is refused and never runs."""
    from align.vocab import Vocab, vocab_map

    src, tgt = Vocab.from_bytes([b"a", b"b", b"ab"]), Vocab.from_bytes([b"a", b"b"])
    ref = vocab_map(src, tgt, "em", tmp_path)
    (cached,) = tmp_path.glob("*.npy")
    np.testing.assert_array_equal(vocab_map(src, tgt, "em", tmp_path), ref)  # the cache is read
    sentinel = tmp_path / "pwned"
    arr = np.empty(1, dtype=object)
    arr[0] = Payload(sentinel)
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=True)
    for payload in (buf.getvalue(), pickle_payload(sentinel)):  # object .npy, raw pickle
        cached.write_bytes(payload)
        with pytest.raises(ValueError, match=r"pickled|allow_pickle"):
            vocab_map(src, tgt, "em", tmp_path)
        assert not sentinel.exists()


# ------------------------------------------------------------- evolve search state


def test_evolve_search_state_is_json_and_refuses_a_pickle(tmp_path):
    """The CMA-ES checkpoint is JSON (replayed on resume); a pickle payload in its place,
    or altered candidates, are refused naming the file (and generation) without running."""
    pytest.importorskip("cma")
    from fusellm.manifest import CorruptArtifact
    from fusellm.merge.search import search

    def f(x):
        return float(((np.asarray(x) - 0.3) ** 2).sum())

    args = (f, [0.5, 0.5], ([0.0, 0.0], [1.0, 1.0]), 0.3)
    path = tmp_path / "search.json"
    ref = search(*args, 3, seed=0, popsize=4, state_path=path)
    state = path.read_bytes()
    assert not state.startswith(b"\x80") and len(json.loads(state)["generations"]) == 3
    resumed = search(*args, 3, seed=0, popsize=4, state_path=path)  # replayed, no evaluations
    assert resumed.history == ref.history

    sentinel = tmp_path / "pwned"
    path.write_bytes(pickle_payload(sentinel))
    with pytest.raises(CorruptArtifact, match=r"search\.json: not a JSON search checkpoint"):
        search(*args, 4, seed=0, popsize=4, state_path=path)
    assert not sentinel.exists()

    tampered = json.loads(state)
    tampered["generations"][1]["xs"][0][0] += 1e-9
    path.write_text(json.dumps(tampered))
    with pytest.raises(CorruptArtifact, match=r"search\.json: generation 2: the recorded"):
        search(*args, 4, seed=0, popsize=4, state_path=path)


# ------------------------------------------------------------------------- recipes


def test_python_tags_refused_without_running(tmp_path):
    """``!!python/object/apply`` would run os.system under an unsafe loader (checked);
    the recipe loader refuses it, naming the file and line, before anything runs."""
    import yaml

    sentinel = tmp_path / "pwned"
    tag = f"x: !!python/object/apply:os.system ['touch {sentinel}']\n"
    yaml.unsafe_load(tag)
    assert sentinel.exists()  # the tag is live
    sentinel.unlink()
    body = "name: t\nrun_dir: /tmp/run\nmodels: {a: {path: /m/a}}\ntarget: a\nsources: [a]\n"
    p = tmp_path / "r.yaml"
    p.write_text(body + tag)
    with pytest.raises(RecipeError, match=r"r\.yaml:\d+: invalid recipe YAML"):
        load_recipe(p)
    assert not sentinel.exists()


# ------------------------------------------------------------------ remote code


def test_trust_remote_code_only_when_set(tiny_models, monkeypatch):
    """Model and tokenizer (also a separate tokenizer path) get ``trust_remote_code`` from
    the recipe's setting for that model only, never True by default."""
    import transformers

    from fusellm.models import load_model, load_tokenizer

    seen: list[tuple[str, object]] = []
    for cls in (transformers.AutoModelForCausalLM, transformers.AutoTokenizer):
        real = cls.from_pretrained

        def spy(*a, _real=real, _name=cls.__name__, **k):
            seen.append((_name, k.get("trust_remote_code")))
            return _real(*a, **k)

        monkeypatch.setattr(cls, "from_pretrained", spy)
    p = str(tiny_models["llama_bpe"])
    for trust in (False, True):
        spec = ModelSpec(path=p, trust_remote_code=trust)
        load_model(spec, "m")
        load_tokenizer(spec, "m")
        load_tokenizer(ModelSpec(path=p, tokenizer=p, trust_remote_code=trust), "m")
    m, t = "AutoModelForCausalLM", "AutoTokenizer"
    assert seen == [(m, False), (t, False), (t, False), (m, True), (t, True), (t, True)]


def test_remote_code_in_a_model_directory_runs_only_when_trusted(tmp_path, monkeypatch):
    """A model directory shipping Python (``auto_map``): untrusted, it is refused and its
    code never runs; with ``trust_remote_code: true`` for that model it does run."""
    import transformers.dynamic_module_utils as dmu

    from fusellm.models import ModelLoadError, load_model

    monkeypatch.setattr(dmu, "HF_MODULES_CACHE", str(tmp_path / "modules"))
    sentinel = tmp_path / "pwned"
    d = tmp_path / "remote"
    d.mkdir()
    (d / "config.json").write_text(
        json.dumps(
            {
                "model_type": "fusellm_remote",
                "auto_map": {
                    "AutoConfig": "configuration_remote.RemoteConfig",
                    "AutoModelForCausalLM": "configuration_remote.RemoteModel",
                },
            }
        )
    )
    (d / "configuration_remote.py").write_text(
        "import pathlib\n"
        "from transformers import PretrainedConfig\n"
        f"pathlib.Path({str(sentinel)!r}).touch()\n"
        "class RemoteConfig(PretrainedConfig):\n"
        "    model_type = 'fusellm_remote'\n"
    )
    with pytest.raises(ModelLoadError, match="trust_remote_code"):
        load_model(ModelSpec(path=str(d)), "remote")
    assert not sentinel.exists()
    with pytest.raises(ModelLoadError):  # the file has no model class; its code ran first
        load_model(ModelSpec(path=str(d), trust_remote_code=True), "remote")
    assert sentinel.exists()
