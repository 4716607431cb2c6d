"""Read rows from files, the hub, or a data_recipes generator, keeping where each row came from.

Every row is returned as `SourceRow(source, index, row)` so later errors can say
"row 17 of train.jsonl" instead of a stack trace.
"""

from __future__ import annotations

import contextlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from posttrain.errors import DataError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SourceRow:
    source: str  # file path, hub name or "generator:<name>"
    index: int  # 1-based row (line) number within the source
    row: Any

    def where(self) -> str:
        return f"row {self.index} of {self.source}"


def read_jsonl(path: Path, on_bad_row: str = "error") -> list[SourceRow]:
    """Rows of a JSON-lines file. A line that is not UTF-8 or not JSON raises a DataError naming the line, or with
    `on_bad_row="skip"` is skipped; the skipped lines are counted in one warning."""
    rows, skipped = [], []
    with _opened(path, "rb") as handle:
        for line_number, raw in enumerate(handle, start=1):
            where = f"line {line_number} of {path}"
            try:
                line = raw.decode("utf-8")
                if not line.strip():
                    continue
                rows.append(SourceRow(str(path), line_number, json.loads(line)))
            except UnicodeDecodeError as error:
                column = error.start + 1
                problem = f"{where} is not valid UTF-8 ({_bad_byte(error)} at column {column}); save it as UTF-8"
                skipped.append(_bad_line(problem, on_bad_row))
            except json.JSONDecodeError as error:
                problem = f"{where} is not valid JSON ({error.msg}); expected one JSON object per line"
                skipped.append(_bad_line(problem, on_bad_row))
    if skipped:
        log.warning("%s: skipped %d bad lines (data.on_bad_row=skip), e.g. %s", path, len(skipped), skipped[0])
    return rows


def _bad_line(problem: str, on_bad_row: str) -> str:
    if on_bad_row != "skip":
        raise DataError(problem + " (data.on_bad_row=skip skips such lines)")
    return problem


def _bad_byte(error: UnicodeDecodeError) -> str:
    return f"byte 0x{error.object[error.start]:02x}"


@contextlib.contextmanager
def _opened(path: Path, mode: str):
    """`path` opened, or a DataError naming it (a directory, no permission, an I/O error)."""
    try:
        handle = path.open(mode)
    except OSError as error:
        raise DataError(f"cannot read data file {path}: {error.strerror or error}") from None
    with handle:
        try:
            yield handle
        except OSError as error:
            raise DataError(f"cannot read data file {path}: {error.strerror or error}") from None


def read_json(path: Path) -> list[SourceRow]:
    """Rows of a .json file holding one list of row objects."""
    with _opened(path, "rb") as handle:
        raw = handle.read()
    try:
        content = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as error:
        raise DataError(f"{path} is not valid UTF-8 ({_bad_byte(error)} at byte offset {error.start})") from None
    except json.JSONDecodeError as error:
        raise DataError(f"{path} is not valid JSON ({error.msg} at line {error.lineno})") from None
    if not isinstance(content, list):
        raise DataError(f"{path} must hold a JSON list of rows, found {type(content).__name__}")
    return [SourceRow(str(path), i, row) for i, row in enumerate(content, start=1)]


def read_parquet(path: Path) -> list[SourceRow]:
    """Rows of a .parquet file, read with pyarrow (no copy in the datasets cache)."""
    import pyarrow
    import pyarrow.parquet

    try:
        table = pyarrow.parquet.read_table(path)
    except (pyarrow.ArrowException, OSError) as error:
        reason = " ".join(str(error).split())[:200]
        raise DataError(f"{path} is not a readable parquet file ({reason})") from None
    return [SourceRow(str(path), i, row) for i, row in enumerate(table.to_pylist(), start=1)]


def read_file(path: Path, on_bad_row: str = "error") -> list[SourceRow]:
    """Rows of a local .jsonl, .json (a list of objects) or .parquet file; every problem with the file itself (it
    is missing, a directory, unreadable, not UTF-8, corrupt) is a one-line DataError naming it. `on_bad_row` applies
    to the lines of a .jsonl file (see `read_jsonl`)."""
    if not path.exists():
        raise DataError(f"data file {path} does not exist; check data.train_files / data.eval_files")
    if path.is_dir():
        raise DataError(f"data file {path} is a directory; give a .jsonl, .json or .parquet file")
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        return read_jsonl(path, on_bad_row)
    if suffix == ".json":
        return read_json(path)
    if suffix == ".parquet":
        return read_parquet(path)
    raise DataError(f"{path}: unsupported data file type {suffix!r}; use .jsonl, .json or .parquet")


def read_source(name: str, split: str = "train", on_bad_row: str = "error") -> list[SourceRow]:
    """A local file, or (when no such file exists and the name looks like owner/name) a hub dataset."""
    path = Path(name)
    if path.exists() or path.suffix.lower() in (".jsonl", ".json", ".parquet"):
        return read_file(path, on_bad_row)
    return read_hub(name, split)


def read_hub(name: str, split: str = "train", config_name: str | None = None) -> list[SourceRow]:
    """Rows of the hub dataset `name` (`config_name`, `split`) via `datasets.load_dataset` (needs the hub or its
    cache)."""
    import datasets

    table = datasets.load_dataset(name, config_name, split=split)
    return [SourceRow(name, i, row) for i, row in enumerate(table, start=1)]
