"""ZIP-FIT: embedding-free data selection by compression (Obbad et al. 2024, "ZIP-FIT: Embedding-Free Data
Selection via Compression-Based Alignment"), and two embedding-free n-gram baselines.

    posttrain select --method zipfit --target T --pool P --keep N --out O [--report R]
    posttrain select --method ngram ...     # a baseline: share of a row's word 1-2-grams found in the target
    posttrain select --method dsir ...      # a baseline: DSIR's hashed 1-2-gram importance weights

ZIP-FIT ranks pool rows by their normalised compression distance to a sample of the target task,
    NCD(t, x) = (C(t x) - min(C(t), C(x))) / max(C(t), C(x)),   C = DEFLATE-compressed length (gzip's codec),
alignment(x) = mean over target chunks t of 1 - NCD(t, x), and keeps the N best aligned rows.

Two codecs (`--codec`), both DEFLATE, gzip's format:
- `fixed` (the default): DEFLATE with the fixed Huffman codes, its size counted from a greedy LZ77 parse
  (data_recipes/fixed_deflate.py; the compiled scorer csrc/zipfit_ncd.cpp gives the same sizes byte for byte).
  Each size is that of a real stream (tested: zlib inflates it back). No Huffman trees are built, which is
  where zlib spends most of a short row's time.
- `zlib`: zlib's own DEFLATE (dynamic trees), C(s) the raw stream ended by a sync flush (the bytes that transmit
  s, byte-aligned), C(t x) = C(t) + the bytes x adds after t; within ~5% of len(zlib.compress(s)) (tested).
  The two codecs' alignments correlate 0.97 (Pearson) over benchmarks/zipfit.py's pool and select the same
  arithmetic rows there (precision 1.00 both).

What makes it cheap (a naive C(t x) recompresses the whole target for every row: ~1,100 us a row):
- the target chunk is parsed / compressed ONCE; C(t x) costs time proportional to len(x) (`fixed`: the chunk's
  hash chains are read-only and shared by every row; `zlib`: its compressor state is copied per row, small
  because `window_bits` 12 gives a 4 KiB window and `mem_level` 1);
- a chunk is therefore a sample of target rows that fits the window (`chunk_bytes`): DEFLATE matches reach back
  only one window, so more target text in one chunk would not be seen anyway. `chunks` > 1 averages over
  several disjoint samples (each costs one more C(t x) per row);
- `fixed` looks at the 8 most recent candidates for a match (`max_chain`; more changed no selection and cost
  up to 2x); `zlib` runs at level 1 (its fastest: short hash chains);
- `zlib`: every row is compressed once for C(x), all rows through ONE compressor with a full flush between rows
  (a full flush forgets the history, so each row's bytes are those of a fresh compressor; tested).
Speed (benchmarks/zipfit.py, one thread, ~80-byte rows, pool 20,000, idle machine): the default (`fixed`,
compiled) 2.2 us a row, 5.2x faster than the word 1-2-gram set overlap baseline (`--method ngram`), 6.7x the
DSIR-style baseline (`--method dsir`) and 5.0x the compiled `zlib` codec (zlib builds Huffman trees for every
row's flushed block). Without the compiled scorer the `fixed` codec's Python path is ~75x slower than compiled
(use `--codec zlib` there: ~1.2x).

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
from data_recipes.fixed_deflate import FixedDeflateSizes, max_distance
from posttrain.errors import DataError

TEXT_FIELDS = ("text", "question", "problem", "instruction")
CODECS = ("fixed", "zlib")  # the first is the default of build_scorer and `posttrain select`


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
    """ZIP-FIT alignment 1 - NCD(t, x), averaged over the target chunks t (module docstring for the tricks).

    `codec`: "zlib" (zlib's DEFLATE at `level` / `mem_level`, gzip's own codec) or "fixed" (DEFLATE with the
    fixed Huffman codes, sizes counted from a greedy parse of up to `max_chain` candidates:
    data_recipes/fixed_deflate.py; `level` and `mem_level` unused).
    `native`: None uses the compiled scorer (data_recipes/zipfit_native.py) when it builds and is not disabled by
    POSTTRAIN_DISABLE_ZIPFIT_NATIVE, else this module's Python path; True requires it; False never uses it. Both
    give the same sizes, byte for byte; `backend` says which one runs ("native" or "python")."""

    def __init__(self, chunks: Sequence[bytes], level: int = 1, window_bits: int = 12, mem_level: int = 1,
                 native: bool | None = None, codec: str = "zlib", max_chain: int = 8):  # fmt: skip
        if codec not in CODECS:
            raise ValueError(f"codec={codec!r} is not one of {', '.join(CODECS)}")
        if not 9 <= window_bits <= 15 or not 1 <= mem_level <= 9:
            raise ValueError(f"window_bits={window_bits} must be in 9..15 and mem_level={mem_level} in 1..9")
        limit = max_distance(window_bits)
        if max(len(chunk) for chunk in chunks) > limit:
            raise ValueError(f"a target chunk is longer than the {limit} bytes a {window_bits}-bit window reaches")
        self.chunks, self.codec, self.max_chain = list(chunks), codec, max_chain
        self.settings = (level, zlib.DEFLATED, -window_bits, mem_level)
        self.targets = []  # (compressor after the chunk, C(chunk)); fixed codec: (None, C(chunk))
        for chunk in self.chunks if codec == "zlib" else ():
            compressor = zlib.compressobj(*self.settings)
            size = len(compressor.compress(chunk)) + len(compressor.flush(zlib.Z_SYNC_FLUSH))
            self.targets.append((compressor, size))
        self.native = None
        if native is not False:
            from data_recipes.zipfit_native import DISABLE_ENV_VAR, build_failure, load_native_sizes

            self.native = load_native_sizes()
            if native and self.native is None:
                reason = build_failure() or f"{DISABLE_ENV_VAR} is set"
                raise RuntimeError(f"the native ZIP-FIT scorer is unavailable: {reason}")
        self.backend = "python" if self.native is None else "native"
        self.fixed = None  # the fixed codec's Python twin (FixedDeflateSizes), built when the Python path needs it
        if codec == "fixed":
            target_sizes = (
                self.native.fixed_deflate_sizes(self.chunks, [], window_bits, max_chain)[0]
                if self.native is not None
                else self.python_fixed().target_sizes
            )
            self.targets = [(None, int(size)) for size in target_sizes]

    def python_fixed(self) -> FixedDeflateSizes:
        """The fixed codec's Python sizes (built on first use: parsing the chunks costs ~10 ms each)."""
        if self.fixed is None:
            self.fixed = FixedDeflateSizes(self.chunks, -self.settings[2], self.max_chain)
        return self.fixed

    def sizes(self, texts: Sequence[bytes]) -> list[int]:
        """C(x) of every row: one compressor, a full flush (history forgotten) after each row."""
        if self.codec == "fixed":
            return [self.python_fixed().size(x) for x in texts]
        stream = zlib.compressobj(*self.settings)
        compress, flush, full = stream.compress, stream.flush, zlib.Z_FULL_FLUSH
        return [len(compress(x)) + len(flush(full)) for x in texts]

    def joint_sizes(self, texts: Sequence[bytes]) -> list[list[int]]:
        """C(t x) of every row for each target chunk t: a copy of the state after t, per row."""
        if self.codec == "fixed":
            fixed = self.python_fixed()
            return [[fixed.joint_size(k, x) for x in texts] for k in range(len(self.chunks))]
        out = []
        for compressor, target_size in self.targets:
            copy, sync = compressor.copy, zlib.Z_SYNC_FLUSH
            # C(t x) = C(t) + what x adds after t; each row gets its own copy of the state after t
            out.append([target_size + len(c.compress(x)) + len(c.flush(sync)) for x in texts for c in (copy(),)])
        return out

    def compressed_sizes(self, texts: Sequence[str]):
        """(C(x) [rows], C(t x) [chunks, rows]) as int64 numpy arrays, from the active backend."""
        import numpy as np

        if self.native is not None:
            level, _, window_bits, mem_level = self.settings
            if self.codec == "fixed":
                _, sizes, joint = self.native.fixed_deflate_sizes(self.chunks, texts, -window_bits, self.max_chain)
                return sizes, joint
            _, sizes, joint = self.native.compressed_sizes(self.chunks, texts, level, -window_bits, mem_level)
            return sizes, joint
        encoded = [text.encode() for text in texts]
        return np.array(self.sizes(encoded), dtype=np.int64), np.array(self.joint_sizes(encoded), dtype=np.int64)

    def scores(self, texts: Sequence[str]) -> list[float]:
        """Alignment of each text, in [about 0, 1]: higher = closer to the target."""
        import numpy as np

        sizes, joint = self.compressed_sizes(texts)
        sizes = sizes.astype(np.float64)
        total = np.zeros(len(texts))
        for (_, target_size), joint_row in zip(self.targets, joint.reshape(len(self.targets), len(texts))):
            total += (joint_row - np.minimum(target_size, sizes)) / np.maximum(target_size, sizes)
        return (1.0 - total / len(self.targets)).tolist()


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


class HashedNgramImportance:
    """DSIR-style baseline (Xie et al. 2023, "Data Selection for Language Models via Importance Resampling"), the
    n-gram method ZIP-FIT's paper compares against: word 1- and 2-grams hashed into `buckets` features; bag-of-
    n-gram distributions p_target and p_pool (add-one smoothed) fitted on the target and on the pool itself; a
    row's score is its log importance weight sum_f count_x(f) (log p_target(f) - log p_pool(f)) (ranked
    deterministically here, where DSIR resamples). Counting and weighting are vectorised (numpy bincount)."""

    def __init__(self, target_texts: Sequence[str], buckets: int = 10_000):
        self.buckets = buckets
        self.target_log = self.log_distribution(self.features(target_texts)[0])

    def features(self, texts: Sequence[str]):
        """(hashed feature ids of all rows, concatenated; the row of each id), numpy int64 arrays."""
        import numpy as np

        ids, rows = [], []
        for row, text in enumerate(texts):
            words = normalize_words(text)
            grams = [hash(g) % self.buckets for g in words + [a + " " + b for a, b in zip(words, words[1:])]]
            ids += grams
            rows += [row] * len(grams)
        return np.array(ids, dtype=np.int64), np.array(rows, dtype=np.int64)

    def log_distribution(self, ids):
        import numpy as np

        counts = np.bincount(ids, minlength=self.buckets).astype(np.float64)
        return np.log(counts + 1.0) - np.log(counts.sum() + self.buckets)

    def scores(self, texts: Sequence[str]) -> list[float]:
        import numpy as np

        ids, rows = self.features(texts)
        log_ratio = self.target_log - self.log_distribution(ids)
        return np.bincount(rows, weights=log_ratio[ids], minlength=len(texts)).tolist()


def build_scorer(method: str, target_texts: Sequence[str], chunks: int = 1, chunk_bytes: int | None = None,
                 seed: int = 0, window_bits: int = 12, native: bool | None = None,
                 codec: str = CODECS[0]):  # fmt: skip
    """The scorer of `method` (zipfit | ngram | dsir) for the target rows' texts (`native`, `codec`:
    CompressionScorer's)."""
    if method == "zipfit":
        size = chunk_bytes or max_distance(window_bits)
        chunk_texts = target_chunks(target_texts, chunks, size, seed)
        return CompressionScorer(chunk_texts, window_bits=window_bits, native=native, codec=codec)
    if method == "ngram":
        return NgramScorer(target_texts)
    if method == "dsir":
        return HashedNgramImportance(target_texts)
    raise DataError(f"unknown selection method {method!r}; known: zipfit, ngram, dsir")


def top_rows(scores: Sequence[float], keep: int) -> list[int]:
    """Indices of the `keep` highest scores, best first (ties: the earlier row)."""
    return sorted(range(len(scores)), key=lambda i: (-scores[i], i))[:keep]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="posttrain select", description=__doc__.splitlines()[0])
    parser.add_argument("--method", default="zipfit", choices=("zipfit", "ngram", "dsir"))
    parser.add_argument("--target", required=True, type=Path, help="rows of the target task (.jsonl/.json/.parquet)")
    parser.add_argument("--pool", required=True, type=Path, help="candidate rows to select from")
    parser.add_argument("--keep", required=True, type=int, help="rows to keep (the best aligned)")
    parser.add_argument("--out", required=True, type=Path, help="the kept rows, best first, as JSONL")
    parser.add_argument("--chunks", type=int, default=1, help="zipfit: target samples averaged over (default 1)")
    parser.add_argument("--window-bits", type=int, default=12, help="zipfit: DEFLATE window 2^bits (default 12)")
    parser.add_argument("--seed", type=int, default=0, help="zipfit: which target rows form the sample")
    parser.add_argument("--codec", default=CODECS[0], choices=CODECS,
                        help="zipfit: DEFLATE with fixed Huffman codes (fast) or zlib's DEFLATE")  # fmt: skip
    parser.add_argument("--scorer", default="auto", choices=("auto", "native", "python"),
                        help="zipfit: compiled if it builds (auto), compiled or fail (native), or Python")  # fmt: skip
    parser.add_argument("--report", type=Path, help="JSON: method, counts, seconds, kept rows' scores")
    args = parser.parse_args(argv)
    if args.keep < 1:
        raise DataError(f"--keep {args.keep} must be >= 1")
    target = [row_text(r.row) for r in read_rows(args.target, "target")]
    pool = read_rows(args.pool, "pool")
    started = time.perf_counter()
    native = {"auto": None, "native": True, "python": False}[args.scorer]
    scorer = build_scorer(args.method, target, args.chunks, None, args.seed, args.window_bits, native, args.codec)
    scores = scorer.scores([row_text(r.row) for r in pool])
    kept = top_rows(scores, args.keep)
    seconds = time.perf_counter() - started
    write_jsonl(args.out, (pool[i].row for i in kept))
    backend = getattr(scorer, "backend", "python")  # the n-gram baselines are Python
    report = {"method": args.method, "codec": getattr(scorer, "codec", None), "scorer": backend,
              "pool_rows": len(pool), "kept_rows": len(kept),
              "seconds": seconds, "kept_scores": [scores[i] for i in kept]}  # fmt: skip
    if args.report:
        args.report.parent.mkdir(parents=True, exist_ok=True)
        args.report.write_text(json.dumps(report, indent=2) + "\n")
    print(f"{args.method} ({backend}): kept {len(kept)} of {len(pool)} pool rows in {seconds:.2f} s -> {args.out}")
    return 0
