"""Extract stage: top-k next-token log-probs of every source model over the corpus."""
