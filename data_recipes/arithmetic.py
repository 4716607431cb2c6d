"""Synthetic, verifiable chat task: multi-digit addition and subtraction.

Each row is a chat conversation whose final answer a verifier can check:
    {"messages": [{"role": "user", "content": "What is 347 + 85?"},
                  {"role": "assistant", "content": "347 + 85 = 432\n#### 432"}],
     "prompt": [<the user turn>], "ground_truth": "432", "verifier": "gsm8k"}
The answer line uses GSM8K's "#### <number>" format, so the `gsm8k` verifier (last number) checks it.

Splits are deterministic in the seed and disjoint: a question lands in the held-out split iff a
hash of its text falls in the held-out bucket, so no eval question is ever trained on.

CLI: python -m data_recipes.arithmetic --out DIR [--num-train N --num-eval N --seed S]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
from pathlib import Path

from posttrain.data.generators import register_task

HELD_OUT_BUCKETS = 10  # 1 in 10 questions belongs to the held-out split


def _is_held_out(question: str) -> bool:
    digest = hashlib.sha256(question.encode()).digest()
    return digest[0] % HELD_OUT_BUCKETS == 0


def make_problem(rng: random.Random, max_digits: int, operations: str) -> tuple[str, int, int, int]:
    """(expression, answer, a, b) for "a + b" or "a - b" with operands below 10**max_digits."""
    a = rng.randint(0, 10**max_digits - 1)
    b = rng.randint(0, 10**max_digits - 1)
    if operations == "+" or (operations == "+-" and rng.random() < 0.5):
        return f"{a} + {b}", a + b, a, b
    return f"{a} - {b}", a - b, a, b


def column_steps(a: int, b: int) -> list[str]:
    """Column addition of a + b, least significant digit first: "7 + 5 + 0 = 12" per column."""
    steps, carry, column = [], 0, 0
    while a or b or column == 0:
        digit_a, digit_b = a % 10, b % 10
        total = digit_a + digit_b + carry
        steps.append(f"{digit_a} + {digit_b} + {carry} = {total}")
        carry, a, b, column = total // 10, a // 10, b // 10, column + 1
    return steps


def make_row(expression: str, answer: int, steps: list[str] | None = None) -> dict:
    question = f"What is {expression}?"
    prompt = [{"role": "user", "content": question}]
    work = "\n".join(steps) if steps else f"{expression} = {answer}"
    response = f"{work}\n#### {answer}"
    return {
        "messages": prompt + [{"role": "assistant", "content": response}],
        "prompt": prompt,
        "ground_truth": str(answer),
        "verifier": "gsm8k",
    }


@register_task("arithmetic")
def arithmetic(
    split: str,
    num_examples: int,
    seed: int,
    max_digits: int = 2,
    operations: str = "+-",
    steps: bool = False,
    noise: float = 0.0,
) -> list[dict]:
    """`num_examples` distinct problems with up to `max_digits`-digit operands.

    operations: "+-" (addition and subtraction), "+" or "-". steps=True writes the answer as column
    addition, one line per digit with its carry, before the "#### answer" line (addition only): every
    token then depends on a few earlier ones, which a 2-layer model can learn.

    noise (train split, steps=True only): the share of demonstrations with a carry out of the units column
    into a tens column whose work forgets that carry (and follows the mistake through to a wrong "####" line),
    a systematic annotator error as in noisy human- or model-written SFT data. With noise > 0.5 the forgotten carry is
    the majority: a model trained on it answers such problems wrong even greedily, and only a training
    signal tied to the true answer (preferences, a verifier) can fix it. "ground_truth" stays the correct
    answer; the held-out split is always clean; noise=0 leaves the rows exactly as without it.
    """
    if not 0.0 <= noise < 1.0:
        raise ValueError(f"noise must be in [0, 1), got {noise}")
    if noise and not steps:
        raise ValueError("noise corrupts column work: set steps=True")
    if split not in ("train", "eval"):
        raise ValueError(f"split must be 'train' or 'eval', got {split!r}")
    if operations not in ("+-", "+", "-"):
        raise ValueError(f"operations must be '+-', '+' or '-', got {operations!r}")
    if steps and operations != "+":
        raise ValueError("steps=True is defined for addition only; set operations='+'")
    want_held_out = split == "eval"
    capacity = len(operations) * (10**max_digits) ** 2 // HELD_OUT_BUCKETS
    if want_held_out and num_examples > capacity // 2:
        raise ValueError(
            f"only ~{capacity} held-out {max_digits}-digit problems exist; ask for at most {capacity // 2}"
        )
    rng = random.Random(f"arithmetic:{seed}:{split}")
    noise_rng = random.Random(f"arithmetic-noise:{seed}")  # separate, so noise=0 draws the same problems
    rows, seen = [], set()
    attempts = 0
    while len(rows) < num_examples:
        attempts += 1
        if attempts > 200 * num_examples + 10_000:
            raise ValueError(f"could not draw {num_examples} distinct {split} problems with max_digits={max_digits}")
        expression, answer, a, b = make_problem(rng, max_digits, operations)
        question = f"What is {expression}?"
        if question in seen or _is_held_out(question) != want_held_out:
            continue
        seen.add(question)
        row = make_row(expression, answer, column_steps(a, b) if steps else None)
        if split == "train" and noise and a % 10 + b % 10 >= 10 and (a >= 10 or b >= 10) and noise_rng.random() < noise:
            from data_recipes.preference import column_work

            lines, wrong = column_work(a, b, "carry", column=1)
            row["messages"][-1]["content"] = "\n".join(lines) + f"\n#### {wrong}"
            row["noisy"] = True
        rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--num-train", type=int, default=2000)
    parser.add_argument("--num-eval", type=int, default=200)
    parser.add_argument("--max-digits", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    for split, count in (("train", args.num_train), ("eval", args.num_eval)):
        rows = arithmetic(split, count, args.seed, max_digits=args.max_digits)
        path = args.out / f"arithmetic_{split}.jsonl"
        path.write_text("".join(json.dumps(row) + "\n" for row in rows))
        print(f"wrote {len(rows)} rows to {path}")


if __name__ == "__main__":
    main()
