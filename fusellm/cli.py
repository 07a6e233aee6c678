"""``fusellm`` command line: run a whole recipe or one stage of it.

    fusellm run RECIPE [--stages corpus,extract] [--force] [key=value ...]
    fusellm <stage> RECIPE [--force] [key=value ...]
    fusellm show RECIPE [key=value ...]     print the resolved, validated recipe
    fusellm plan RECIPE [key=value ...]     what the recipe will cost: tokens, disk, memory, time
    fusellm verify RUN_DIR                  re-hash every recorded file of every stage

Exit codes: 0 done, 1 unexpected failure, 2 bad recipe/input/inputs changed.

Under a launcher (torchrun, ``accelerate launch``, deepspeed) every process runs the same
command; see :mod:`fusellm.distributed` for how stages share the work and wait for each
other.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
from pathlib import Path

from fusellm.stages import STAGES

EPILOG = (
    "Overrides are dotted keys, e.g. run_dir=/scratch/run1 corpus.block_size=512 sources=[a,b]."
)


def _add_recipe_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("recipe", help="recipe YAML file (see recipes/)")
    p.add_argument(
        "overrides", nargs="*", metavar="key=value", help="dotted overrides of recipe keys"
    )
    p.add_argument(
        "--force", action="store_true", help="recompute even if outputs exist or inputs changed"
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fusellm",
        description="Knowledge fusion of heterogeneous LLMs (FuseLLM): "
        + " -> ".join(STAGES)
        + ". Each stage writes run_dir/<stage>/ with a manifest; complete stages are skipped.",
        epilog=EPILOG,
    )
    parser.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser(
        "run",
        help="run the recipe's stages in order",
        epilog=EPILOG,
        description="Run every stage the recipe configures, in pipeline order.",
    )
    _add_recipe_args(p)
    p.add_argument("--stages", help=f"comma-separated subset of: {','.join(STAGES)}")

    for st in STAGES.values():
        sp = sub.add_parser(st.name, help=st.help, description=st.help + ".", epilog=EPILOG)
        _add_recipe_args(sp)

    p = sub.add_parser(
        "show",
        help="print the resolved and validated recipe as YAML",
        description="Load RECIPE with overrides and ${...} resolved; print it.",
    )
    p.add_argument("recipe")
    p.add_argument("overrides", nargs="*", metavar="key=value")

    p = sub.add_parser(
        "plan",
        help="estimate tokens, disk, memory per rank and time of every stage",
        description="What RECIPE will cost before it runs (see docs/reference.md).",
    )
    p.add_argument("recipe")
    p.add_argument("overrides", nargs="*", metavar="key=value")
    p.add_argument("--gpus", type=int, help="ranks that train (default: $WORLD_SIZE or 1)")
    p.add_argument("--device", choices=["a100-80gb", "h100-80gb", "cpu"], help="time estimates for")
    p.add_argument(
        "--corpus-tokens", type=float, help="tokens of the target's train split, if not on disk"
    )
    p.add_argument("--json", action="store_true", help="one JSON object instead of tables")

    p = sub.add_parser(
        "verify",
        help="re-hash every file recorded in a run's manifests",
        description="Check every stage manifest under RUN_DIR; list missing or altered files.",
    )
    p.add_argument("run_dir")
    return parser


def _run_stages(recipe, names: list[str], force: bool, explicit: bool) -> None:
    from fusellm import distributed

    log = logging.getLogger("fusellm")
    # The launch's default group keeps the recipe's collective timeout (the Trainer would
    # have set it; it reuses the group).
    distributed.setup(timeout_s=(recipe.train or {}).get("ddp_timeout", 1800))
    if distributed.Rank.from_env().world > 1:
        from fusellm.models import pin_hub_revisions

        pin_hub_revisions(recipe.models)
    for name in names:
        st = STAGES[name]
        section = st.section_name
        if getattr(recipe, section) is None:
            if explicit:
                raise ValueError(f"stage '{name}' has no '{section}:' section in the recipe")
            log.info(
                "== stage %s: not configured in the recipe (no '%s:' section), skipped",
                name,
                section,
            )
            continue
        if not explicit and not st.wanted(recipe):
            log.info("== stage %s: not listed in bench.models, skipped", name)
            continue
        log.info("== stage %s", name)
        run = st.load()
        with _usage(recipe, name):
            if st.ranks == "first":
                distributed.on_rank0(lambda run=run: run(recipe, force=force) and None)
            else:
                run(recipe, force=force)
        # No rank reads this stage's output before every rank has finished its share.
        distributed.barrier()
    distributed.teardown()


def _local_rank_arg(argv: list[str], i: int) -> bool:
    """Whether ``argv[i]`` is ``--local_rank=N`` / ``--local-rank=N``, or ``N`` after one."""
    a = argv[i]
    if a.startswith(("--local_rank=", "--local-rank=")) or a in ("--local_rank", "--local-rank"):
        return True
    return i > 0 and argv[i - 1] in ("--local_rank", "--local-rank")


@contextlib.contextmanager
def _usage(recipe, stage: str):
    """Record what a stage took when it ran (a manifest under its directory was written
    meanwhile, by this rank or another): one JSON line per stage and rank in
    ``run_dir/usage.jsonl`` (seconds, and on Linux, where the peak can be reset, this
    process's peak RSS during the stage), beside the stage directories so no stage's
    manifest is followed by it. A stage skipped as complete records nothing."""
    import json
    import time
    from pathlib import Path

    from fusellm.distributed import Rank

    def rss(key: str) -> int | None:
        try:
            with open("/proc/self/status") as f:
                line = next(x for x in f if x.startswith(key))
            return int(line.split()[1]) * 1024
        except (OSError, StopIteration):
            return None

    try:  # peak RSS := current RSS, so the peak below is this stage's
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        reset = True
    except OSError:
        reset = False

    def manifests() -> dict:
        return {p: p.stat().st_mtime_ns for p in recipe.stage_dir(stage).rglob("manifest.json")}

    before = manifests()
    t0 = time.time()
    yield
    if manifests() == before:
        return  # nothing written: skipped as complete
    rec = {
        "stage": stage,
        "rank": Rank.from_env().rank,
        "seconds": round(time.time() - t0, 2),
        "peak_rss_bytes": rss("VmHWM:") if reset else None,
    }
    path = Path(recipe.run_dir) / "usage.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(rec) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    # Launchers that pass the local rank as an argument (the deepspeed launcher without
    # --no_local_rank, torch.distributed.launch): it is in LOCAL_RANK too.
    argv = sys.argv[1:] if argv is None else list(argv)
    argv = [a for i, a in enumerate(argv) if not _local_rank_arg(argv, i)]
    # Flags may sit anywhere among the key=value overrides (argparse would stop the
    # positional list at the first flag): collect the leftovers as overrides.
    args, extra = parser.parse_known_args(argv)
    stray = [x for x in extra if x.startswith("-") or "=" not in x]
    if stray or (extra and not hasattr(args, "overrides")):
        parser.error(f"unrecognized arguments: {' '.join(stray or extra)}")
    if extra:
        args.overrides = list(args.overrides) + extra
    logging.basicConfig(
        level=logging.WARNING if args.quiet else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    from fusellm.corpus.readers import CorpusInputError
    from fusellm.distributed import OtherRankFailed
    from fusellm.manifest import CorruptArtifact, StageInputsChanged
    from fusellm.models import ModelLoadError
    from fusellm.recipe import RecipeError

    try:
        if args.command == "verify":
            return _verify(Path(args.run_dir))
        from fusellm.recipe import load_recipe

        if args.command in ("show", "plan"):
            # stdout carries only the YAML/plan: imports that print (DeepSpeed's accelerator
            # notice) go to stderr
            with contextlib.redirect_stdout(sys.stderr):
                recipe = load_recipe(args.recipe, args.overrides)
        else:
            recipe = load_recipe(args.recipe, args.overrides)
        if args.command == "plan":
            from fusellm.plan.runner import run as plan

            source = [args.recipe, *args.overrides]
            return plan(recipe, source, args.gpus, args.device, args.corpus_tokens, args.json)
        if args.command == "show":
            import yaml

            print(
                yaml.safe_dump(
                    recipe.model_dump(mode="json", by_alias=True),
                    sort_keys=False,
                    allow_unicode=True,
                ),
                end="",
            )
            return 0
        if args.command == "run":
            names = list(STAGES)
            explicit = bool(args.stages)
            if args.stages:
                names = [s.strip() for s in args.stages.split(",") if s.strip()]
                unknown = [s for s in names if s not in STAGES]
                if unknown:
                    raise RecipeError(
                        f"--stages: unknown stage(s) {unknown}; known: {list(STAGES)}"
                    )
                names = [s for s in STAGES if s in names]  # pipeline order
            _run_stages(recipe, names, args.force, explicit)
        else:
            _run_stages(recipe, [args.command], args.force, True)
        return 0
    except (
        RecipeError,
        CorpusInputError,
        ModelLoadError,
        StageInputsChanged,
        CorruptArtifact,
        ValueError,
        OSError,  # missing input, disk full, permissions: the message names the path
        FloatingPointError,  # train: a NaN/Inf loss or gradient, step and batch named
        OtherRankFailed,  # rank 0 reported its own error
    ) as e:
        print(f"fusellm: error: {e}", file=sys.stderr)
        return 2


def _verify(run_dir: Path) -> int:
    """Re-hash every file that a stage manifest or a checkpoint's completion marker lists;
    print one line per record and then one line per bad file (path, actual vs expected)."""
    from fusellm.manifest import CHECKPOINT_COMPLETE, MANIFEST, verify_files

    records = sorted(
        m
        for name in (MANIFEST, CHECKPOINT_COMPLETE)
        for m in run_dir.rglob(name)
        if "wandb" not in m.parts
    )
    if not records:
        print(f"fusellm: error: no stage manifests under {run_dir}", file=sys.stderr)
        return 2
    bad = []
    for m in records:
        problems = verify_files(m.parent, m.name, full=True)
        bad += problems
        print(
            f"{m.parent.relative_to(run_dir)}: {f'{len(problems)} bad file(s)' if problems else 'OK'}"
        )
    for problem, _ in bad:
        print(problem)
    return 1 if bad else 0


def entry() -> None:
    """The ``fusellm`` command. Under a launcher, the process ends with ``os._exit`` once
    its output is flushed: every stage has finished and the process group is gone, but
    threads of gloo/NCCL/DeepSpeed still alive at interpreter shutdown can abort a rank
    ("terminate called without an active exception") after all its work is written."""
    code = main()
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


if __name__ == "__main__":
    entry()
