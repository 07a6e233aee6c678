"""``fusellm bench``: compare fused models with their sources, CLM-only training, merges
and ensembles on bits per byte (per domain) and log-likelihood-scored tasks."""
