"""Packed rows laid out as rows of their longest sequence (`posttrain.models.attention.row_layout`): the decoder
states and their gradients equal those of each sequence run on its own (the reference), and the layout packs."""

import pytest
import torch
from transformers import LlamaConfig, LlamaModel

from posttrain.data.batching import collate_packed
from posttrain.data.chat import TokenizedExample
from posttrain.models.attention import decoder_hidden_states, row_layout, sequence_lengths


def packed_positions(lengths):
    return torch.cat([torch.arange(n) for n in lengths])[None]


def test_sequence_lengths_split_where_positions_restart():
    assert sequence_lengths(packed_positions([3, 1, 4])[0]) == [3, 1, 4]
    assert sequence_lengths(torch.arange(5)) == [5]


def test_first_fit_decreasing_fills_rows_of_the_longest_sequence():
    # Lengths 5, 4, 3, 2, 1 in rows of 5: [5], [4, 1], [3, 2] -- three rows, no padding at all.
    layout = row_layout(packed_positions([2, 5, 1, 4, 3]), hidden_size=0)
    assert layout.index.shape == (3, 5)
    assert int((layout.index < 0).sum()) == 0
    # Every packed position is read by exactly the slot `flat` names.
    assert torch.equal(layout.index.flatten()[layout.flat], torch.arange(15))


def test_layout_only_when_it_costs_less():
    # In units of 4 x hidden per layer: one row of N costs N (6h + N); R rows of C cost R C (6h + C).
    assert row_layout(packed_positions([6]), hidden_size=0) is None  # one sequence
    assert row_layout(packed_positions([4, 4]), hidden_size=0) is not None  # 8 * 8 = 64 > 2 * 4 * 4 = 32
    # [5], [1]: 2 rows of 5 cost 2 * 5 * 5 = 50 > 6 * 6 = 36 -- the padding outweighs the attention saved
    assert row_layout(packed_positions([5, 1]), hidden_size=0) is None
    # [4, 4] with h = 4: 8 (24 + 8) = 256 > 2 * 4 (24 + 4) = 224 still; with h = 100 padding-free rows still win
    assert row_layout(packed_positions([4, 4]), hidden_size=100) is not None
    # [5, 1] with h = 1: 6 (6 + 6) = 72 < 10 (6 + 5) = 110
    assert row_layout(packed_positions([5, 1]), hidden_size=1) is None


@pytest.fixture(scope="module")
def decoder():
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, attn_implementation="sdpa",
    )  # fmt: skip
    return LlamaModel(config).double().eval()  # float64: the two paths differ only by summation order


def test_laid_out_rows_equal_each_sequence_on_its_own(decoder):
    generator = torch.Generator().manual_seed(1)
    lengths = [7, 3, 11, 2, 9, 5] * 3
    examples = [TokenizedExample(torch.randint(1, 64, (n,), generator=generator).tolist(), [0] * n) for n in lengths]
    batch = collate_packed(examples)
    assert row_layout(batch["position_ids"], decoder.config.hidden_size) is not None  # the test exercises the re-layout
    packed = decoder_hidden_states(decoder, batch["input_ids"], batch["position_ids"])
    reference = torch.cat(
        [decoder(input_ids=torch.tensor([e.input_ids]), use_cache=False).last_hidden_state[0] for e in examples]
    )
    torch.testing.assert_close(packed[0], reference, atol=1e-10, rtol=1e-9)
    # Gradients: the same weighted sum of states through both paths reaches the weights alike.
    weights = torch.randn(reference.shape, generator=generator, dtype=torch.float64)
    grads = []
    for states in (
        lambda: decoder_hidden_states(decoder, batch["input_ids"], batch["position_ids"])[0],
        lambda: torch.cat(
            [decoder(input_ids=torch.tensor([e.input_ids]), use_cache=False).last_hidden_state[0] for e in examples]
        ),
    ):
        decoder.zero_grad()
        (states() * weights).sum().backward()
        grads.append([p.grad.clone() for p in decoder.parameters()])
    for ours, theirs in zip(*grads):
        torch.testing.assert_close(ours, theirs, atol=1e-10, rtol=1e-9)


def test_varlen_kernels_keep_the_single_row():
    class Recorder:
        def __init__(self, implementation):
            self.config = type("Config", (), {"_attn_implementation": implementation, "hidden_size": 0})()
            self.shapes = []

        def __call__(self, input_ids, **_):
            self.shapes.append(tuple(input_ids.shape))
            return type("Output", (), {"last_hidden_state": torch.zeros(*input_ids.shape, 2)})()

    positions = packed_positions([3, 4, 2])
    ids = torch.randint(1, 64, positions.shape)
    for implementation, shape in (("sdpa", (3, 4)), ("eager", (3, 4)), ("flash_attention_2", (1, 9))):
        recorder = Recorder(implementation)
        assert decoder_hidden_states(recorder, ids, positions).shape == (1, 9, 2)
        assert recorder.shapes == [shape], implementation
