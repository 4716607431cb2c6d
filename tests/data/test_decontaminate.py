"""Decontamination finds every planted copy (exact and lightly edited) of an eval prompt and no clean row."""

import json
import subprocess

import pytest
from helpers import cli_env, posttrain_command

from data_recipes.decontaminate import decontaminate, normalize_words, word_ngrams
from posttrain.cli import run_subcommand
from posttrain.data.sources import SourceRow

EVAL_GSM = [
    {
        "id": "gsm-1",
        "question": "Natalia sold clips to 48 of her friends in April, and then she sold half as many "
        "clips in May. How many clips did Natalia sell altogether in April and May?",
        "answer": "72",
    },
    {
        "id": "gsm-2",
        "question": "Weng earns 12 dollars an hour for babysitting. Yesterday, she just did 50 minutes "
        "of babysitting. How much did she earn?",
        "answer": "10",
    },
    {"id": "gsm-short", "question": "What is 2 + 2?", "answer": "4"},  # 4 words: cannot be checked at n = 8
]
EVAL_MATH = [
    {
        "problem": "Let f(x) be a polynomial such that f(x + 1) - f(x) = 6x + 4 for every real number x. Find the "
        "leading coefficient of f.",
        "solution": "\\boxed{3}",
    },
]


def chat(user: str, system: str | None = None) -> dict:
    turns = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": user}]
    return {"messages": turns + [{"role": "assistant", "content": "Let me think."}]}


NATALIA = EVAL_GSM[0]["question"]
WENG = EVAL_GSM[1]["question"]
MATH = EVAL_MATH[0]["problem"]

PLANTED = {  # id -> (row, the eval set it copies)
    "exact": (chat(NATALIA), "gsm8k"),
    "case_and_punctuation": (chat(NATALIA.upper().replace(",", "").replace("?", " ??").replace(".", " ;")), "gsm8k"),
    "one_word_changed": (chat(WENG.replace("Yesterday", "Today")), "gsm8k"),
    "number_changed": (chat(NATALIA.replace("48", "36")), "gsm8k"),
    "prepended": (chat("Solve this problem step by step and show your work. " + WENG), "gsm8k"),
    "appended": (chat(NATALIA + " Answer with a single number at the end, please."), "gsm8k"),
    "system_turn_and_extra_spaces": (chat("  ".join(WENG.split()), system="You are a helpful tutor."), "gsm8k"),
    "prompt_string_field": ({"prompt": "Question: " + MATH + "\nAnswer:", "completion": "3"}, "math"),
    "latex_spacing": (chat(MATH.replace("f(x + 1)", "f( x+1 )").replace("6x + 4", "6x+4")), "math"),
    "eight_word_span": (chat("My notes say she sold half as many clips in May, which I found odd."), "gsm8k"),
}
CLEAN = {
    "unrelated": chat("Write a haiku about the sea at dawn."),
    "seven_word_span": chat(
        "The shop sold half as many clips in May and doubled its ads."
    ),  # 7 words shared with NATALIA
    "scattered_short_phrases": chat(
        "Her friends in April said she did 50 minutes of reading; how much did she read? "
        "Find the leading coefficient later, for every real number counts."
    ),
    "same_topic": chat("Natalia bought 30 pencils and gave a third of them to her brother. How many are left?"),
    "short_eval_text_inside": chat(
        "What is 2 + 2? Explain why addition is commutative."
    ),  # eval row too short to check
}


def rows_of(named: dict) -> list[SourceRow]:
    return [SourceRow("train.jsonl", i, {"id": name, **row}) for i, (name, row) in enumerate(named.items(), start=1)]


def eval_sets() -> dict:
    return {
        "gsm8k": [SourceRow("gsm.jsonl", i, row) for i, row in enumerate(EVAL_GSM, start=1)],
        "math": [SourceRow("math.jsonl", i, row) for i, row in enumerate(EVAL_MATH, start=1)],
    }


def test_normalisation_ignores_case_punctuation_and_spacing():
    assert normalize_words("Hello,  WORLD!  It's 3+4=7.") == ["hello", "world", "it", "s", "3", "4", "7"]
    assert word_ngrams(["a", "b", "c"], 2) == {("a", "b"), ("b", "c")} and word_ngrams(["a"], 2) == set()


def test_every_planted_row_is_found_and_no_clean_row_is():
    train = rows_of({**{name: row for name, (row, _) in PLANTED.items()}, **CLEAN})
    kept, report = decontaminate(train, eval_sets(), n=8)
    assert sorted(row.row["id"] for row in kept) == sorted(CLEAN)
    assert report["removed_rows"] == len(PLANTED) and report["kept_rows"] == len(CLEAN)
    for name in ("gsm8k", "math"):
        planted_here = sorted(row_id for row_id, (_, target) in PLANTED.items() if target == name)
        section = report["eval_sets"][name]
        assert section["matched_train_rows"] == len(planted_here)
        assert sorted(example["train_id"] for example in section["examples"]) == planted_here
    gsm = report["eval_sets"]["gsm8k"]
    assert gsm["eval_rows"] == 3 and gsm["eval_rows_too_short"] == 1 and gsm["matched_eval_rows"] == 2
    example = next(e for e in gsm["examples"] if e["train_id"] == "exact")
    assert example["eval_id"] == "gsm-1" and len(example["ngram"].split()) == 8
    assert report["eval_sets"]["math"]["examples"][0]["eval_id"] == "line 1"  # no "id": the line number


def test_n_is_configurable():
    train = rows_of({"seven_word_span": CLEAN["seven_word_span"]})
    assert len(decontaminate(train, eval_sets(), n=8)[0]) == 1
    assert len(decontaminate(train, eval_sets(), n=7)[0]) == 0


def test_command_writes_filtered_rows_and_report(tmp_path):
    train = tmp_path / "train.jsonl"
    train.write_text(
        "".join(json.dumps(row.row) + "\n" for row in rows_of({**{k: r for k, (r, _) in PLANTED.items()}, **CLEAN}))
    )
    gsm, math = tmp_path / "gsm.jsonl", tmp_path / "math.jsonl"
    gsm.write_text("".join(json.dumps(row) + "\n" for row in EVAL_GSM))
    math.write_text("".join(json.dumps(row) + "\n" for row in EVAL_MATH))
    out, report = tmp_path / "clean.jsonl", tmp_path / "report.json"
    command = posttrain_command(
        "decontaminate",
        "--train",
        str(train),
        "--eval",
        f"gsm8k={gsm}",
        "--eval",
        f"math={math}",
        "--ngram",
        "8",
        "--out",
        str(out),
        "--report",
        str(report),
    )
    result = subprocess.run(command, env=cli_env(), capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    kept = [json.loads(line) for line in out.read_text().splitlines()]
    assert sorted(row["id"] for row in kept) == sorted(CLEAN)
    assert kept[0] == {"id": "unrelated", **CLEAN["unrelated"]}  # rows are written back unchanged
    summary = json.loads(report.read_text())
    assert summary["removed_rows"] == len(PLANTED) and set(summary["eval_sets"]) == {"gsm8k", "math"}
    assert f"kept {len(CLEAN)} of {len(PLANTED) + len(CLEAN)} training rows" in result.stdout


@pytest.mark.parametrize("case", ["missing_train", "missing_eval", "bad_json", "no_text"])
def test_bad_input_is_one_line_naming_file_and_line_with_status_2(case, tmp_path, capsys):
    train, evals = tmp_path / "train.jsonl", tmp_path / "eval.jsonl"
    train.write_text(json.dumps(chat("hello there")) + "\n")
    evals.write_text(json.dumps(EVAL_GSM[0]) + "\n")
    expected = {
        "missing_train": f"training file {tmp_path / 'nope.jsonl'} does not exist",
        "missing_eval": f"eval set 'gsm8k' file {tmp_path / 'nope.jsonl'} does not exist",
        "bad_json": f"line 2 of {train} is not valid JSON",
        "no_text": f"row 2 of {train} has no prompt text",
    }[case]
    if case == "bad_json":
        train.write_text(train.read_text() + "{not json\n")
    if case == "no_text":
        train.write_text(train.read_text() + json.dumps({"answer": "4"}) + "\n")
    args = [
        "--train",
        str(tmp_path / "nope.jsonl" if case == "missing_train" else train),
        "--eval",
        f"gsm8k={tmp_path / 'nope.jsonl' if case == 'missing_eval' else evals}",
        "--out",
        str(tmp_path / "o.jsonl"),
    ]
    assert run_subcommand("decontaminate", args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("posttrain decontaminate: error: ") and expected in err, err
    assert not (tmp_path / "o.jsonl").exists()
