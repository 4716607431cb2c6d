"""Run every comparison benchmark and print one summary table (what `make bench` runs).

    python benchmarks/run_all.py                  # reduced size (make bench): estimated 15-20 min on 2 idle cores
    python benchmarks/run_all.py --size full      # full size: ~3-4 h (estimate, see README), a quiet machine
    python benchmarks/run_all.py --size smoke     # every script's --smoke: proves they all run
    python benchmarks/run_all.py --only dpo_vs_trl,fused_logprobs

Each benchmark runs in its own process, one after the other, with the command lines in SIZES, and writes its JSON
(the machine description included: CPU model, cores, memory, torch / transformers / trl / vllm versions, git
commit) to --out-dir: benchmarks/results/ for the full size, benchmarks/results/reduced/ for the reduced size,
a temporary directory for smoke runs. Every script follows benchmarks/protocol.py (interleaved rounds, order
rotated, per-round ratios); this script reads the protocol summary of each JSON and prints one table: per
comparison the median ratio (peer cost / ours, > 1: ours faster) by wall clock with its min-max spread, the
CPU-time ratio, and a load WARNING when the 1-minute load average exceeded the number of cores in any round.
The table and every benchmark's wall time go to <out-dir>/summary.json; each benchmark's own output to
<out-dir>/<name>.log.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from protocol import machine_description

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent

# name -> size -> arguments (besides --out). Reduced sizes keep each comparison's shape of work but shrink the
# model and the number of steps so the whole set fits in ~20 min on 2 idle cores.
SIZES = {
    "sft_throughput": {
        "full": ["--rounds", "3", "--steps", "8", "--warmup", "1"],
        "reduced": [
            "--rounds", "3", "--steps", "4", "--warmup", "1", "--sides", "posttrain,trl,trl-padding-free",
            "--hidden-size", "256", "--layers", "4", "--heads", "4", "--intermediate-size", "768",
            "--vocab-size", "8000", "--lexicon-size", "20000", "--corpus-words", "300000",
        ],
        "smoke": ["--smoke"],
    },
    "dpo_vs_trl": {
        "full": ["--rounds", "3"],
        "reduced": ["--rounds", "3", "--hidden", "256", "--layers", "2", "--steps", "3", "--warmup", "1"],
        "smoke": ["--smoke"],
    },
    "rlvr_vs_trl": {
        "full": ["--rounds", "3", "--steps", "4"],
        "reduced": [
            # the full-size 27.6M model (a smaller one measures only per-step overhead), half the prompts
            "--rounds", "3", "--sides", "posttrain,trl,trl-vllm", "--prompts", "4",
            "--samples", "8", "--max-tokens", "128", "--micro-batch", "16", "--steps", "2", "--warmup", "1",
        ],
        "smoke": ["--smoke"],
    },
    "fused_logprobs": {
        "full": ["--rounds", "3"],
        "reduced": ["--rounds", "3", "--rows", "1024", "--vocab", "32000", "128256", "--repeats", "1"],
        "smoke": ["--smoke"],
    },
}  # fmt: skip


def run_benchmark(name: str, size: str, out_dir: Path, workdir: Path) -> dict:
    """Run one script at `size`; returns {"name", "seconds", "exit_status", "json"}."""
    out = out_dir / f"{name}.json"
    command = [sys.executable, str(BENCH_DIR / f"{name}.py"), *SIZES[name][size], "--out", str(out)]
    if name in ("dpo_vs_trl", "rlvr_vs_trl", "sft_throughput"):
        command += ["--workdir", str(workdir / name)]
    env = {**os.environ}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    print(f"== {name} ({size}): {' '.join(command[1:])}", flush=True)
    started = time.perf_counter()
    with (out_dir / f"{name}.log").open("w") as log:
        done = subprocess.run(command, cwd=REPO_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, check=False)
    seconds = time.perf_counter() - started
    print(f"   exit status {done.returncode} after {seconds:.0f} s (load average {os.getloadavg()[0]:.2f})", flush=True)
    return {"name": name, "seconds": seconds, "exit_status": done.returncode, "json": str(out)}


def summary_rows(run: dict) -> list[dict]:
    """One row per comparison in the benchmark's JSON (or one failure row)."""
    path = Path(run["json"])
    if run["exit_status"] != 0 or not path.exists():
        return [{"name": run["name"], "error": f"exit status {run['exit_status']}; see {run['name']}.log"}]
    protocol = json.loads(path.read_text())["protocol"]
    rows = []
    for entry in protocol["comparisons"]:
        row = {
            "name": run["name"] + (f" {entry['shape']}" if "shape" in entry else ""),
            "ours": entry["ours"],
            "peer": entry["peer"],
            "rounds": entry["rounds"],
            "loaded_rounds": protocol["loaded_rounds"],
            "max_load": max(max(pair) for pair in protocol["loads"]),
        }
        if "error" in entry:
            row["error"] = entry["error"]
        else:
            row.update(wall=entry["wall_ratio"], cpu=entry["cpu_ratio"])
        rows.append(row)
    return rows


def print_summary(rows: list[dict], runs: list[dict], size: str) -> None:
    machine = machine_description()
    versions = ", ".join(f"{key} {value}" for key, value in machine["versions"].items() if value)
    print(
        f"\nsummary ({size} size): {machine['cpu_model']}, {machine['cores']} cores, {machine['memory_gib']} GiB; "
        f"{versions}; commit {(machine['git_commit'] or '?')[:10]}{' (dirty)' if machine['git_dirty'] else ''}"
    )
    header = (
        f"{'benchmark':<30} {'ours':<13} {'peer':<17} {'rounds':>6} {'wall ratio':>10} {'spread':>11} "
        f"{'cpu ratio':>9} {'max load':>8}  warning"
    )
    print(header)
    print("-" * len(header))
    cores = os.cpu_count() or 1
    for row in rows:
        if "error" in row and "ours" not in row:
            print(f"{row['name']:<30} FAILED: {row['error']}")
            continue
        head = f"{row['name']:<30} {row['ours']:<13} {row['peer']:<17} {row['rounds']:>6}"
        if "error" in row:
            print(f"{head} {row['error']}")
            continue
        warning = f"WARNING load > {cores} cores in round(s) {row['loaded_rounds']}" if row["loaded_rounds"] else ""
        wall, cpu = row["wall"], row["cpu"]
        print(
            f"{head} {wall['median']:>9.2f}x {wall['min']:>5.2f}-{wall['max']:<5.2f} {cpu['median']:>8.2f}x "
            f"{row['max_load']:>8.1f}  {warning}"
        )
    print(
        "ratio = peer's cost / ours for the same work, per round (> 1: ours faster): median over rounds, spread "
        "min-max; cpu = process user+sys time; fused_logprobs: peer 'floor' is the GEMMs alone (< 1 expected)"
    )
    print("wall time per benchmark: " + ", ".join(f"{run['name']} {run['seconds']:.0f} s" for run in runs))
    if any(row.get("loaded_rounds") for row in rows):
        print(f"WARNING: the machine was loaded (> {cores} cores busy) during some rounds: not valid measurements")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=("reduced", "full", "smoke"), default="reduced")
    parser.add_argument("--only", help=f"comma-separated subset of {', '.join(SIZES)}")
    parser.add_argument("--out-dir", type=Path, help="default: results/ (full), results/reduced/, a temp dir (smoke)")
    args = parser.parse_args(argv)
    names = args.only.split(",") if args.only else list(SIZES)
    unknown = [name for name in names if name not in SIZES]
    if unknown:
        parser.error(f"unknown benchmark(s) {unknown}; known: {', '.join(SIZES)}")
    default_dirs = {"full": BENCH_DIR / "results", "reduced": BENCH_DIR / "results" / "reduced"}
    with tempfile.TemporaryDirectory(prefix="bench-") as temporary:
        out_dir = args.out_dir or default_dirs.get(args.size) or Path(temporary) / "results"
        out_dir.mkdir(parents=True, exist_ok=True)
        started = time.perf_counter()
        print(f"load average at start {os.getloadavg()[0]:.2f} on {os.cpu_count()} cores; results in {out_dir}")
        runs = [run_benchmark(name, args.size, out_dir, Path(temporary)) for name in names]
        rows = [row for run in runs for row in summary_rows(run)]
        print_summary(rows, runs, args.size)
        print(f"total {time.perf_counter() - started:.0f} s")
        (out_dir / "summary.json").write_text(
            json.dumps(
                {"size": args.size, "machine": machine_description(), "runs": runs, "rows": rows},
                indent=2,
                default=str,
            )
        )
    if any(run["exit_status"] != 0 for run in runs):
        sys.exit(1)


if __name__ == "__main__":
    main()
