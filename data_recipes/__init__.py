"""Dataset recipes: synthetic task generators, mixtures and decontamination.

The generators register into posttrain's task-generator registry (`posttrain.data.generators`); this package
is named in the `posttrain.task_generators` entry point, so `data.generator=<task>` finds them.
"""

from data_recipes import arithmetic, preference  # noqa: E402,F401  (registers the built-in tasks)
from posttrain.data.generators import generate_task, register_task  # noqa: F401  (re-exported)
