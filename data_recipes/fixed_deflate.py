"""ZIP-FIT's fast codec: DEFLATE with the fixed Huffman codes, its size counted instead of written.

zlib spends most of a short row's time ending the row's block: it builds the dynamic Huffman trees to choose a
block type, even for ~80 bytes (profiled: ~4 us of its ~4.5 us a row). With DEFLATE's fixed codes (RFC 1951,
3.2.6) every symbol has a known length, so the size of a one-block stream is a sum over the LZ77 parse: no trees,
no output. C(s) is the byte length of that stream, a real DEFLATE stream (`encode` writes it; zlib inflates it
back, tested):

    one final fixed block: 3 header bits + the symbols' bits + 7 bits of end-of-block, rounded up to bytes
    literal byte b: 8 bits (b < 144) or 9; match: its length code (7 or 8 bits) + extra bits, then 5 bits of
    distance code + extra bits (the RFC's tables)

C(t x) is the stream for t followed by x, with x's matches reaching back into t: what ZIP-FIT needs.

The parse is greedy and fully specified, so this module and the compiled scorer (csrc/zipfit_ncd.cpp,
`fixed_deflate_sizes`) give the same sizes byte for byte (tested): at each position i with at least 3 bytes left,
the candidates are the earlier positions p with the same next 3 bytes and i - p <= max_distance (2^window_bits -
262, zlib's reach), the `max_chain` most recent of them; the longest match (at most 258, ties: the most recent)
is taken if it is >= 3 bytes long, else a literal.
"""

from __future__ import annotations

from collections.abc import Sequence

MIN_MATCH, MAX_MATCH = 3, 258
LOOKAHEAD = 262  # DEFLATE's MIN_LOOKAHEAD: matches reach back at most window - 262 bytes
BLOCK_BITS = 3 + 7  # block header + end-of-block (code 256: 7 bits)

# (first length, extra bits) of length codes 257..285, and (first distance, extra bits) of distance codes 0..29
LENGTH_CODES = [(3, 0), (4, 0), (5, 0), (6, 0), (7, 0), (8, 0), (9, 0), (10, 0), (11, 1), (13, 1), (15, 1), (17, 1),
                (19, 2), (23, 2), (27, 2), (31, 2), (35, 3), (43, 3), (51, 3), (59, 3), (67, 4), (83, 4), (99, 4),
                (115, 4), (131, 5), (163, 5), (195, 5), (227, 5), (258, 0)]  # fmt: skip
DISTANCE_CODES = [(1, 0), (2, 0), (3, 0), (4, 0), (5, 1), (7, 1), (9, 2), (13, 2), (17, 3), (25, 3), (33, 4),
                  (49, 4), (65, 5), (97, 5), (129, 6), (193, 6), (257, 7), (385, 7), (513, 8), (769, 8), (1025, 9),
                  (1537, 9), (2049, 10), (3073, 10), (4097, 11), (6145, 11), (8193, 12), (12289, 12), (16385, 13),
                  (24577, 13)]  # fmt: skip


def _code_of(value: int, table: list[tuple[int, int]]) -> int:
    """Index of the code whose range holds `value` (the last code whose first value is <= value)."""
    code = 0
    while code + 1 < len(table) and table[code + 1][0] <= value:
        code += 1
    return code


def _length_code(length: int) -> int:
    return 28 if length == MAX_MATCH else _code_of(length, LENGTH_CODES[:28])


LITERAL_BITS = [8 if byte < 144 else 9 for byte in range(256)]
MATCH_LENGTH_BITS = [0] * 3 + [
    (7 if 257 + _length_code(n) <= 279 else 8) + LENGTH_CODES[_length_code(n)][1] for n in range(3, 259)
]


def distance_bits(distance: int) -> int:
    return 5 + DISTANCE_CODES[_code_of(distance, DISTANCE_CODES)][1]


def max_distance(window_bits: int) -> int:
    """The farthest a match reaches back in a 2^window_bits window (zlib's MAX_DIST); a target chunk fits in it."""
    return (1 << window_bits) - LOOKAHEAD


def parse(data: bytes, start: int, max_dist: int, max_chain: int, history_keys: dict | None = None):
    """Greedy LZ77 tokens of data[start:], matches may reach into data[:start] (module docstring for the rule):
    ints are literals, (length, distance) tuples matches. `history_keys`: key -> ascending positions of
    data[:start - 2] (`key_positions`), reused across calls with the same history."""
    keys = {} if history_keys is None else history_keys
    local: dict[bytes, list[int]] = {}  # keys at positions >= start - 2 (they may reach into the new bytes)
    total, tokens = len(data), []

    def insert(position: int) -> None:
        if position + MIN_MATCH <= total:
            local.setdefault(data[position : position + MIN_MATCH], []).append(position)

    for position in range(max(start - 2, 0), start):
        insert(position)
    i = start
    while i < total:
        best_length, best_distance = 0, 0
        if i + MIN_MATCH <= total:
            key, limit, seen = data[i : i + MIN_MATCH], min(MAX_MATCH, total - i), 0
            for positions in (local.get(key, ()), keys.get(key, ())):
                for p in reversed(positions):
                    if i - p > max_dist or seen == max_chain:
                        break
                    seen += 1
                    length = MIN_MATCH
                    while length < limit and data[p + length] == data[i + length]:
                        length += 1
                    if length > best_length:
                        best_length, best_distance = length, i - p
                    if length == limit:
                        break
                if seen == max_chain or best_length == limit:
                    break
        if best_length >= MIN_MATCH:
            tokens.append((best_length, best_distance))
            for position in range(i, i + best_length):
                insert(position)
            i += best_length
        else:
            tokens.append(data[i])
            insert(i)
            i += 1
    return tokens


def key_positions(history: bytes) -> dict[bytes, list[int]]:
    """3-byte key -> ascending positions, for the keys that lie wholly inside `history` (`parse`'s history_keys)."""
    keys: dict[bytes, list[int]] = {}
    for position in range(len(history) - MIN_MATCH + 1):
        keys.setdefault(history[position : position + MIN_MATCH], []).append(position)
    return keys


def token_bits(tokens) -> int:
    return sum(LITERAL_BITS[t] if isinstance(t, int) else MATCH_LENGTH_BITS[t[0]] + distance_bits(t[1]) for t in tokens)


def stream_bytes(bits: int) -> int:
    """Bytes of one final fixed block holding symbols of `bits` bits."""
    return (BLOCK_BITS + bits + 7) // 8


class FixedDeflateSizes:
    """C(t) of each target chunk, C(x) and C(t x) of rows, by this module's parse (the compiled scorer's twin)."""

    def __init__(self, chunks: Sequence[bytes], window_bits: int = 12, max_chain: int = 8):
        self.max_dist, self.max_chain = max_distance(window_bits), max_chain
        self.chunks = list(chunks)
        self.chunk_keys = [key_positions(chunk) for chunk in self.chunks]
        self.chunk_bits = [token_bits(parse(chunk, 0, self.max_dist, max_chain)) for chunk in self.chunks]
        self.target_sizes = [stream_bytes(bits) for bits in self.chunk_bits]

    def size(self, text: bytes) -> int:
        return stream_bytes(token_bits(parse(text, 0, self.max_dist, self.max_chain)))

    def joint_size(self, chunk_index: int, text: bytes) -> int:
        chunk = self.chunks[chunk_index]
        tokens = parse(chunk + text, len(chunk), self.max_dist, self.max_chain, self.chunk_keys[chunk_index])
        return stream_bytes(self.chunk_bits[chunk_index] + token_bits(tokens))


class _BitWriter:
    def __init__(self):
        self.out, self.buffer, self.count = bytearray(), 0, 0

    def write(self, value: int, bits: int) -> None:  # least significant bit first (RFC 1951, 3.1.1)
        self.buffer |= value << self.count
        self.count += bits
        while self.count >= 8:
            self.out.append(self.buffer & 0xFF)
            self.buffer >>= 8
            self.count -= 8

    def write_code(self, code: int, bits: int) -> None:  # Huffman codes go most significant bit first
        self.write(int(f"{code:0{bits}b}"[::-1], 2), bits)

    def finish(self) -> bytes:
        if self.count:
            self.out.append(self.buffer & 0xFF)
        return bytes(self.out)


def _write_symbol(writer: _BitWriter, symbol: int) -> None:
    """A literal/length symbol in the fixed code (RFC 1951, 3.2.6)."""
    if symbol < 144:
        writer.write_code(0x30 + symbol, 8)
    elif symbol < 256:
        writer.write_code(0x190 + symbol - 144, 9)
    elif symbol < 280:
        writer.write_code(symbol - 256, 7)
    else:
        writer.write_code(0xC0 + symbol - 280, 8)


def encode(tokens) -> bytes:
    """The DEFLATE stream (raw, one final fixed block) of `tokens`: for tests, which inflate it with zlib."""
    writer = _BitWriter()
    writer.write(1, 1)  # BFINAL
    writer.write(1, 2)  # BTYPE 01: fixed Huffman codes
    for token in tokens:
        if isinstance(token, int):
            _write_symbol(writer, token)
            continue
        length, distance = token
        code = _length_code(length)
        _write_symbol(writer, 257 + code)
        writer.write(length - LENGTH_CODES[code][0], LENGTH_CODES[code][1])
        code = _code_of(distance, DISTANCE_CODES)
        writer.write_code(code, 5)
        writer.write(distance - DISTANCE_CODES[code][0], DISTANCE_CODES[code][1])
    _write_symbol(writer, 256)
    return writer.finish()
