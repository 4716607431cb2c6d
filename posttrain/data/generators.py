"""Synthetic task generators, registered by name; `generate_task` runs one.

Generators live outside the library: the top-level `data_recipes` package ships the built-in ones
(arithmetic, arithmetic_preference, cyclic_preference, game_moves) and registers them here with
`@register_task("name")`. Packages holding generators are named in the `posttrain.task_generators`
entry-point group (see pyproject.toml) and imported on the first look-up, so the library never imports them
itself and a third-party package adds a task by declaring the same entry point.
"""

from __future__ import annotations

import importlib.metadata

from posttrain.errors import ConfigError
from posttrain.registry import Registry

ENTRY_POINT_GROUP = "posttrain.task_generators"

TASK_GENERATORS: Registry = Registry("task generator")
register_task = TASK_GENERATORS.register

_entry_points_loaded = False


def load_generator_packages() -> None:
    """Import every package named in the `posttrain.task_generators` entry points (once)."""
    global _entry_points_loaded
    if _entry_points_loaded:
        return
    _entry_points_loaded = True
    for entry_point in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        entry_point.load()


def generate_task(name: str, split: str, num_examples: int, seed: int, **kwargs) -> list[dict]:
    """Rows of the named synthetic task for `split` ("train" or "eval"); deterministic in (seed, split).

    A generator's ValueError (a bad option, more rows than exist) becomes a one-line ConfigError naming it."""
    load_generator_packages()
    generator = TASK_GENERATORS.get(name, "data.generator")
    try:
        return generator(split=split, num_examples=num_examples, seed=seed, **kwargs)
    except TypeError as error:
        if "unexpected keyword argument" not in str(error):
            raise  # a bug in the generator, not an option it does not take
        raise ConfigError(f"task generator {name!r}: {error}; check data.generator_kwargs") from None
    except ValueError as error:
        raise ConfigError(f"task generator {name!r} ({split} split, {num_examples} rows): {error}") from None
