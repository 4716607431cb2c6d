"""Local sweeps: `posttrain -m optim.lr=1e-6,5e-6 train.epochs=1,2` (and launch/sweep.sh) run every job as its own
`posttrain` process, one after another, in run_dir/<job number> (the layout of Hydra's multirun).

Why not Hydra's basic launcher: it runs all jobs inside one process, where they share process-wide state
(torch.distributed's world, vLLM's parallel groups, the global RNGs); a process per job runs each job as it would
run alone, and under any launcher (torchrun). The sweep is expanded by Hydra's own override
parser and basic sweeper (same jobs, same order, same syntax: a,b,c / range() / choice()). Each job's command is
`$POSTTRAIN_SWEEP_LAUNCHER -m posttrain <job overrides> run_dir=<run_dir>/<n>`; the launcher defaults to this
Python, and e.g. `POSTTRAIN_SWEEP_LAUNCHER="torchrun --standalone --nproc_per_node=8"` runs each job on all
local GPUs. Sweeps that name a Hydra launcher (`hydra/launcher=submitit_slurm`, Slurm through the
hydra-submitit-launcher plugin) or set any other `hydra.*` key go to Hydra's multirun unchanged.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

MULTIRUN_FLAGS = ("-m", "--multirun")
LAUNCHER_ENV = "POSTTRAIN_SWEEP_LAUNCHER"


def is_local_sweep(argv: list[str]) -> bool:
    """A multirun that posttrain runs itself: -m plus plain overrides, none of them about Hydra's own config."""
    if not any(arg in MULTIRUN_FLAGS for arg in argv):
        return False
    overrides = [arg for arg in argv if arg not in MULTIRUN_FLAGS]
    return all(not arg.startswith("-") and not arg.lstrip("+~").startswith("hydra") for arg in overrides)


def sweep_jobs(overrides: list[str]) -> list[list[str]]:
    """Each job's full override list, expanded as Hydra's basic sweeper expands them (cartesian product, in order)."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parsed = OverridesParser.create().parse_overrides(overrides)
    return [list(job) for batch in BasicSweeper.split_arguments(parsed, max_batch_size=None) for job in batch]


def override_key(override: str) -> str:
    return override.split("=", 1)[0].lstrip("+~")


def sweep_root(job: list[str]) -> Path:
    """The sweep's run_dir: from the overrides, else the config's default (composed once, e.g. runs/sft/<time>)."""
    for override in job:
        if override_key(override) == "run_dir":
            from hydra.core.override_parser.overrides_parser import OverridesParser

            return Path(str(OverridesParser.create().parse_override(override).value()))
    from hydra import compose, initialize_config_dir
    from hydra.core.utils import setup_globals

    from posttrain.cli import CONF_DIR
    from posttrain.config import register_configs

    setup_globals()  # the ${now:...} resolver of the default run_dir
    register_configs()
    with initialize_config_dir(str(CONF_DIR), version_base=None):
        return Path(str(compose("config", overrides=job).run_dir))


def run_sweep(argv: list[str]) -> int:
    """Run every job of the sweep in `argv` as its own process; 0 if all succeeded, else 1 (all jobs still run).
    Writes run_dir/sweep.json: each job's overrides, run dir and exit status."""
    jobs = sweep_jobs([arg for arg in argv if arg not in MULTIRUN_FLAGS])
    root = sweep_root(jobs[0])
    launcher = shlex.split(os.environ.get(LAUNCHER_ENV, "")) or [sys.executable]
    root.mkdir(parents=True, exist_ok=True)
    record = []
    for number, job in enumerate(jobs):
        job_dir = root / str(number)
        overrides = [override for override in job if override_key(override) != "run_dir"]
        command = [*launcher, "-m", "posttrain", *overrides, f"run_dir={job_dir}"]
        process = subprocess.Popen(command)
        print(f"posttrain sweep: job {number} of {len(jobs)} (pid {process.pid}): {' '.join(overrides)}", flush=True)
        status = process.wait()
        print(f"posttrain sweep: job {number} exited with status {status}: {job_dir}", flush=True)
        record.append({"job": number, "overrides": overrides, "run_dir": str(job_dir), "status": status})
        (root / "sweep.json").write_text(json.dumps(record, indent=2) + "\n")
    failed = [entry["job"] for entry in record if entry["status"] != 0]
    if failed:
        print(f"posttrain sweep: jobs {failed} failed (see {root / 'sweep.json'})", file=sys.stderr, flush=True)
    return 1 if failed else 0
