"""CDR preference annotation (posttrain/annotate.py): the density ratio against a hand computation from two
tiny models, and the preference rows it writes."""

import json

import pytest
import torch

from posttrain.annotate import ScoringModel, density_ratio_rewards, main, with_criteria
from posttrain.config import ModelConfig
from posttrain.models.loading import load_model


@pytest.fixture(scope="module")
def two_models(tmp_path_factory, tiny_tokenizer):
    """Directories of two tiny Llamas with different random weights (the 'strong' and the 'weak')."""
    dirs = []
    for seed in (0, 1):
        path = tmp_path_factory.mktemp(f"model{seed}")
        load_model(ModelConfig(), tiny_tokenizer, seed=seed).save_pretrained(str(path))
        tiny_tokenizer.save_pretrained(str(path))
        dirs.append(path)
    return dirs


def by_hand(model_dir, tokenizer, prompt, response) -> float:
    """sum_t log softmax(logits)[y_t] over the response tokens (and its end-of-turn), float64, plain transformers."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float64)
    prompt_text = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
    full_text = tokenizer.apply_chat_template(prompt + [{"role": "assistant", "content": response}], tokenize=False)
    prompt_ids = tokenizer(prompt_text, add_special_tokens=False)["input_ids"]
    ids = tokenizer(full_text.rstrip("\n"), add_special_tokens=False)["input_ids"]  # up to and including <|end|>
    with torch.no_grad():
        logprobs = torch.log_softmax(model(torch.tensor([ids])).logits[0].double(), -1)
    return sum(float(logprobs[t - 1, ids[t]]) for t in range(len(prompt_ids), len(ids)))


def test_density_ratio_is_strong_minus_weak_log_likelihood_by_hand(two_models, tiny_tokenizer):
    strong_dir, weak_dir = two_models
    strong, weak = ScoringModel(strong_dir), ScoringModel(weak_dir)
    assert strong.model.shares_prompts  # batches of 2 responses to one prompt put it in their forward once
    prompts = [[{"role": "user", "content": "What is 12 + 34?"}], [{"role": "user", "content": "What is 5 + 9?"}]]
    responses = [["12 + 34 = 46\n#### 46", "#### 47"], ["5 + 9 = 14\n#### 14", "#### 13", "#### 14"]]
    criteria = "Answer correctly."
    rewards = density_ratio_rewards(strong, weak, prompts, responses, criteria=criteria, batch_size=2)
    assert [len(r) for r in rewards] == [2, 3]
    for prompt, group, reward in zip(prompts, responses, rewards):
        for response, value in zip(group, reward.tolist()):
            expected = by_hand(strong_dir, tiny_tokenizer, with_criteria(prompt, criteria), response) - by_hand(
                weak_dir, tiny_tokenizer, prompt, response
            )
            assert value == pytest.approx(expected, abs=1e-3)
    assert with_criteria(prompts[0], criteria)[0] == {"role": "system", "content": criteria}
    assert with_criteria(prompts[0], None) == prompts[0]


def test_annotate_writes_best_vs_worst_preference_rows(two_models, tmp_path, capsys):
    strong_dir, weak_dir = two_models
    rows = [
        {"prompt": [{"role": "user", "content": "What is 1 + 2?"}], "ground_truth": "3",
         "chosen": [{"role": "assistant", "content": "#### 3"}],
         "rejected": [{"role": "assistant", "content": "#### 4"}]},
        {"prompt": [{"role": "user", "content": "What is 2 + 2?"}], "responses": ["#### 4", "#### 5", "2 + 2 = 4"]},
    ]  # fmt: skip
    (tmp_path / "in.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "out.jsonl"
    argv = ["--strong", str(strong_dir), "--weak", str(weak_dir), "--prompts", str(tmp_path / "in.jsonl")]
    assert main([*argv, "--out", str(out)]) == 0
    written = [json.loads(line) for line in out.read_text().splitlines()]
    strong, weak = ScoringModel(strong_dir), ScoringModel(weak_dir)
    for row, source in zip(written, rows):
        texts = (
            [source["chosen"][0]["content"], source["rejected"][0]["content"]]
            if "chosen" in source
            else source["responses"]
        )
        reward = density_ratio_rewards(strong, weak, [source["prompt"]], [texts])[0]
        assert row["prompt"] == source["prompt"]
        assert row["chosen"] == [{"role": "assistant", "content": texts[int(reward.argmax())]}]
        assert row["rejected"] == [{"role": "assistant", "content": texts[int(reward.argmin())]}]
        assert row["cdr_reward"]["chosen"] == pytest.approx(float(reward.max()), abs=1e-5)
    assert written[0]["ground_truth"] == "3"


def test_annotate_samples_k_responses_when_rows_have_none(two_models, tmp_path, monkeypatch):
    from posttrain.rollout.service import RolloutService

    closed, close = [], RolloutService.close
    monkeypatch.setattr(RolloutService, "close", lambda self: closed.append(self) or close(self))
    strong_dir, weak_dir = two_models
    rows = [{"prompt": [{"role": "user", "content": f"What is {a} + 1?"}]} for a in range(3)]
    (tmp_path / "prompts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "out.jsonl"
    argv = ["--strong", str(strong_dir), "--weak", str(weak_dir), "--prompts", str(tmp_path / "prompts.jsonl")]
    assert main([*argv, "--out", str(out), "--k", "3", "--max-tokens", "6", "--backend", "hf"]) == 0
    assert len(closed) == 1  # the sampler's service is shut down once its samples are drawn
    written = [json.loads(line) for line in out.read_text().splitlines()]
    assert 1 <= len(written) <= 3  # a prompt whose 3 samples all score the same gives no row
    for row in written:
        assert row["cdr_reward"]["chosen"] > row["cdr_reward"]["rejected"]
        assert row["prompt"] in [r["prompt"] for r in rows]
