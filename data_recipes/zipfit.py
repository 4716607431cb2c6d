"""ZIP-FIT: embedding-free data selection by compression (Obbad et al. 2024, "ZIP-FIT: Embedding-Free Data
Selection via Compression-Based Alignment"), and an n-gram-overlap baseline.

    posttrain select --method zipfit --target T --pool P --keep N --out O [--report R]
    posttrain select --method ngram ...     # the baseline: share of a row's word 1-2-grams found in the target

ZIP-FIT ranks pool rows by their normalised compression distance to a sample of the target task,
    NCD(t, x) = (C(t x) - min(C(t), C(x))) / max(C(t), C(x)),   C = DEFLATE-compressed length (gzip's codec),
alignment(x) = mean over target chunks t of 1 - NCD(t, x), and keeps the N best aligned rows.

What makes it cheap (a naive C(t x) recompresses the whole target for every row, and a full-size zlib state
costs ~250 KiB of copying per row):
- the target chunk is compressed ONCE; its compressor state is copied (`compressobj.copy()`) for each row, so
  C(t x) costs time proportional to len(x);
- the window is small (`window_bits` 12: 4 KiB, `mem_level` 2), so a copy moves ~20 KiB, not ~270 KiB; a chunk
  is therefore a sample of target rows that fits the window (`chunk_bytes`): DEFLATE matches only reach back
  one window, so more target text in one chunk would not be seen anyway. `chunks` > 1 averages over several
  disjoint samples (each costs one more copy per row);
- every row is compressed once for C(x), all rows through ONE compressor with a full flush between rows (a full
  flush forgets the history, so each row's bytes are those of a fresh compressor; tested).
C(s) here is raw DEFLATE ended by a sync flush (the bytes that transmit s, byte-aligned): C(t x) = C(t) +
the bytes x adds after t. It differs from len(zlib.compress(s)) by a few header/trailer bytes, the same for
every row, so rankings do not depend on it.

A row's text (`row_text`) is every message content of "messages" (else "prompt", "chosen", "rejected"), else a
"text", "question", "problem" or "instruction" field, else the row's JSON.
"""

from __future__ import annotations

import argparse
import json
import random
import time
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from data_recipes.decontaminate import normalize_words, read_rows, write_jsonl
from posttrain.errors import DataError

TEXT_FIELDS = ("text", "question", "problem", "instruction")
LOOKAHEAD = 262  # DEFLATE's MIN_LOOKAHEAD: matches reach back at most window - 262 bytes


def row_text(row: Any) -> str:
    """The text of a row that selection compares (rules in the module docstring)."""
    if isinstance(row, dict):
        parts = []
        for name in ("messages", "prompt", "chosen", "rejected") if "messages" not in row else ("messages",):
            value = row.get(name)
            if isinstance(value, str):
                parts.append(value)
            elif isinstance(value, list):
                parts += [m["content"] for m in value if isinstance(m, dict) and isinstance(m.get("content"), str)]
        if parts:
            return "\n".join(parts)
        for name in TEXT_FIELDS:
            if isinstance(row.get(name), str):
                return row[name]
    return json.dumps(row, sort_keys=True)


def compressed_size(data: bytes, level: int = 9) -> int:
    """gzip's C(s) as usually written: len(zlib.compress(s)) (zlib container, default window)."""
    return len(zlib.compress(data, level))


def ncd(a: bytes, b: bytes, level: int = 9) -> float:
    """Normalised compression distance (C(ab) - min(C(a), C(b))) / max(C(a), C(b)), plain zlib: the reference."""
    size_a, size_b = compressed_size(a, level), compressed_size(b, level)
    return (compressed_size(a + b, level) - min(size_a, size_b)) / max(size_a, size_b)


def target_chunks(texts: Sequence[str], chunks: int, chunk_bytes: int, seed: int) -> list[bytes]:
    """`chunks` disjoint samples of the target rows (seeded order), each the rows joined by newlines while they
    fit in `chunk_bytes` (at least one row, cut to `chunk_bytes`)."""
    order = list(range(len(texts)))
    random.Random(seed).shuffle(order)
    out, position = [], 0
    for _ in range(chunks):
        parts, size = [], 0
        while position < len(order):
            encoded = texts[order[position]].encode()
            if parts and size + len(encoded) + 1 > chunk_bytes:
                break
            parts.append(encoded)
            size += len(encoded) + 1
            position += 1
        if parts:
            out.append(b"\n".join(parts)[:chunk_bytes])
    if not out:
        raise DataError("the target sample is empty: give at least one target row")
    return out


class CompressionScorer:
    """ZIP-FIT alignment 1 - NCD(t, x), averaged over the target chunks t (module docstring for the tricks)."""

    def __init__(self, chunks: Sequence[bytes], level: int = 9, window_bits: int = 12, mem_level: int = 2):
        if not 9 <= window_bits <= 15 or not 1 <= mem_level <= 9:
            raise ValueError(f"window_bits={window_bits} must be in 9..15 and mem_level={mem_level} in 1..9")
        limit = (1 << window_bits) - LOOKAHEAD
        if max(len(chunk) for chunk in chunks) > limit:
            raise ValueError(f"a target chunk is longer than the {limit} bytes a {window_bits}-bit window reaches")
        self.settings = (level, zlib.DEFLATED, -window_bits, mem_level)
        self.targets = []  # (compressor after the chunk, C(chunk))
        for chunk in chunks:
            compressor = zlib.compressobj(*self.settings)
            size = len(compressor.compress(chunk)) + len(compressor.flush(zlib.Z_SYNC_FLUSH))
            self.targets.append((compressor, size))

    def sizes(self, texts: Sequence[bytes]) -> list[int]:
        """C(x) of every row: one compressor, a full flush (history forgotten) after each row."""
        stream, full = zlib.compressobj(*self.settings), zlib.Z_FULL_FLUSH
        return [len(stream.compress(x)) + len(stream.flush(full)) for x in texts]

    def scores(self, texts: Sequence[str]) -> list[float]:
        """Alignment of each text, in [about 0, 1]: higher = closer to the target."""
        encoded = [text.encode() for text in texts]
        sizes, sync = self.sizes(encoded), zlib.Z_SYNC_FLUSH
        totals = [0.0] * len(encoded)
        for compressor, target_size in self.targets:
            for index, (x, size) in enumerate(zip(encoded, sizes)):
                copy = compressor.copy()
                joint = target_size + len(copy.compress(x)) + len(copy.flush(sync))
                totals[index] += (joint - min(target_size, size)) / max(target_size, size)
        return [1.0 - total / len(self.targets) for total in totals]


class NgramScorer:
    """The baseline: the share of a row's word 1- and 2-grams (lowercase, punctuation dropped) in the target's."""

    def __init__(self, target_texts: Sequence[str]):
        self.target: set = set()
        for text in target_texts:
            self.target |= self.grams(text)

    @staticmethod
    def grams(text: str) -> set:
        words = normalize_words(text)
        return set(words).union(zip(words, words[1:]))

    def scores(self, texts: Sequence[str]) -> list[float]:
        target, out = self.target, []
        for text in texts:
            grams = self.grams(text)
            out.append(len(grams & target) / len(grams) if grams else 0.0)
        return out


def build_scorer(method: str, target_texts: Sequence[str], chunks: int = 1, chunk_bytes: int | None = None,
                 seed: int = 0, window_bits: int = 12):  # fmt: skip
    """The scorer of `method` (zipfit | ngram) for the target rows' texts."""
    if method == "zipfit":
        size = chunk_bytes or (1 << window_bits) - LOOKAHEAD
        return CompressionScorer(target_chunks(target_texts, chunks, size, seed), window_bits=window_bits)
    if method == "ngram":
        return NgramScorer(target_texts)
    raise DataError(f"unknown selection method {method!r}; known: zipfit, ngram")


def top_rows(scores: Sequence[float], keep: int) -> list[int]:
    """Indices of the `keep` highest scores, best first (ties: the earlier row)."""
    return sorted(range(len(scores)), key=lambda i: (-scores[i], i))[:keep]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="posttrain select", description=__doc__.splitlines()[0])
    parser.add_argument("--method", default="zipfit", choices=("zipfit", "ngram"))
    parser.add_argument("--target", required=True, type=Path, help="rows of the target task (.jsonl/.json/.parquet)")
    parser.add_argument("--pool", required=True, type=Path, help="candidate rows to select from")
    parser.add_argument("--keep", required=True, type=int, help="rows to keep (the best aligned)")
    parser.add_argument("--out", required=True, type=Path, help="the kept rows, best first, as JSONL")
    parser.add_argument("--chunks", type=int, default=1, help="zipfit: target samples averaged over (default 1)")
    parser.add_argument("--window-bits", type=int, default=12, help="zipfit: DEFLATE window 2^bits (default 12)")
    parser.add_argument("--seed", type=int, default=0, help="zipfit: which target rows form the sample")
    parser.add_argument("--report", type=Path, help="JSON: method, counts, seconds, kept rows' scores")
    args = parser.parse_args(argv)
    if args.keep < 1:
        raise DataError(f"--keep {args.keep} must be >= 1")
    target = [row_text(r.row) for r in read_rows(args.target, "target")]
    pool = read_rows(args.pool, "pool")
    started = time.perf_counter()
    scorer = build_scorer(args.method, target, args.chunks, None, args.seed, args.window_bits)
    scores = scorer.scores([row_text(r.row) for r in pool])
    kept = top_rows(scores, args.keep)
    seconds = time.perf_counter() - started
    write_jsonl(args.out, (pool[i].row for i in kept))
    report = {"method": args.method, "pool_rows": len(pool), "kept_rows": len(kept), "seconds": seconds,
              "kept_scores": [scores[i] for i in kept]}  # fmt: skip
    if args.report:
        args.report.parent.mkdir(parents=True, exist_ok=True)
        args.report.write_text(json.dumps(report, indent=2) + "\n")
    print(f"{args.method}: kept {len(kept)} of {len(pool)} pool rows in {seconds:.2f} s -> {args.out}")
    return 0
