"""What the plan measures or looks up on this machine: the resident memory of the
framework and of each tokenizer (in a fresh interpreter), a CPU forward pass's tokens per
second, and whether a GGUF model is converted already."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from fusellm.models import PARTS_PREFIX, converted_dir, load_model, locate
from fusellm.packages import resolve_pkg_path
from fusellm.recipe import Recipe


def gguf_conversion(recipe: Recipe, name: str) -> bool | None:
    """None: not a GGUF model; else whether it is converted already (cached)."""
    spec = recipe.models[name]
    if not (spec.path.startswith(PARTS_PREFIX) or spec.path.endswith(".gguf") or spec.gguf_file):
        return None
    return (converted_dir(locate(spec, name), "model") / "fusellm-converted.json").exists()


# Measured in a fresh interpreter: the resident memory of a `fusellm run` process before any
# model is loaded (torch, transformers, datasets, every stage's modules, W&B when tracking
# is on), and what each tokenizer adds.
_BASELINE = r"""
import json, sys
def rss():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS"):
            return int(line.split()[1]) * 1024
import datasets, transformers.trainer
import fusellm.cli, fusellm.corpus.runner, fusellm.extract.runner, fusellm.align.runner
import fusellm.fuse.runner, fusellm.train.runner, fusellm.train.trainer, fusellm.train.data
if sys.argv[1] == "1":
    import wandb
out = {"framework": rss(), "tokenizers": {}}
from fusellm.recipe import load_recipe
from fusellm.models import load_tokenizer
recipe = load_recipe(sys.argv[2], sys.argv[3:])
for name in json.loads(sys.stdin.read()):
    before = rss()
    tok = load_tokenizer(recipe.models[name], name)
    out["tokenizers"][name] = rss() - before
print(json.dumps(out))
"""


def measure_baseline(recipe: Recipe, recipe_args: list[str], names: list[str]) -> dict:
    """``{"framework": bytes, "tokenizers": {name: bytes}}`` measured in a subprocess
    (Linux ``/proc``; zeros elsewhere)."""
    if not Path("/proc/self/status").exists():
        return {"framework": 0, "tokenizers": {}}
    wandb = recipe.tracking.backend == "wandb" and recipe.tracking.mode != "disabled"
    p = subprocess.run(
        [sys.executable, "-c", _BASELINE, "1" if wandb else "0", *recipe_args],
        input=json.dumps(names),
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
    )
    if p.returncode != 0:
        raise RuntimeError(f"plan: measuring the framework's memory failed: {p.stderr[-2000:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def cpu_tokens_per_second(recipe: Recipe, name: str, n_tokens: int = 256) -> float | None:
    """Tokens per second of a forward pass over ``n_tokens`` of the model on this CPU, if
    its weights are at hand without converting or downloading (a local directory, a
    converted GGUF); else None."""
    import torch

    spec = recipe.models[name]
    conv = gguf_conversion(recipe, name)
    if conv is False:  # a GGUF model not converted yet: loading it would convert it
        return None
    if conv is None:  # a local directory; a hub id would be downloaded
        try:
            if not resolve_pkg_path(spec.path).is_dir():
                return None
        except (ImportError, FileNotFoundError, ValueError):
            return None
    model = load_model(spec, name, "cpu")
    ids = torch.arange(n_tokens).remainder(model.config.get_text_config().vocab_size)[None]
    times = []
    with torch.inference_mode():
        for _ in range(4):  # the first pass pages the weights in: the best of the others
            t0 = time.perf_counter()
            model(input_ids=ids)
            times.append(time.perf_counter() - t0)
    secs = min(times[1:])
    return n_tokens / secs
