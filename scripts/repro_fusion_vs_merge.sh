#!/usr/bin/env bash
# Fusion vs ensemble vs weight merging, small scale (recipes/fusion-vs-merge.yaml; ~45 min
# on 2 CPU cores). Makes two domain variants of SmolLM2 (CLM on drama / on science, lr
# 1e-4, 2 epochs), then fuses them into the base, merges them four ways and benches all.
#   scripts/repro_fusion_vs_merge.sh
set -euo pipefail
R=recipes/fusion-vs-merge.yaml
ROOT=runs/fusion-vs-merge

domain() {  # NAME BUILTIN MAX_DOCS (the main corpus's documents of that domain)
  fusellm run "$R" "run_dir=$ROOT/$1" "corpus.inputs=[{builtin: $2, max_docs: $3}]" \
    "sources=[smollm2]" "bench.models=[clm_only]" train.learning_rate=1.0e-4 \
    train.num_train_epochs=2 --stages corpus,extract,align,fuse,clm_only
}
domain drama shakespeare 16
domain science sciq 60

fusellm run "$R"
echo "table: $ROOT/main/bench/results.md  chart: $ROOT/main/bench/results.png"
