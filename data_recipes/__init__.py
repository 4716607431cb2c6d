"""Dataset recipes: synthetic task generators (registered by name), mixtures and decontamination."""

from posttrain.registry import Registry

TASKS: Registry = Registry("task generator")
register_task = TASKS.register


def generate_task(name: str, split: str, num_examples: int, seed: int, **kwargs) -> list[dict]:
    """Rows of the named synthetic task for `split` ("train" or "eval"); deterministic in (seed, split).

    A generator's ValueError (a bad option, more rows than exist) becomes a one-line ConfigError naming it."""
    import data_recipes.arithmetic  # noqa: F401  (registers the built-in tasks)
    import data_recipes.preference  # noqa: F401
    from posttrain.errors import ConfigError

    generator = TASKS.get(name)
    try:
        return generator(split=split, num_examples=num_examples, seed=seed, **kwargs)
    except TypeError as error:
        if "unexpected keyword argument" not in str(error):
            raise  # a bug in the generator, not an option it does not take
        raise ConfigError(f"task generator {name!r}: {error}; check data.generator_kwargs") from None
    except ValueError as error:
        raise ConfigError(f"task generator {name!r} ({split} split, {num_examples} rows): {error}") from None
