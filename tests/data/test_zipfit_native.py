"""The native ZIP-FIT sizes (csrc/zipfit_ncd.cpp, data_recipes/zipfit_native.py) against the Python zlib path
(CompressionScorer with native=False) and fresh compressors: equal sizes, byte for byte, so equal selections.

A broken build fails these tests rather than skipping them; the fallback is tested on purpose, separately."""

import json
import random
import zlib

import numpy as np
import pytest
from test_zipfit import mixed_pool

from data_recipes import generate_task, zipfit_native
from data_recipes.zipfit import CompressionScorer, main, row_text, target_chunks, top_rows


def varied_rows() -> list:
    """Empty, one byte, non-ASCII (2-, 3- and 4-byte UTF-8), arithmetic, prose, bytes, rows longer than the 4 KiB
    window (repetitive, and 70 KB of random bytes: incompressible, more output than the 64 KiB buffer)."""
    arithmetic = [row_text(r) for r in generate_task("arithmetic", "train", 20, seed=5, steps=True, operations="+")]
    noise = random.Random(0).randbytes(70_000)
    return ["", "x", "é" * 50, "数学题：12 + 34 = 46 🙂", *arithmetic, "The quick brown fox jumps over the lazy dog.",
            b"bytes row: 1 + 2 = 3", "", " ".join(arithmetic) * 12, noise, "What is 7 + 8?\n#### 15"]  # fmt: skip


def fresh_sizes(chunk: bytes, x: bytes, settings: tuple) -> tuple[int, int]:
    """(C(x), C(t x)) from fresh compressors, no copies: raw DEFLATE, x ended by a full (alone) or sync flush."""
    alone = zlib.compressobj(*settings)
    joint = zlib.compressobj(*settings)
    c_t = len(joint.compress(chunk)) + len(joint.flush(zlib.Z_SYNC_FLUSH))
    return (len(alone.compress(x)) + len(alone.flush(zlib.Z_FULL_FLUSH)),
            c_t + len(joint.compress(x)) + len(joint.flush(zlib.Z_SYNC_FLUSH)))  # fmt: skip


@pytest.mark.parametrize("level, window_bits, mem_level", [(1, 12, 1), (9, 15, 8), (6, 9, 3)])
def test_native_sizes_equal_the_python_zlib_sizes_byte_for_byte(level, window_bits, mem_level):
    rows = varied_rows()
    targets = [row_text(r) for r in generate_task("arithmetic", "eval", 200, seed=1, steps=True, operations="+")]
    chunks = target_chunks(targets, 3, (1 << window_bits) - 262, seed=0)
    native = CompressionScorer(chunks, level, window_bits, mem_level, native=True)
    python = CompressionScorer(chunks, level, window_bits, mem_level, native=False)
    assert (native.backend, python.backend) == ("native", "python")
    encoded = [r.encode() if isinstance(r, str) else r for r in rows]
    target_sizes, sizes, joint = native.native.compressed_sizes(chunks, rows, level, window_bits, mem_level)
    assert target_sizes.tolist() == [size for _, size in python.targets]
    assert sizes.tolist() == python.sizes(encoded)
    assert joint.tolist() == python.joint_sizes(encoded)
    # and the Python path is the textbook one: fresh compressors for every row (spot-checked: first chunk)
    assert [fresh_sizes(chunks[0], x, python.settings) for x in encoded] == list(zip(sizes, joint[0]))
    assert sizes[0] == 5 and len(encoded[-3]) > 4096 and sizes[-2] > 70_000  # empty: an empty stored block
    texts = [r if isinstance(r, str) else r.decode("latin-1") for r in rows[:-2]]  # str rows only for scores()
    assert native.scores(texts) == python.scores(texts)


def test_threads_split_rows_without_changing_a_size():
    rows = varied_rows() * 3
    chunks = [b"What is 12 + 34?\n2 + 4 + 0 = 6\n1 + 3 + 0 = 4\n#### 46", b"Ann and Ben play the hand game."]
    module = CompressionScorer(chunks, native=True).native
    one = module.compressed_sizes(chunks, rows, 1, 12, 1)
    for threads in (2, 5, 1000):
        assert all(np.array_equal(a, b) for a, b in zip(one, module.compressed_sizes(chunks, rows, 1, 12, 1, threads)))
    assert [a.shape for a in module.compressed_sizes(chunks, [], 1, 12, 1, 4)] == [(2,), (0,), (2, 0)]


def test_native_rejects_rows_that_are_not_text():
    module = CompressionScorer([b"abc"], native=True).native
    with pytest.raises(TypeError, match="row 1 is a int; expected str or bytes"):
        module.compressed_sizes([b"abc"], ["ok", 7], 1, 12, 1)


def test_native_and_python_select_the_same_rows_from_the_mixed_pool():
    rows, is_arithmetic = mixed_pool()
    texts = [row_text(r) for r in rows]
    targets = [row_text(r) for r in generate_task("arithmetic", "eval", 100, seed=0, steps=True, operations="+")]
    chunks = target_chunks(targets, 2, 3000, seed=0)
    native, python = (CompressionScorer(chunks, native=flag).scores(texts) for flag in (True, False))
    assert native == python
    kept = top_rows(native, 200)
    assert sum(is_arithmetic[i] for i in kept) / len(kept) >= 0.95


def test_the_environment_variable_forces_the_python_scorer_silently(monkeypatch, recwarn):
    monkeypatch.setenv(zipfit_native.DISABLE_ENV_VAR, "1")
    scorer = CompressionScorer([b"What is 1 + 2?"])
    assert scorer.backend == "python" and scorer.native is None and not recwarn.list
    with pytest.raises(RuntimeError, match="POSTTRAIN_DISABLE_ZIPFIT_NATIVE is set"):
        CompressionScorer([b"What is 1 + 2?"], native=True)


def test_a_failed_build_warns_once_and_falls_back_to_python(monkeypatch):
    monkeypatch.delenv(zipfit_native.DISABLE_ENV_VAR, raising=False)
    monkeypatch.setattr(zipfit_native, "_module", None)
    monkeypatch.setattr(zipfit_native, "_failure", None)
    monkeypatch.setattr(zipfit_native, "SOURCE", "deliberately_missing.cpp")
    with pytest.warns(RuntimeWarning) as caught:
        first = CompressionScorer([b"What is 1 + 2?"])
        second = CompressionScorer([b"What is 1 + 2?"])
    assert len(caught) == 1 and "native ZIP-FIT scorer unavailable" in str(caught[0].message)
    assert "deliberately_missing.cpp" in zipfit_native.build_failure()
    assert (first.backend, second.backend) == ("python", "python")
    assert first.scores(["What is 1 + 3?", "rock"])[0] > first.scores(["What is 1 + 3?", "rock"])[1]


def small_selection_argv(tmp_path) -> list[str]:
    """`posttrain select` arguments over 20 arithmetic target rows and a pool of 10 arithmetic rows + 10 others,
    keeping 10 (into kept.jsonl, with report.json)."""
    target = generate_task("arithmetic", "eval", 20, seed=0, steps=True, operations="+")
    pool = generate_task("arithmetic", "train", 10, seed=0) + [{"text": "rock paper scissors"}] * 10
    for name, rows in (("target", target), ("pool", pool)):
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return ["--target", str(tmp_path / "target.jsonl"), "--pool", str(tmp_path / "pool.jsonl"), "--keep", "10",
            "--out", str(tmp_path / "kept.jsonl"), "--report", str(tmp_path / "report.json")]  # fmt: skip


@pytest.mark.parametrize("scorer", ["auto", "python"])
def test_select_reports_which_scorer_ran(tmp_path, capsys, scorer):
    argv = small_selection_argv(tmp_path) + ["--scorer", scorer]
    assert main(argv) == 0
    expected = "native" if scorer == "auto" else "python"
    assert json.loads((tmp_path / "report.json").read_text())["scorer"] == expected
    assert f"zipfit ({expected}): kept 10 of 20" in capsys.readouterr().out
