"""Algorithms, one small module each, registered once with `@register_algo`; `posttrain algo=<name>` runs one.

An algorithm is a class registered with its config schema (the dataclass of `algo.*`):

    @register_algo("sft", schema=SFTAlgoConfig, curve=("loss",))
    class SFT:
        def __init__(self, run: Run): ...            # setup: data, tokenizer, model, engine (posttrain.training)
        def train_step(self, step: int) -> dict: ... # optimizer steps step .. step + steps_per_update - 1
        def evaluate(self) -> dict: ...              # held-out metrics ({} when there is nothing to evaluate)
        def export(self, out_dir: Path) -> None: ... # final/

and the run loop (`posttrain.training.run_loop`) owns everything they share: run dir, resume, logging, eval and
checkpoint cadence, the final checkpoint and export. An orchestrator that runs other algorithms (the pipeline)
registers a `main(cfg) -> Path` function instead of a class.

Adding an algorithm = a module (here, or any importable module named in $POSTTRAIN_ALGORITHMS, comma-separated),
a YAML in a config dir (`conf/algo/<name>.yaml`: `defaults: [<name>_schema, _self_]`), and a test.
"""

from __future__ import annotations

import importlib
import inspect
import os
import pkgutil
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from posttrain.registry import Registry

ALGORITHMS: Registry = Registry("algorithm")
EXTRA_ALGORITHMS_ENV = "POSTTRAIN_ALGORITHMS"
BUILT_IN_ORCHESTRATORS = ("posttrain.pipeline",)


@dataclass(frozen=True)
class Algorithm:
    name: str
    schema: type  # the dataclass of `algo.*`, stored in Hydra's ConfigStore as algo/<name>_schema
    entry: Any  # a trainer class (constructed with the Run) or, for an orchestrator, main(cfg) -> Path
    curve: tuple[str, ...]  # the metric plotted per stage (pipeline.png): the first one present in metrics.jsonl
    check: Callable[[Any], None] | None  # config checks run before anything is read or written

    @property
    def is_trainer(self) -> bool:
        return inspect.isclass(self.entry)


def register_algo(name: str, *, schema: type, curve: tuple[str, ...] = ("loss",), check: Callable | None = None):
    """Register the decorated trainer class (or orchestrator `main`) as `algo=<name>` with its config schema."""

    def decorator(entry):
        ALGORITHMS.register(name)(Algorithm(name, schema, entry, tuple(curve), check))
        return entry

    return decorator


def load_algorithms() -> Registry:
    """Import every built-in algorithm module and those named in $POSTTRAIN_ALGORITHMS; returns the registry."""
    modules = [f"{__name__}.{info.name}" for info in pkgutil.iter_modules(__path__)]
    modules += list(BUILT_IN_ORCHESTRATORS)
    modules += [name.strip() for name in os.environ.get(EXTRA_ALGORITHMS_ENV, "").split(",") if name.strip()]
    for module in modules:
        importlib.import_module(module)
    return ALGORITHMS


def get_algorithm(name: str) -> Algorithm:
    return load_algorithms().get(name, "algo")
