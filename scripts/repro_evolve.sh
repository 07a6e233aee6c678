#!/usr/bin/env bash
# Evolutionary merging at small scale: PS, DFS and PS+DFS (recipes/evolve-merge.yaml) over two
# domain variants of SmolLM2 (continued on drama / on science, as scripts/repro_fusion_vs_merge.sh
# makes them), fitness on the valid split, then the bench on the test split.
#   scripts/repro_evolve.sh
set -euo pipefail
F=recipes/fusion-vs-merge.yaml
ROOT=runs/fusion-vs-merge

domain() {  # NAME BUILTIN MAX_DOCS (the main corpus's documents of that domain)
  fusellm run "$F" "run_dir=$ROOT/$1" "corpus.inputs=[{builtin: $2, max_docs: $3}]" \
    "sources=[smollm2]" "bench.models=[clm_only]" train.learning_rate=1.0e-4 \
    train.num_train_epochs=2 --stages corpus,extract,align,fuse,clm_only
}
domain drama shakespeare 16
domain science sciq 60

fusellm run recipes/evolve-merge.yaml --stages corpus,evolve,bench
echo "table: runs/evolve-merge/bench/results.md  chart: runs/evolve-merge/bench/results.png"
