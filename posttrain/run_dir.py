"""The run directory contract shared by every trainer.

run_dir/.posttrain.lock       held (flock) by the one process running in this directory: its host and pid
run_dir/config.yaml           the resolved config
run_dir/metrics.jsonl         one JSON object per logged step
run_dir/tokenizer/            the locally trained tokenizer (tiny model only)
run_dir/checkpoints/step_<N>/ atomic, verified checkpoints (engine shards, RNG, trainer state, manifest)
run_dir/final/                a Hugging Face model directory (safetensors, tokenizer, chat template)
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import socket
from pathlib import Path

from omegaconf import OmegaConf

from posttrain.engine.checkpoint import checkpoint_problem, latest_valid_checkpoint, list_checkpoints
from posttrain.engine.distributed import is_main_process
from posttrain.errors import ConfigError, DiskFullError

log = logging.getLogger("posttrain")

LOCK_FILE = ".posttrain.lock"
_held: dict[Path, tuple[int, bool]] = {}  # run dir -> (open lock file descriptor, whether we created the dir)


def resume_point(run_dir: Path, resume: str) -> Path | None:
    """The checkpoint to resume from, per `resume` (auto: the newest valid one | never | a checkpoint path)."""
    if resume not in ("auto", "never"):
        path = Path(resume)
        if not (path / "trainer_state.json").exists():
            raise ConfigError(f"resume={resume} is not a posttrain checkpoint directory (no trainer_state.json)")
        problem = checkpoint_problem(path)
        if problem is not None:
            raise ConfigError(f"resume={resume} is not a usable checkpoint: {problem}")
        return path
    if resume == "never":
        existing = list_checkpoints(run_dir)
        if existing:
            raise ConfigError(
                f"run_dir {run_dir} already holds checkpoints (newest: {existing[-1][1].name}); "
                "pass resume=auto to continue it, or choose another run_dir"
            )
        return None
    return latest_valid_checkpoint(run_dir)


def write_config(run_dir: Path, cfg) -> None:
    """Save the resolved config as run_dir/config.yaml (atomically, rank 0); a resumed run whose config is
    unchanged writes nothing (so a rerun on a full disk still gets to its checkpoint)."""
    if not is_main_process():
        return
    run_dir.mkdir(parents=True, exist_ok=True)
    text = OmegaConf.to_yaml(cfg, resolve=True)
    target = run_dir / "config.yaml"
    if target.is_file() and target.read_text() == text:
        return
    staging = run_dir / ".config.yaml.tmp"
    try:
        staging.write_text(text)
    except OSError as error:
        staging.unlink(missing_ok=True)
        if error.errno in (errno.ENOSPC, errno.EDQUOT):
            raise DiskFullError(f"disk full while writing {target}: free space and rerun the same command") from None
        raise
    os.replace(staging, target)


def _holder(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def lock_run_dir(run_dir: Path) -> None:
    """Make this process the only one running in `run_dir` (rank 0; re-entrant within a process).

    An exclusive `flock` on run_dir/.posttrain.lock, which names the holder's host and pid. Another live holder:
    ConfigError naming its pid (exit 2). The kernel drops a dead process's flock, so a lock file left by a killed
    run is simply taken over, with a warning naming the dead pid. The directory is created if needed (and removed
    again by `unlock_run_dir` if the run wrote nothing else)."""
    run_dir = Path(run_dir).resolve()
    if not is_main_process() or run_dir in _held:
        return
    created = not run_dir.exists()
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / LOCK_FILE
    while True:
        descriptor = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(descriptor)
            holder = _holder(path)
            raise ConfigError(
                f"run_dir {run_dir} is in use by pid {holder.get('pid', '?')} on host {holder.get('host', '?')} "
                f"(lock {path}); wait for that run to finish, stop it, or choose another run_dir"
            ) from None
        # The holder may have unlinked the file between our open and flock: lock the file now at `path`.
        if path.exists() and os.stat(path).st_ino == os.fstat(descriptor).st_ino:
            break
        os.close(descriptor)
    previous = _holder(path)
    if previous.get("pid") and previous.get("pid") != os.getpid():
        same_host = previous.get("host") == socket.gethostname()
        state = "dead" if same_host and not _pid_alive(int(previous["pid"])) else "no longer holding it"
        log.warning(
            "run_dir %s: taking over the lock of pid %s on host %s (%s); that run stopped without releasing it",
            run_dir, previous["pid"], previous.get("host", "?"), state,
        )  # fmt: skip
    os.ftruncate(descriptor, 0)
    os.write(descriptor, json.dumps({"host": socket.gethostname(), "pid": os.getpid()}).encode())
    os.fsync(descriptor)
    _held[run_dir] = (descriptor, created)


def unlock_run_dir(run_dir: Path) -> None:
    """Release `lock_run_dir`'s lock; a run dir this process created and left empty is removed."""
    run_dir = Path(run_dir).resolve()
    held = _held.pop(run_dir, None)
    if held is None:
        return
    descriptor, created = held
    (run_dir / LOCK_FILE).unlink(missing_ok=True)  # before unlocking, so no one locks a file about to vanish
    os.close(descriptor)
    if created and not any(run_dir.iterdir()):
        run_dir.rmdir()
