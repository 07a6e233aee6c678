"""Weight merging through mergekit (a baseline for fusion): ``fusellm merge`` and the
CMA-ES merge search of ``fusellm evolve``."""
