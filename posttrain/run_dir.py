"""The run directory contract shared by every trainer.

run_dir/config.yaml           the resolved config
run_dir/metrics.jsonl         one JSON object per logged step
run_dir/tokenizer/            the locally trained tokenizer (tiny model only)
run_dir/checkpoints/step_<N>/ atomic checkpoints (engine shards, RNG, trainer state)
run_dir/final/                a Hugging Face model directory (safetensors, tokenizer, chat template)
"""

from __future__ import annotations

import os
from pathlib import Path

from omegaconf import OmegaConf

from posttrain.engine.checkpoint import latest_checkpoint
from posttrain.engine.distributed import is_main_process
from posttrain.errors import ConfigError


def resume_point(run_dir: Path, resume: str) -> Path | None:
    """The checkpoint to resume from, per `resume` (auto | never | a checkpoint path)."""
    if resume not in ("auto", "never"):
        path = Path(resume)
        if not (path / "trainer_state.json").exists():
            raise ConfigError(f"resume={resume} is not a posttrain checkpoint directory (no trainer_state.json)")
        return path
    latest = latest_checkpoint(run_dir)
    if latest is not None and resume == "never":
        raise ConfigError(
            f"run_dir {run_dir} already holds checkpoints (newest: {latest.name}); "
            "pass resume=auto to continue it, or choose another run_dir"
        )
    return latest if resume == "auto" else None


def write_config(run_dir: Path, cfg) -> None:
    """Save the resolved config as run_dir/config.yaml (atomically, rank 0)."""
    if not is_main_process():
        return
    run_dir.mkdir(parents=True, exist_ok=True)
    staging = run_dir / ".config.yaml.tmp"
    staging.write_text(OmegaConf.to_yaml(cfg, resolve=True))
    os.replace(staging, run_dir / "config.yaml")
