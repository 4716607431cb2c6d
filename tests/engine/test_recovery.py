"""A run survives what goes wrong around it: a corrupted newest checkpoint (resume from the previous valid one,
with a warning), a full disk (one clear error, no staging dir, older checkpoints intact, the rerun resumes), a
crash before the first checkpoint or a rerun of a finished run (metrics.jsonl never holds a step twice).
Every rerun's metrics curve equals the uninterrupted run's."""

import errno
import json
import logging
import shutil
import subprocess

import pytest
import torch
from helpers import compose_config

from posttrain import training
from posttrain.engine.checkpoint import checkpoint_problem, list_checkpoints
from posttrain.errors import DiskFullError
from posttrain.logging import read_metrics
from posttrain.training import run_algorithm

pytestmark = pytest.mark.integration

ARGS = [
    "data.num_train=64",
    "data.num_eval=0",
    "logger.progress_bar=false",
    "train.max_steps=6",
    "checkpoint.every=2",
    "checkpoint.keep_last=5",
    "optim.lr=3e-3",
]
TIMING = ("train_seconds", "tokens_per_second", "step_seconds")


def run(run_dir, *overrides):
    return run_algorithm(compose_config([f"run_dir={run_dir}", *ARGS, *overrides]))


def curve(run_dir) -> list[dict]:
    """Every metrics row without wall-clock timings, in file order."""
    return [
        {k: v for k, v in row.items() if k not in TIMING and not k.endswith("_seconds")}
        for row in read_metrics(run_dir)
    ]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    run_dir = run(tmp_path_factory.mktemp("uninterrupted") / "run")
    assert [row["step"] for row in read_metrics(run_dir)] == [1, 2, 3, 4, 5, 6]
    return run_dir


def crash_at_save(monkeypatch, crash_step: int, after: bool):
    """`training.save` raises a crash at `crash_step`, before or after writing that checkpoint."""
    original = training.save

    def crashing(run, trainer, step):
        if step == crash_step and not after:
            raise KeyboardInterrupt("killed before the checkpoint")
        original(run, trainer, step)
        if step == crash_step:
            raise KeyboardInterrupt("killed after the checkpoint")

    monkeypatch.setattr(training, "save", crashing)


def truncate_model_states(path):
    shard = path / "engine" / "mp_rank_00_model_states.pt"
    shard.write_bytes(shard.read_bytes()[:100])


def remove_trainer_state(path):
    (path / "trainer_state.json").unlink()


def garble_trainer_state(path):  # same size, so only parsing tells
    state = path / "trainer_state.json"
    state.write_text("{" * state.stat().st_size)


def empty_rng(path):
    (path / "rng_rank0.json").write_text("")


@pytest.mark.parametrize("corrupt", [truncate_model_states, remove_trainer_state, garble_trainer_state, empty_rng])
def test_a_corrupted_newest_checkpoint_resumes_from_the_previous_valid_one(uninterrupted, tmp_path, caplog, corrupt):
    run_dir = tmp_path / "run"
    shutil.copytree(uninterrupted, run_dir)
    shutil.rmtree(run_dir / "final")
    corrupt(run_dir / "checkpoints" / "step_6")
    with caplog.at_level(logging.INFO, logger="posttrain"):
        run(run_dir)
    assert "checkpoint" in caplog.text and "step_6 is not usable" in caplog.text
    assert "resumed from" in caplog.text and "step_4 (step 4 of 6)" in caplog.text
    assert curve(run_dir) == curve(uninterrupted)
    assert checkpoint_problem(run_dir / "checkpoints" / "step_6") is None  # rewritten whole
    assert (run_dir / "final" / "model.safetensors").exists()


def test_a_crash_before_the_first_checkpoint_and_a_rerun_of_a_finished_run_never_duplicate_rows(
    uninterrupted, tmp_path, monkeypatch
):
    run_dir = tmp_path / "run"
    with monkeypatch.context() as patch:
        crash_at_save(patch, 2, after=False)
        with pytest.raises(KeyboardInterrupt):
            run(run_dir)
    assert [row["step"] for row in read_metrics(run_dir)] == [1, 2] and not list_checkpoints(run_dir)
    run(run_dir)
    assert curve(run_dir) == curve(uninterrupted)
    finished = (run_dir / "metrics.jsonl").read_bytes()
    run(run_dir)  # a rerun of the finished run only exports again
    assert (run_dir / "metrics.jsonl").read_bytes() == finished


def test_disk_full_is_one_clear_error_and_the_rerun_resumes(uninterrupted, tmp_path, monkeypatch):
    """ENOSPC simulated inside torch.save (DeepSpeed's writer) while checkpoint step_4 is written."""
    run_dir = tmp_path / "run"
    real_save = torch.save

    def full_disk_save(obj, path, *args, **kwargs):
        if ".tmp-step_4" in str(path):
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return real_save(obj, path, *args, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(torch, "save", full_disk_save)
        with pytest.raises(DiskFullError, match=r"^disk full while writing checkpoint .*step_4") as raised:
            run(run_dir)
    assert "\n" not in str(raised.value)
    assert [step for step, _ in list_checkpoints(run_dir)] == [2]
    assert checkpoint_problem(run_dir / "checkpoints" / "step_2") is None
    assert not [p for p in (run_dir / "checkpoints").iterdir() if p.name.startswith(".")]
    run(run_dir)
    assert curve(run_dir) == curve(uninterrupted)


def mount_tmpfs(path, size_bytes: int, remount: bool = False) -> bool:
    options = f"{'remount,' if remount else ''}size={size_bytes}"
    command = (
        ["mount", "-o", options, str(path)] if remount else ["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)]
    )
    return subprocess.run(command, capture_output=True).returncode == 0


def test_a_real_full_tmpfs_ends_with_one_clear_error_and_a_rerun_with_space_resumes(uninterrupted, tmp_path):
    """On a tmpfs with room for one checkpoint and a half (needs permission to mount, e.g. root)."""
    checkpoint = sum(f.stat().st_size for f in (uninterrupted / "checkpoints" / "step_2").rglob("*") if f.is_file())
    other = sum(
        f.stat().st_size
        for f in uninterrupted.rglob("*")
        if f.is_file() and "checkpoints" not in f.parts and "final" not in f.parts
    )
    disk = tmp_path / "disk"
    disk.mkdir()
    if not mount_tmpfs(disk, other + checkpoint * 3 // 2 + 2**18):
        pytest.skip("cannot mount a tmpfs here (needs root / CAP_SYS_ADMIN); the simulated ENOSPC test covers it")
    try:
        run_dir = disk / "run"
        with pytest.raises(DiskFullError, match=r"^disk full while writing checkpoint .*step_4"):
            run(run_dir)
        assert [step for step, _ in list_checkpoints(run_dir)] == [2]
        assert not [p for p in (run_dir / "checkpoints").iterdir() if p.name.startswith(".")]
        with pytest.raises(DiskFullError, match=r"^disk full while writing checkpoint .*step_4"):
            run(run_dir)  # still full: it resumes (no write_config failure) and fails the same clean way
        assert mount_tmpfs(disk, 2**28, remount=True)
        run(run_dir)
        assert curve(run_dir) == curve(uninterrupted)
        assert json.loads((run_dir / "checkpoints" / "step_6" / "trainer_state.json").read_text())["step"] == 6
    finally:
        subprocess.run(["umount", str(disk)], capture_output=True)
