"""Read rows from files, the hub, or a data_recipes generator, keeping where each row came from.

Every row is returned as `SourceRow(source, index, row)` so later errors can say
"row 17 of train.jsonl" instead of a stack trace.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from posttrain.errors import DataError


@dataclass(frozen=True)
class SourceRow:
    source: str  # file path, hub name or "generator:<name>"
    index: int  # 1-based row (line) number within the source
    row: Any

    def where(self) -> str:
        return f"row {self.index} of {self.source}"


def read_jsonl(path: Path) -> list[SourceRow]:
    rows = []
    with path.open(encoding="utf-8") as handle:
        for line_number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                rows.append(SourceRow(str(path), line_number, json.loads(line)))
            except json.JSONDecodeError as error:
                raise DataError(
                    f"line {line_number} of {path} is not valid JSON ({error.msg}); expected one JSON object per line"
                ) from None
    return rows


def read_file(path: Path) -> list[SourceRow]:
    """Rows of a local .jsonl, .json (a list of objects) or .parquet file."""
    if not path.exists():
        raise DataError(f"data file {path} does not exist; check data.train_files / data.eval_files")
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        return read_jsonl(path)
    if suffix == ".json":
        try:
            content = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as error:
            raise DataError(f"{path} is not valid JSON ({error.msg} at line {error.lineno})") from None
        if not isinstance(content, list):
            raise DataError(f"{path} must hold a JSON list of rows, found {type(content).__name__}")
        return [SourceRow(str(path), i, row) for i, row in enumerate(content, start=1)]
    if suffix == ".parquet":
        import datasets

        table = datasets.load_dataset("parquet", data_files=str(path), split="train")
        return [SourceRow(str(path), i, row) for i, row in enumerate(table, start=1)]
    raise DataError(f"{path}: unsupported data file type {suffix!r}; use .jsonl, .json or .parquet")


def read_source(name: str, split: str = "train") -> list[SourceRow]:
    """A local file, or (when no such file exists and the name looks like owner/name) a hub dataset."""
    path = Path(name)
    if path.exists() or path.suffix.lower() in (".jsonl", ".json", ".parquet"):
        return read_file(path)
    return read_hub(name, split)


def read_hub(name: str, split: str = "train", config_name: str | None = None) -> list[SourceRow]:
    """Rows of the hub dataset `name` (`config_name`, `split`) via `datasets.load_dataset` (needs the hub or its
    cache)."""
    import datasets

    table = datasets.load_dataset(name, config_name, split=split)
    return [SourceRow(name, i, row) for i, row in enumerate(table, start=1)]
