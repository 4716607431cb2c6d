"""Token-budget micro-batches (train.max_tokens_per_micro_batch): exact cover, determinism, the budget, pairs."""

import logging
import random

import pytest

from posttrain.data.batching import micro_batch_tokens, pack_token_budget


def random_sizes(count, longest, seed, per_item=1):
    generator = random.Random(seed)
    return [tuple(generator.randint(1, longest) for _ in range(per_item)) for _ in range(count)]


@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("per_item", [1, 2])  # examples, and pairs (chosen, rejected)
def test_every_item_once_within_the_budget(padded, per_item):
    sizes = random_sizes(200, 300, seed=per_item, per_item=per_item)
    items = [f"item{i}" for i in range(len(sizes))]
    budget = 1000
    micro_batches = pack_token_budget(items, sizes, budget, padded)
    flat = [item for batch in micro_batches for item in batch]
    assert sorted(flat) == sorted(items) and len(flat) == len(items)  # each exactly once
    by_name = dict(zip(items, sizes))
    for batch in micro_batches:
        lengths = [length for item in batch for length in by_name[item]]
        assert micro_batch_tokens(lengths, padded) <= budget
        assert [items.index(item) for item in batch] == sorted(items.index(item) for item in batch)  # input order
    # First-fit decreasing wastes little: fewer micro-batches than twice the lower bound.
    total = sum(micro_batch_tokens(list(s), padded) for s in sizes)
    assert len(micro_batches) < 2 * -(-total // budget)


def test_order_is_deterministic_and_hand_checked():
    """Lengths 5, 3, 8, 2, 6 under budget 10, packed. Decreasing: 8 (#2) opens A; 6 (#4) opens B; 5 (#0) does not
    fit A (13) or B (11): opens C; 3 (#1) fits B (9); 2 (#3) fits A (10). Batches by first item: C=[0], B=[1, 4],
    A=[2, 3]."""
    sizes = [(5,), (3,), (8,), (2,), (6,)]
    expected = [[0], [1, 4], [2, 3]]
    assert pack_token_budget(list(range(5)), sizes, 10, padded=False) == expected
    assert pack_token_budget(list(range(5)), sizes, 10, padded=False) == expected  # again: same answer


def test_padded_budget_counts_rows_times_the_longest():
    """Padded, (6, 6) costs 12 and (6, 2) costs 12 too: under 11 every pair of these sequences is too big."""
    assert micro_batch_tokens([6, 2], padded=True) == 12 and micro_batch_tokens([6, 2], padded=False) == 8
    assert pack_token_budget(["a", "b"], [(6,), (2,)], 11, padded=True) == [["a"], ["b"]]
    assert pack_token_budget(["a", "b"], [(6,), (2,)], 11, padded=False) == [["a", "b"]]


def test_a_pair_is_never_split():
    """Pairs (4, 4), (4, 4), (1, 1) under budget 10: 8 + 8 > 10 keeps p0 and p1 apart (a split of p1 over two
    batches would fill both to 10 instead), and the small pair joins the first batch (8 + 2 = 10)."""
    micro_batches = pack_token_budget(["p0", "p1", "p2"], [(4, 4), (4, 4), (1, 1)], 10, padded=False)
    assert micro_batches == [["p0", "p2"], ["p1"]]


def test_an_item_over_the_budget_goes_alone_with_a_warning(caplog):
    with caplog.at_level(logging.WARNING, logger="posttrain"):
        micro_batches = pack_token_budget(["big", "a", "b"], [(50,), (3,), (4,)], 10, padded=False)
    assert micro_batches == [["big"], ["a", "b"]]
    assert "exceeds train.max_tokens_per_micro_batch=10" in caplog.text


def test_bad_budget_and_mismatched_sizes_fail():
    with pytest.raises(ValueError, match="max_tokens_per_micro_batch must be >= 1"):
        pack_token_budget([1], [(1,)], 0, padded=False)
    with pytest.raises(ValueError, match="2 items but 1 sizes"):
        pack_token_budget([1, 2], [(1,)], 5, padded=False)
