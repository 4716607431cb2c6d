"""Tokenising synthetic SFT rows: the old serial loop against the Arrow path (`datasets.map`, 1 and 2 processes)
and a read of the on-disk cache. Time and peak memory per side.

Method. The parent writes `--rows` synthetic chat rows (1-3 user/assistant turns of seeded random words, about
40-250 tokens each) to a JSONL file once. Each side then runs in a fresh Python process that reads the rows and
trains nothing: the tokenizer is `common.arithmetic_tokenizer()` (posttrain's byte-level BPE with its chat
template), built before the clock starts. Timed is the call that turns the rows into the list of
`TokenizedExample`s a trainer holds (Arrow sides: `build_sft_examples`, conversion from Arrow included):

| side | what runs |
| --- | --- |
| `serial` | the loop posttrain ran before: validate, `tokenize_conversation`, length policy, row by row |
| `arrow1` | `build_sft_examples` with `data.num_proc=1` (no cache) |
| `arrow2` | the same with `data.num_proc=2` |
| `arrow2_lists` | `arrow2` as it was before the examples held `array("i")`: the table's columns `to_pylist`-ed |
| `cache_build` | `data.cache_tokenized=true` on an empty cache dir, `num_proc=2`: tokenise and write the Arrow table |
| `cache_read` | the same again: the table read back from disk (what every rank but the builder does) |

Memory: `ru_maxrss` of the side's process when the examples are built (`rss_mib`, the peak), its VmRSS then
(`held_mib`: the rows read plus the examples a trainer keeps) and the largest of its child processes
(`worker_rss_mib`: the `datasets.map` workers, but also helper processes started at import, which set a floor of
about 310 MiB here even for the serial side; compare it across sides only above that floor). Every side's
examples are compared with the serial side's by a digest (same ids and labels, in order); a mismatch is printed.
Needs the machine to itself: record `uptime` before and after.

    python benchmarks/tokenization.py --rows 100000 --out tokenization.json   # full size
    python benchmarks/tokenization.py --smoke                                  # 2,000 rows
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import resource
import subprocess
import sys
import tempfile
import time
from array import array
from pathlib import Path

SIDES = ("serial", "arrow1", "arrow2", "arrow2_lists", "cache_build", "cache_read")
WORDS = (
    "the a model data token train step loss batch value answer question number sum carry digit result rate learn "
    "text chat user reply first second third more less check write read list table run test"
).split()


def synthetic_rows(count: int, seed: int) -> list[dict]:
    generator = random.Random(seed)

    def sentence() -> str:
        return " ".join(generator.choice(WORDS) for _ in range(generator.randint(8, 40))).capitalize() + "."

    rows = []
    for _ in range(count):
        messages = []
        for _ in range(generator.randint(1, 3)):
            messages += [{"role": "user", "content": sentence()}, {"role": "assistant", "content": sentence()}]
        rows.append({"messages": messages})
    return rows


def serial_examples(rows, tokenizer, data_cfg):
    """The pre-Arrow path: one Python loop over the rows (posttrain/data/sft.py before the datasets rewrite)."""
    from posttrain.data.chat import apply_length_policy, tokenize_conversation, validate_messages

    examples = []
    for row in rows:
        where = row.where()
        conversation = tokenize_conversation(tokenizer, validate_messages(row.row, where), where)
        example = apply_length_policy(conversation, data_cfg.max_length, data_cfg.truncation, where)
        if example is not None:
            examples.append(example)
    return examples


def current_rss_mib() -> float:
    """The process's resident set now (VmRSS), MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def run_side(side: str, rows_file: Path, cache_dir: Path) -> dict:
    """One side in this process (called in a fresh child): seconds, peak RSS, and a digest of the examples."""
    import os

    os.environ["POSTTRAIN_CACHE_DIR"] = str(cache_dir)
    from common import arithmetic_tokenizer

    from posttrain.config import DataConfig
    from posttrain.data.sft import build_sft_examples
    from posttrain.data.sources import read_file

    tokenizer = arithmetic_tokenizer()
    rows = read_file(rows_file)
    data_cfg = DataConfig(
        max_length=1024,
        truncation="truncate",
        num_proc=1 if side == "arrow1" else 2,
        cache_tokenized=side.startswith("cache"),
    )
    started = time.perf_counter()
    if side == "serial":
        examples = serial_examples(rows, tokenizer, data_cfg)
    elif side == "arrow2_lists":  # the Arrow path as it was before SFT examples held array("i"): to_pylist
        from posttrain.data.tokenization import sft_example, to_examples, tokenized_split

        examples, _ = to_examples(tokenized_split("sft", rows, tokenizer, data_cfg), data_cfg, sft_example)
    else:
        examples, _ = build_sft_examples(rows, tokenizer, data_cfg, "train")
    seconds = time.perf_counter() - started
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # before the digest allocates anything
    held_mib = current_rss_mib()  # what the examples (and the rows read) keep alive
    digest = hashlib.sha256()
    for example in examples:  # the same bytes for list and array("i") examples
        digest.update(array("i", example.input_ids).tobytes() + b"|" + array("i", example.labels).tobytes() + b"#")
    return {
        "side": side,
        "rows": len(rows),
        "examples": len(examples),
        "tokens": sum(len(e.input_ids) for e in examples),
        "seconds": round(seconds, 3),
        "rss_mib": round(peak_mib, 1),
        "held_mib": round(held_mib, 1),
        "worker_rss_mib": round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024, 1),
        "digest": digest.hexdigest(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--sides", default=",".join(SIDES))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--smoke", action="store_true", help="2,000 rows")
    parser.add_argument("--out", type=Path)
    parser.add_argument("--side", help=argparse.SUPPRESS)  # internal: run one side in this process
    parser.add_argument("--rows-file", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--cache-dir", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.side:
        print(json.dumps(run_side(args.side, args.rows_file, args.cache_dir)))
        return
    count = 2000 if args.smoke else args.rows
    results = []
    with tempfile.TemporaryDirectory() as scratch:
        rows_file, cache_dir = Path(scratch) / "rows.jsonl", Path(scratch) / "cache"
        rows_file.write_text("".join(json.dumps(row) + "\n" for row in synthetic_rows(count, args.seed)))
        for side in args.sides.split(","):
            command = [sys.executable, __file__, "--side", side, "--rows-file", str(rows_file)]
            command += ["--cache-dir", str(cache_dir)]
            done = subprocess.run(command, capture_output=True, text=True)
            if done.returncode != 0:
                sys.exit(f"side {side} failed:\n{done.stderr[-3000:]}")
            results.append(json.loads(done.stdout.strip().splitlines()[-1]))
            print(results[-1], flush=True)
    print(f"\n{'side':<12} {'seconds':>9} {'x serial':>9} {'peak MiB':>9} {'held MiB':>9} {'worker MiB':>11}  examples")
    serial = next((r for r in results if r["side"] == "serial"), results[0])
    for result in results:
        print(
            f"{result['side']:<12} {result['seconds']:>9.2f} {serial['seconds'] / result['seconds']:>9.2f} "
            f"{result['rss_mib']:>9.0f} {result['held_mib']:>9.0f} {result['worker_rss_mib']:>11.0f}  "
            f"{result['examples']}"
        )
    if len({result["digest"] for result in results}) > 1:
        print("WARNING: the sides produced different examples", {r["side"]: r["digest"][:12] for r in results})
    if args.out:
        args.out.write_text(json.dumps({"rows": count, "results": results}, indent=2))


if __name__ == "__main__":
    main()
