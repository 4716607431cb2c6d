"""The tokenised-data cache holds JSON only: a round trip gives the same examples, and a file planted at the
(predictable) cache path, a crafted pickle or a truncated file, runs nothing and is rebuilt."""

import logging
import os
import pickle

from posttrain.config import DataConfig
from posttrain.data.cache import cache_root, tokenized_cache_key
from posttrain.data.sft import build_sft_examples, tokenize_sft_rows
from posttrain.data.sources import SourceRow


class RunsCommand:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def rows(arithmetic_rows):
    return [SourceRow("generator:arithmetic", index, row) for index, row in enumerate(arithmetic_rows[:8], start=1)]


def test_planted_or_truncated_cache_files_run_nothing_and_are_rebuilt(tmp_path, monkeypatch, caplog, tiny_tokenizer,
                                                                      arithmetic_rows):  # fmt: skip
    monkeypatch.setenv("POSTTRAIN_CACHE_DIR", str(tmp_path / "cache"))
    caplog.set_level(logging.INFO)
    data_cfg = DataConfig(cache_tokenized=True, max_length=64)
    source_rows = rows(arithmetic_rows)
    expected = [(e.input_ids, e.labels) for e in tokenize_sft_rows(source_rows, tiny_tokenizer, data_cfg, "train")[0]]
    path = cache_root() / "tokenized" / f"{tokenized_cache_key('sft', source_rows, tiny_tokenizer, data_cfg)}.json"
    path.parent.mkdir(parents=True)
    marker = tmp_path / "pwned"
    path.write_bytes(pickle.dumps(RunsCommand(marker)))
    examples, _ = build_sft_examples(source_rows, tiny_tokenizer, data_cfg, "train")
    assert not marker.exists() and "is unreadable" in caplog.text
    assert [(e.input_ids, e.labels) for e in examples] == expected
    assert path.read_text().startswith("{")  # rebuilt as JSON

    caplog.clear()
    cached, _ = build_sft_examples(source_rows, tiny_tokenizer, data_cfg, "train")
    assert "cache hit" in caplog.text
    assert [(e.input_ids, e.labels) for e in cached] == expected
    path.write_text(path.read_text()[:50])
    caplog.clear()
    again, _ = build_sft_examples(source_rows, tiny_tokenizer, data_cfg, "train")
    assert "is unreadable" in caplog.text and [(e.input_ids, e.labels) for e in again] == expected
