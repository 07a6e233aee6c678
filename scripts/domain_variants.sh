#!/usr/bin/env bash
# Two domain variants of SmolLM2 (CLM on drama / on science, lr 1e-4, 2 epochs, each on the
# quickstart corpus's documents of that domain) at runs/fusion-vs-merge/{drama,science}:
# the sources of recipes/fusion-vs-merge.yaml and recipes/evolve-merge.yaml. Skips what
# is done.
#   scripts/domain_variants.sh
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
