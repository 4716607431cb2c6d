"""Atomic, verified checkpoints: `checkpoints/step_<N>/` appears only once complete, and resume checks it first.

A checkpoint is written into `checkpoints/.tmp-step_<N>/` by every rank (DeepSpeed model / optimizer /
scheduler shards, each rank's RNG state as JSON), rank 0's trainer state and the trainer's own files (RLVR's
refreshed reference: `write_extra`); after a barrier rank 0 writes `manifest.json` (every file and its size)
last, flushes the directory to disk and renames it into place (rename is atomic on POSIX), then prunes to the
newest `keep_last`. A save that fails (a full disk) removes its staging
directory and leaves the older checkpoints as they were.

Nothing is unpickled with arbitrary globals: the RNG state is JSON, and DeepSpeed's shards are read with
`torch.load(weights_only=True)` (forced through torch's documented TORCH_FORCE_WEIGHTS_ONLY_LOAD while DeepSpeed
loads; the few plain DeepSpeed classes its optimizer states hold are allow-listed), so a crafted file fails to
load instead of running code.

On resume `latest_valid_checkpoint` walks back from the newest checkpoint to the newest one whose manifest
matches the files on disk and whose JSON files parse, warning about each one it skips and why.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import pickle
import random
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from posttrain.engine.distributed import barrier, is_main_process, rank
from posttrain.errors import DiskFullError, PosttrainError

log = logging.getLogger("posttrain")

STEP_DIR = re.compile(r"^step_(\d+)$")
MANIFEST = "manifest.json"
TRAINER_STATE = "trainer_state.json"
NEARLY_FULL_BYTES = 16 * 2**20  # a write error with less free space than this is a full disk
RNG_FILE = re.compile(r"^rng_rank(\d+)\.json$")


class CheckpointError(PosttrainError):
    """A checkpoint must not be loaded (unsafe content), or no checkpoint in the run dir is usable."""


def checkpoint_root(run_dir: Path) -> Path:
    return Path(run_dir) / "checkpoints"


def list_checkpoints(run_dir: Path) -> list[tuple[int, Path]]:
    """Complete (renamed into place) checkpoints as (step, path), oldest first; not yet verified."""
    root = checkpoint_root(run_dir)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), path) for path in root.iterdir() if (m := STEP_DIR.match(path.name)) and path.is_dir()]
    return sorted(found)


def latest_checkpoint(run_dir: Path) -> Path | None:
    checkpoints = list_checkpoints(run_dir)
    return checkpoints[-1][1] if checkpoints else None


def rng_file(rank_index: int) -> str:
    return f"rng_rank{rank_index}.json"


def rng_state() -> dict[str, Any]:
    """This process's Python, NumPy and torch (CPU, CUDA) RNG states as plain JSON values."""
    version, internal, gauss = random.getstate()
    kind, keys, position, has_gauss, cached = np.random.get_state()
    state = {
        "python": [version, list(internal), gauss],
        "numpy": [kind, keys.tolist(), int(position), int(has_gauss), float(cached)],
        "torch": torch.get_rng_state().tolist(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state().tolist()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, position, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), position, has_gauss, cached))
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(torch.tensor(state["cuda"], dtype=torch.uint8))


def _fsync_tree(path: Path) -> None:
    for file in path.rglob("*"):
        if file.is_file():
            with file.open("rb") as handle:
                os.fsync(handle.fileno())
    directory = os.open(path, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)


def file_sizes(directory: Path) -> dict[str, int]:
    """{relative path: size in bytes} of every file under `directory` but the manifest."""
    return {
        str(file.relative_to(directory)): file.stat().st_size
        for file in sorted(directory.rglob("*"))
        if file.is_file() and file.name != MANIFEST
    }


def is_disk_full(error: BaseException, directory: Path) -> bool:
    """ENOSPC / EDQUOT raised directly (open, write), or any write error while `directory`'s file system has
    (almost) no space left: torch.save reports a full disk only as "file write failed"."""
    if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    text = str(error).lower()
    if "no space left on device" in text or "disk quota exceeded" in text:
        return True
    try:
        return shutil.disk_usage(directory if directory.exists() else directory.parent).free < NEARLY_FULL_BYTES
    except OSError:
        return False


def remove_staging_dirs(run_dir: Path) -> None:
    """Remove `.tmp-step_*` / `.old-step_*` directories a killed save left behind (rank 0)."""
    root = checkpoint_root(run_dir)
    if is_main_process() and root.is_dir():
        for leftover in root.iterdir():
            if leftover.name.startswith((".tmp-step_", ".old-step_")) and leftover.is_dir():
                shutil.rmtree(leftover, ignore_errors=True)


def _write_staging(engine, staging: Path, step: int, trainer_state: dict[str, Any], write_extra) -> None:
    engine.save_checkpoint(str(staging), tag="engine", save_latest=False)
    if write_extra is not None:
        write_extra(staging)
    (staging / rng_file(rank())).write_text(json.dumps(rng_state()))
    if is_main_process():
        (staging / TRAINER_STATE).write_text(json.dumps({**trainer_state, "step": step}, indent=2))


def save_checkpoint(
    engine,
    run_dir: Path,
    step: int,
    trainer_state: dict[str, Any],
    keep_last: int,
    write_extra: Callable[[Path], None] | None = None,
) -> Path:
    """Write checkpoint `step` atomically on all ranks; returns its final path. `write_extra(directory)`, called
    on every rank after the engine's shards, adds files of the trainer's own (covered by the manifest like the
    rest). A full disk raises DiskFullError (one line) after removing the staging directory; older checkpoints
    are untouched."""
    root = checkpoint_root(run_dir)
    final = root / f"step_{step}"
    staging = root / f".tmp-step_{step}"
    try:
        if is_main_process():
            shutil.rmtree(staging, ignore_errors=True)  # a save killed earlier left this behind
            staging.mkdir(parents=True)
        barrier()
        _write_staging(engine, staging, step, trainer_state, write_extra)
        barrier()
        if is_main_process():
            manifest = {"step": step, "files": file_sizes(staging)}
            (staging / MANIFEST).write_text(json.dumps(manifest, indent=1))  # last: its presence means complete
            _fsync_tree(staging)
    except (OSError, RuntimeError) as error:
        if not is_disk_full(error, root):
            raise
        shutil.rmtree(staging, ignore_errors=True)
        raise DiskFullError(
            f"disk full while writing checkpoint {final} (no space left on device); its staging directory was "
            f"removed and the older checkpoints are intact: free space (or lower checkpoint.keep_last) and rerun "
            "the same command to resume"
        ) from None
    if is_main_process():
        if final.exists():  # the same step saved again (e.g. at the end of training): replace it
            retired = root / f".old-step_{step}"
            os.rename(final, retired)
            os.rename(staging, final)
            shutil.rmtree(retired)
        else:
            os.rename(staging, final)
        for _, old in list_checkpoints(run_dir)[:-keep_last] if keep_last > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
    barrier()
    return final


def checkpoint_problem(path: Path) -> str | None:
    """What is wrong with checkpoint `path` (a missing or broken manifest, a file missing, truncated or grown,
    a trainer state or RNG file that does not parse), or None when it is complete."""
    try:
        manifest = json.loads((path / MANIFEST).read_text())
        expected = {str(name): int(size) for name, size in manifest["files"].items()}
    except FileNotFoundError:
        return f"no {MANIFEST} (the save never finished, or an older posttrain wrote it)"
    except (ValueError, KeyError, TypeError, AttributeError, OSError) as error:
        return f"{MANIFEST} is unreadable ({type(error).__name__}: {error})"
    for name, size in expected.items():
        file = path / name
        if not file.is_file():
            return f"{name} is missing"
        if file.stat().st_size != size:
            return f"{name} is {file.stat().st_size} bytes, the manifest says {size} (truncated or overwritten)"
    if TRAINER_STATE not in expected:
        return f"the manifest lists no {TRAINER_STATE}"
    if not any(RNG_FILE.match(name) for name in expected):
        return "the manifest lists no RNG state file"
    for name in expected:
        if name == TRAINER_STATE or RNG_FILE.match(name):
            try:
                json.loads((path / name).read_text())
            except (ValueError, OSError) as error:
                return f"{name} is not valid JSON ({error})"
    return None


def latest_valid_checkpoint(run_dir: Path) -> Path | None:
    """The newest checkpoint that passes `checkpoint_problem`; each newer one skipped is named with a warning.
    Raises CheckpointError when checkpoints exist but none is valid (a silent restart would lose the run)."""
    checkpoints = list_checkpoints(run_dir)
    problems = []
    for _, path in reversed(checkpoints):
        problem = checkpoint_problem(path)
        if problem is None:
            return path
        problems.append(f"{path.name}: {problem}")
        log.warning("checkpoint %s is not usable: %s; falling back to an older checkpoint", path, problem)
    if problems:
        raise CheckpointError(
            f"no usable checkpoint in {checkpoint_root(run_dir)} ({'; '.join(problems)}); move the checkpoints "
            "away to start over, or choose another run_dir"
        )
    return None


def _deepspeed_safe_globals() -> list:
    """The plain DeepSpeed classes ZeRO optimizer states pickle (loss scaler, ZeRO stage enum, fragment maps)."""
    found = []
    for module, names in (
        ("deepspeed.runtime.fp16.loss_scaler", ("LossScaler", "DynamicLossScaler", "LossScalerBase")),
        ("deepspeed.runtime.zero.config", ("ZeroStageEnum",)),
        ("deepspeed.utils.tensor_fragment", ("fragment_address",)),
    ):
        try:
            imported = __import__(module, fromlist=list(names))
        except ImportError:
            continue
        found += [getattr(imported, name) for name in names if hasattr(imported, name)]
    return found


@contextlib.contextmanager
def weights_only_loading():
    """Every torch.load in this block (DeepSpeed's included, which pass weights_only=False) loads weights only."""
    previous = os.environ.get("TORCH_FORCE_WEIGHTS_ONLY_LOAD")
    os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = "1"
    try:
        with torch.serialization.safe_globals(_deepspeed_safe_globals()):
            yield
    finally:
        if previous is None:
            os.environ.pop("TORCH_FORCE_WEIGHTS_ONLY_LOAD", None)
        else:
            os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = previous


def load_checkpoint(engine, path: Path) -> dict[str, Any]:
    """Restore model, optimizer, scheduler and this rank's RNG from `path`; returns the trainer state."""
    legacy = sorted(file.name for file in path.glob("rng_rank*.pt"))
    if legacy:
        raise CheckpointError(
            f"{path} holds {legacy[0]}, a pickled RNG state, which posttrain does not load (unpickling can run "
            "code); resume from a checkpoint this posttrain wrote, or start a new run_dir"
        )
    try:
        with weights_only_loading():
            load_path, _ = engine.load_checkpoint(
                str(path), tag="engine", load_optimizer_states=True, load_lr_scheduler_states=True
            )
    except Exception as error:
        if "weights_only" in str(error) or isinstance(error, pickle.UnpicklingError):
            raise CheckpointError(
                f"{path}: a DeepSpeed shard holds objects beyond tensors and plain data, refused by "
                f"torch.load(weights_only=True) ({str(error).splitlines()[0]}); posttrain does not unpickle "
                "arbitrary objects: resume from a checkpoint you trust that this posttrain wrote"
            ) from None
        raise
    if load_path is None:
        raise RuntimeError(f"DeepSpeed could not load the checkpoint in {path}")
    trainer_state = json.loads((path / TRAINER_STATE).read_text())
    own = path / rng_file(rank())
    if own.exists():
        restore_rng_state(json.loads(own.read_text()))
    else:  # written by fewer ranks: this rank's random stream cannot continue exactly
        log.warning("%s has no RNG state for rank %d; its random stream starts afresh", path, rank())
    return trainer_state
