"""Evaluation tasks: prompts with a verifier and ground truth, from data_recipes, local files or the hub.

A task is named on the command line as KIND or KIND=DATA:
    arithmetic             the embedded default task's held-out split (conf/data/arithmetic.yaml options;
                           never trained on)
    gsm8k=test.jsonl       a local .jsonl / .json / .parquet file
    gsm8k                  the kind's hub dataset (needs the hub or its cache): openai/gsm8k (main, test)
    math=HuggingFaceH4/MATH-500, ifeval=google/IFEval, ...

Rows may be in posttrain's format ({"prompt" or "messages", "ground_truth", optional "verifier"}) or
the kind's hub format: gsm8k {"question", "answer"}, math {"problem", "answer" or "solution"}, ifeval
{"prompt", "instruction_id_list", "kwargs"}. Questions are used verbatim as the user turn (no few-shot
or answer-format instructions are added). A row's own "verifier" wins over the kind's default. The
first `num` rows are evaluated (all when `num` is None).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from posttrain.data.prompts import prompt_messages
from posttrain.data.sources import SourceRow, read_file, read_hub
from posttrain.errors import ConfigError, DataError
from posttrain.registry import Registry


@dataclass
class EvalExample:
    id: str  # "row N of <source>"
    prompt: list[dict]  # chat messages to answer
    verifier: str  # a name in posttrain.rewards.VERIFIERS
    ground_truth: Any


@dataclass
class EvalTask:
    name: str  # the label in results
    examples: list[EvalExample]


@dataclass(frozen=True)
class TaskKind:
    """How rows of one kind of task become examples."""

    verifier: str
    question_fields: tuple[str, ...]  # plain-text question columns of the hub format, tried in order
    ground_truth: Callable[[dict], Any]  # the hub format's label
    hub: tuple[str, str | None, str] | None = None  # default dataset: (name, config, split)


def _first_present(*keys: str) -> Callable[[dict], Any]:
    def label(row: dict) -> Any:
        return next((row[key] for key in keys if row.get(key) is not None), None)

    return label


def _ifeval_label(row: dict) -> Any:
    if "instruction_id_list" not in row:
        return None
    return {
        "instruction_id_list": row["instruction_id_list"],
        "kwargs": row.get("kwargs") or [{}] * len(row["instruction_id_list"]),
    }


TASK_KINDS: Registry = Registry("eval task")
TASK_KINDS.register("gsm8k")(
    TaskKind("gsm8k", ("question",), _first_present("answer"), ("openai/gsm8k", "main", "test"))
)
TASK_KINDS.register("math")(
    TaskKind("math", ("problem",), _first_present("answer", "solution"), ("HuggingFaceH4/MATH-500", None, "test"))
)
TASK_KINDS.register("ifeval")(TaskKind("ifeval", ("prompt",), _ifeval_label, ("google/IFEval", None, "train")))
TASK_KINDS.register("arithmetic")(TaskKind("gsm8k", (), _first_present("ground_truth")))  # generated: see load_task


def example_from_row(source_row: SourceRow, kind: TaskKind) -> EvalExample:
    """An example from a posttrain-format or hub-format row; DataError naming the row if it is neither."""
    row, where = source_row.row, source_row.where()
    if not isinstance(row, dict):
        raise DataError(f"{where} is not a JSON object")
    question = next((row[name] for name in kind.question_fields if isinstance(row.get(name), str)), None)
    if question is not None:
        prompt = [{"role": "user", "content": question}]
    elif "prompt" in row or "messages" in row:
        prompt = prompt_messages(row, where)
    else:
        fields = ", ".join(('"prompt"', '"messages"', *(f'"{name}"' for name in kind.question_fields)))
        raise DataError(f"{where} has no prompt; expected one of {fields}")
    truth = row["ground_truth"] if row.get("ground_truth") is not None else kind.ground_truth(row)
    if truth is None:
        raise DataError(f'{where} has no "ground_truth" (or the {kind.verifier} hub format\'s label column)')
    return EvalExample(where, prompt, row.get("verifier") or kind.verifier, truth)


def parse_task_spec(spec: str) -> tuple[str, str | None]:
    """ "kind" or "kind=data" -> (kind, data)."""
    kind, _, data = spec.partition("=")
    return kind.strip(), (data.strip() or None)


def task_label(kind: str, data: str | None) -> str:
    if data is None:
        return kind
    path = Path(data)
    return f"{kind}:{path.stem}" if path.suffix.lower() in (".jsonl", ".json", ".parquet") else f"{kind}:{data}"


def read_task_rows(kind_name: str, kind: TaskKind, data: str | None) -> list[SourceRow]:
    if data is None:
        if kind.hub is None:
            raise ConfigError(f"eval task {kind_name!r} needs data: {kind_name}=path/to/rows.jsonl")
        name, config, split = kind.hub
        return read_hub(name, split, config)
    path = Path(data)
    if path.exists() or path.suffix.lower() in (".jsonl", ".json", ".parquet"):
        if not path.is_file():
            raise DataError(f"eval task {kind_name}: data file {path} does not exist")
        return read_file(path)
    split = kind.hub[2] if kind.hub else "test"
    return read_hub(data, split)


def shipped_arithmetic_kwargs() -> dict:
    """The generator options of the embedded default (conf/data/arithmetic.yaml), so "arithmetic" evaluates
    held-out problems of exactly the task the default trains on."""
    from omegaconf import OmegaConf

    from posttrain.cli import CONF_DIR

    return OmegaConf.to_container(OmegaConf.load(CONF_DIR / "data" / "arithmetic.yaml").generator_kwargs)


def load_task(spec: str, num: int | None = None, seed: int = 0) -> EvalTask:
    """The task named by `spec` ("arithmetic", "gsm8k=test.jsonl", ...) with its first `num` examples."""
    kind_name, data = parse_task_spec(spec)
    kind = TASK_KINDS.get(kind_name)
    if kind_name == "arithmetic" and data is None:
        from data_recipes import generate_task

        if not num:
            raise ConfigError("the arithmetic eval task is generated: give a number of prompts (--num N)")
        rows = generate_task("arithmetic", "eval", num, seed, **shipped_arithmetic_kwargs())
        source_rows = [SourceRow("generator:arithmetic/eval", i, row) for i, row in enumerate(rows, start=1)]
    else:
        source_rows = read_task_rows(kind_name, kind, data)
        if num:
            source_rows = source_rows[:num]
    if not source_rows:
        raise DataError(f"eval task {spec!r} has no rows")
    return EvalTask(task_label(kind_name, data), [example_from_row(row, kind) for row in source_rows])
