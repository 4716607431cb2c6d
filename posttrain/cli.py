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

# The configs ship inside the package (Hydra reads them as pkg://posttrain.conf; the checkout's conf/ links
# there). POSTTRAIN_CONF_DIR points the CLI at another config directory instead.
CONF_PACKAGE = "posttrain.conf"
CONF_DIR = Path(os.environ.get("POSTTRAIN_CONF_DIR") or Path(__file__).resolve().parent / "conf")
HELP_RESOLVER = "posttrain_help"  # ${posttrain_help:algorithms|recipes|groups} in conf/config.yaml's help template


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

    from posttrain.config import undeclared_keys
    from posttrain.errors import ConfigError, PosttrainError
    from posttrain.logging import log, setup_console_logging
    from posttrain.training import run_algorithm

    global _in_task
    setup_console_logging()
    if HydraConfig.initialized() and HydraConfig.get().mode.name == "MULTIRUN":
        with open_dict(cfg):
            cfg.run_dir = HydraConfig.get().runtime.output_dir  # one run dir per sweep job
    _in_task = True  # left set when the task raises: run_hydra then re-raises instead of calling it a config error
    try:
        undeclared = undeclared_keys(cfg)
        if undeclared:
            raise ConfigError(
                f"unknown config key(s) {', '.join(undeclared)}: no schema in posttrain/config.py declares them, so "
                "they would be ignored; fix the name or drop the override"
            )
        run_dir = run_algorithm(cfg)
    except PosttrainError as error:
        log.error("error: %s", error)
        sys.exit(2)
    _in_task = False
    return run_dir


_in_task = False  # inside `run`: an exception there is a bug to show in full, not a composition error


def composition_error_line(error: BaseException) -> str:
    """One line for a Hydra / OmegaConf error met while composing the config (an unknown key or group option,
    a malformed override, a value of the wrong type). Internal `*_schema` options are not offered."""
    from hydra.errors import MissingConfigException

    missing = getattr(error, "missing_cfg_file", None)
    if isinstance(error, MissingConfigException) and missing and error.options is not None:
        group, _, option = missing.rpartition("/")
        known = ", ".join(name for name in error.options if not name.endswith("_schema"))
        return f"unknown {group or 'config'} option {option!r} ({group}={option}); known options: {known}"
    parts = [error] + ([error.__cause__] if error.__cause__ is not None else [])
    lines = [line.strip() for part in parts for line in str(part).splitlines()]
    noise = ("HYDRA_FULL_ERROR", "reference_type=", "object_type=")
    text = "; ".join(line.rstrip(".") for line in lines if line and not any(word in line for word in noise))
    return text or type(error).__name__


def help_section(section: str) -> str:
    """A section of `posttrain --help` (the `${posttrain_help:...}` resolver): the registered algorithms, the
    recipes in conf/recipe/, or the other config groups and their options."""
    if section == "algorithms":
        from posttrain.trainers import load_algorithms

        registry = load_algorithms()
        entries = {
            name: _summary(sys.modules[registry.get(name).entry.__module__].__doc__) for name in registry.names()
        }
    elif section == "recipes":
        entries = {path.stem: _recipe_summary(path) for path in sorted((CONF_DIR / "recipe").glob("*.yaml"))}
    elif section == "groups":
        groups = sorted(p for p in CONF_DIR.iterdir() if p.is_dir() and p.name not in ("algo", "recipe"))
        entries = {g.name: ", ".join(sorted(o.stem for o in g.glob("*.yaml"))) for g in groups if any(g.glob("*.yaml"))}
    else:
        raise ValueError(f"unknown help section {section!r}; known: algorithms, recipes, groups")
    width = max(map(len, entries), default=0)
    return "\n".join(f"  {name.ljust(width)}  {text}".rstrip() for name, text in entries.items())


def _summary(docstring: str | None, limit: int = 96) -> str:
    first = (docstring or "").strip().split("\n", 1)[0].strip()
    return first if len(first) <= limit else first[: limit - 3].rstrip() + "..."


def _recipe_summary(path: Path) -> str:
    """The first comment line after the `# @package` header of a recipe YAML."""
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.startswith("#") and "@package" not in line:
            return _summary(line.lstrip("#").strip().replace("$", ""))
        if line and not line.startswith("#"):
            break
    return ""


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
        sys.exit(finished(run_subcommand(sys.argv[1], sys.argv[2:])))
    if not CONF_DIR.is_dir():
        sys.exit(f"posttrain: config directory {CONF_DIR} not found; set POSTTRAIN_CONF_DIR")
    from posttrain.sweep import is_local_sweep, run_sweep

    if is_local_sweep(sys.argv[1:]):
        sys.exit(run_sweep(sys.argv[1:]))
    sys.exit(finished(run_hydra()))


def finished(status: int) -> int:
    """The process's exit status; after a success the torch.distributed world (if any) is closed on every rank."""
    if status == 0:
        from posttrain.engine.distributed import close_distributed

        close_distributed()
    return status


def run_hydra() -> int:
    """Compose the config from sys.argv and run it (Hydra: overrides, -m sweeps, --help, --cfg). A config that
    does not compose prints one line and returns 2, like every other user error."""
    import hydra
    from hydra.errors import HydraException
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    from posttrain.config import register_configs

    register_configs()
    OmegaConf.register_new_resolver(HELP_RESOLVER, help_section, replace=True)
    config_path = str(CONF_DIR) if os.environ.get("POSTTRAIN_CONF_DIR") else f"pkg://{CONF_PACKAGE}"
    # Hydra prints its errors itself and exits 1, keeping the exception from us unless HYDRA_FULL_ERROR is set.
    previous = os.environ.get("HYDRA_FULL_ERROR")
    os.environ["HYDRA_FULL_ERROR"] = "1"
    try:
        hydra.main(config_path=config_path, config_name="config", version_base=None)(run)()
    except (HydraException, OmegaConfBaseException) as error:
        if _in_task:
            raise
        print(f"posttrain: error: {composition_error_line(error)}", file=sys.stderr)
        return 2
    finally:
        if previous is None:
            os.environ.pop("HYDRA_FULL_ERROR", None)
        else:
            os.environ["HYDRA_FULL_ERROR"] = previous
    return 0


if __name__ == "__main__":
    main()
