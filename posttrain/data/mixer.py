"""The dataset mixer: training rows drawn from several sources in stated amounts, shuffled by seed.

    data:
      mixture:
        - {name: tulu_sft, hub: allenai/tulu-3-sft-mixture, fraction: 0.25}
        - {name: mine, file: data/mine.jsonl, fraction: 2.0}
        - {name: arithmetic, generator: arithmetic, count: 1000}

Each source is exactly one of `file` (local .jsonl / .json / .parquet), `hub` (a dataset name, loaded
with `datasets.load_dataset`) or `generator` (a task registered in data_recipes), and gives exactly one
amount, under two keys that cannot be mistaken for each other:
- `fraction`: a multiple of the source. 0.5 takes half its rows; 2.0 takes every row twice; 1.5 every
  row once plus a seeded half. In general round(fraction x size) rows: whole copies, then a sample
  without replacement for the remainder. Above MAX_FRACTION it is refused as a likely `count`.
- `count`: that many rows, drawn the same way (a count above the source size repeats rows). A
  generator source produces `count` distinct rows instead; with `fraction` it needs `num_examples`,
  the size of the generated source the fraction applies to.

Determinism: each source's sample uses a generator seeded by (seed, source name), so adding or
removing one source leaves the others' picks unchanged, and the concatenation is shuffled by seed.
Provenance: every row is a dict and gets PROVENANCE_COLUMN = the source's name (an existing value in
that column is replaced); the returned `SourceRow`s keep the original file / hub name and row number,
so errors still say "row 17 of data/mine.jsonl".
"""

from __future__ import annotations

import dataclasses
import logging
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from posttrain.data.generators import generate_task
from posttrain.data.sources import SourceRow, read_file, read_hub
from posttrain.errors import ConfigError, DataError

log = logging.getLogger(__name__)

PROVENANCE_COLUMN = "source"
MAX_FRACTION = 100.0  # a larger "fraction" is almost certainly a row count written under the wrong key
KINDS = ("file", "hub", "generator")
AMOUNTS = ("fraction", "count")


@dataclass(frozen=True)
class MixtureSource:
    """A validated mixture entry (the fields of `posttrain.config.MixtureSourceConfig`)."""

    name: str
    kind: str  # file | hub | generator
    location: str  # the path, hub name or task name
    fraction: float | None = None
    count: int | None = None
    split: str = "train"
    generator_kwargs: dict = field(default_factory=dict)
    num_examples: int | None = None


def _as_dict(spec: Any, label: str) -> dict:
    if dataclasses.is_dataclass(spec):
        return dataclasses.asdict(spec)
    try:
        from omegaconf import DictConfig, OmegaConf

        if isinstance(spec, DictConfig):
            return OmegaConf.to_container(spec, resolve=True)
    except ImportError:  # pragma: no cover - omegaconf is a dependency
        pass
    if not isinstance(spec, Mapping):
        raise ConfigError(f"{label} must be a mapping like {{file: data.jsonl, fraction: 1.0}}, got {spec!r}")
    return dict(spec)


def parse_source(spec: Any, position: int) -> MixtureSource:
    """A `MixtureSource` from one config entry; ConfigError naming `data.mixture[position]` if it is ambiguous."""
    label = f"data.mixture[{position}]"
    entry = _as_dict(spec, label)
    known = {f.name for f in dataclasses.fields(MixtureSource)} - {"kind", "location"} | set(KINDS)
    unknown = sorted(set(entry) - known)
    if unknown:
        raise ConfigError(f"{label} has unknown keys {unknown}; known keys: {sorted(known)}")
    if entry.get("name"):
        label = f'{label} ("{entry["name"]}")'
    kinds = [kind for kind in KINDS if entry.get(kind) is not None]
    if len(kinds) != 1:
        raise ConfigError(f"{label} must give exactly one of file, hub or generator; got {kinds or 'none'}")
    kind = kinds[0]
    location = str(entry[kind])
    name = entry.get("name") or _default_name(kind, location)
    label = f'data.mixture[{position}] ("{name}")'
    fraction, count = entry.get("fraction"), entry.get("count")
    if (fraction is None) == (count is None):
        given = "both" if fraction is not None else "neither"
        raise ConfigError(
            f"{label} gives {given} of fraction and count; give exactly one: fraction (a multiple of the "
            "source: 0.5 = half, 2.0 = two copies) or count (a number of rows)"
        )
    if count is not None and (isinstance(count, bool) or not isinstance(count, int) or count < 1):
        raise ConfigError(
            f"{label}: count={count!r} must be a whole number of rows >= 1 (for a share of the source use fraction)"
        )
    if fraction is not None:
        if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not fraction > 0:
            raise ConfigError(f"{label}: fraction={fraction!r} must be a number > 0 (1.0 = the whole source once)")
        if fraction > MAX_FRACTION:
            raise ConfigError(
                f"{label}: fraction={fraction} repeats the source {fraction:g} times; did you mean count: "
                f"{int(fraction)}?"
            )
    num_examples = entry.get("num_examples")
    if kind == "generator" and fraction is not None and not num_examples:
        raise ConfigError(
            f"{label}: a generator has no natural size; give count: N, or num_examples: N with the fraction"
        )
    return MixtureSource(
        name=name,
        kind=kind,
        location=location,
        fraction=None if fraction is None else float(fraction),
        count=count,
        split=entry.get("split") or "train",
        generator_kwargs=dict(entry.get("generator_kwargs") or {}),
        num_examples=num_examples,
    )


def _default_name(kind: str, location: str) -> str:
    if kind == "file":
        return Path(location).stem
    return f"generator:{location}" if kind == "generator" else location


def parse_mixture(specs: Sequence[Any]) -> list[MixtureSource]:
    """Validated sources; their names (the provenance labels) must be distinct."""
    if isinstance(specs, (str, Mapping)) or not len(specs):
        raise ConfigError("data.mixture must be a non-empty list of sources, e.g. [{file: train.jsonl, fraction: 1.0}]")
    sources = [parse_source(spec, position) for position, spec in enumerate(specs)]
    names = [source.name for source in sources]
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise ConfigError(f"data.mixture names {repeated} more than once; give each source a distinct `name:`")
    return sources


def read_mixture_source(source: MixtureSource, seed: int) -> list[SourceRow]:
    """Every row of the source before sampling (for a generator: `count` or `num_examples` generated rows)."""
    label = f'mixture source "{source.name}"'
    if source.kind == "file":
        path = Path(source.location)
        if not path.exists():
            raise DataError(f"{label}: data file {path} does not exist; check its `file:` path in data.mixture")
        rows = read_file(path)
    elif source.kind == "hub":
        rows = read_hub(source.location, source.split)
    else:
        size = source.count if source.count is not None else source.num_examples
        try:
            generated = generate_task(source.location, source.split, size, seed, **source.generator_kwargs)
        except (TypeError, ValueError) as error:
            raise ConfigError(f"{label}: generator {source.location!r} failed: {error}") from None
        where = f"generator:{source.location}/{source.split}"
        rows = [SourceRow(where, i, row) for i, row in enumerate(generated, start=1)]
    if not rows:
        raise DataError(f"{label} ({source.location}) holds no rows")
    return rows


def sample_indices(size: int, rng: random.Random, fraction: float | None = None, count: int | None = None) -> list[int]:
    """Indices into a source of `size` rows: round(fraction x size) or `count` of them, as whole copies
    (every index, in order) followed by a sample without replacement (sorted) for the remainder."""
    total = count if count is not None else int(fraction * size + 0.5)
    copies, remainder = divmod(total, size)
    return list(range(size)) * copies + sorted(rng.sample(range(size), remainder))


def with_provenance(source_row: SourceRow, name: str) -> SourceRow:
    if not isinstance(source_row.row, dict):
        raise DataError(f"{source_row.where()} is a {type(source_row.row).__name__}; mixture rows must be JSON objects")
    return SourceRow(source_row.source, source_row.index, {**source_row.row, PROVENANCE_COLUMN: name})


def mix_sources(specs: Sequence[Any], seed: int) -> list[SourceRow]:
    """The mixture's rows: each source sampled per its amount, tagged with its name, all shuffled by `seed`."""
    mixed = []
    for source in parse_mixture(specs):
        rows = read_mixture_source(source, seed)
        if source.kind == "generator" and source.count is not None:
            picked = rows  # already exactly `count` distinct rows
        else:
            rng = random.Random(f"mixture:{seed}:{source.name}")
            picked = [rows[i] for i in sample_indices(len(rows), rng, source.fraction, source.count)]
        if not picked:
            log.warning('mixture source "%s": %s of %d rows rounds to none', source.name, source.fraction, len(rows))
        log.info('mixture source "%s": %d of %d rows', source.name, len(picked), len(rows))
        mixed.extend(with_provenance(row, source.name) for row in picked)
    if not mixed:
        raise DataError("data.mixture selects no rows; raise the fractions or counts")
    random.Random(f"mixture-shuffle:{seed}").shuffle(mixed)
    return mixed
