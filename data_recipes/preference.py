"""Synthetic preference pairs: arithmetic (correct vs plausibly wrong) and cyclic (intransitive) choices.

`arithmetic_preference`: the arithmetic task's problems (data_recipes/arithmetic.py, same disjoint
train / held-out split by question hash); chosen = the correct worked answer, rejected = the same
answer with a plausible mistake: off by one, a dropped carry / borrow, or the tens digit off by one.
    {"prompt": [user], "chosen": [assistant], "rejected": [assistant], "ground_truth": "432", "error": "carry"}

`cyclic_preference`: intransitive preferences, the General Preference Model's test case (Zhang et al.
2024). Each prompt names two players and a game whose three moves beat each other in a cycle
(A > B > C > A); every prompt contributes all three pairs. Bradley-Terry can rank at most 2 of a
prompt's 3 pairs correctly (a scalar order has no cycles); a skew-symmetric GPM can rank all three.
Held-out prompts (a hash bucket of the prompt text) are never trained on. `order="transitive"` reverses
the closing pair (A > B > C and A > C): the same responses with a preference BT can represent.
    {"prompt": [user], "chosen": [assistant], "rejected": [assistant], "subset": "elements"}
Responses are the bare move by default: a reward model reads its embedding at the response's last
(end-of-turn) token, and in a small model trained from scratch the move must stand out in that state.
With `phrased=True` ("I play {move}.", "I choose {move}, of course.", ...) the phrasing swamps it: the
tiny GPM of recipe=tiny_gpm_cyclic stays near chance (0.55-0.60 held out) instead of reaching 1.0.

`game_moves`: SFT rows for the same prompts, {"messages": [user, assistant], "prompt": [user], "subset"}:
the assistant plays a uniformly random legal move; a policy trained on them is the starting point of
self-play (GPO) against a GPM trained on `cyclic_preference`.

CLI: python -m data_recipes.preference --task arithmetic_preference --out DIR [--num-train N --num-eval N --seed S]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
from pathlib import Path

from data_recipes.arithmetic import _is_held_out, make_problem
from posttrain.data.generators import register_task

# Each game lists its moves in cycle order: every move beats the next one, the last beats the first.
CYCLIC_GAMES = {
    "hand": ("rock", "scissors", "paper"),
    "elements": ("fire", "grass", "water"),
    "chain": ("fox", "hen", "corn"),
}
PLAYERS = ("Ann", "Ben", "Cara", "Dan", "Eva", "Finn", "Gia", "Hugo", "Ida", "Jack", "Kim", "Leo")
# Prompts differ only by two players from a small pool (and the game): each distinct prompt token is one more
# direction in which the tiny model's end-of-turn state varies between prompts, which the score must learn to
# ignore. With 5-digit round numbers in two phrasings (the first version) recipe=tiny_gpm_cyclic reached
# 0.85-0.99 held out depending on the seed; with these prompts 1.0 on every seed tried.
PROMPT_TEMPLATES = ("{player} and {opponent} play the {game} game.",)
PHRASED_RESPONSES = (
    "I play {move}.",
    "My move: {move}.",
    "{move}!",
    "I choose {move}, of course.",
    "Let me go with {move}.",
)
ORDERS = ("cyclic", "transitive")


def _answer_text(expression: str, answer: int) -> str:
    return f"{expression} = {answer}\n#### {answer}"


def _evaluate(a: int, operator: str, b: int) -> int:
    return a + b if operator == "+" else a - b


def _misread(number: int, rng: random.Random) -> int:
    """The operand as a hurried reader copies it: two digits swapped, else one digit off by one."""
    text = str(number)
    if len(text) == 2 and text[0] != text[1] and text[1] != "0":
        return int(text[::-1])
    return number + 1 if number < 9 or rng.random() < 0.5 else number - 1


def arithmetic_mistakes(expression: str, answer: int, rng: random.Random) -> dict[str, str]:
    """Wrong worked answers a careless solver writes, by kind (a kind is absent where it cannot happen).

    Kinds that need the sum itself to spot: off_by_one (answer +-1), carry (a dropped carry or borrow,
    else the tens digit off by one). Kinds visible from the context: misread (an operand copied wrong
    from the question, then computed correctly), transcription (the final "####" line miscopies the
    worked result).
    """
    a, operator, b = expression.split()
    a, b = int(a), int(b)
    if operator == "+" and a % 10 + b % 10 >= 10:
        carry = answer - 10  # forgot to carry the one
    elif operator == "-" and a % 10 < b % 10:
        carry = answer + 10  # forgot to borrow
    else:
        carry = answer + 10 if answer < 10 else answer - 10
    wrong = {
        "off_by_one": _answer_text(expression, answer + rng.choice((-1, 1))),
        "carry": _answer_text(expression, carry),
    }
    if rng.random() < 0.5:
        a_read, b_read = _misread(a, rng), b
    else:
        a_read, b_read = a, _misread(b, rng)
    wrong["misread"] = _answer_text(f"{a_read} {operator} {b_read}", _evaluate(a_read, operator, b_read))
    wrong["transcription"] = f"{expression} = {answer}\n#### {answer + rng.choice((-1, 1, 10, -10))}"
    return wrong


MISTAKE_KINDS = ("off_by_one", "carry", "misread", "transcription")


def column_work(a: int, b: int, mistake: str | None = None, column: int = 0, delta: int = 1) -> tuple[list[str], int]:
    """Column addition lines ("7 + 4 + 0 = 11", least significant first) and the answer they give, with
    an optional `mistake` in `column` that every later column then carries on from consistently:
    misread (a's digit written `delta` off), carry (the incoming carry flipped), off_by_one (the total
    written `delta` off)."""
    lines, carry, answer, place = [], 0, 0, 1
    while a or b or place == 1:
        digit_a, digit_b = a % 10, b % 10
        if mistake == "misread" and place == 10**column:
            digit_a = (digit_a + delta) % 10
        if mistake == "carry" and place == 10**column:
            carry = 1 - carry
        total = digit_a + digit_b + carry
        if mistake == "off_by_one" and place == 10**column:
            total = max(0, total + delta)
        lines.append(f"{digit_a} + {digit_b} + {carry} = {total}")
        answer += (total % 10) * place
        carry, a, b, place = total // 10, a // 10, b // 10, place * 10
    return lines, answer + carry * place


def _work_text(lines: list[str], answer: int) -> str:
    return "\n".join(lines) + f"\n#### {answer}"


def column_mistake(a: int, b: int, kind: str, rng: random.Random) -> str:
    """A column-addition answer to a + b with one mistake of `kind` (see `column_work`); never the correct one."""
    lines, answer = column_work(a, b)
    if kind == "transcription":
        return _work_text(lines, answer + rng.choice((-1, 1, 10)))
    for _ in range(20):
        column = rng.randrange(len(lines) if kind != "carry" else max(1, len(lines)))
        wrong_lines, wrong_answer = column_work(a, b, kind, column, rng.choice((-1, 1)))
        if wrong_answer != answer and wrong_answer >= 0:
            return _work_text(wrong_lines, wrong_answer)
    return _work_text(lines, answer + 1)  # no column admits this kind (e.g. 0 + 0): an off-by-one answer


def _pair_row(question: str, chosen: str, rejected: str, answer: int, kind: str) -> dict:
    return {
        "prompt": [{"role": "user", "content": question}],
        "chosen": [{"role": "assistant", "content": chosen}],
        "rejected": [{"role": "assistant", "content": rejected}],
        "ground_truth": str(answer),
        "mistake": kind,
    }


@register_task("arithmetic_preference")
def arithmetic_preference(
    split: str,
    num_examples: int,
    seed: int,
    max_digits: int = 2,
    operations: str = "+-",
    steps: bool = False,
    mistakes: list[str] | tuple[str, ...] = MISTAKE_KINDS,
) -> list[dict]:
    """`num_examples` pairs over distinct problems (train and eval problems never overlap, as in the
    arithmetic task); each rejected answer makes one mistake drawn uniformly from `mistakes`.

    steps=False: one-line answers "a + b = c\n#### c" (`arithmetic_mistakes`). steps=True (addition only):
    column-addition answers as the arithmetic task writes them, the mistake made in one column and
    carried on consistently (`column_mistake`); each step depends on a few earlier tokens, so a tiny
    model can learn to tell them apart.
    """
    if split not in ("train", "eval"):
        raise ValueError(f"split must be 'train' or 'eval', got {split!r}")
    unknown = sorted(set(mistakes) - set(MISTAKE_KINDS))
    if unknown or not mistakes:
        raise ValueError(f"unknown mistake kinds {unknown}; choose from {', '.join(MISTAKE_KINDS)}")
    if steps and operations != "+":
        raise ValueError("steps=True is defined for addition only; set operations='+'")
    rng = random.Random(f"arithmetic_preference:{seed}:{split}")
    rows, seen, attempts = [], set(), 0
    while len(rows) < num_examples:
        attempts += 1
        if attempts > 200 * num_examples + 10_000:
            raise ValueError(f"could not draw {num_examples} distinct {split} problems with max_digits={max_digits}")
        expression, answer, a, b = make_problem(rng, max_digits, operations)
        question = f"What is {expression}?"
        if question in seen or _is_held_out(question) != (split == "eval"):
            continue
        seen.add(question)
        kind = rng.choice(list(mistakes))
        if steps:
            chosen, rejected = _work_text(*column_work(a, b)), column_mistake(a, b, kind, rng)
        else:
            chosen, rejected = _answer_text(expression, answer), arithmetic_mistakes(expression, answer, rng)[kind]
        rows.append(_pair_row(question, chosen, rejected, answer, kind))
    return rows


def _prompt_is_held_out(prompt: str) -> bool:
    return hashlib.sha256(prompt.encode()).digest()[0] % 5 == 0  # 1 in 5 prompts is held out


def cycle_pairs(moves: tuple[str, ...]) -> list[tuple[str, str]]:
    """(winner, loser) for each consecutive pair of the cycle, closing it: A > B, B > C, C > A."""
    return [(moves[i], moves[(i + 1) % len(moves)]) for i in range(len(moves))]


def order_pairs(moves: tuple[str, ...], order: str) -> list[tuple[str, str]]:
    """The three (winner, loser) pairs of a game: the cycle, or with its closing pair reversed (A > C)."""
    if order not in ORDERS:
        raise ValueError(f"order={order!r} is not one of {', '.join(ORDERS)}")
    pairs = cycle_pairs(moves)
    return pairs if order == "cyclic" else pairs[:-1] + [pairs[-1][::-1]]


def game_prompts(split: str, num_prompts: int, seed: int, task: str):
    """`num_prompts` distinct (prompt text, game) of `split` (held-out prompts are a hash bucket of the text)."""
    if split not in ("train", "eval"):
        raise ValueError(f"split must be 'train' or 'eval', got {split!r}")
    rng = random.Random(f"{task}:{seed}:{split}")
    prompts, seen, attempts = [], set(), 0
    while len(prompts) < num_prompts:
        attempts += 1
        if attempts > 200 * num_prompts + 10_000:
            available = len(PLAYERS) * (len(PLAYERS) - 1) * len(CYCLIC_GAMES) * len(PROMPT_TEMPLATES)
            raise ValueError(
                f"could not draw {num_prompts} distinct {split} prompts ({available} exist over both splits, "
                f"about 1 in 5 held out); ask for fewer examples"
            )
        game = rng.choice(sorted(CYCLIC_GAMES))
        player, opponent = rng.sample(PLAYERS, 2)
        prompt = rng.choice(PROMPT_TEMPLATES).format(player=player, opponent=opponent, game=game)
        if prompt in seen or _prompt_is_held_out(prompt) != (split == "eval"):
            continue
        seen.add(prompt)
        prompts.append((prompt, game))
    return prompts, rng


@register_task("cyclic_preference")
def cyclic_preference(
    split: str, num_examples: int, seed: int, order: str = "cyclic", phrased: bool = False
) -> list[dict]:
    """`num_examples` pairs (3 per prompt, rounded down to whole prompts); held-out prompts are disjoint."""
    order_pairs(CYCLIC_GAMES["hand"], order)  # a bad order fails before any drawing
    prompts, rng = game_prompts(split, num_examples // 3, seed, "cyclic_preference")

    def response(move: str) -> str:
        return rng.choice(PHRASED_RESPONSES).format(move=move) if phrased else move

    rows = []
    for prompt, game in prompts:
        for winner, loser in order_pairs(CYCLIC_GAMES[game], order):
            rows.append(
                {
                    "prompt": [{"role": "user", "content": prompt}],
                    "chosen": [{"role": "assistant", "content": response(winner)}],
                    "rejected": [{"role": "assistant", "content": response(loser)}],
                    "subset": game,
                }
            )
    return rows


@register_task("game_moves")
def game_moves(split: str, num_examples: int, seed: int) -> list[dict]:
    """`num_examples` SFT rows over distinct prompts of `cyclic_preference`'s kind: a random legal move each."""
    prompts, rng = game_prompts(split, num_examples, seed, "game_moves")
    rows = []
    for prompt, game in prompts:
        user = {"role": "user", "content": prompt}
        rows.append(
            {
                "messages": [user, {"role": "assistant", "content": rng.choice(CYCLIC_GAMES[game])}],
                "prompt": [user],
                "subset": game,
            }
        )
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--task", default="arithmetic_preference", choices=["arithmetic_preference", "cyclic_preference", "game_moves"]
    )
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--num-train", type=int, default=2000)
    parser.add_argument("--num-eval", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    generate = {
        "arithmetic_preference": arithmetic_preference,
        "cyclic_preference": cyclic_preference,
        "game_moves": game_moves,
    }[args.task]
    for split, count in (("train", args.num_train), ("eval", args.num_eval)):
        path = args.out / f"{args.task}_{split}.jsonl"
        path.write_text("".join(json.dumps(row) + "\n" for row in generate(split, count, args.seed)))
        print(f"wrote {count} rows to {path}")


if __name__ == "__main__":
    main()
