"""benchmarks/protocol.py: rotation, per-round ratios with their spread, the load warning."""

import importlib.util
from pathlib import Path

# Loaded from its file: putting benchmarks/ on sys.path would expose its scripts (rollout.py, common.py, ...) as
# top-level modules to every test after this one.
_spec = importlib.util.spec_from_file_location(
    "benchmarks_protocol", Path(__file__).resolve().parents[2] / "benchmarks" / "protocol.py"
)
protocol = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(protocol)


def test_rotation_runs_every_side_once_per_round_and_starts_each_round_elsewhere():
    assert [protocol.rotated(["a", "b", "c"], r) for r in range(4)] == [
        ["a", "b", "c"],
        ["b", "c", "a"],
        ["c", "a", "b"],
        ["a", "b", "c"],
    ]


def test_run_rounds_records_order_and_load(monkeypatch):
    calls = []
    monkeypatch.setattr(protocol.os, "getloadavg", lambda: (0.5, 0.0, 0.0))
    rounds = protocol.run_rounds(["x", "y"], 2, lambda side, r: calls.append((side, r)) or {}, log=lambda _: None)
    assert calls == [("x", 0), ("y", 0), ("y", 1), ("x", 1)]
    assert [r["order"] for r in rounds] == [["x", "y"], ["y", "x"]]
    assert rounds[0]["load_before"] == rounds[0]["load_after"] == 0.5


def test_compare_takes_ratios_within_each_round():
    """Round 1: peer 4 s / ours 2 s = 2.0 (CPU 6/2 = 3.0); round 2: 9/3 = 3.0 (CPU 9/9 = 1.0); round 3: 2/2 = 1.0
    (CPU 2/1 = 2.0). Median 2.0, spread 1.0-3.0 for both; a round where ours failed is left out."""
    costs = [((2, 2), (4, 6)), ((3, 9), (9, 9)), ((2, 1), (2, 2))]
    rounds = [
        {"round": i, "load_before": 0, "load_after": 0, "results": {"ours": {"c": o}, "peer": {"c": p}}}
        for i, (o, p) in enumerate(costs)
    ]
    rounds.append({"round": 3, "load_before": 0, "load_after": 0, "results": {"ours": {"error": "x"}, "peer": {}}})
    (entry,) = protocol.compare(rounds, lambda result: result["c"], "ours", ["peer"])
    assert entry["rounds"] == 3
    assert (entry["wall_ratio"]["median"], entry["wall_ratio"]["min"], entry["wall_ratio"]["max"]) == (2.0, 1.0, 3.0)
    assert (entry["cpu_ratio"]["median"], entry["cpu_ratio"]["min"], entry["cpu_ratio"]["max"]) == (2.0, 1.0, 3.0)


def test_a_round_above_the_core_count_is_flagged_in_the_table():
    rounds = [
        {"round": 0, "load_before": 1.0, "load_after": 1.5, "results": {}},
        {"round": 1, "load_before": 1.0, "load_after": 2.5, "results": {}},
    ]
    assert protocol.loaded_rounds(rounds, cores=2) == [1]
    table = protocol.format_comparisons("b", [], rounds)
    assert ("WARNING" in table) == (protocol.loaded_rounds(rounds) != [])


def test_machine_description_names_the_cpu_and_the_versions():
    machine = protocol.machine_description()
    assert machine["cores"] >= 1 and "torch" in machine["versions"] and machine["git_commit"]
