"""Decontamination: drop training rows whose prompts share a word n-gram with an evaluation set.

    posttrain decontaminate --train train.jsonl --eval gsm8k=gsm8k_test.jsonl --eval math=math.jsonl \\
        --ngram 8 --out train.clean.jsonl --report contamination.json

Text is compared as normalised words (`normalize_words`: lowercase, punctuation replaced by spaces,
split on whitespace), so case, punctuation and spacing changes do not hide a copy. A training row is
contaminated by an eval set when any n consecutive words of its prompt (default n = 8) also occur, in
order, in one of that set's prompts. Because every n-gram counts, copies with text prepended or
appended, or with a word changed (the n-grams that avoid the change survive), are still found; two
texts that share only phrases shorter than n words are not. Eval prompts shorter than n words have no
n-gram and cannot be checked at this n: the report counts them (`eval_rows_too_short`); lower --ngram
to cover them.

A row's prompt text (`prompt_text`) is its "prompt" (a string or chat messages), else the non-assistant
turns of its "messages", else its "question", "problem", "instruction" or "text" field; with
--all-turns the assistant turns of "messages" are checked too.

The report (JSON) has, per eval set: its rows, how many training rows it contaminated, how many of its
own rows were found in training, and up to --examples example matches (training row id, eval row id,
the shared n-gram). Row ids are a row's "id" field, else "line N" of its file.
"""

from __future__ import annotations

import argparse
import json
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from posttrain.data.sources import SourceRow, read_file
from posttrain.errors import DataError

DEFAULT_NGRAM = 8
TEXT_FIELDS = ("question", "problem", "instruction", "text")
_PUNCTUATION = re.compile(r"[^\w\s]|_")


def normalize_words(text: str) -> list[str]:
    """Lowercase words of `text` with every punctuation character replaced by a space."""
    return _PUNCTUATION.sub(" ", text.lower()).split()


def word_ngrams(words: list[str], n: int) -> set[tuple[str, ...]]:
    """Every run of `n` consecutive words (empty if there are fewer than `n`)."""
    return {tuple(words[i : i + n]) for i in range(len(words) - n + 1)}


def _message_text(messages: Any, all_turns: bool) -> str | None:
    if not isinstance(messages, list):
        return None
    parts = [m.get("content") for m in messages if isinstance(m, dict) and (all_turns or m.get("role") != "assistant")]
    parts = [part for part in parts if isinstance(part, str)]
    return "\n".join(parts) if parts else None


def prompt_text(row: Any, where: str, all_turns: bool = False) -> str:
    """The text of a row compared for overlap (rules in the module docstring); DataError naming `where` if none."""
    if isinstance(row, dict):
        prompt = row.get("prompt")
        if isinstance(prompt, str):
            return prompt
        text = _message_text(prompt, all_turns) or _message_text(row.get("messages"), all_turns)
        if text is not None:
            return text
        for name in TEXT_FIELDS:
            if isinstance(row.get(name), str):
                return row[name]
    raise DataError(
        f'{where} has no prompt text; expected a "prompt" (string or chat messages), "messages", or one of '
        f"{', '.join(TEXT_FIELDS)}"
    )


def row_id(source_row: SourceRow) -> str:
    value = source_row.row.get("id") if isinstance(source_row.row, dict) else None
    return str(value) if isinstance(value, (str, int)) and not isinstance(value, bool) else f"line {source_row.index}"


@dataclass
class EvalSetReport:
    eval_rows: int
    eval_rows_too_short: int = 0
    matched_train_rows: int = 0
    matched_eval_rows: set = field(default_factory=set)
    examples: list = field(default_factory=list)

    def as_dict(self) -> dict:
        return {
            "eval_rows": self.eval_rows,
            "eval_rows_too_short": self.eval_rows_too_short,
            "matched_train_rows": self.matched_train_rows,
            "matched_eval_rows": len(self.matched_eval_rows),
            "examples": self.examples,
        }


def build_eval_index(eval_sets: dict[str, list[SourceRow]], n: int, all_turns: bool = False):
    """(n-gram -> [(eval set, eval row id)], per-set reports) over every eval prompt."""
    index: dict[tuple[str, ...], list[tuple[str, str]]] = {}
    reports = {}
    for name, rows in eval_sets.items():
        reports[name] = EvalSetReport(eval_rows=len(rows))
        for source_row in rows:
            grams = word_ngrams(normalize_words(prompt_text(source_row.row, source_row.where(), all_turns)), n)
            if not grams:
                reports[name].eval_rows_too_short += 1
            for gram in grams:
                index.setdefault(gram, []).append((name, row_id(source_row)))
    return index, reports


def decontaminate(
    train_rows: list[SourceRow],
    eval_sets: dict[str, list[SourceRow]],
    n: int = DEFAULT_NGRAM,
    all_turns: bool = False,
    max_examples: int = 10,
) -> tuple[list[SourceRow], dict]:
    """(the training rows that share no n-gram with any eval set, the report as a dict)."""
    if n < 1:
        raise DataError(f"--ngram must be >= 1, got {n}")
    index, reports = build_eval_index(eval_sets, n, all_turns)
    kept = []
    for source_row in train_rows:
        words = normalize_words(prompt_text(source_row.row, source_row.where(), all_turns))
        hits: dict[str, tuple[str, tuple[str, ...]]] = {}  # eval set -> (first eval row id, n-gram)
        for start in range(len(words) - n + 1):
            gram = tuple(words[start : start + n])
            for name, eval_id in index.get(gram, ()):
                hits.setdefault(name, (eval_id, gram))
                reports[name].matched_eval_rows.add(eval_id)
        if not hits:
            kept.append(source_row)
        for name, (eval_id, gram) in hits.items():
            report = reports[name]
            report.matched_train_rows += 1
            if len(report.examples) < max_examples:
                report.examples.append({"train_id": row_id(source_row), "eval_id": eval_id, "ngram": " ".join(gram)})
    summary = {
        "ngram": n,
        "train_rows": len(train_rows),
        "kept_rows": len(kept),
        "removed_rows": len(train_rows) - len(kept),
        "eval_sets": {name: report.as_dict() for name, report in reports.items()},
    }
    return kept, summary


def read_rows(path: Path, what: str) -> list[SourceRow]:
    """Rows of a local .jsonl / .json / .parquet file; DataError naming the file if it is missing."""
    if not path.is_file():
        raise DataError(f"{what} file {path} does not exist")
    return read_file(path)


def parse_eval_argument(value: str) -> tuple[str, Path]:
    """ "name=path" (or a bare path, named by its stem)."""
    name, sep, path = value.partition("=")
    if not sep:
        return Path(value).stem, Path(value)
    if not name or not path:
        raise DataError(f"--eval {value!r}: expected NAME=FILE, e.g. --eval gsm8k=gsm8k_test.jsonl")
    return name, Path(path)


def write_jsonl(path: Path, rows: Iterable[Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="posttrain decontaminate", description=__doc__.splitlines()[0])
    parser.add_argument("--train", required=True, type=Path, help="training rows (.jsonl / .json / .parquet)")
    parser.add_argument(
        "--eval", required=True, action="append", metavar="NAME=FILE", help="an eval set; repeat for several"
    )
    parser.add_argument("--ngram", type=int, default=DEFAULT_NGRAM, help=f"words per n-gram (default {DEFAULT_NGRAM})")
    parser.add_argument("--out", required=True, type=Path, help="the training rows left, as JSONL")
    parser.add_argument("--report", type=Path, help="the per-eval-set report (JSON); printed when omitted")
    parser.add_argument("--all-turns", action="store_true", help="also compare the assistant turns of 'messages'")
    parser.add_argument("--examples", type=int, default=10, help="example matches kept per eval set")
    args = parser.parse_args(argv)

    eval_sets: dict[str, list[SourceRow]] = {}
    for value in args.eval:
        name, path = parse_eval_argument(value)
        if name in eval_sets:
            raise DataError(f"--eval name {name!r} is given twice; names label the report's sections")
        eval_sets[name] = read_rows(path, f"eval set {name!r}")
    train_rows = read_rows(args.train, "training")
    kept, report = decontaminate(train_rows, eval_sets, args.ngram, args.all_turns, args.examples)
    report = {"train": str(args.train), "out": str(args.out), **report}
    write_jsonl(args.out, (row.row for row in kept))
    if args.report:
        args.report.parent.mkdir(parents=True, exist_ok=True)
        args.report.write_text(json.dumps(report, indent=2) + "\n")
    else:
        print(json.dumps(report, indent=2))
    for name, section in report["eval_sets"].items():
        print(
            f"{name}: {section['matched_train_rows']} training rows match ({section['matched_eval_rows']} of "
            f"{section['eval_rows']} eval rows found; {section['eval_rows_too_short']} too short to check)"
        )
    print(f"kept {report['kept_rows']} of {report['train_rows']} training rows -> {args.out}")
    return 0


if __name__ == "__main__":
    import sys

    from posttrain.cli import run_subcommand

    sys.exit(run_subcommand("decontaminate", sys.argv[1:]))
