"""ZIP-FIT selection time against the n-gram-overlap baseline at equal pool size (data_recipes/zipfit.py).

    python benchmarks/zipfit.py --pool 20000 --rounds 5            # the measurement (a quiet machine)
    python benchmarks/zipfit.py --pool 2000 --rounds 1             # a smoke run, seconds

The pool mixes arithmetic rows (data_recipes arithmetic task, 3-digit column addition) with unrelated text (game-move
chats and README lines, repeated with a row number to fill the pool) in equal parts; the target is held-out
arithmetic rows. Each side scores the whole pool and keeps the top half (`top_rows`); timed: building the
scorer from the target + scoring + ranking, in one process, sides interleaved `--rounds` times, best and median
per side, plus process CPU time. ZIP-FIT runs twice: `zipfit-native` (the compiled batch scorer,
csrc/zipfit_ncd.cpp, on ONE thread like every other side; built and loaded before the clock starts) and
`zipfit-python` (the same sizes from Python's zlib module); their kept rows are checked identical. Also reported:
the precision of each side's kept rows (the share of arithmetic rows) and, for reference, the naive ZIP-FIT
(recompressing target + row with zlib.compress per row, the default 32 KiB window) on a tenth of the pool.
Prints a table and writes --out JSON.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import zlib
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from data_recipes import generate_task  # noqa: E402
from data_recipes.zipfit import build_scorer, row_text, top_rows  # noqa: E402


def make_pool(size: int) -> tuple[list[str], list[bool], list[str]]:
    """(pool texts, is_arithmetic, target texts)."""
    half = size // 2
    task = {"max_digits": 3, "steps": True, "operations": "+"}  # 3 digits: enough distinct rows for 20k pools
    arithmetic = [row_text(r) for r in generate_task("arithmetic", "train", half, seed=0, **task)]
    games = [row_text(r) for r in generate_task("game_moves", "train", 300, seed=0)]
    prose = [line.strip() for line in (REPO / "README.md").read_text().splitlines() if len(line.strip()) > 40]
    unrelated = [f"{(games + prose)[i % len(games + prose)]} ({i})" for i in range(size - half)]
    target = [row_text(r) for r in generate_task("arithmetic", "eval", 200, seed=1, **task)]
    return arithmetic + unrelated, [True] * half + [False] * (size - half), target


def naive_zipfit(target: list[str], texts: list[str]) -> list[float]:
    """ZIP-FIT as first written: C(t x) recompresses the whole target for every row (zlib defaults)."""
    joined = "\n".join(target).encode()
    c_t = len(zlib.compress(joined, 9))
    out = []
    for text in texts:
        x = text.encode()
        c_x = len(zlib.compress(x, 9))
        out.append(1 - (len(zlib.compress(joined + x, 9)) - min(c_t, c_x)) / max(c_t, c_x))
    return out


def run_side(method: str, target: list[str], texts: list[str]) -> tuple[float, float, list[int]]:
    wall, cpu = time.perf_counter(), time.process_time()
    if method == "naive-zipfit":
        scores = naive_zipfit(target, texts)
    elif method.startswith("zipfit-"):
        scores = build_scorer("zipfit", target, native=method == "zipfit-native").scores(texts)
    else:
        scores = build_scorer(method, target).scores(texts)
    kept = top_rows(scores, len(texts) // 2)
    return time.perf_counter() - wall, time.process_time() - cpu, kept


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pool", type=int, default=20000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--out", type=Path, default=Path("zipfit_benchmark.json"))
    args = parser.parse_args()
    texts, is_arithmetic, target = make_pool(args.pool)
    build_scorer("zipfit", target, native=True)  # compile (first time) and load outside the timed region
    sides = {"zipfit-native": texts, "zipfit-python": texts, "ngram": texts, "dsir": texts, "naive-zipfit": texts[::10]}
    times: dict[str, list[tuple[float, float]]] = {side: [] for side in sides}
    precision, kept_rows = {}, {}
    for _ in range(args.rounds):
        for side, pool in sides.items():
            wall, cpu, kept = run_side(side, target, pool)
            times[side].append((wall, cpu))
            labels = is_arithmetic if side != "naive-zipfit" else is_arithmetic[::10]
            precision[side], kept_rows[side] = sum(labels[i] for i in kept) / len(kept), kept
    if kept_rows["zipfit-native"] != kept_rows["zipfit-python"]:
        raise SystemExit("native and Python ZIP-FIT kept different rows: the sizes are supposed to be identical")
    rows = {}
    for side, pool in sides.items():
        walls = [w for w, _ in times[side]]
        rows[side] = {"rows": len(pool), "best_s": min(walls), "median_s": statistics.median(walls),
                      "cpu_s": min(c for _, c in times[side]), "us_per_row": 1e6 * min(walls) / len(pool),
                      "precision": precision[side]}  # fmt: skip
    print(f"{'side':14} {'rows':>7} {'best s':>8} {'median s':>9} {'cpu s':>7} {'us/row':>7} {'precision':>9}")
    for side, row in rows.items():
        print(f"{side:14} {row['rows']:7d} {row['best_s']:8.3f} {row['median_s']:9.3f} {row['cpu_s']:7.3f} "
              f"{row['us_per_row']:7.2f} {row['precision']:9.3f}")  # fmt: skip
    result = {"pool": args.pool, "rounds": args.rounds, "threads": 1, "sides": rows}
    for zipfit in ("zipfit-native", "zipfit-python"):
        ratios = {other: rows[other]["us_per_row"] / rows[zipfit]["us_per_row"] for other in ("ngram", "dsir")}
        print(f"baseline time / {zipfit} time at equal pool size (> 1: ZIP-FIT is faster): n-gram overlap "
              f"{ratios['ngram']:.2f}x, DSIR-style {ratios['dsir']:.2f}x")  # fmt: skip
        result.update({f"{other}_over_{zipfit}": ratio for other, ratio in ratios.items()})
    speedup = rows["zipfit-python"]["us_per_row"] / rows["zipfit-native"]["us_per_row"]
    print(f"zipfit-python time / zipfit-native time: {speedup:.2f}x (same kept rows)")
    result["python_over_native"] = speedup
    args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
