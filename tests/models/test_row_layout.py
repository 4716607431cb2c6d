"""Packed rows without a varlen kernel: laid out as rows of their longest sequence (`row_layout`), or kept whole
with attention split per sequence (`PACKED_SDPA`). Either way the decoder states and their gradients equal those
of each sequence run on its own (the reference, float64), and the layout packs."""

import pytest
import torch
from transformers import GPT2Config, GPT2Model, LlamaConfig, LlamaModel, Qwen2Config, Qwen2Model

from posttrain.data.batching import collate_packed
from posttrain.data.chat import TokenizedExample
from posttrain.models.attention import (
    PACKED_SDPA,
    UPCAST_MAX_KEYS,
    attend,
    decoder_hidden_states,
    row_layout,
    sequence_lengths,
    use_packed_sdpa,
)


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


def tiny_decoder(kind: str, attn_implementation: str = "sdpa", heads: int = 4, kv_heads: int = 2):
    torch.manual_seed(0)
    sizes = dict(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=heads,
        num_key_value_heads=kv_heads, max_position_embeddings=64, attn_implementation=attn_implementation,
    )  # fmt: skip
    config, model = {"llama": (LlamaConfig, LlamaModel), "qwen2": (Qwen2Config, Qwen2Model)}[kind]
    return use_packed_sdpa(model(config(**sizes)).double())


def states_and_grads(decoder, forward, weights):
    """(states, gradient of sum(states * weights) for every parameter) of `forward()`."""
    decoder.zero_grad()
    states = forward()
    (states * weights).sum().backward()
    return states.detach(), [parameter.grad.clone() for parameter in decoder.parameters()]


@pytest.mark.parametrize(
    ("kind", "heads", "kv_heads", "lengths", "checkpointing"),
    [
        ("llama", 4, 2, [7, 3, 11, 1, 2, 9, 5], False),  # grouped-query heads, mixed lengths, a 1-token sequence
        ("llama", 4, 4, [12, 4, 4], True),  # multi-head, gradient checkpointing recomputes attention in backward
        ("qwen2", 4, 1, [6, 13, 2], False),  # another model type (q/k/v biases), one key-value head
        ("llama", 4, 2, [10], False),  # a single sequence: plain causal sdpa
    ],
)
def test_packed_sdpa_equals_each_sequence_on_its_own(kind, heads, kv_heads, lengths, checkpointing):
    decoder = tiny_decoder(kind, heads=heads, kv_heads=kv_heads)
    assert decoder.config._attn_implementation == PACKED_SDPA
    if checkpointing:
        decoder.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    decoder.train()  # dropout is 0: train mode only exercises the checkpointed path
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(1, 64, (1, sum(lengths)), generator=generator)
    positions = packed_positions(lengths)
    weights = torch.randn(1, sum(lengths), 32, generator=generator, dtype=torch.float64)
    calls = []
    attention = decoder.layers[0].self_attn
    original = attention.forward
    attention.forward = lambda *args, **kwargs: (
        calls.append(kwargs.get("packed_sequence_lengths")) or original(*args, **kwargs)
    )
    packed, packed_grads = states_and_grads(decoder, lambda: decoder_hidden_states(decoder, ids, positions), weights)
    attention.forward = original
    # Layers see the one packed row (no re-layout), with the sequence boundaries when there is more than one.
    assert calls[0] == (lengths if len(lengths) > 1 else None)

    def reference():
        pieces = ids.split(lengths, 1)
        return torch.cat([decoder(input_ids=piece, use_cache=False).last_hidden_state for piece in pieces], 1)

    expected, expected_grads = states_and_grads(decoder, reference, weights)
    torch.testing.assert_close(packed, expected, atol=1e-10, rtol=1e-9)
    for ours, theirs in zip(packed_grads, expected_grads):
        torch.testing.assert_close(ours, theirs, atol=1e-10, rtol=1e-9)


def test_packed_sdpa_without_sequence_lengths_is_sdpa():
    # A padded batch with its mask (generation, padded collation) runs transformers' sdpa unchanged.
    packed, plain = tiny_decoder("llama").eval(), tiny_decoder("llama").eval()
    plain.set_attn_implementation("sdpa")
    ids = torch.randint(1, 64, (2, 9), generator=torch.Generator().manual_seed(2))
    mask = torch.ones_like(ids)
    mask[1, :4] = 0  # left padding
    ours = decoder_hidden_states(packed, ids, attention_mask=mask)
    theirs = decoder_hidden_states(plain, ids, attention_mask=mask)
    assert plain.config._attn_implementation == "sdpa"
    torch.testing.assert_close(ours, theirs, atol=0, rtol=0)


def test_attend_runs_short_16_bit_training_calls_in_float32_on_cpu():
    """A bf16 query that needs a gradient and has <= UPCAST_MAX_KEYS keys: exactly fp32 sdpa cast back, gradients
    included (bf16 sdpa rounds differently, so equality shows which ran); otherwise transformers' sdpa as it is."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    module = torch.nn.Module()
    module.is_causal, module.num_key_value_groups = True, 2
    generator = torch.Generator().manual_seed(3)

    def inputs(keys, requires_grad=True):
        shapes = [(1, 4, keys, 16), (1, 2, keys, 16), (1, 2, keys, 16)]
        tensors = [torch.randn(*shape, generator=generator).bfloat16() for shape in shapes]
        return [t.requires_grad_(requires_grad) for t in tensors]

    def output_and_grads(fn, tensors):
        output = fn(module, *tensors, None, is_causal=True)[0]
        output.float().square().sum().backward()
        return output.detach(), [t.grad for t in tensors]

    def in_fp32(module, query, key, value, mask, **kwargs):
        output, _ = sdpa_attention_forward(module, query.float(), key.float(), value.float(), mask, **kwargs)
        return output.bfloat16(), None

    short = inputs(40)
    ours, our_grads = output_and_grads(attend, short)
    upcast, upcast_grads = output_and_grads(in_fp32, [t.detach().clone().requires_grad_(True) for t in short])
    assert ours.dtype == torch.bfloat16 and torch.equal(ours, upcast)
    assert all(torch.equal(a, b) and a.dtype == torch.bfloat16 for a, b in zip(our_grads, upcast_grads))
    native = sdpa_attention_forward(module, *[t.detach() for t in short], None, is_causal=True)[0]
    assert not torch.equal(native, ours)  # the comparison can tell the two apart
    for tensors in (inputs(UPCAST_MAX_KEYS + 1), inputs(40, requires_grad=False)):  # long, or no gradient: as it is
        expected = sdpa_attention_forward(module, *[t.detach() for t in tensors], None, is_causal=True)[0]
        assert torch.equal(attend(module, *tensors, None, is_causal=True)[0].detach(), expected)


def test_packed_sdpa_only_for_known_model_types_under_sdpa():
    assert tiny_decoder("llama", "eager").config._attn_implementation == "eager"  # eager keeps the row layout
    gpt2 = use_packed_sdpa(GPT2Model(GPT2Config(n_layer=1, n_embd=16, n_head=2, attn_implementation="sdpa")))
    assert gpt2.config._attn_implementation == "sdpa"  # its attention is not known to forward the lengths
