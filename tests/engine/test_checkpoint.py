"""Atomic, verified checkpoints: a save that dies part-way (or on a full disk) never becomes a checkpoint resume
would pick; a corrupted one is skipped with a warning; nothing in a checkpoint is unpickled."""

import errno
import json
import logging
import os
import pickle
import random
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from posttrain.engine import checkpoint
from posttrain.engine.checkpoint import (
    CheckpointError,
    checkpoint_problem,
    latest_checkpoint,
    latest_valid_checkpoint,
    list_checkpoints,
    load_checkpoint,
    restore_rng_state,
    rng_state,
    save_checkpoint,
)
from posttrain.errors import DiskFullError


class FakeEngine:
    """Writes a shard like DeepSpeed's save_checkpoint; optionally dies half-way."""

    def __init__(self, die=False):
        self.die = die

    def save_checkpoint(self, save_dir, tag, save_latest):
        (Path(save_dir) / tag).mkdir()
        (Path(save_dir) / tag / "shard.pt").write_text("half")
        if self.die:
            raise KeyboardInterrupt("killed during save")


def test_interrupted_save_is_invisible_and_cleaned_next_time(tmp_path):
    save_checkpoint(FakeEngine(), tmp_path, 2, {"algo": "sft"}, keep_last=3)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(FakeEngine(die=True), tmp_path, 4, {"algo": "sft"}, keep_last=3)
    assert (tmp_path / "checkpoints" / ".tmp-step_4").exists()
    assert latest_checkpoint(tmp_path).name == "step_2"
    save_checkpoint(FakeEngine(), tmp_path, 4, {"algo": "sft"}, keep_last=3)
    assert latest_checkpoint(tmp_path).name == "step_4"
    assert not (tmp_path / "checkpoints" / ".tmp-step_4").exists()
    assert json.loads((tmp_path / "checkpoints" / "step_4" / "trainer_state.json").read_text())["step"] == 4


def test_keep_last_prunes_oldest(tmp_path):
    for step in (1, 2, 3, 4):
        save_checkpoint(FakeEngine(), tmp_path, step, {}, keep_last=2)
    assert [step for step, _ in list_checkpoints(tmp_path)] == [3, 4]


def test_resaving_a_step_replaces_it(tmp_path):
    save_checkpoint(FakeEngine(), tmp_path, 5, {"version": 1}, keep_last=2)
    save_checkpoint(FakeEngine(), tmp_path, 5, {"version": 2}, keep_last=2)
    assert json.loads((tmp_path / "checkpoints" / "step_5" / "trainer_state.json").read_text())["version"] == 2
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["step_5"]


# --- verified checkpoints: a manifest written last, fall-back to the newest valid one -------------------------


def corrupt_truncated_model_states(path):
    shard = path / "engine" / "shard.pt"
    shard.write_text(shard.read_text()[:2])


def corrupt_missing_trainer_state(path):
    (path / "trainer_state.json").unlink()


def corrupt_broken_trainer_state(path):
    (path / "trainer_state.json").write_text('{"step": 4, "algo": "s')


def corrupt_empty_rng(path):
    (path / "rng_rank0.json").write_text("")


def corrupt_missing_rng(path):
    (path / "rng_rank0.json").unlink()


def corrupt_same_size_garbage_rng(path):
    rng = path / "rng_rank0.json"
    rng.write_text("x" * rng.stat().st_size)


def corrupt_missing_manifest(path):
    (path / "manifest.json").unlink()


def corrupt_broken_manifest(path):
    (path / "manifest.json").write_text("{")


@pytest.mark.parametrize(
    "corrupt, problem",
    [
        (corrupt_truncated_model_states, r"engine/shard.pt is 2 bytes, the manifest says 4 \(truncated"),
        (corrupt_missing_trainer_state, r"trainer_state.json is missing"),
        (corrupt_broken_trainer_state, r"trainer_state.json is"),
        (corrupt_empty_rng, r"rng_rank0.json is 0 bytes"),
        (corrupt_missing_rng, r"rng_rank0.json is missing"),
        (corrupt_same_size_garbage_rng, r"rng_rank0.json is not valid JSON"),
        (corrupt_missing_manifest, r"no manifest.json"),
        (corrupt_broken_manifest, r"manifest.json is unreadable"),
    ],
)
def test_a_corrupted_newest_checkpoint_falls_back_to_the_previous_with_a_warning(tmp_path, caplog, corrupt, problem):
    save_checkpoint(FakeEngine(), tmp_path, 2, {"algo": "sft"}, keep_last=3)
    save_checkpoint(FakeEngine(), tmp_path, 4, {"algo": "sft"}, keep_last=3)
    assert latest_valid_checkpoint(tmp_path).name == "step_4"
    corrupt(tmp_path / "checkpoints" / "step_4")
    with caplog.at_level(logging.WARNING, logger="posttrain"):
        assert latest_valid_checkpoint(tmp_path).name == "step_2"
    assert re.search(problem, caplog.text), caplog.text
    assert "step_4" in caplog.text


def test_every_checkpoint_broken_is_an_error_not_a_silent_restart(tmp_path):
    save_checkpoint(FakeEngine(), tmp_path, 2, {"algo": "sft"}, keep_last=3)
    corrupt_empty_rng(tmp_path / "checkpoints" / "step_2")
    with pytest.raises(CheckpointError, match=r"no usable checkpoint .*step_2: rng_rank0.json is 0 bytes"):
        latest_valid_checkpoint(tmp_path)


def test_manifest_lists_every_file_with_its_size(tmp_path):
    path = save_checkpoint(FakeEngine(), tmp_path, 2, {"algo": "sft"}, keep_last=3)
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["files"] == {
        "engine/shard.pt": 4,
        "rng_rank0.json": (path / "rng_rank0.json").stat().st_size,
        "trainer_state.json": (path / "trainer_state.json").stat().st_size,
    }
    assert checkpoint_problem(path) is None


def test_rng_state_round_trips_through_json(tmp_path):
    random.seed(3), np.random.seed(3), torch.manual_seed(3)
    state = json.loads(json.dumps(rng_state()))
    expected = (random.random(), np.random.rand(), torch.rand(3))
    random.seed(9), np.random.seed(9), torch.manual_seed(9)
    restore_rng_state(state)
    assert (random.random(), np.random.rand()) == expected[:2] and torch.equal(torch.rand(3), expected[2])


# --- a full disk: one clear error, no staging dir left, older checkpoints intact ------------------------------


class DiskFullEngine(FakeEngine):
    def __init__(self, error):
        super().__init__()
        self.error = error

    def save_checkpoint(self, save_dir, tag, save_latest):
        (Path(save_dir) / tag).mkdir()
        (Path(save_dir) / tag / "shard.pt").write_text("ha")
        raise self.error


@pytest.mark.parametrize(
    "error",
    [
        OSError(errno.ENOSPC, "No space left on device"),
        RuntimeError(
            "[enforce fail at inline_container.cc:858] . PytorchStreamWriter failed writing file data/0: "
            "file write failed"
        ),
    ],  # fmt: skip
)
def test_disk_full_during_a_save_removes_the_staging_dir_and_keeps_older_checkpoints(tmp_path, monkeypatch, error):
    save_checkpoint(FakeEngine(), tmp_path, 2, {"algo": "sft"}, keep_last=3)
    before = sorted((p.relative_to(tmp_path), p.read_bytes()) for p in tmp_path.rglob("*") if p.is_file())
    if isinstance(error, RuntimeError):  # torch.save's message names no errno: the free space tells
        monkeypatch.setattr(checkpoint.shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10, 10, 0))
    with pytest.raises(DiskFullError, match=r"^disk full while writing checkpoint .*step_4 .*rerun") as raised:
        save_checkpoint(DiskFullEngine(error), tmp_path, 4, {"algo": "sft"}, keep_last=3)
    assert "\n" not in str(raised.value)
    assert not (tmp_path / "checkpoints" / ".tmp-step_4").exists()
    after = sorted((p.relative_to(tmp_path), p.read_bytes()) for p in tmp_path.rglob("*") if p.is_file())
    assert after == before
    assert latest_valid_checkpoint(tmp_path).name == "step_2"


def test_other_write_errors_are_not_called_disk_full(tmp_path):
    with pytest.raises(RuntimeError, match="something else"):
        save_checkpoint(DiskFullEngine(RuntimeError("something else")), tmp_path, 4, {}, keep_last=3)


# --- nothing unpickled: a crafted pickle RNG file runs nothing ----------------------------------------------


class RunsCommand:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_crafted_pickle_rng_file_is_refused_and_runs_nothing(tmp_path):
    path = save_checkpoint(FakeEngine(), tmp_path, 2, {"algo": "sft"}, keep_last=3)
    marker = tmp_path / "pwned"
    (path / "rng_rank0.pt").write_bytes(pickle.dumps({"torch": RunsCommand(marker)}))
    engine = LoadingEngine()
    with pytest.raises(CheckpointError, match=r"rng_rank0.pt, a pickled RNG state, which posttrain does not load"):
        load_checkpoint(engine, path)
    assert not marker.exists() and engine.loads == 0


class LoadingEngine:
    loads = 0

    def load_checkpoint(self, *args, **kwargs):
        self.loads += 1
        return "loaded", {}
