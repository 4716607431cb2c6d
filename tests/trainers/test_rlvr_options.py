"""RLVR's DAPO-era options through the trainer's library path (posttrain.rollout.groups, corrected_policy_loss):
oversampling against a scripted rollout service with real verifiers, overlong handling, and the mismatch figures
of real rollout log-probs (the transformers backend) with a known perturbation injected."""

import copy
import math

import pytest
import torch
from helpers import compose_config
from omegaconf import OmegaConf

from posttrain.data.prompts import PromptRow
from posttrain.errors import ConfigError
from posttrain.losses import POLICY_LOSSES
from posttrain.losses.rollout_correction import corrected_policy_loss, mismatch_metrics
from posttrain.models.logprob_model import CausalLMWithLogprobs
from posttrain.models.logprobs import completion_logprobs, padded_rows
from posttrain.rollout.completion import Completion
from posttrain.rollout.config import RolloutConfig, SamplingConfig
from posttrain.rollout.rl_groups import sample_training_groups
from posttrain.rollout.samples import completion_example
from posttrain.trainers import get_algorithm

N = 4


class ScriptedRollout:
    """A rollout service whose answers are scripted per prompt: an `informative` prompt gets [right, wrong, right,
    wrong], any other all wrong (a zero-variance group); completions of `long_prompts` stop at max_tokens."""

    def __init__(self, informative: set[int], long_prompts: frozenset = frozenset()):
        self.informative, self.long_prompts, self.calls = informative, long_prompts, []

    def generate(self, prompts, sampling: SamplingConfig):
        self.calls.append(len(prompts))
        completions = []
        for p, prompt in enumerate(prompts):
            number = int(prompt[0]["content"])
            for s in range(sampling.n):
                right = number in self.informative and s % 2 == 0
                length = sampling.max_tokens if number in self.long_prompts else 3
                text = f"The answer is {number if right else number + 1}"
                reason = "length" if number in self.long_prompts else "stop"
                completions.append(Completion(p, s, [number], [1] * length, text, [-0.5] * length, reason))
        return completions


PROMPTS = [PromptRow([{"role": "user", "content": str(i)}], "gsm8k", str(i), f"row {i}") for i in range(64)]


def algo_config(*overrides):
    cfg = compose_config(["recipe=dapo_tiny", "algo.prompts_per_step=8", f"algo.sampling.n={N}", *overrides])
    get_algorithm("rlvr").check(cfg)
    return cfg.algo


def test_oversampling_trains_on_the_full_number_of_informative_groups():
    """Even prompts are informative: the step's first 8 prompts give 4; extra rounds of ceil(4 x 1.5) = 6 ... more
    prompts from the step's prompt stream fill the step to exactly 8 groups, all informative."""
    rollout = ScriptedRollout(set(range(0, 64, 2)))
    groups = sample_training_groups(rollout, PROMPTS, list(range(8)), algo_config(), seed=0, update=3)
    assert rollout.calls[:2] == [8, 6] and groups.stats["extra_rounds"] == len(rollout.calls) - 1 >= 1
    assert groups.kept_groups == groups.stats["groups_kept"] == 8
    assert len(groups.samples) == 8 * N
    assert all(s.example.input_ids[0] % 2 == 0 for s in groups.samples)  # the prompt id the script put first
    assert all(s.advantage != 0.0 for s in groups.samples)
    assert groups.stats["groups_sampled"] == sum(rollout.calls) == groups.rewards.shape[0]
    again = ScriptedRollout(set(range(0, 64, 2)))
    sample_training_groups(again, PROMPTS, list(range(8)), algo_config(), seed=0, update=3)
    assert again.calls == rollout.calls  # the prompt stream is deterministic


def test_oversampling_stops_after_max_extra_rounds_when_the_data_has_no_more():
    """Only prompts 0-3 are informative: 4 of 8 after the first round, none in the 2 allowed extra rounds."""
    rollout = ScriptedRollout({0, 1, 2, 3})
    algo = algo_config("algo.max_extra_rounds=2")
    groups = sample_training_groups(rollout, PROMPTS, list(range(8)), algo, seed=0, update=0)
    assert len(rollout.calls) == 3 and groups.stats["extra_rounds"] == 2
    assert groups.kept_groups == 4 and len(groups.samples) == 4 * N
    assert groups.stats["groups_dropped"] == sum(rollout.calls) - 4


def test_filter_shrinks_the_step_and_off_keeps_flat_groups():
    rollout = ScriptedRollout(set(range(0, 64, 2)))
    first = list(range(8))
    filtered = sample_training_groups(rollout, PROMPTS, first, algo_config("algo.dynamic_sampling=filter"), 0, 0)
    kept_all = sample_training_groups(rollout, PROMPTS, first, algo_config("algo.dynamic_sampling=off"), 0, 0)
    assert rollout.calls == [8, 8]
    assert filtered.kept_groups == 4 and len(filtered.samples) == 4 * N
    assert kept_all.kept_groups == 8 and len(kept_all.samples) == 8 * N


def test_overlong_mask_and_soft_penalty():
    """Prompts 0 and 1 informative; prompt 0's completions run to max_tokens (48). mask: its 4 completions leave the
    loss (its group still counts as kept). soft_penalty with buffer 8, factor 2: 48 tokens -> -2 on each of prompt 0's
    rewards (10 / 0 -> 8 / -2); 3-token completions get nothing."""
    rollout = ScriptedRollout({0, 1}, frozenset({0}))
    masked = sample_training_groups(rollout, PROMPTS, [0, 1], algo_config("algo.dynamic_sampling=filter"), 0, 0)
    assert masked.kept_groups == 2 and len(masked.samples) == N and masked.stats["overlong_masked"] == N
    soft = ["algo.dynamic_sampling=filter", "algo.overlong=soft_penalty", "algo.overlong_buffer=8"]
    shaped = sample_training_groups(
        rollout, PROMPTS, [0, 1], algo_config(*soft, "algo.overlong_penalty_factor=2"), 0, 0
    )
    torch.testing.assert_close(shaped.rewards, torch.tensor([[8.0, -2.0, 8.0, -2.0], [10.0, 0.0, 10.0, 0.0]]))
    assert len(shaped.samples) == 2 * N


@pytest.mark.parametrize(
    "override, message",
    [
        ("algo.dynamic_sampling=more", "algo.dynamic_sampling='more' must be one of off, filter, oversample"),
        ("algo.oversample_factor=0.5", "algo.oversample_factor=0.5 must be >= 1"),
        ("algo.overlong_buffer=48", "algo.overlong_buffer=48 must be > 0 and < algo.sampling.max_tokens=48"),
        ("algo.rollout_correction_cap=0.5", "algo.rollout_correction_cap=0.5 must be > 1"),
        ("algo.importance_level=seq", "algo.importance_level='seq' must be one of token, sequence"),
        ("algo.rollout_correction=is", "algo.rollout_correction='is': unknown rollout correction"),
    ],
)
def test_config_errors_name_the_key(override, message):
    cfg = compose_config(["recipe=dapo_tiny", "algo.overlong=soft_penalty", override])
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        get_algorithm("rlvr").check(cfg)


def test_bare_yaml_off_is_explained():
    cfg = compose_config(["recipe=dapo_tiny"])
    OmegaConf.update(cfg, "algo.overlong", False)  # what `overlong: off` in a YAML file gives
    with pytest.raises(ConfigError, match=r"algo.overlong='False': quote the mode in YAML \('off'\)"):
        get_algorithm("rlvr").check(cfg)


def test_injected_rollout_logprob_perturbation_shows_in_the_mismatch_figures(tiny_model, tiny_tokenizer):
    """Real rollout log-probs (transformers backend, T = 0.7) agree with the trainer's recomputation (fp32):
    mismatch ~ 0. Shifting the rollout log-probs by -0.2 / +0.2 on alternate tokens gives d = +-0.2: mean |d| = 0.2,
    k3 = mean(e^d - d - 1) = (e^0.2 - 1.2 + e^-0.2 - 0.8) / 2 (even token counts per row aside, up to the ~0 base);
    shifting by -ln 3 makes every token ratio 3 > C = 2 (all capped) and every sequence ratio 3^|y| (all masked)."""
    from posttrain.rollout.hf_backend import HFBackend
    from posttrain.rollout.service import RolloutService

    cfg = RolloutConfig(backend="hf", max_model_len=256)
    service = RolloutService(HFBackend(copy.deepcopy(tiny_model), tiny_tokenizer, cfg), tiny_tokenizer, cfg)
    prompts = [[{"role": "user", "content": f"What is {i} + {i + 3}?"}] for i in range(3)]
    completions = service.generate(prompts, SamplingConfig(n=2, temperature=0.7, max_tokens=12, seed=0))
    module = CausalLMWithLogprobs(tiny_model, fused=False).eval()
    examples = [completion_example(c) for c in completions]
    with torch.no_grad():
        logprobs, _, mask = completion_logprobs(module, examples, [len(c.prompt_token_ids) for c in completions], 0.7)
    rollout = padded_rows([torch.tensor(c.logprobs) for c in completions], mask)
    advantages = torch.tensor([1.0, -1.0] * 3)

    def figures(rollout_logprobs, correction="off"):
        _, _, sums = corrected_policy_loss(
            POLICY_LOSSES.get("grpo"), logprobs, logprobs, rollout_logprobs, advantages, mask,
            correction=correction, cap=2.0, clip_low=0.2, clip_high=0.28,
        )  # fmt: skip
        return mismatch_metrics(sums)

    base = figures(rollout)
    assert base["mismatch_abs_logprob"] < 1e-4 and base["mismatch_kl_k3"] < 1e-6
    shift = torch.tensor([(-0.2 if t % 2 == 0 else 0.2) for t in range(mask.shape[1])]) * mask
    shifted = figures(rollout + shift)
    assert shifted["mismatch_abs_logprob"] == pytest.approx(0.2, abs=1e-4)
    tokens = mask.sum().item()
    expected_k3 = float(((torch.exp(-shift) + shift - 1) * mask).sum()) / tokens  # d = -shift
    assert shifted["mismatch_kl_k3"] == pytest.approx(expected_k3, abs=1e-4)
    assert 0.8 * (math.exp(0.2) - 1.2) < expected_k3 < (math.exp(0.2) - 1.2 + math.exp(-0.2) - 0.8)
    capped = figures(rollout - math.log(3.0) * mask)
    assert capped["mismatch_capped_token_share"] == 1.0 and capped["mismatch_masked_sequence_share"] == 1.0
    assert base["mismatch_capped_token_share"] == 0.0 and base["mismatch_masked_sequence_share"] == 0.0
