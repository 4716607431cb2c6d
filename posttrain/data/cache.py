"""On-disk caches keyed by content hashes: the shared helpers and the tokenised-dataset key.

A cache key is a hash over everything that changes the cached value, so a stale entry is never read:
`content_hash` of a dict of parts (the reference log-prob cache in `posttrain.engine.reference` and
the tokenised datasets both build their keys with it). Entries go under `cache_root()`
($POSTTRAIN_CACHE_DIR, default ~/.cache/posttrain) and are written atomically (staged, then renamed
into place), so a killed run never leaves half an entry behind.

Tokenised datasets (`data.cache_tokenized=true`, written by `posttrain.data.tokenization` as Arrow
directories): keyed by the rows themselves (content, source and row number, which error messages
quote), the tokenizer (vocabulary and chat template) and the data settings that change tokenisation.
A second run over the same data, e.g. every stage of a sweep, reads the table instead of re-running
the template.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable
from pathlib import Path

TOKENIZED_CACHE_FORMAT = 2  # bump when the cached tables change shape (2: Arrow tables with a status column)


def cache_root() -> Path:
    """$POSTTRAIN_CACHE_DIR, or ~/.cache/posttrain."""
    return Path(os.environ.get("POSTTRAIN_CACHE_DIR") or Path.home() / ".cache" / "posttrain")


def content_hash(parts: dict) -> str:
    """32 hex digits of SHA-256 over `parts` as canonical JSON (sorted keys; non-JSON values by str())."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:32]


def tokenizer_fingerprint(tokenizer) -> str:
    """SHA-256 of the tokenizer's vocabulary (token -> id), sorted."""
    return hashlib.sha256(json.dumps(sorted(tokenizer.get_vocab().items())).encode()).hexdigest()


def rows_fingerprint(rows: Iterable) -> str:
    """BLAKE2 over every `SourceRow`'s source, row number and content (canonical JSON), in order."""
    digest = hashlib.blake2b(digest_size=32)
    for source_row in rows:
        digest.update(
            json.dumps([source_row.source, source_row.index, source_row.row], sort_keys=True, default=str).encode()
        )
        digest.update(b"\n")
    return digest.hexdigest()


def tokenized_cache_key(kind: str, rows: list, tokenizer, data_cfg) -> str:
    """Key of a tokenised split: the builder `kind` ("sft", "preference"), rows, tokenizer and length settings
    (`data.on_bad_row` and `data.num_proc` do not change the table: skipped rows are kept with their status)."""
    return content_hash(
        {
            "format": TOKENIZED_CACHE_FORMAT,
            "kind": kind,
            "rows": rows_fingerprint(rows),
            "num_rows": len(rows),
            "tokenizer_vocab": tokenizer_fingerprint(tokenizer),
            "tokenizer_class": type(tokenizer).__name__,
            "chat_template": tokenizer.chat_template,
            "special_tokens": {"bos": tokenizer.bos_token, "eos": tokenizer.eos_token, "pad": tokenizer.pad_token},
            "max_length": data_cfg.max_length,
            "truncation": data_cfg.truncation,
        }
    )
