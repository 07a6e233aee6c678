"""``fusellm plan``: what a recipe will cost (tokens, disk, memory per rank, time) before it
runs. :mod:`~fusellm.plan.core` holds the arithmetic, :mod:`~fusellm.plan.shapes` reads
model shapes without weights, :mod:`~fusellm.plan.runner` gathers the facts and prints,
:mod:`~fusellm.plan.check` sets a plan against a finished run."""
