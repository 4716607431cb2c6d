"""Atomic checkpoints: `checkpoints/step_<N>/` appears only once complete, so resume never picks a half one.

A checkpoint is written into `checkpoints/.tmp-step_<N>/` by every rank (DeepSpeed model / optimizer /
scheduler shards, each rank's RNG state) and rank 0's trainer state; after a barrier rank 0 flushes it
to disk and renames it into place (rename is atomic on POSIX), then prunes to the newest `keep_last`.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from posttrain.engine.distributed import barrier, is_main_process, rank

STEP_DIR = re.compile(r"^step_(\d+)$")


def checkpoint_root(run_dir: Path) -> Path:
    return Path(run_dir) / "checkpoints"


def list_checkpoints(run_dir: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints as (step, path), oldest first."""
    root = checkpoint_root(run_dir)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), path) for path in root.iterdir() if (m := STEP_DIR.match(path.name)) and path.is_dir()]
    return sorted(found)


def latest_checkpoint(run_dir: Path) -> Path | None:
    checkpoints = list_checkpoints(run_dir)
    return checkpoints[-1][1] if checkpoints else None


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


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


def save_checkpoint(engine, run_dir: Path, step: int, trainer_state: dict[str, Any], keep_last: int) -> Path:
    """Write checkpoint `step` atomically on all ranks; returns its final path."""
    root = checkpoint_root(run_dir)
    final = root / f"step_{step}"
    staging = root / f".tmp-step_{step}"
    if is_main_process():
        shutil.rmtree(staging, ignore_errors=True)  # a save killed earlier left this behind
        staging.mkdir(parents=True)
    barrier()
    engine.save_checkpoint(str(staging), tag="engine", save_latest=False)
    torch.save(rng_state(), staging / f"rng_rank{rank()}.pt")
    if is_main_process():
        (staging / "trainer_state.json").write_text(json.dumps({**trainer_state, "step": step}, indent=2))
    barrier()
    if is_main_process():
        _fsync_tree(staging)
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


def load_checkpoint(engine, path: Path) -> dict[str, Any]:
    """Restore model, optimizer, scheduler and this rank's RNG from `path`; returns the trainer state."""
    load_path, _ = engine.load_checkpoint(
        str(path), tag="engine", load_optimizer_states=True, load_lr_scheduler_states=True
    )
    if load_path is None:
        raise RuntimeError(f"DeepSpeed could not load the checkpoint in {path}")
    trainer_state = json.loads((path / "trainer_state.json").read_text())
    rng_file = path / f"rng_rank{rank()}.pt"
    if rng_file.exists():
        restore_rng_state(torch.load(rng_file, weights_only=False))
    return trainer_state
