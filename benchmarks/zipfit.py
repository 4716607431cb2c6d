"""ZIP-FIT selection time against the n-gram-overlap baseline at equal pool size (data_recipes/zipfit.py).

    python benchmarks/zipfit.py --pool 20000 --rounds 5            # the measurement (a quiet machine)
    python benchmarks/zipfit.py --pool 2000 --rounds 1             # a smoke run, seconds

The pool mixes arithmetic rows (data_recipes arithmetic task, 3-digit column addition) with unrelated text (game-move
chats and README lines, repeated with a row number to fill the pool) in equal parts; the target is held-out
arithmetic rows. Each side scores the whole pool and keeps the top half (`top_rows`); timed: building the
scorer from the target + scoring + ranking, in this process (one thread), process CPU time beside wall time.
Sides, interleaved over `--rounds` rounds in rotated order (benchmarks/protocol.py: per-round ratios with median
and spread, the load average per round, a WARNING when it exceeded the cores):
- `zipfit` (ours): `posttrain select`'s default, the fixed-code DEFLATE sizes of the compiled scorer
  (csrc/zipfit_ncd.cpp, built and loaded before the clock starts);
- `zipfit-zlib`: the compiled scorer with zlib's DEFLATE (`--codec zlib`);
- `zipfit-python`, `zipfit-zlib-python`: the same two codecs from Python (the same sizes: their kept rows are
  checked identical to the compiled ones');
- `ngram` (word 1-2-gram set overlap) and `dsir` (DSIR-style hashed importance weights): the embedding-free
  baselines;
- `naive-zipfit` (recompressing target + row with zlib.compress per row, the default 32 KiB window), on a tenth of
  the pool: costs are compared per row.
Also reported: the precision of each side's kept rows (the share of arithmetic rows). Prints the protocol table
and writes --out JSON.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import zlib
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from protocol import compare, format_comparisons, protocol_summary, run_rounds, write_results  # noqa: E402

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


SIDES = {  # side: (method, native, codec)
    "zipfit": ("zipfit", True, "fixed"),
    "zipfit-zlib": ("zipfit", True, "zlib"),
    "zipfit-python": ("zipfit", False, "fixed"),
    "zipfit-zlib-python": ("zipfit", False, "zlib"),
    "ngram": ("ngram", None, None),
    "dsir": ("dsir", None, None),
}


def run_side(side: str, target: list[str], texts: list[str]) -> tuple[float, float, list[int]]:
    wall, cpu = time.perf_counter(), time.process_time()
    if side == "naive-zipfit":
        scores = naive_zipfit(target, texts)
    else:
        method, native, codec = SIDES[side]
        scores = build_scorer(method, target, native=native, codec=codec or "fixed").scores(texts)
    kept = top_rows(scores, len(texts) // 2)
    return time.perf_counter() - wall, time.process_time() - cpu, kept


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pool", type=int, default=20000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--out", type=Path, default=Path("zipfit_benchmark.json"))
    args = parser.parse_args()
    os.environ.pop("POSTTRAIN_DISABLE_ZIPFIT_NATIVE", None)
    texts, is_arithmetic, target = make_pool(args.pool)
    build_scorer("zipfit", target, native=True)  # compile (first time) and load outside the timed region
    pools = {side: texts for side in SIDES} | {"naive-zipfit": texts[::10]}
    labels = {side: is_arithmetic for side in SIDES} | {"naive-zipfit": is_arithmetic[::10]}
    kept_rows: dict[str, list[int]] = {}

    def one_side(side: str, _round: int) -> dict:
        wall, cpu, kept = run_side(side, target, pools[side])
        kept_rows[side] = kept
        rows = len(pools[side])
        precision = sum(labels[side][i] for i in kept) / len(kept)
        return {"rows": rows, "wall_s": wall, "cpu_s": cpu, "us_per_row": 1e6 * wall / rows, "precision": precision}

    rounds = run_rounds(list(pools), args.rounds, one_side)
    for native, python in (("zipfit", "zipfit-python"), ("zipfit-zlib", "zipfit-zlib-python")):
        if kept_rows[native] != kept_rows[python]:
            raise SystemExit(f"{native} and {python} kept different rows: their sizes are supposed to be identical")

    def cost(result: dict) -> tuple[float, float]:  # per row: the naive side scores a tenth of the pool
        return result["wall_s"] / result["rows"], result["cpu_s"] / result["rows"]

    comparisons = compare(rounds, cost, ours="zipfit", peers=[side for side in pools if side != "zipfit"])
    print(f"{'side':20} {'rows':>7} {'us/row (median)':>16} {'precision':>9}")
    sides = {}
    for side in pools:
        results = [r["results"][side] for r in rounds]
        sides[side] = {"rows": results[0]["rows"], "us_per_row": [r["us_per_row"] for r in results],
                       "precision": results[-1]["precision"]}  # fmt: skip
        median = sorted(sides[side]["us_per_row"])[len(results) // 2]
        print(f"{side:20} {results[0]['rows']:7d} {median:16.2f} {results[-1]['precision']:9.3f}")
    print(format_comparisons("zipfit", comparisons, rounds))
    write_results(args.out, {"pool": args.pool, "rounds": rounds, "sides": sides,
                             "protocol": protocol_summary("zipfit", comparisons, rounds)})  # fmt: skip


if __name__ == "__main__":
    main()
