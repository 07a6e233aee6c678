"""Train stage: continued training of the target on λ·CLM + (1−λ)·fusion loss."""
