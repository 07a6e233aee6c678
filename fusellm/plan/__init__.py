"""``fusellm plan``: what a recipe will cost (tokens, disk, memory per rank, time) before it
runs. :mod:`~fusellm.plan.core` holds the arithmetic, :mod:`~fusellm.plan.shapes` reads
model shapes without weights, :mod:`~fusellm.plan.counts` the corpus and token counts,
:mod:`~fusellm.plan.machine` what is measured here; :mod:`~fusellm.plan.tokens`,
:mod:`~fusellm.plan.disk`, :mod:`~fusellm.plan.memory` and :mod:`~fusellm.plan.duration`
make the sections from a shared :class:`~fusellm.plan.context.Context`,
:mod:`~fusellm.plan.render` prints them, :mod:`~fusellm.plan.runner` runs it all and
:mod:`~fusellm.plan.check` sets a plan against a finished run."""
