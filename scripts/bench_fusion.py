"""Does fusion beat plain continued training, and why: arms trained alike, scored alike.

    python scripts/bench_fusion.py                    # every arm (~3 h on 2 CPU cores)
    python scripts/bench_fusion.py --arms default     # CLM-only vs the new default only
    python scripts/bench_fusion.py --arms paper,min_ed --base runs/quickstart

On the quickstart's models, corpus and token budget (``recipes/quickstart.yaml``): every
arm trains the same target from the same corpus and extraction, on the same blocks in
the same order (``packing: stream`` arms excepted: that layout *is* the ablation), for
the same optimizer steps with the same learning rate and schedule; only the knowledge it
is handed differs. CLM-only is the quickstart's own train section with λ = 1.

Arms (``ARMS``): ``clm_only``; ``default`` (the quickstart's recipe as shipped); ``paper``
(``recipes/quickstart-paper.yaml``: the MinED vocabulary map and DP alignment, every
source entry through the map, MinCE on the paper's per-token CE, one token stream cut
into blocks with attention across documents); and
ablations that each change one thing of ``default``. Every model is scored by bits per
byte on the valid split (for choices) and the test split (for the report), with
document-level paired-bootstrap 95% intervals against CLM-only.

Also measured, per arm, where the signal goes: from its fused shards, the share of
target positions with a teacher distribution (vs the one-hot fallback), how often the
fused top-1 is the gold next token, and the teacher's mean NLL of the gold next token at
aligned positions (nats).

Outputs under ``--out`` (default ``runs/bench-fusion``): one run directory per arm
(corpus and extraction hard-linked from the base run, stages shared between arms whose
configuration for them is equal), ``results.json``, ``differences.png`` (each arm's
paired difference from CLM-only with its interval). The last line printed is one JSON
object: ``fused_minus_clm_bpb``, ``fused_minus_clm_ci``, ``teacher_gap_closed`` (for
``default``) and one entry per arm.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from fusellm.recipe import load_recipe  # noqa: E402

RECIPE = ROOT / "recipes" / "quickstart.yaml"


def paper_overrides(path: Path = ROOT / "recipes" / "quickstart-paper.yaml") -> list[str]:
    """The paper variant's align/fuse/train keys as overrides (one source of truth)."""
    import yaml

    tree = yaml.safe_load(path.read_text(encoding="utf-8"))
    return [
        f"{sec}.{k}={json.dumps(v)}"
        for sec in ("align", "fuse", "train")
        for k, v in tree.get(sec, {}).items()
    ]


PAPER = paper_overrides()
# name -> recipe overrides on top of the quickstart recipe (its train/align/fuse sections)
ARMS: dict[str, list[str]] = {
    "clm_only": [],
    "default": [],
    "paper": PAPER,
    "min_ed": ["align.vocab_method=min_ed"],
    "em": ["align.vocab_method=em"],
    "dp_alignment": ["align.seq_method=dp"],
    "no_gold_span": ["align.gold_span=false"],
    "per_token_ce": ["fuse.criterion=ce_per_token"],
    "token_level": ["fuse.level=token"],
    "avg_ce_token": ["fuse.method=avg_ce", "fuse.level=token"],
    "avg_ce_sequence": ["fuse.method=avg_ce"],
    "stream_packing": ["train.packing=stream"],
    "lm_weight_0.5": ["train.lm_weight=0.5"],
    "lm_weight_0.5_bucket": ["train.lm_weight=0.5", "train.tail=bucket"],
    "tail_bucket": ["train.tail=bucket"],
    "temperature_2": ["train.teacher_temperature=2.0"],
    # the target's own distribution as a MinCE candidate, or not (whichever equals the
    # default shares its stages: no extra training)
    "sources_both": ["fuse.sources=[smollm2,gemma3]"],
    "sources_gemma3": ["fuse.sources=[gemma3]"],
}
SHARED = ("corpus", "extract")
SPLITS = ("valid", "test")


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:12]


def link_tree(src: Path, dst: Path) -> None:
    """Hard-link a finished stage directory (same content, same fingerprints)."""
    if not dst.exists():
        shutil.copytree(src, dst, copy_function=os.link)


def arm_recipe(args, arm: str, run_dir: Path):
    return load_recipe(
        args.recipe, [*ARMS[arm], f"run_dir={run_dir}", "tracking.backend=none", *args.set]
    )


def run_arm(args, arm: str, shared: dict[str, Path]) -> Path:
    """Align, fuse and train one arm; stages whose configuration another arm already ran
    are hard-linked from it. Returns the trained model directory."""
    from fusellm.align.runner import run as align_run
    from fusellm.fuse.runner import run as fuse_run
    from fusellm.train.runner import run as train_run
    from fusellm.train.runner import run_clm_only

    run_dir = args.out / "arms" / arm
    r = arm_recipe(args, arm, run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    for s in SHARED:
        link_tree(args.base / s, run_dir / s)
    train_cfg = {**r.train, **({"lm_weight": 1.0} if arm == "clm_only" else {})}
    keys = {
        "align": digest(r.align.model_dump()),
        "fuse": digest([r.align.model_dump(), r.fuse.model_dump(), r.sources]),
    }
    keys["train"] = digest([keys["fuse"], train_cfg])
    stage = "clm_only" if arm == "clm_only" else "train"
    steps = [
        ("align", align_run),
        ("fuse", fuse_run),
        (stage, run_clm_only if arm == "clm_only" else train_run),
    ]
    for name, fn in steps:
        key = keys["train" if name == stage else name]
        if key in shared and not (run_dir / name).exists():
            link_tree(shared[key], run_dir / name)
        t0 = time.time()
        fn(r)
        shared.setdefault(key, run_dir / name)
        log(f"[{arm}] {name}: {time.time() - t0:.0f}s")
    return run_dir / stage / "model"


def score(model_dir: Path | None, spec, corpus_dir: Path, name: str) -> dict[str, dict]:
    """Per-document NLL and bytes of one model on the valid and test splits (bench's
    scorer; the model is loaded once for both)."""
    from fusellm.bench.config import BenchConfig
    from fusellm.bench.runner import score_task
    from fusellm.bench.score import LogProbModel
    from fusellm.bench.tasks import load_lm
    from fusellm.models import load_model, load_tokenizer
    from fusellm.recipe import ModelSpec

    spec = spec or ModelSpec(path=str(model_dir))
    tok = load_tokenizer(spec, name)
    lpm = LogProbModel([load_model(spec, name)], [name])
    return {
        split: score_task(
            lpm, tok, load_lm(corpus_dir, split, None, 0), BenchConfig(), f"{name} {split}"
        )
        for split in SPLITS
    }


def diagnostics(run_dir: Path) -> dict:
    """Where the signal goes, from an arm's fused shards (train split)."""
    from fusellm.shards import iter_docs

    paths = sorted((run_dir / "fuse" / "train").glob("shard-*.safetensors"))
    n = aligned = top1 = 0
    nll = []
    for d in iter_docs(paths):
        if len(d.input_ids) < 2:
            continue
        gold = d.input_ids[1:]
        a = (d.aligned if d.aligned is not None else np.ones(len(d.input_ids), bool))[:-1]
        ids, lp = d.topk_ids[:-1], d.topk_logprobs.float().numpy()[:-1]
        n += len(gold)
        aligned += int(a.sum())
        top1 += int((ids[a, 0] == gold[a]).sum())
        hit = (ids == gold[:, None]) & np.isfinite(lp)
        p_gold = np.where(hit, np.exp(lp), 0.0).sum(1)
        nll.extend((-np.log(np.clip(p_gold[a], 1e-6, 1.0))).tolist())  # top-k miss: 1e-6
    man = json.loads((run_dir / "fuse" / "manifest.json").read_text())
    return {
        "fused_fraction": aligned / max(n, 1),
        "fused_top1_is_gold": top1 / max(aligned, 1),
        "teacher_gold_nll": float(np.mean(nll)) if nll else None,
        "source_weight": man["stats"]["source_weight"],
    }


def paired(records: dict[str, dict], ref: str, count: int = 2000) -> dict[str, dict]:
    """``{group: {model: value, se, diff, diff_lo, diff_hi}}`` for ``all`` and each domain."""
    from fusellm.bench.stats import compare, item_metrics

    per = {m: item_metrics("lm", rec) for m, rec in records.items()}
    groups = [g for g, metric in per[ref] if metric == "bpb"]
    return {
        g: compare({m: v[(g, "bpb")] for m, v in per.items()}, ref, f"bench_fusion/{g}/bpb", count)
        for g in groups
    }


def plot(res: dict[str, dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    arms = [a for a in res if "diff" in res[a]]
    d = np.array([res[a]["diff"] for a in arms])
    lo = np.array([res[a]["diff_lo"] for a in arms])
    hi = np.array([res[a]["diff_hi"] for a in arms])
    fig, ax = plt.subplots(figsize=(7, 0.45 * len(arms) + 1.2))
    y = np.arange(len(arms))[::-1]
    ax.errorbar(d, y, xerr=[d - lo, hi - d], fmt="o", capsize=3)
    ax.axvline(0, color="gray", lw=1)
    ax.set_yticks(y, arms)
    ax.set_xlabel("test bits/byte minus CLM-only (95% paired interval; < 0 = fusion helps)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--recipe", type=Path, default=RECIPE)
    ap.add_argument("--base", type=Path, default=None, help="run dir with corpus + extract done")
    ap.add_argument("--out", type=Path, default=ROOT / "runs" / "bench-fusion")
    ap.add_argument("--arms", default="all", help="all | default | comma-separated names")
    ap.add_argument("--set", action="append", default=[], help="extra override for every arm")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    if args.arms == "all":
        arms = list(ARMS)
    else:
        wanted = ["default"] if args.arms == "default" else args.arms.split(",")
        arms = ["clm_only", *[a for a in wanted if a != "clm_only"]]
    unknown = [a for a in arms if a not in ARMS]
    if unknown:
        ap.error(f"unknown arms {unknown}; known: {list(ARMS)}")
    args.out.mkdir(parents=True, exist_ok=True)
    args.base = args.base or args.out / "base"
    from fusellm.corpus.runner import run as corpus_run
    from fusellm.extract.runner import run as extract_run

    base = load_recipe(args.recipe, [f"run_dir={args.base}", "tracking.backend=none", *args.set])
    t0 = time.time()
    corpus_run(base)
    extract_run(base)
    log(f"base corpus + extract: {time.time() - t0:.0f}s")
    shared: dict[str, Path] = {}
    models = {}
    for arm in arms:
        t0 = time.time()
        models[arm] = run_arm(args, arm, shared)
        log(f"[{arm}] trained in {time.time() - t0:.0f}s")
    corpus_dir = args.base / "corpus"
    best_src = [s for s in base.sources if s != base.target]
    out = {"splits": {}, "arms": {}}
    scores = {a: score(m, None, corpus_dir, a) for a, m in models.items()}
    for name in [base.target, *best_src]:
        key = "target" if name == base.target else name
        scores[key] = score(None, base.models[name], corpus_dir, name)
    for split in SPLITS:
        rec = {m: s[split] for m, s in scores.items()}
        out["splits"][split] = paired(rec, "clm_only")
        (args.out / f"scores-{split}.json").write_text(json.dumps(rec))
    domains = {s: out["splits"][s] for s in out["splits"]}
    out["splits"] = {s: d["all"] for s, d in domains.items()}
    out["domains"] = domains
    for arm in arms:
        run_dir = args.out / "arms" / arm
        row = {split: out["splits"][split][arm] for split in SPLITS}
        if arm != "clm_only":
            row["diagnostics"] = diagnostics(run_dir)
        out["arms"][arm] = row
    test = out["splits"]["test"]
    best = min(best_src, key=lambda s: test[s]["value"]) if best_src else None
    plot({a: test[a] for a in arms if a != "clm_only"}, args.out / "differences.png")
    (args.out / "results.json").write_text(json.dumps(out, indent=1))
    summary = {
        "fused_minus_clm_bpb": test["default"]["diff"] if "default" in test else None,
        "fused_minus_clm_ci": [test["default"]["diff_lo"], test["default"]["diff_hi"]]
        if "default" in test
        else None,
        # undefined once CLM-only is at or past the best source (no gap left to close)
        "teacher_gap_closed": (test["clm_only"]["value"] - test["default"]["value"])
        / (test["clm_only"]["value"] - test[best]["value"])
        if best and "default" in test and test["clm_only"]["value"] > test[best]["value"]
        else None,
        "clm_only_bpb": test["clm_only"]["value"],
        "target_bpb": test["target"]["value"],
        "best_source": best,
        "best_source_bpb": test[best]["value"] if best else None,
        "arms": {
            a: {
                "test_bpb": test[a]["value"],
                "test_minus_clm": test[a].get("diff"),
                "test_ci": [test[a].get("diff_lo"), test[a].get("diff_hi")]
                if a != "clm_only"
                else None,
                "test_minus_clm_by_domain": {
                    g: round(v[a]["diff"], 5)
                    for g, v in out["domains"]["test"].items()
                    if g != "all" and "diff" in v[a]
                },
                "valid_minus_clm": out["splits"]["valid"][a].get("diff"),
                "valid_ci": [
                    out["splits"]["valid"][a].get("diff_lo"),
                    out["splits"]["valid"][a].get("diff_hi"),
                ]
                if a != "clm_only"
                else None,
                **(
                    {
                        k: v
                        for k, v in out["arms"][a].get("diagnostics", {}).items()
                        if k != "source_weight"
                    }
                ),
            }
            for a in arms
        },
    }
    for k in ("fused_minus_clm_bpb", "teacher_gap_closed"):
        if summary[k] is not None and not math.isfinite(summary[k]):
            summary[k] = None
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
