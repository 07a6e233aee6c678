"""fusellm: knowledge fusion of heterogeneous large language models (FuseLLM, Wan et al., ICLR 2024).

Stages (``fusellm.stages``): corpus -> extract -> align -> fuse -> train, with merge /
evolve baselines and bench. Recipes (``fusellm.recipe``) configure a whole job.
"""

__version__ = "0.1.0"
