"""What `posttrain doctor` runs and prints: checks, their results, the table, the exit status.

A check is a function of a shared context dict returning a one-line detail; it fails by raising (any
exception, reported as its type and message) and declines by raising `NotRun` (a package missing, no
GPU). Checks run in order; one whose prerequisite (`after`) did not pass is not run. Standard library only.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

OK, FAILED, NOT_RUN = "ok", "FAIL", "not run"


class NotRun(Exception):
    """Raised by a check that cannot run on this machine (reported as "not run", not a failure)."""


@dataclass(frozen=True)
class Check:
    name: str
    run: Callable[[dict], str]  # context -> one-line detail; raises to fail, NotRun to decline
    needs_gpu: bool = False
    after: tuple[str, ...] = ()  # checks that must pass first (e.g. an engine start before a sync)
    description: str = ""


@dataclass(frozen=True)
class CheckResult:
    name: str
    status: str  # OK | FAILED | NOT_RUN
    detail: str
    seconds: float = 0.0


def one_line(text: str, limit: int = 300) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def run_check(check: Check, context: dict) -> CheckResult:
    started = time.perf_counter()
    try:
        detail, status = check.run(context), OK
    except NotRun as reason:
        detail, status = str(reason), NOT_RUN
    except Exception as error:  # a doctor reports every failure and goes on to the next check
        detail, status = f"{type(error).__name__}: {error}", FAILED
    return CheckResult(check.name, status, one_line(detail), time.perf_counter() - started)


def run_checks(
    checks: Sequence[Check],
    gpus: int,
    context: dict | None = None,
    skip: Iterable[str] = (),
    on_result: Callable[[CheckResult], None] | None = None,
) -> list[CheckResult]:
    """Results of `checks` in order; GPU checks are not run when `gpus` is 0, nor those named in `skip`."""
    context = {} if context is None else context
    context.setdefault("gpus", gpus)
    skip, results, passed = set(skip), [], set()
    for check in checks:
        missing = [name for name in check.after if name not in passed]
        if check.name in skip:
            result = CheckResult(check.name, NOT_RUN, "skipped (--skip)")
        elif check.needs_gpu and gpus == 0:
            result = CheckResult(check.name, NOT_RUN, "needs a GPU")
        elif missing:
            result = CheckResult(check.name, NOT_RUN, f"needs {', '.join(missing)} to pass first")
        else:
            result = run_check(check, context)
        if result.status == OK:
            passed.add(check.name)
        results.append(result)
        if on_result is not None:
            on_result(result)
    return results


def render_table(results: Sequence[CheckResult]) -> str:
    """A Markdown table (check | result | seconds | detail) and a one-line summary."""
    rows = [("check", "result", "seconds", "detail")]
    rows += [(r.name, r.status, f"{r.seconds:.1f}" if r.status != NOT_RUN else "", r.detail) for r in results]
    widths = [max(len(row[column]) for row in rows) for column in range(3)]

    def line(row):
        return "| " + " | ".join([*(cell.ljust(width) for cell, width in zip(row, widths)), row[3]]) + " |"

    separator = "|" + "|".join("-" * (width + 2) for width in widths) + "|---|"
    counts = {status: sum(r.status == status for r in results) for status in (OK, FAILED, NOT_RUN)}
    summary = f"{counts[OK]} ok, {counts[FAILED]} failed, {counts[NOT_RUN]} not run"
    return "\n".join([line(rows[0]), separator, *(line(row) for row in rows[1:]), "", summary])


def exit_status(results: Sequence[CheckResult]) -> int:
    """1 if any check failed, else 0 (checks that were not run do not fail the doctor)."""
    return 1 if any(result.status == FAILED for result in results) else 0
