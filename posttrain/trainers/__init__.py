"""One small module per algorithm; `posttrain algo=<name>` runs `posttrain.trainers.<name>.main(cfg)`."""

import importlib

from posttrain.errors import ConfigError

TRAINERS = {
    "sft": "posttrain.trainers.sft",
    "dpo": "posttrain.trainers.dpo",
    "rm": "posttrain.trainers.reward",
    "rlvr": "posttrain.trainers.rlvr",
    "gpo": "posttrain.trainers.gpo",
    "pipeline": "posttrain.pipeline",
}


def trainer_module(name: str):
    if name not in TRAINERS:
        raise ConfigError(f"unknown algo {name!r}; known: {', '.join(sorted(TRAINERS))}")
    return importlib.import_module(TRAINERS[name])
