#!/usr/bin/env bash
# Fusion vs ensemble vs weight merging, small scale (recipes/fusion-vs-merge.yaml; ~45 min
# on 2 CPU cores). Makes two domain variants of SmolLM2 (scripts/domain_variants.sh), then
# fuses them into the base, merges them four ways and benches all.
#   scripts/repro_fusion_vs_merge.sh
set -euo pipefail
"$(dirname "$0")/domain_variants.sh"
fusellm run recipes/fusion-vs-merge.yaml
echo "table: runs/fusion-vs-merge/main/bench/results.md  chart: runs/fusion-vs-merge/main/bench/results.png"
