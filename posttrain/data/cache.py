"""On-disk caches keyed by content hashes: the shared helpers, and the tokenised-dataset cache.

A cache key is a hash over everything that changes the cached value, so a stale entry is never read:
`content_hash` of a dict of parts (the reference log-prob cache in `posttrain.engine.reference` and
the tokenised datasets here both build their keys with it). Files go under `cache_root()`
($POSTTRAIN_CACHE_DIR, default ~/.cache/posttrain) and are written atomically (a temporary file
renamed into place), so a killed run never leaves half a file behind, and hold JSON only: nothing read from
the cache is unpickled, so a file planted at the (predictable) cache path can break a cache hit, never run code.

Tokenised datasets (`data.cache_tokenized=true`): the result of tokenising a split, keyed by the
rows themselves (content, source and row number, which error messages quote), the tokenizer
(vocabulary and chat template) and the data settings that change tokenisation. A second run over
the same data, e.g. every stage of a sweep, loads the examples instead of re-running the template.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

TOKENIZED_CACHE_FORMAT = 2  # bump when the cached objects change shape (2: JSON, no pickle)


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


def load_or_build(
    path: Path, build: Callable[[], Any], encode: Callable[[Any], Any], decode: Callable[[Any], Any]
) -> tuple[Any, bool]:
    """(value, hit): `decode` of the JSON at `path`, or `build()` written there (as JSON, `encode`d) atomically.
    An unreadable file (truncated, not JSON, another layout) is rebuilt with a warning.

    Every process that misses builds and writes its own temporary file; the last rename wins, and all
    of them wrote the same value (the key covers everything that changes it).
    """
    path = Path(path)
    if path.exists():
        try:
            return decode(json.loads(path.read_text())), True
        except Exception as error:  # not JSON, or not this layout: rebuild it
            log.warning("cache file %s is unreadable (%s: %s); rebuilding it", path, type(error).__name__, error)
    value = build()
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = path.with_name(f".tmp-{os.getpid()}-{path.name}")
    staging.write_text(json.dumps(encode(value)))
    os.replace(staging, path)
    return value, False


def tokenized_cache_key(kind: str, rows: list, tokenizer, data_cfg) -> str:
    """Key of a tokenised split: the builder `kind` ("sft", ...), rows, tokenizer and length settings."""
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
            "on_bad_row": data_cfg.on_bad_row,
        }
    )


def cached_tokenization(kind: str, rows: list, tokenizer, data_cfg, build: Callable[[], Any]) -> Any:
    """`build()` (the tokenised split of `rows`: examples and skip counts), from
    `cache_root()/tokenized/<key>.json` when cached there."""
    from posttrain.data.chat import TokenizedExample
    from posttrain.data.sft import SkipCounts

    def encode(value):
        examples, skipped = value
        return {"examples": [[e.input_ids, e.labels] for e in examples], "skipped": dataclasses.asdict(skipped)}

    def decode(data):
        examples = [TokenizedExample(list(map(int, ids)), list(map(int, labels))) for ids, labels in data["examples"]]
        return examples, SkipCounts(**data["skipped"])

    path = cache_root() / "tokenized" / f"{tokenized_cache_key(kind, rows, tokenizer, data_cfg)}.json"
    value, hit = load_or_build(path, build, encode, decode)
    log.info("tokenised %s data: %s %s", kind, "cache hit" if hit else "cached in", path)
    return value
