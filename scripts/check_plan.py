"""Compare ``fusellm plan`` with what a finished run wrote and used.

    python scripts/check_plan.py RUN_DIR RECIPE [key=value ...]

Plans RECIPE twice: as before anything ran (``run_dir`` pointed at an empty directory, so
token counts come from the corpus inputs) and with RUN_DIR's outputs at hand (token counts
from its manifests). Each is set against the bytes RUN_DIR's manifests record per stage
(checkpoints and the decontamination index as found on disk) and the peak RSS of extract,
train and clm_only in ``RUN_DIR/usage.jsonl``: disk within ±20%, RSS within ±30%.
Prints a table, then one JSON object as its last line:
``{"before": {"disk": {key: ratio}, "rss": {...}, "ok": ...}, "after": {...}, "ok": ...}``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import tempfile
from pathlib import Path

from fusellm.plan.check import DISK_TOLERANCE, RSS_TOLERANCE, compare
from fusellm.plan.runner import Settings, build
from fusellm.recipe import load_recipe


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run_dir", type=Path)
    ap.add_argument("recipe")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    out = {}
    with tempfile.TemporaryDirectory() as empty:
        for mode, run_dir in (("before", empty), ("after", str(args.run_dir))):
            over = [*args.overrides, f"run_dir={run_dir}"]
            with contextlib.redirect_stdout(sys.stderr):
                recipe = load_recipe(args.recipe, over)
                plan = build(recipe, Settings(1, None, None, [args.recipe, *over]))
            res = compare(plan, args.run_dir)
            print(
                f"{mode} the run (tolerance: disk ±{DISK_TOLERANCE:.0%}, RSS ±{RSS_TOLERANCE:.0%})"
            )
            for kind in ("disk", "rss"):
                for key, v in res[kind].items():
                    print(
                        f"  {kind:4}  {key:40} plan {v['estimate'] or 0:>14,}  run {v['actual']:>14,}"
                        f"  ratio {v['ratio'] if v['ratio'] is not None else '-':>7}  {'ok' if v['ok'] else 'OUT'}"
                    )
            out[mode] = {
                "disk": {k: v["ratio"] for k, v in res["disk"].items()},
                "rss": {k: v["ratio"] for k, v in res["rss"].items()},
                "ok": res["ok"],
            }
    out["ok"] = all(v["ok"] for v in out.values())
    print(json.dumps(out))
    return 0 if out["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
