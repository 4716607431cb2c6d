"""The run dir: one process per run dir (an exclusive lock naming its holder; a second run exits 2 naming the
first's pid; a lock left by a killed run is taken over with a warning), and a full disk while writing the config or
a metrics row is one line."""

import errno
import json
import logging
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import cli_env, run_posttrain
from omegaconf import OmegaConf

from posttrain.errors import DiskFullError
from posttrain.logging import MetricsLogger
from posttrain.run_dir import LOCK_FILE, lock_run_dir, unlock_run_dir, write_config

HOLD = "import sys, time; from posttrain.run_dir import lock_run_dir; lock_run_dir(sys.argv[1]); print('locked', flush=True); time.sleep(120)"  # noqa: E501


def hold_lock(run_dir) -> subprocess.Popen:
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(run_dir)], env=cli_env(), stdout=subprocess.PIPE, text=True
    )
    assert holder.stdout.readline().strip() == "locked"
    return holder


def test_a_second_run_on_a_locked_run_dir_exits_2_naming_the_first_pid_and_writes_nothing(tmp_path):
    run_dir = tmp_path / "run"
    holder = hold_lock(run_dir)
    try:
        assert json.loads((run_dir / LOCK_FILE).read_text())["pid"] == holder.pid
        result = run_posttrain(f"run_dir={run_dir}", "train.max_steps=2", "logger.progress_bar=false", timeout=300)
        assert result.returncode == 2, result.stderr[-2000:]
        assert f"is in use by pid {holder.pid} on host" in result.stderr
        assert "Traceback" not in result.stderr
        assert [p.name for p in run_dir.iterdir()] == [LOCK_FILE]  # no config.yaml, metrics or checkpoints
    finally:
        holder.kill()
        holder.wait()


def test_a_lock_left_by_a_killed_run_is_taken_over_with_a_warning(tmp_path, caplog):
    run_dir = tmp_path / "run"
    holder = hold_lock(run_dir)
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    assert json.loads((run_dir / LOCK_FILE).read_text())["pid"] == holder.pid  # the dead run's lock file stays
    with caplog.at_level(logging.WARNING, logger="posttrain"):
        lock_run_dir(run_dir)
    try:
        assert f"taking over the lock of pid {holder.pid}" in caplog.text and "(dead)" in caplog.text
        assert json.loads((run_dir / LOCK_FILE).read_text())["pid"] == os.getpid()
    finally:
        unlock_run_dir(run_dir)
    assert not (run_dir / LOCK_FILE).exists()


def test_unlock_removes_a_run_dir_the_lock_created_and_nothing_else(tmp_path):
    fresh, existing = tmp_path / "fresh", tmp_path / "existing"
    existing.mkdir()
    for run_dir in (fresh, existing):
        lock_run_dir(run_dir)
        lock_run_dir(run_dir)  # re-entrant within one process
        assert (run_dir / LOCK_FILE).exists()
        unlock_run_dir(run_dir)
    assert not fresh.exists() and existing.is_dir() and not any(existing.iterdir())


def enospc(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


def test_write_config_on_a_full_disk_is_one_line_and_an_unchanged_config_is_not_rewritten(tmp_path, monkeypatch):
    cfg = OmegaConf.create({"seed": 1, "run_dir": str(tmp_path)})
    write_config(tmp_path, cfg)
    before = (tmp_path / "config.yaml").read_text()
    monkeypatch.setattr(Path, "write_text", enospc)
    write_config(tmp_path, cfg)  # a resumed run with the same config writes nothing, so a full disk is no obstacle
    with pytest.raises(DiskFullError, match=r"^disk full while writing .*config.yaml: free space and rerun"):
        write_config(tmp_path, OmegaConf.create({"seed": 2, "run_dir": str(tmp_path)}))
    assert (tmp_path / "config.yaml").read_text() == before
    assert not (tmp_path / ".config.yaml.tmp").exists()


def test_a_metrics_row_on_a_full_disk_is_one_line(tmp_path, monkeypatch):
    logger_cfg = OmegaConf.create({"progress_bar": False, "wandb": False, "log_every": 1})
    logger = MetricsLogger(tmp_path, logger_cfg, {}, total_steps=4)
    logger.log(1, {"loss": 1.0})
    monkeypatch.setattr(Path, "open", enospc)
    with pytest.raises(DiskFullError, match=r"^disk full while appending step 2 to .*metrics.jsonl"):
        logger.log(2, {"loss": 0.5})


def test_a_partly_written_metrics_row_is_dropped_on_resume(tmp_path):
    rows = [json.dumps({"step": step, "loss": 1.0 / step}) for step in (1, 2, 3)]
    (tmp_path / "metrics.jsonl").write_text("\n".join(rows) + '\n{"step": 4, "lo')
    logger_cfg = OmegaConf.create({"progress_bar": False, "wandb": False, "log_every": 1})
    MetricsLogger(tmp_path, logger_cfg, {}, total_steps=6, start_step=2).close()
    assert (tmp_path / "metrics.jsonl").read_text() == "\n".join(rows[:2]) + "\n"
    (tmp_path / "metrics.jsonl").write_text(rows[0] + '\n{"step": 2, "lo')
    MetricsLogger(tmp_path, logger_cfg, {}, total_steps=6, start_step=2).close()
    assert (tmp_path / "metrics.jsonl").read_text() == rows[0] + "\n"
