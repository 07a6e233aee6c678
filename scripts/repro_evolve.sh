#!/usr/bin/env bash
# Evolutionary merging at small scale: PS, DFS and PS+DFS (recipes/evolve-merge.yaml) over two
# domain variants of SmolLM2 (scripts/domain_variants.sh, shared with
# scripts/repro_fusion_vs_merge.sh), fitness on the valid split, then the bench on the test
# split.
#   scripts/repro_evolve.sh
set -euo pipefail
"$(dirname "$0")/domain_variants.sh"
fusellm run recipes/evolve-merge.yaml --stages corpus,evolve,bench
echo "table: runs/evolve-merge/bench/results.md  chart: runs/evolve-merge/bench/results.png"
