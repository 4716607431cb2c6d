"""ZIP-FIT's fixed-code DEFLATE sizes (data_recipes/fixed_deflate.py, csrc/zipfit_ncd.cpp `fixed_deflate_sizes`):
the counted size is the length of a real DEFLATE stream that zlib inflates back, the parse follows its written
rule (a brute-force search), the compiled sizes equal the Python ones byte for byte, and selection still keeps the
arithmetic rows first."""

import json
import random
import zlib

import numpy as np
import pytest
from test_zipfit import mixed_pool
from test_zipfit_native import small_selection_argv, varied_rows

from data_recipes import generate_task
from data_recipes.fixed_deflate import (
    FixedDeflateSizes,
    encode,
    key_positions,
    max_distance,
    parse,
    stream_bytes,
    token_bits,
)
from data_recipes.zipfit import CompressionScorer, main, row_text, target_chunks, top_rows


def random_case(rnd: random.Random) -> tuple[bytes, bytes, int, int]:
    """(history, text, max_dist, max_chain): few-letter alphabets (many matches) to all 256 bytes (few)."""
    alphabet = bytes(rnd.sample(range(256), rnd.choice([2, 4, 16, 256])))
    window_bits = rnd.choice([9, 10, 12])
    history = bytes(rnd.choice(alphabet) for _ in range(rnd.randint(0, max_distance(window_bits))))
    text = bytes(rnd.choice(alphabet) for _ in range(rnd.randint(0, 400)))
    return history, text, max_distance(window_bits), rnd.choice([1, 2, 8, 32])


def brute_force_parse(data: bytes, start: int, max_dist: int, max_chain: int) -> list:
    """The module docstring's rule, searched by scanning every earlier position: at i, the `max_chain` nearest
    p < i with the same next 3 bytes and i - p <= max_dist; the longest match (ties: the nearest), if >= 3."""
    tokens, i = [], start
    while i < len(data):
        best, distance, seen, limit = 0, 0, 0, min(258, len(data) - i)
        if limit >= 3:
            for p in range(i - 1, max(i - max_dist, 0) - 1, -1):
                if seen == max_chain:
                    break
                if p + 3 > len(data) or data[p : p + 3] != data[i : i + 3]:
                    continue
                seen += 1
                length = 3
                while length < limit and data[p + length] == data[i + length]:
                    length += 1
                if length > best:
                    best, distance = length, i - p
        if best >= 3:
            tokens.append((best, distance))
            i += best
        else:
            tokens.append(data[i])
            i += 1
    return tokens


def test_the_counted_size_is_a_real_stream_that_zlib_inflates_back():
    rnd = random.Random(0)
    for _ in range(150):
        history, text, max_dist, max_chain = random_case(rnd)
        alone = parse(history, 0, max_dist, max_chain)
        after = parse(history + text, len(history), max_dist, max_chain, key_positions(history))
        stream = encode(alone + after)
        assert zlib.decompress(stream, -15) == history + text
        assert len(stream) == stream_bytes(token_bits(alone) + token_bits(after))


def test_the_parse_follows_its_rule_against_a_brute_force_search():
    rnd = random.Random(1)
    for _ in range(60):
        history, text, max_dist, max_chain = random_case(rnd)
        history = history[:600]  # the brute force scans every earlier position
        data = history + text
        expected = brute_force_parse(data, len(history), max_dist, max_chain)
        assert parse(data, len(history), max_dist, max_chain, key_positions(history)) == expected
        assert parse(text, 0, max_dist, max_chain) == brute_force_parse(text, 0, max_dist, max_chain)


def test_sizes_by_hand():
    """RFC 1951's fixed codes: 3 header bits, a literal below 144 is 8 bits, end-of-block 7."""
    sizes = FixedDeflateSizes([b"abcabcabc"], window_bits=12, max_chain=8)
    assert sizes.size(b"") == 2  # 3 + 7 bits
    assert sizes.size(b"a") == 3  # 3 + 8 + 7 = 18 bits
    assert sizes.size(b"\xff") == 3  # 3 + 9 + 7 = 19 bits
    # "abc" as literals (24 bits), then a match of 6 at distance 3: length code 260 (7 bits, no extra) + distance
    # code 2 (5 bits, no extra) = 12 bits; 3 + 36 + 7 = 46 bits = 6 bytes
    assert parse(b"abcabcabc", 0, 3834, 8) == [97, 98, 99, (6, 3)]
    assert sizes.target_sizes == [6]
    # after the chunk, "abcabc" is one match of 6 at distance 9 (code 6: 5 bits + 2 extra): 36 + 14 + 10 = 60 bits
    assert sizes.joint_size(0, b"abcabc") == 8
    assert zlib.decompress(encode(parse(b"abcabcabc", 0, 3834, 8) + [(6, 9)]), -15) == b"abcabcabcabcabc"


@pytest.mark.parametrize("window_bits, max_chain", [(12, 32), (9, 1), (15, 8)])
def test_native_fixed_sizes_equal_the_python_sizes_byte_for_byte(window_bits, max_chain):
    rows = varied_rows()
    targets = [row_text(r) for r in generate_task("arithmetic", "eval", 200, seed=1, steps=True, operations="+")]
    chunks = target_chunks(targets, 3, max_distance(window_bits), seed=0)
    native = CompressionScorer(chunks, window_bits=window_bits, native=True, codec="fixed", max_chain=max_chain)
    python = CompressionScorer(chunks, window_bits=window_bits, native=False, codec="fixed", max_chain=max_chain)
    encoded = [r.encode() if isinstance(r, str) else r for r in rows]
    for threads in (1, 3):
        target_sizes, sizes, joint = native.native.fixed_deflate_sizes(chunks, rows, window_bits, max_chain, threads)
        assert target_sizes.tolist() == [size for _, size in python.targets]
        assert sizes.tolist() == python.sizes(encoded)
        assert joint.tolist() == python.joint_sizes(encoded)
    assert sizes[0] == 2 and sizes[-2] > 70_000  # empty: an empty fixed block; random bytes: incompressible
    texts = [r if isinstance(r, str) else r.decode("latin-1") for r in rows[:-2]]
    assert native.scores(texts) == python.scores(texts)


def test_the_fixed_codec_keeps_the_arithmetic_rows_first_as_zlib_does():
    rows, is_arithmetic = mixed_pool()
    texts = [row_text(r) for r in rows]
    targets = [row_text(r) for r in generate_task("arithmetic", "eval", 100, seed=0, steps=True, operations="+")]
    chunks = target_chunks(targets, 1, 3800, seed=0)
    scores = {codec: np.array(CompressionScorer(chunks, codec=codec).scores(texts)) for codec in ("fixed", "zlib")}
    for codec, values in scores.items():
        kept = top_rows(values.tolist(), 200)
        assert sum(is_arithmetic[i] for i in kept) / len(kept) >= 0.95, codec
    assert np.corrcoef(scores["fixed"], scores["zlib"])[0, 1] > 0.9  # the two codecs agree on what is close


def test_select_writes_which_codec_ran(tmp_path):
    argv = small_selection_argv(tmp_path)
    for codec in ("fixed", "zlib"):
        assert main([*argv, "--codec", codec]) == 0
        report = json.loads((tmp_path / "report.json").read_text())
        assert report["codec"] == codec and len(report["kept_scores"]) == 10
        kept = [json.loads(line) for line in (tmp_path / "kept.jsonl").read_text().splitlines()]
        assert all("messages" in row for row in kept), codec  # the 10 arithmetic rows, not the game text
    with pytest.raises(ValueError, match="codec='gzip' is not one of fixed, zlib"):
        CompressionScorer([b"abc"], codec="gzip")
