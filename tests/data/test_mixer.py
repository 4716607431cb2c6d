"""Dataset mixer: amounts (fraction vs count), upsampling, seeded determinism, provenance, errors; tokenised cache."""

import json
from collections import Counter
from pathlib import Path

import pytest

from posttrain.config import DataConfig
from posttrain.data.loading import load_rows
from posttrain.data.mixer import PROVENANCE_COLUMN, mix_sources, sample_indices
from posttrain.errors import ConfigError, DataError


def write_source(path: Path, prefix: str, size: int) -> Path:
    rows = [
        {
            "id": f"{prefix}{i}",
            "messages": [{"role": "user", "content": f"q {prefix}{i}"}, {"role": "assistant", "content": f"a {i}"}],
        }
        for i in range(size)
    ]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


@pytest.fixture()
def files(tmp_path):
    return {"a": write_source(tmp_path / "a.jsonl", "a", 10), "b": write_source(tmp_path / "b.jsonl", "b", 4)}


def ids(rows, source=None):
    return [row.row["id"] for row in rows if source is None or row.row[PROVENANCE_COLUMN] == source]


def test_fraction_takes_that_share_of_distinct_rows(files):
    rows = mix_sources([{"file": str(files["a"]), "fraction": 0.5}, {"file": str(files["b"]), "fraction": 1.0}], seed=0)
    a, b = ids(rows, "a"), ids(rows, "b")
    assert len(a) == 5 and len(set(a)) == 5 and set(a) <= {f"a{i}" for i in range(10)}
    assert sorted(b) == ["b0", "b1", "b2", "b3"]
    assert len(rows) == 9


def test_count_takes_that_many_rows(files):
    rows = mix_sources(
        [{"name": "first", "file": str(files["a"]), "count": 7}, {"file": str(files["b"]), "count": 1}], seed=0
    )
    assert len(ids(rows, "first")) == 7 and len(set(ids(rows, "first"))) == 7
    assert len(ids(rows, "b")) == 1


@pytest.mark.parametrize(
    "amount, expected_total, expected_copies",
    [
        ({"fraction": 2.0}, 20, {2}),  # every row exactly twice
        ({"fraction": 2.5}, 25, {2, 3}),  # two copies + a seeded half: 5 rows three times
        ({"count": 13}, 13, {1, 2}),  # one copy + 3 sampled rows
    ],
)
def test_upsampling_repeats_whole_copies_then_samples_the_rest(files, amount, expected_total, expected_copies):
    rows = mix_sources([{"file": str(files["a"]), **amount}], seed=3)
    copies = Counter(ids(rows))
    assert len(rows) == expected_total
    assert set(copies) == {f"a{i}" for i in range(10)}  # every row at least once
    assert set(copies.values()) == expected_copies
    assert sum(copies.values()) == expected_total


def test_sample_indices_rounds_half_up_and_is_sorted_within_the_partial_sample():
    import random

    assert sample_indices(3, random.Random(0), fraction=0.5) == sorted(
        sample_indices(3, random.Random(0), fraction=0.5)
    )
    assert len(sample_indices(3, random.Random(0), fraction=0.5)) == 2  # 1.5 -> 2
    assert sample_indices(4, random.Random(0), fraction=1.0) == [0, 1, 2, 3]


def test_same_seed_same_rows_and_order_different_seed_differs(files):
    spec = [{"file": str(files["a"]), "fraction": 0.5}, {"file": str(files["b"]), "fraction": 2.0}]
    first, again, other = mix_sources(spec, seed=0), mix_sources(spec, seed=0), mix_sources(spec, seed=1)
    assert [r.row for r in first] == [r.row for r in again]
    assert ids(first) != ids(other)
    assert Counter(r.row[PROVENANCE_COLUMN] for r in first) == Counter(r.row[PROVENANCE_COLUMN] for r in other)


def test_adding_a_source_keeps_the_other_sources_picks(files):
    alone = mix_sources([{"file": str(files["a"]), "fraction": 0.5}], seed=0)
    together = mix_sources([{"file": str(files["a"]), "fraction": 0.5}, {"file": str(files["b"]), "count": 2}], seed=0)
    assert sorted(ids(alone)) == sorted(ids(together, "a"))


def test_every_row_names_its_source_and_keeps_its_file_and_line(files, tmp_path):
    rows = mix_sources(
        [
            {"name": "alpha", "file": str(files["a"]), "fraction": 1.0},
            {"name": "arith", "generator": "arithmetic", "count": 6},
        ],
        seed=0,
    )
    assert Counter(row.row[PROVENANCE_COLUMN] for row in rows) == {"alpha": 10, "arith": 6}
    for row in rows:
        if row.row[PROVENANCE_COLUMN] == "alpha":
            line = int(row.row["id"][1:]) + 1
            assert row.where() == f"row {line} of {files['a']}"
        else:
            assert row.source == "generator:arithmetic/train" and row.row["verifier"] == "gsm8k"


def test_generator_sources_count_is_distinct_rows_and_fraction_needs_num_examples():
    rows = mix_sources([{"generator": "arithmetic", "count": 30}], seed=0)
    questions = [row.row["prompt"][0]["content"] for row in rows]
    assert len(questions) == 30 == len(set(questions))
    doubled = mix_sources([{"generator": "arithmetic", "num_examples": 8, "fraction": 2.0}], seed=0)
    assert len(doubled) == 16 and set(Counter(r.row["prompt"][0]["content"] for r in doubled).values()) == {2}
    with pytest.raises(ConfigError, match=r'data.mixture\[0\] \("generator:arithmetic"\).*num_examples'):
        mix_sources([{"generator": "arithmetic", "fraction": 0.5}], seed=0)


def test_parquet_source(tmp_path):
    import pandas as pd

    path = tmp_path / "p.parquet"
    pd.DataFrame({"id": [f"p{i}" for i in range(6)], "text": ["x"] * 6}).to_parquet(path)
    rows = mix_sources([{"file": str(path), "fraction": 0.5}], seed=0)
    assert len(rows) == 3 and {row.row[PROVENANCE_COLUMN] for row in rows} == {"p"}


@pytest.mark.parametrize("amount, word", [({"fraction": 0.5, "count": 3}, "both"), ({}, "neither")])
def test_both_or_neither_amount_is_refused_naming_the_source(files, amount, word):
    spec = [{"file": str(files["b"]), "count": 1}, {"name": "second", "file": str(files["a"]), **amount}]
    with pytest.raises(ConfigError) as error:
        mix_sources(spec, seed=0)
    message = str(error.value)
    assert 'data.mixture[1] ("second")' in message and word in message and "fraction" in message and "count" in message


@pytest.mark.parametrize(
    "entry, expected",
    [
        ({"file": "x.jsonl", "count": 0.5}, "whole number of rows"),  # a share written as a count
        ({"file": "x.jsonl", "fraction": 1000}, "did you mean count: 1000"),  # a count written as a fraction
        ({"file": "x.jsonl", "fraction": -1.0}, "must be a number > 0"),
        ({"file": "x.jsonl", "hub": "a/b", "count": 1}, "exactly one of file, hub or generator"),
        ({"fraction": 1.0}, "exactly one of file, hub or generator"),
        ({"file": "x.jsonl", "counts": 3}, "unknown keys ['counts']"),
    ],
)
def test_malformed_entries_fail_naming_what_is_wrong(entry, expected):
    with pytest.raises(ConfigError, match=r"data.mixture\[0\]") as error:
        mix_sources([entry], seed=0)
    assert expected in str(error.value)


def test_duplicate_names_are_refused(files):
    with pytest.raises(ConfigError, match="'a'.*more than once"):
        mix_sources([{"file": str(files["a"]), "count": 1}, {"name": "a", "file": str(files["b"]), "count": 1}], seed=0)


def test_missing_file_error_names_the_file_and_source(tmp_path):
    missing = tmp_path / "nowhere" / "train.jsonl"
    with pytest.raises(DataError) as error:
        mix_sources([{"name": "mine", "file": str(missing), "fraction": 1.0}], seed=0)
    assert str(missing) in str(error.value) and '"mine"' in str(error.value)


def test_bad_json_line_names_file_and_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"id": 1}\n{oops\n')
    with pytest.raises(DataError, match=f"line 2 of {path}"):
        mix_sources([{"file": str(path), "fraction": 1.0}], seed=0)


def test_shipped_example_config_composes_and_mixes(tmp_path):
    from helpers import compose_config

    cfg = compose_config(["data=mixture_example", f"run_dir={tmp_path}"])
    counts = Counter(row.row[PROVENANCE_COLUMN] for row in load_rows(cfg.data, "train"))
    expected = {source.name: source.count or source.num_examples * source.fraction for source in cfg.data.mixture}
    assert counts == expected
    assert len(load_rows(cfg.data, "eval")) == cfg.data.num_eval


def test_mixture_and_train_files_together_are_refused(files):
    data_cfg = DataConfig(train_files=[str(files["a"])], mixture=[{"file": str(files["b"]), "count": 1}])
    with pytest.raises(ConfigError, match="data.mixture or data.train_files"):
        load_rows(data_cfg, "train")
