"""Fast checks without an engine: prompt rendering and length policy, sampling / config validation and
the conf/rollout YAMLs against the schema."""

from pathlib import Path

import pytest
from omegaconf import OmegaConf

from posttrain.data.chat import render_ids
from posttrain.errors import ConfigError, DataError
from posttrain.rollout.config import RolloutConfig, SamplingConfig
from posttrain.rollout.prompts import fit_prompt, prepare_prompts
from posttrain.rollout.service import as_sampling_config, validate_rollout_config

CONF_ROLLOUT = Path(__file__).resolve().parents[2] / "conf" / "rollout"


def test_chat_prompts_render_like_trainers_and_ids_pass_through(tiny_tokenizer):
    messages = [{"role": "user", "content": "What is 2 + 3?"}]
    expected = render_ids(tiny_tokenizer, messages, add_generation_prompt=True)
    rendered = prepare_prompts(
        tiny_tokenizer, [messages, [5, 6, 7]], max_tokens=8, max_model_len=64, truncation="error"
    )
    assert rendered == [expected, [5, 6, 7]]
    assert tiny_tokenizer.decode(expected).endswith("<|assistant|>\n")


@pytest.mark.parametrize("bad", ["What is 2 + 3?", [{"role": "robot", "content": "hi"}], [1.5, 2.0], []])
def test_malformed_prompt_names_its_index(tiny_tokenizer, bad):
    with pytest.raises(DataError, match="prompt 1"):
        prepare_prompts(tiny_tokenizer, [[1, 2], bad], max_tokens=8, max_model_len=64, truncation="error")


def test_long_prompt_error_names_index_and_lengths():
    with pytest.raises(DataError) as error:
        fit_prompt(list(range(60)), prompt_index=3, max_tokens=8, max_model_len=64, truncation="error")
    message = str(error.value)
    assert "prompt 3 has 60 tokens" in message and "68 > rollout.max_model_len=64" in message


def test_left_truncation_keeps_the_last_tokens():
    assert fit_prompt(list(range(60)), 0, max_tokens=8, max_model_len=64, truncation="left") == list(range(4, 60))
    assert fit_prompt(list(range(10)), 0, max_tokens=8, max_model_len=64, truncation="left") == list(range(10))
    with pytest.raises(ConfigError, match="no room"):
        fit_prompt([1], 0, max_tokens=64, max_model_len=64, truncation="left")


def test_sampling_validation():
    assert as_sampling_config({"n": 2, "temperature": 0.0}) == SamplingConfig(n=2, temperature=0.0)
    with pytest.raises(ConfigError, match="unknown sampling keys \\['temprature'\\]"):
        as_sampling_config({"temprature": 0.5})
    with pytest.raises(ConfigError, match="n=0 must be >= 1.*top_p=0.0"):
        as_sampling_config(SamplingConfig(n=0, top_p=0.0))


def test_rollout_config_validation():
    validate_rollout_config(RolloutConfig())
    with pytest.raises(ConfigError, match="rollout.backend='sglang' is not one of vllm, hf"):
        validate_rollout_config(RolloutConfig(backend="sglang"))
    with pytest.raises(ConfigError, match="logprobs_mode"):
        validate_rollout_config(RolloutConfig(logprobs_mode="processed_logits"))


@pytest.mark.parametrize("option", ["vllm", "hf"])
def test_conf_rollout_yaml_matches_the_schema(option):
    cfg = OmegaConf.merge(OmegaConf.structured(RolloutConfig), OmegaConf.load(CONF_ROLLOUT / f"{option}.yaml"))
    assert cfg.backend == option
    validate_rollout_config(OmegaConf.to_object(cfg))
