"""Padding-free packing: no attention across documents, targets shifted within each document."""

import torch

from posttrain.data.batching import collate_packed, collate_padded
from posttrain.data.chat import IGNORE_INDEX, tokenize_conversation
from posttrain.models.logprob_model import CausalLMWithLogprobs


def _logits(model, batch):
    # use_cache=False: transformers derives the packed (block-diagonal) mask only without a KV cache.
    kwargs = {k: v for k, v in batch.items() if k in ("input_ids", "position_ids", "attention_mask")}
    return model(**kwargs, use_cache=False).logits


def test_packed_document_logits_equal_the_document_alone(tiny_model, tiny_tokenizer, arithmetic_rows):
    examples = [tokenize_conversation(tiny_tokenizer, row["messages"]) for row in arithmetic_rows[:4]]
    tiny_model.eval()
    with torch.no_grad():
        packed = _logits(tiny_model, collate_packed(examples))[0]
        offset = 0
        for example in examples:
            alone = _logits(tiny_model, {"input_ids": torch.tensor([example.input_ids])})[0]
            n = len(example.input_ids)
            torch.testing.assert_close(packed[offset : offset + n], alone, atol=1e-5, rtol=1e-5)
            offset += n
        # Control: positions that do not restart let documents see each other, and logits change.
        leaky = collate_packed(examples)
        leaky["position_ids"] = torch.arange(leaky["input_ids"].shape[1])[None]
        n0 = len(examples[0].input_ids)
        second_alone = _logits(tiny_model, {"input_ids": torch.tensor([examples[1].input_ids])})[0]
        assert not torch.allclose(
            _logits(tiny_model, leaky)[0][n0 : n0 + len(examples[1].input_ids)], second_alone, atol=1e-3
        )


def test_packed_and_padded_give_the_same_logprobs(tiny_model, tiny_tokenizer, arithmetic_rows):
    examples = [tokenize_conversation(tiny_tokenizer, row["messages"]) for row in arithmetic_rows[:3]]
    module = CausalLMWithLogprobs(tiny_model, fused=False).eval()
    with torch.no_grad():
        packed = collate_packed(examples)
        packed_logprobs, _ = module(**packed)
        padded = collate_padded(examples, tiny_tokenizer.pad_token_id)
        padded_logprobs, _ = module(**padded)
    mask = padded["targets"] != IGNORE_INDEX
    torch.testing.assert_close(
        packed_logprobs[packed["targets"] != IGNORE_INDEX], padded_logprobs[mask], atol=1e-5, rtol=1e-5
    )


def test_targets_never_cross_a_document_boundary(tiny_tokenizer, arithmetic_rows):
    examples = [tokenize_conversation(tiny_tokenizer, row["messages"]) for row in arithmetic_rows[:3]]
    batch = collate_packed(examples)
    ends = torch.tensor([len(e.input_ids) for e in examples]).cumsum(0) - 1
    assert (batch["targets"][0, ends] == IGNORE_INDEX).all()
    assert int((batch["targets"] != IGNORE_INDEX).sum()) == sum(e.num_target_tokens for e in examples)


def test_compact_examples_collate_like_lists(tiny_tokenizer, arithmetic_rows):
    """SFT examples hold array("i") ids and labels: both collates give the tensors lists give."""
    from array import array

    from posttrain.data.chat import TokenizedExample

    examples = [tokenize_conversation(tiny_tokenizer, row["messages"]) for row in arithmetic_rows[:3]]
    compact = [TokenizedExample(array("i", e.input_ids), array("i", e.labels)) for e in examples]
    for collate in (collate_packed, lambda batch: collate_padded(batch, pad_token_id=0)):
        expected, got = collate(examples), collate(compact)
        assert expected.keys() == got.keys()
        for key in expected:
            assert got[key].dtype == expected[key].dtype and torch.equal(got[key], expected[key]), key
    assert [e.num_target_tokens for e in compact] == [e.num_target_tokens for e in examples]
