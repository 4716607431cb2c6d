"""Metrics to the console (progress bar), `metrics.jsonl` in the run dir, and optionally wandb.

wandb runs offline unless WANDB_API_KEY is set, so a run never stops to ask for a login.
Only rank 0 logs.
"""

from __future__ import annotations

import errno
import json
import logging
import math
import os
from pathlib import Path
from typing import Any

from posttrain.engine.distributed import is_main_process
from posttrain.errors import DiskFullError

log = logging.getLogger("posttrain")


def setup_console_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="[posttrain %(asctime)s] %(message)s", datefmt="%H:%M:%S")
    for noisy in ("DeepSpeed", "deepspeed", "torch.distributed", "httpx", "datasets"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _keep_rows_before(path: Path, start_step: int) -> None:
    """Drop the records a run resumed at `start_step` logs again, atomically: every record of a run restarted
    from step 0 (its step-0 eval included), else those of steps after `start_step` (the record of step
    `start_step` itself was logged before its checkpoint was written, and that step is not redone)."""
    if not path.exists():
        return
    kept = []
    for line in path.read_text(errors="replace").splitlines():
        try:
            step = json.loads(line).get("step", 0) if line.strip() else None
        except ValueError:  # a row cut short by a kill or a full disk: it is logged again
            log.warning("metrics.jsonl: dropping a partly written row (%s...)", line[:60])
            continue
        if step is not None and start_step > 0 and step <= start_step:
            kept.append(line)
    staging = path.with_suffix(".jsonl.tmp")
    staging.write_text("".join(line + "\n" for line in kept))
    os.replace(staging, path)


class MetricsLogger:
    def __init__(self, run_dir: Path, logger_cfg, config: dict, total_steps: int, start_step: int = 0):
        """`config`: the run's resolved config, handed to wandb as the run's config (its hyperparameters)."""
        self.enabled = is_main_process()
        self.path = Path(run_dir) / "metrics.jsonl"
        self.cfg = logger_cfg
        self.progress = None
        self.wandb_run = None
        if not self.enabled:
            return
        _keep_rows_before(self.path, start_step)
        if logger_cfg.progress_bar:
            from tqdm.auto import tqdm

            self.progress = tqdm(total=total_steps, initial=start_step, desc="train", dynamic_ncols=True)
        if logger_cfg.wandb:
            self.wandb_run = self._init_wandb(run_dir, config)

    def _init_wandb(self, run_dir: Path, config: dict):
        import wandb

        mode = "online" if os.environ.get("WANDB_API_KEY") else "offline"
        os.environ.setdefault("WANDB_SILENT", "true")
        return wandb.init(
            project=self.cfg.project,
            dir=str(run_dir),
            config=config,
            mode=mode,
            name=Path(run_dir).name,
            settings=wandb.Settings(console="off", x_disable_stats=True),
        )

    def log(self, step: int, metrics: dict[str, float]) -> None:
        if not self.enabled:
            return
        record = {
            "step": step,
            **{k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in metrics.items()},
        }
        try:
            with self.path.open("a") as handle:
                handle.write(json.dumps(record) + "\n")
        except OSError as error:
            if error.errno in (errno.ENOSPC, errno.EDQUOT):
                raise DiskFullError(
                    f"disk full while appending step {step} to {self.path}: free space and rerun the same command "
                    "(it resumes from the newest checkpoint and drops the rows after it)"
                ) from None
            raise
        if self.wandb_run is not None:
            self.wandb_run.log(metrics, step=step)
        if self.progress is not None:
            self.progress.update(step - self.progress.n)
            self.progress.set_postfix(
                {k: f"{v:.4g}" for k, v in metrics.items() if k in ("loss", "lr", "reward_mean", "accuracy")}
            )

    def log_if_any(self, step: int, metrics: dict[str, float]) -> None:
        """`log` unless `metrics` is empty (an algorithm with nothing to evaluate)."""
        if metrics:
            self.log(step, metrics)

    def close(self) -> None:
        if self.progress is not None:
            self.progress.close()
        if self.wandb_run is not None:
            self.wandb_run.finish()
