"""Reading data files: every file-level problem is one DataError naming the file; bad lines can be skipped."""

import json
import logging

import pyarrow
import pyarrow.parquet
import pytest

from posttrain.data.sources import read_file
from posttrain.errors import DataError

ROW = {"messages": [{"role": "user", "content": "What is 1 + 1?"}, {"role": "assistant", "content": "2"}]}


def _parquet(path, rows):
    pyarrow.parquet.write_table(pyarrow.Table.from_pylist(rows), path)
    return path


def _non_utf8_jsonl(tmp_path):
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(json.dumps(ROW).encode() + b'\n{"messages": "caf\xe9"}\n')
    return path


def _non_utf8_json(tmp_path):
    path = tmp_path / "latin1.json"
    path.write_bytes(b'[{"messages": "caf\xe9"}]')
    return path


def _directory(tmp_path):
    path = tmp_path / "x.jsonl"
    path.mkdir()
    return path


def _garbage_parquet(tmp_path):
    path = tmp_path / "garbage.parquet"
    path.write_bytes(b"PAR1 this is not a parquet file at all")
    return path


def _truncated_parquet(tmp_path):
    whole = _parquet(tmp_path / "whole.parquet", [ROW] * 50).read_bytes()
    path = tmp_path / "truncated.parquet"
    path.write_bytes(whole[: len(whole) // 2])
    return path


FILE_ERRORS = {
    "directory": (_directory, "data file {path} is a directory"),
    "non_utf8_jsonl": (_non_utf8_jsonl, "line 2 of {path} is not valid UTF-8 (byte 0xe9 at column 18)"),
    "non_utf8_json": (_non_utf8_json, "{path} is not valid UTF-8 (byte 0xe9 at byte offset 18)"),
    "garbage_parquet": (_garbage_parquet, "{path} is not a readable parquet file"),
    "truncated_parquet": (_truncated_parquet, "{path} is not a readable parquet file"),
}


@pytest.mark.parametrize("case", sorted(FILE_ERRORS))
def test_file_level_errors_are_one_line_naming_the_file(case, tmp_path):
    make, expected = FILE_ERRORS[case]
    path = make(tmp_path)
    with pytest.raises(DataError) as error:
        read_file(path)
    message = str(error.value)
    assert expected.format(path=path) in message and "\n" not in message


def test_parquet_rows_come_back_as_written(tmp_path):
    rows = [{**ROW, "source": "a"}, {"messages": [{"role": "assistant", "content": "hi"}], "source": "x"}]
    read = read_file(_parquet(tmp_path / "rows.parquet", rows))
    assert [r.index for r in read] == [1, 2]
    assert [r.row for r in read] == rows


def test_skip_drops_invalid_and_non_utf8_lines_and_counts_them(tmp_path, caplog):
    path = tmp_path / "mixed.jsonl"
    good = json.dumps(ROW).encode()
    path.write_bytes(b"\n".join([good, b"{not json", good, b'{"messages": "caf\xe9"}', b"", good]) + b"\n")
    with pytest.raises(DataError, match=f"line 2 of {path} is not valid JSON"):
        read_file(path)
    with caplog.at_level(logging.WARNING):
        rows = read_file(path, on_bad_row="skip")
    assert [row.index for row in rows] == [1, 3, 6] and all(row.row == ROW for row in rows)
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1 and f"{path}: skipped 2 bad lines" in warnings[0]
