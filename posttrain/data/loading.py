"""Rows of a split as `data.*` configures them: a mixture, files, the hub, or a task generator."""

from __future__ import annotations

from posttrain.data.generators import generate_task
from posttrain.data.mixer import mix_sources
from posttrain.data.sources import SourceRow, read_source
from posttrain.errors import ConfigError, DataError


def load_rows(data_cfg, split: str) -> list[SourceRow]:
    """All rows of `split` ("train" or "eval") as configured by `data_cfg`.

    Training rows come from `data.mixture` (see posttrain/data/mixer.py), else `data.train_files`,
    else `data.generator`; eval rows from `data.eval_files`, else the generator's held-out split.
    """
    mixture = getattr(data_cfg, "mixture", None)
    if split == "train" and mixture:
        if data_cfg.train_files:
            raise ConfigError(
                "set data.mixture or data.train_files, not both (a file can be a mixture source: "
                "{file: ..., fraction: 1.0})"
            )
        return mix_sources(mixture, data_cfg.seed)
    files = data_cfg.train_files if split == "train" else data_cfg.eval_files
    if files:
        on_bad_row = getattr(data_cfg, "on_bad_row", "error")
        rows = [row for name in files for row in read_source(name, split, on_bad_row)]
        if not rows:
            raise DataError(f"the {split} data ({', '.join(files)}) holds no rows")
        return rows
    if split == "train" and not data_cfg.generator:
        raise ConfigError("no training data: set data.train_files=[...] or data.generator=<task>")
    if not data_cfg.generator:
        return []
    count = data_cfg.num_train if split == "train" else data_cfg.num_eval
    generated = generate_task(data_cfg.generator, split, count, data_cfg.seed, **dict(data_cfg.generator_kwargs))
    source = f"generator:{data_cfg.generator}/{split}"
    return [SourceRow(source, i, row) for i, row in enumerate(generated, start=1)]
