"""ZIP-FIT selection (data_recipes/zipfit.py): NCD against zlib by hand, the cheap scorer's exactness, and
selection precision on a pool that mixes arithmetic rows with unrelated text."""

import json
import zlib

import pytest
from helpers import REPO

from data_recipes import generate_task
from data_recipes.zipfit import CompressionScorer, NgramScorer, main, ncd, row_text, target_chunks, top_rows


def test_ncd_is_the_textbook_formula_over_zlib_lengths():
    a, b = b"What is 12 + 34?\n#### 46", b"What is 12 + 35?\n#### 47"
    # By hand: C(a) = len(zlib.compress(a, 9)), ... and NCD = (C(ab) - min(C(a), C(b))) / max(C(a), C(b)).
    c_a, c_b, c_ab = (len(zlib.compress(s, 9)) for s in (a, b, a + b))
    assert ncd(a, b) == (c_ab - min(c_a, c_b)) / max(c_a, c_b)
    assert ncd(a, a) < ncd(a, b"The quick brown fox jumps over the lazy dog")  # a copy is closer than prose


def raw_deflate_sizes(target: bytes, x: bytes, window_bits: int, mem_level: int) -> tuple[int, int, int]:
    """C(t), C(t x), C(x) from fresh compressors, no state copies: raw DEFLATE, each text ended by a sync flush."""

    def fresh():
        return zlib.compressobj(9, zlib.DEFLATED, -window_bits, mem_level)

    joint = fresh()
    c_t = len(joint.compress(target)) + len(joint.flush(zlib.Z_SYNC_FLUSH))
    c_tx = c_t + len(joint.compress(x)) + len(joint.flush(zlib.Z_SYNC_FLUSH))
    alone = fresh()
    return c_t, c_tx, len(alone.compress(x)) + len(alone.flush(zlib.Z_SYNC_FLUSH))


def test_the_copied_compressor_gives_exactly_the_fresh_compressors_ncd():
    rows = generate_task("arithmetic", "eval", 40, seed=0, steps=True, operations="+")
    target = b"\n".join(row_text(r).encode() for r in rows[:30])
    texts = [row_text(r) for r in rows[30:]] + ["The quick brown fox jumps over the lazy dog.", "x", "é" * 50]
    scorer = CompressionScorer([target], level=9, window_bits=12, mem_level=2)
    expected = []
    for text in texts:
        c_t, c_tx, c_x = raw_deflate_sizes(target, text.encode(), 12, 2)
        expected.append(1 - (c_tx - min(c_t, c_x)) / max(c_t, c_x))
        # C(t x) here stays near gzip's one-shot length (it adds headers, a sync marker and, with the small
        # buffers, more Huffman blocks: measured 5% here).
        assert abs(c_tx - len(zlib.compress(target + text.encode(), 9))) <= 0.1 * c_tx
    assert scorer.sizes([t.encode() for t in texts]) == [raw_deflate_sizes(b"", t.encode(), 12, 2)[2] for t in texts]
    assert scorer.scores(texts) == expected


def test_target_chunks_fit_the_window_and_do_not_overlap():
    texts = [f"row {i} " * 5 for i in range(100)]
    chunks = target_chunks(texts, 3, 200, seed=1)
    assert len(chunks) == 3 and all(len(c) <= 200 for c in chunks)
    rows = [line for chunk in chunks for line in chunk.decode().split("\n")]
    assert len(rows) == len(set(rows))
    with pytest.raises(ValueError, match="longer than"):
        CompressionScorer([b"x" * 5000], window_bits=12)


def mixed_pool():
    """(rows, is_arithmetic): 200 arithmetic training rows, 200 game-move chats, 200 lines of README prose."""
    arithmetic = generate_task("arithmetic", "train", 200, seed=3, steps=True, operations="+")
    games = generate_task("game_moves", "train", 200, seed=0)
    prose = [line.strip() for line in (REPO / "README.md").read_text().splitlines() if len(line.strip()) > 40][:200]
    rows = arithmetic + games + [{"text": line} for line in prose]
    return rows, [True] * len(arithmetic) + [False] * (len(rows) - len(arithmetic))


@pytest.mark.parametrize("method", ["zipfit", "ngram", "dsir"])
def test_selection_toward_arithmetic_keeps_arithmetic_rows_first(tmp_path, method):
    rows, is_arithmetic = mixed_pool()
    target = generate_task("arithmetic", "eval", 100, seed=0, steps=True, operations="+")
    (tmp_path / "target.jsonl").write_text("".join(json.dumps(r) + "\n" for r in target))
    (tmp_path / "pool.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    argv = ["--method", method, "--target", str(tmp_path / "target.jsonl"), "--pool", str(tmp_path / "pool.jsonl")]
    assert main([*argv, "--keep", "200", "--out", str(tmp_path / "kept.jsonl")]) == 0
    kept = [json.loads(line) for line in (tmp_path / "kept.jsonl").read_text().splitlines()]
    arithmetic_keys = {json.dumps(r, sort_keys=True) for r, a in zip(rows, is_arithmetic) if a}
    precision = sum(json.dumps(r, sort_keys=True) in arithmetic_keys for r in kept) / len(kept)
    print(f"{method}: precision of the kept 200 (200 arithmetic rows among 600) = {precision:.3f}")
    assert len(kept) == 200 and precision >= (0.9 if method == "dsir" else 0.95)


def test_scorers_rank_a_near_copy_above_unrelated_text():
    target = ["What is 12 + 34?\n2 + 4 + 0 = 6\n1 + 3 + 0 = 4\n#### 46"]
    texts = ["Ann and Ben play the hand game.\nrock", "What is 13 + 34?\n3 + 4 + 0 = 7\n1 + 3 + 0 = 4\n#### 47"]
    for scorer in (CompressionScorer(target_chunks(target, 1, 3000, 0)), NgramScorer(target)):
        assert top_rows(scorer.scores(texts), 1) == [1]
