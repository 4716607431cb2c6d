"""The one entry point: `posttrain <hydra overrides>` and `python -m posttrain`.

`algo=` picks the trainer. The same command runs single-process, under `torchrun` or under the
`deepspeed` launcher, and `-m` sweeps (e.g. `posttrain -m optim.lr=1e-4,3e-4`: each job its own process, see
posttrain/sweep.py; with `hydra/launcher=submitit_slurm` through Hydra's submitit plugin). The tools in
SUBCOMMANDS take ordinary flags instead: `posttrain decontaminate --train ...`, `posttrain eval --model ...`.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

CONF_DIR = Path(os.environ.get("POSTTRAIN_CONF_DIR", Path(__file__).resolve().parent.parent / "conf"))


def _prepare_environment(multirun: bool = False) -> None:
    """Defaults that must be in place before torch / deepspeed / wandb are imported. A sweep's launching process
    does not pick the DeepSpeed accelerator: its jobs inherit the environment and may run on other machines
    (a Slurm login node has no GPU; its jobs do)."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("WANDB_SILENT", "true")
    if multirun:
        return
    if not os.environ.get("CUDA_VISIBLE_DEVICES", "x") or not _has_cuda():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def run(cfg) -> Path | None:
    """Run the trainer `cfg.algo.name`; a user error prints one line and exits with status 2."""
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import open_dict

    from posttrain.errors import PosttrainError
    from posttrain.logging import log, setup_console_logging
    from posttrain.training import run_algorithm

    setup_console_logging()
    if HydraConfig.initialized() and HydraConfig.get().mode.name == "MULTIRUN":
        with open_dict(cfg):
            cfg.run_dir = HydraConfig.get().runtime.output_dir  # one run dir per sweep job
    try:
        return run_algorithm(cfg)
    except PosttrainError as error:
        log.error("error: %s", error)
        sys.exit(2)


# `posttrain <name> --flags`: argparse tools beside the Hydra trainers (module: its `main(argv) -> exit status`).
SUBCOMMANDS = {
    "decontaminate": "data_recipes.decontaminate",
    "eval": "evals.runner",
    "annotate": "posttrain.annotate",
    "select": "data_recipes.zipfit",
    "doctor": "posttrain.doctor",
}


def run_subcommand(name: str, argv: list[str]) -> int:
    """Run the subcommand `name` with `argv`; a user error prints one line and returns status 2."""
    import importlib

    from posttrain.errors import PosttrainError

    try:
        return importlib.import_module(SUBCOMMANDS[name]).main(argv)
    except PosttrainError as error:
        print(f"posttrain {name}: error: {error}", file=sys.stderr)
        return 2


def strip_local_rank(argv: list[str]) -> list[str]:
    """`argv` without the `--local_rank=N` / `--local_rank N` the DeepSpeed launcher appends (unless started with
    --no_local_rank, as launch/deepspeed.sh does): Hydra would reject it. The rank also arrives as LOCAL_RANK."""
    out, index = [], 0
    while index < len(argv):
        arg = argv[index]
        if arg.startswith("--local_rank=") or arg.startswith("--local-rank="):
            os.environ.setdefault("LOCAL_RANK", arg.split("=", 1)[1])
        elif arg in ("--local_rank", "--local-rank") and index + 1 < len(argv):
            os.environ.setdefault("LOCAL_RANK", argv[index + 1])
            index += 1
        else:
            out.append(arg)
        index += 1
    return out


def main() -> None:
    sys.argv = [sys.argv[0], *strip_local_rank(sys.argv[1:])]
    _prepare_environment(multirun=any(arg in ("-m", "--multirun") for arg in sys.argv[1:]))
    if len(sys.argv) > 1 and sys.argv[1] in SUBCOMMANDS:
        sys.exit(run_subcommand(sys.argv[1], sys.argv[2:]))
    from posttrain.sweep import is_local_sweep, run_sweep

    if is_local_sweep(sys.argv[1:]):
        sys.exit(run_sweep(sys.argv[1:]))
    import hydra

    from posttrain.config import register_configs

    if not CONF_DIR.is_dir():
        sys.exit(f"posttrain: config directory {CONF_DIR} not found; set POSTTRAIN_CONF_DIR")
    register_configs()
    hydra.main(config_path=str(CONF_DIR), config_name="config", version_base=None)(run)()


if __name__ == "__main__":
    main()
