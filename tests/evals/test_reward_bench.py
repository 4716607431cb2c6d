"""RewardBench-format evaluator: per-subset and mean accuracy for BT and GPM reward models."""

import json

import pytest
import torch

from evals import reward_bench
from evals.reward_bench import accuracy_by_subset, evaluate_reward_bench
from posttrain.config import ModelConfig
from posttrain.errors import DataError
from posttrain.models.reward import RewardHeadConfig, build_reward_model, save_reward_model

ROWS = [
    {"prompt": "What is 2 + 3?", "chosen": "5", "rejected": "6", "subset": "math"},
    {"prompt": "What is 4 + 4?", "chosen": "8", "rejected": "9", "subset": "math"},
    {"prompt": "What is 1 + 1?", "chosen": "2", "rejected": "3", "subset": "math"},
    {"prompt": "Say hi.", "chosen": "hi", "rejected": "no", "subset": "chat"},
]


def test_accuracy_by_subset_hand_computed():
    # math: scores 1, -1, 0 -> right 1, 0, 1/2 -> 0.5; chat: 2 -> 1.0; mean (0.5 + 1) / 2 = 0.75; overall 2.5 / 4
    result = accuracy_by_subset(torch.tensor([1.0, -1.0, 0.0, 2.0]), ["math", "math", "math", "chat"])
    assert result == {"chat": 1.0, "math": 0.5, "mean": 0.75, "overall": 0.625}


@pytest.mark.parametrize("head", [{"head": "bt"}, {"head": "gpm", "embed_dim": 4, "prompt_gate": True}])
def test_evaluator_matches_the_models_own_pair_preferences(tiny_tokenizer, head):
    from posttrain.models.reward import embed_responses, score_matrix

    model = build_reward_model(ModelConfig(), tiny_tokenizer, 0, RewardHeadConfig(**head)).eval()
    result = evaluate_reward_bench(model, tiny_tokenizer, ROWS, batch_size=3)
    expected = []
    for row in ROWS:
        values, gate = embed_responses(
            model, tiny_tokenizer, [{"role": "user", "content": row["prompt"]}], [row["chosen"], row["rejected"]]
        )
        expected.append(float(score_matrix(values, gate, head["head"])[0, 1]))
    right = [1.0 if s > 0 else 0.0 for s in expected]
    assert result["math"] == pytest.approx(sum(right[:3]) / 3)
    assert result["chat"] == right[3]
    assert result["mean"] == pytest.approx((result["math"] + result["chat"]) / 2)
    assert result["overall"] == pytest.approx(sum(right) / 4)


def test_cli_scores_a_saved_model(tmp_path, tiny_tokenizer, capsys):
    model = build_reward_model(ModelConfig(), tiny_tokenizer, 0, RewardHeadConfig(head="gpm", embed_dim=4))
    save_reward_model(model, tiny_tokenizer, tmp_path / "rm")
    data = tmp_path / "bench.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in ROWS))
    reward_bench.main(["--model", str(tmp_path / "rm"), "--data", str(data)])
    printed = json.loads(capsys.readouterr().out)
    assert set(printed) == {"chat", "math", "mean", "overall"} and 0.0 <= printed["mean"] <= 1.0


def test_rows_without_a_subset_are_named(tiny_tokenizer):
    model = build_reward_model(ModelConfig(), tiny_tokenizer, 0, RewardHeadConfig())
    with pytest.raises(DataError, match='row 2 of rows has no "subset" string'):
        evaluate_reward_bench(model, tiny_tokenizer, [ROWS[0], {k: v for k, v in ROWS[1].items() if k != "subset"}])
