"""Reward-model heads: shapes, normalisation, the prompt gate, one-pass score matrices, save / load."""

import pytest
import torch
from transformers import AutoModelForSequenceClassification

from posttrain.config import ModelConfig
from posttrain.data.preference import build_preference_examples, collate_pairs
from posttrain.data.sources import SourceRow
from posttrain.errors import ConfigError
from posttrain.losses.preference import gpm_score
from posttrain.models.reward import (
    RewardHeadConfig,
    build_reward_model,
    embed_responses,
    load_reward_model,
    pair_scores,
    save_reward_model,
    score_matrices,
    score_matrix,
    score_pairs,
)

PROMPT = [{"role": "user", "content": "What is 2 + 3?"}]
RESPONSES = ["2 + 3 = 5\n#### 5", "2 + 3 = 6\n#### 6", "5", "2 + 3 = 4\n#### 4"]


def model_for(tokenizer, **head):
    return build_reward_model(ModelConfig(), tokenizer, seed=0, head_config=RewardHeadConfig(**head)).eval()


def pairs(tokenizer):
    rows = [
        SourceRow("t", i, {"prompt": PROMPT, "chosen": RESPONSES[0], "rejected": other})
        for i, other in enumerate(RESPONSES[1:])
    ]
    return build_preference_examples(rows, tokenizer, __import__("posttrain.config").config.DataConfig(), "test")[0]


@pytest.mark.parametrize(
    "head, dim",
    [
        ({"head": "bt"}, 1),
        ({"head": "gpm", "embed_dim": 6}, 6),
        ({"head": "gpm", "embed_dim": 2, "prompt_gate": True}, 2),
    ],
)
def test_head_output_shapes(tiny_tokenizer, head, dim):
    model = model_for(tiny_tokenizer, **head)
    batch = collate_pairs(pairs(tiny_tokenizer), True, tiny_tokenizer.pad_token_id)
    values, gate = model(
        batch.inputs["input_ids"], batch.last_index, batch.prompt_index, position_ids=batch.inputs["position_ids"]
    )
    assert values.shape == (6, dim) and values.dtype == torch.float32
    if head.get("prompt_gate"):
        assert gate.shape == (6, dim // 2)
        torch.testing.assert_close(gate.sum(-1), torch.ones(6))
        assert torch.equal(gate[:3], gate[3:])  # chosen and rejected share the prompt, so the gate
    else:
        assert gate is None


def test_gpm_embeddings_are_unit_norm_only_when_normalising(tiny_tokenizer):
    normalised, _ = embed_responses(
        model_for(tiny_tokenizer, head="gpm", embed_dim=4), tiny_tokenizer, PROMPT, RESPONSES
    )
    torch.testing.assert_close(normalised.norm(dim=-1), torch.ones(4))
    raw, _ = embed_responses(
        model_for(tiny_tokenizer, head="gpm", embed_dim=4, normalize=False), tiny_tokenizer, PROMPT, RESPONSES
    )
    assert not torch.allclose(raw.norm(dim=-1), torch.ones(4))
    torch.testing.assert_close(raw / raw.norm(dim=-1, keepdim=True), normalised)  # same weights, only the norm differs


def test_prompt_gate_changes_scores_and_depends_only_on_the_prompt(tiny_tokenizer):
    gated = model_for(tiny_tokenizer, head="gpm", embed_dim=6, prompt_gate=True)
    values, gate = embed_responses(gated, tiny_tokenizer, PROMPT, RESPONSES)
    _, other_gate = embed_responses(gated, tiny_tokenizer, PROMPT, RESPONSES[::-1])
    torch.testing.assert_close(gate, other_gate)  # same prompt, whatever the responses
    _, new_prompt_gate = embed_responses(
        gated, tiny_tokenizer, [{"role": "user", "content": "What is 9 + 9?"}], RESPONSES
    )
    assert not torch.allclose(gate, new_prompt_gate)
    assert not torch.allclose(score_matrix(values, gate, "gpm"), score_matrix(values, None, "gpm"))


@pytest.mark.parametrize(
    "head", [{"head": "bt"}, {"head": "gpm", "embed_dim": 8}, {"head": "gpm", "embed_dim": 4, "prompt_gate": True}]
)
def test_score_matrix_from_one_embedding_pass_equals_pairwise_scores(tiny_tokenizer, head):
    model = model_for(tiny_tokenizer, **head)
    values, gate = embed_responses(model, tiny_tokenizer, PROMPT, RESPONSES)
    matrix = score_matrix(values, gate, model.head_config.head)
    assert matrix.shape == (4, 4)
    torch.testing.assert_close(matrix, -matrix.T)
    assert torch.all(matrix.diagonal() == 0)
    for i in range(4):
        for j in range(4):
            # A separate forward over just the two responses gives the same score.
            pair_values, pair_gate = embed_responses(model, tiny_tokenizer, PROMPT, [RESPONSES[i], RESPONSES[j]])
            expected = pair_scores(
                pair_values[:1], pair_values[1:], None if pair_gate is None else pair_gate[None], model.head_config.head
            )
            torch.testing.assert_close(matrix[i, j], expected[0], rtol=1e-4, atol=1e-5)


OTHER_PROMPT = [{"role": "user", "content": "What is 9 + 9?"}]
OTHER_RESPONSES = ["18", "9 + 9 = 18\n#### 18", "9 + 9 = 19\n#### 19", "#### 17"]


@pytest.mark.parametrize(
    "head", [{"head": "bt"}, {"head": "gpm", "embed_dim": 6}, {"head": "gpm", "embed_dim": 4, "prompt_gate": True}]
)
def test_batched_score_matrices_equal_each_prompts_matrix_and_the_pairwise_scores(tiny_tokenizer, head):
    """[P, K, K] for several prompts in shared packed forwards (3 sequences per forward, so chunks cross prompts)
    = each prompt's one-pass matrix = a separate forward per pair; antisymmetric, s(y > y) = 0."""
    model = model_for(tiny_tokenizer, **head)
    matrices = score_matrices(
        model, tiny_tokenizer, [PROMPT, OTHER_PROMPT], [RESPONSES, OTHER_RESPONSES], sequences_per_forward=3
    )
    assert matrices.shape == (2, 4, 4)
    assert torch.equal(matrices, -matrices.transpose(1, 2)) and torch.all(matrices.diagonal(dim1=1, dim2=2) == 0)
    for p, (prompt, responses) in enumerate(((PROMPT, RESPONSES), (OTHER_PROMPT, OTHER_RESPONSES))):
        values, gate = embed_responses(model, tiny_tokenizer, prompt, responses)
        torch.testing.assert_close(
            matrices[p], score_matrix(values, gate, model.head_config.head), rtol=1e-4, atol=1e-5
        )
        pair_values, pair_gate = embed_responses(model, tiny_tokenizer, prompt, [responses[0], responses[2]])
        expected = pair_scores(
            pair_values[:1], pair_values[1:], None if pair_gate is None else pair_gate[None], model.head_config.head
        )
        torch.testing.assert_close(matrices[p, 0, 2], expected[0], rtol=1e-4, atol=1e-5)
    if head["head"] == "bt":  # the BT special case: s = r_i - r_j
        rewards = embed_responses(model, tiny_tokenizer, PROMPT, RESPONSES)[0][:, 0]
        torch.testing.assert_close(matrices[0], rewards[:, None] - rewards[None, :], rtol=1e-4, atol=1e-5)


def test_identical_responses_score_zero_and_the_gate_switches_the_block_weights(tiny_tokenizer):
    gated = model_for(tiny_tokenizer, head="gpm", embed_dim=6, prompt_gate=True)
    matrix = score_matrices(gated, tiny_tokenizer, [PROMPT], [[RESPONSES[0], RESPONSES[0], RESPONSES[1]]])[0]
    assert abs(float(matrix[0, 1])) < 1e-6 and matrix[0, 2] != 0  # s(y > y) = 0, also for two separate copies of y
    values, gate = embed_responses(gated, tiny_tokenizer, PROMPT, RESPONSES)
    gate_off = score_matrix(values, None, "gpm")
    torch.testing.assert_close(score_matrix(values, torch.ones_like(gate), "gpm"), gate_off)  # all-ones gate = no gate
    assert not torch.allclose(score_matrices(gated, tiny_tokenizer, [PROMPT], [RESPONSES])[0], gate_off)


def test_score_matrices_need_the_same_number_of_responses_per_prompt(tiny_tokenizer):
    with pytest.raises(ValueError, match="same number K of responses"):
        score_matrices(
            model_for(tiny_tokenizer, head="bt"), tiny_tokenizer, [PROMPT, OTHER_PROMPT], [RESPONSES, RESPONSES[:2]]
        )


def test_bt_scores_are_reward_differences(tiny_tokenizer):
    model = model_for(tiny_tokenizer, head="bt")
    values, _ = embed_responses(model, tiny_tokenizer, PROMPT, RESPONSES)
    rewards = values[:, 0]
    torch.testing.assert_close(score_matrix(values, None, "bt"), rewards[:, None] - rewards[None, :])


def test_gpm_pair_scores_use_the_block_score(tiny_tokenizer):
    model = model_for(tiny_tokenizer, head="gpm", embed_dim=6)
    examples = pairs(tiny_tokenizer)
    scores = score_pairs(model, examples, tiny_tokenizer.pad_token_id)
    values, _ = embed_responses(model, tiny_tokenizer, PROMPT, RESPONSES)
    torch.testing.assert_close(scores, gpm_score(values[:1].expand(3, -1), values[1:]), rtol=1e-4, atol=1e-5)


def test_bad_head_settings_fail_naming_the_key():
    with pytest.raises(ConfigError, match="algo.embed_dim=3"):
        RewardHeadConfig(head="gpm", embed_dim=3)
    with pytest.raises(ConfigError, match="unknown; use one of bt, gpm"):
        RewardHeadConfig(head="mse")
    with pytest.raises(ConfigError, match="prompt_gate needs algo.head=gpm"):
        RewardHeadConfig(head="bt", prompt_gate=True)


@pytest.mark.parametrize("head", [{"head": "bt"}, {"head": "gpm", "embed_dim": 4, "prompt_gate": True}])
def test_saved_reward_model_loads_back_and_in_transformers(tmp_path, tiny_tokenizer, head):
    model = model_for(tiny_tokenizer, **head)
    save_reward_model(model, tiny_tokenizer, tmp_path / "final")
    loaded, tokenizer = load_reward_model(tmp_path / "final")
    before = embed_responses(model, tiny_tokenizer, PROMPT, RESPONSES)
    after = embed_responses(loaded, tokenizer, PROMPT, RESPONSES)
    torch.testing.assert_close(after[0], before[0])
    if before[1] is not None:
        torch.testing.assert_close(after[1], before[1])
    # Plain transformers: logits at the last token are the (unnormalised) head output.
    classifier = AutoModelForSequenceClassification.from_pretrained(tmp_path / "final").eval()
    ids = tokenizer.apply_chat_template(
        PROMPT + [{"role": "assistant", "content": RESPONSES[0]}], return_tensors="pt", return_dict=True
    )["input_ids"]
    ids = ids[
        :, : ids[0].tolist().index(tokenizer.eos_token_id, ids.shape[1] - 3) + 1
    ]  # end at the response's end of turn
    with torch.no_grad():
        logits = classifier(ids).logits[0]
    expected = before[0][0] if head["head"] == "bt" else torch.nn.functional.normalize(logits, dim=-1)
    torch.testing.assert_close(logits if head["head"] == "bt" else expected, before[0][0], rtol=1e-4, atol=1e-5)
