#!/usr/bin/env bash
# FuseLLM's main comparison and ablations, small scale, on the embedded default (2 CPU
# cores, ~45 min after the quickstart): base target vs CLM-only (λ = 1) vs FuseLLM with
# MinCE (the quickstart's fused model) vs AvgCE fusion vs exact-match (EM) vocabulary
# alignment instead of MinED vs a single source (the target's own distributions).
#
#   scripts/repro_fusellm.sh [ROOT]        # default ROOT=runs/repro-fusellm
#   BASE=runs/quickstart scripts/repro_fusellm.sh   # reuse a finished quickstart run
#
# Variants share the base run's corpus and extraction (hard-linked: same content, same
# fingerprints) and redo only what differs. The bench runs in the base run directory and
# lists the variants' models by path; its table lands in BASE/bench/results.md.
set -euo pipefail
ROOT=${1:-runs/repro-fusellm}
BASE=${BASE:-$ROOT/base}
R=recipes/quickstart.yaml
TASKS="bench.tasks=[lm,arc_easy:rc_0shot,piqa:rc_0shot,lambada:bpb_0shot]"

fusellm run "$R" "run_dir=$BASE" --stages corpus,extract,align,fuse,train,clm_only

variant() {  # NAME STAGES OVERRIDES... : hard-link the shared stages, run the rest
  local name=$1 stages=$2; shift 2
  local dir=$ROOT/$name
  mkdir -p "$dir"
  for s in corpus extract $( [[ $stages == fuse ]] && echo align ); do
    [[ -e $dir/$s ]] || cp -al "$BASE/$s" "$dir/$s"
  done
  fusellm run "$R" "run_dir=$dir" --stages "$stages,train" "$@"
}
variant avg_ce   fuse       fuse.method=avg_ce
variant em       align,fuse align.vocab_method=em
variant one_src  fuse       "fuse.sources=[smollm2]"

fusellm bench "$R" "run_dir=$BASE" "$TASKS" \
  "models.avg_ce={path: $(realpath "$ROOT/avg_ce/train/model")}" \
  "models.em_align={path: $(realpath "$ROOT/em/train/model")}" \
  "models.one_source={path: $(realpath "$ROOT/one_src/train/model")}" \
  "bench.models=[target,clm_only,fused,avg_ce,em_align,one_source]"
echo "table: $BASE/bench/results.md  chart: $BASE/bench/results.png"
