"""The vLLM backend's logic without starting an engine: engine arguments, dtype, the CPU head_dim
check, and GPU sleep / wake bookkeeping (on a recording stand-in for `vllm.LLM`)."""

import pytest
import torch

from posttrain.errors import ConfigError
from posttrain.rollout.config import RolloutConfig
from posttrain.rollout.vllm_backend import VLLMBackend, engine_kwargs, resolve_dtype, start_engine


def test_engine_kwargs_single_process_and_torchrun(monkeypatch):
    monkeypatch.delenv("VLLM_CPU_KVCACHE_SPACE", raising=False)
    cfg = RolloutConfig(kv_cache_gib=0.5, seed=3, engine_kwargs={"max_num_batched_tokens": 4096})
    single = engine_kwargs(cfg, "/m", "float32", on_gpu=False, num_ranks=1, this_rank=0)
    assert single["kv_cache_memory_bytes"] == 1 << 29 and single["seed"] == 3 and single["dtype"] == "float32"
    assert "distributed_executor_backend" not in single and single["max_num_batched_tokens"] == 4096
    assert single["enable_sleep_mode"] is False and single["logprobs_mode"] == "processed_logprobs"
    rank1 = engine_kwargs(cfg, "/m", "float32", on_gpu=False, num_ranks=2, this_rank=1)
    assert rank1["distributed_executor_backend"] == "external_launcher" and rank1["seed"] == 4
    gpu = engine_kwargs(RolloutConfig(enable_sleep_mode=True), "/m", "bfloat16", on_gpu=True, num_ranks=1, this_rank=0)
    assert gpu["enable_sleep_mode"] is True and "kv_cache_memory_bytes" not in gpu
    with pytest.raises(ConfigError, match="tensor_parallel_size=3 must divide the number of ranks 4"):
        engine_kwargs(RolloutConfig(tensor_parallel_size=3), "/m", "bfloat16", on_gpu=True, num_ranks=4, this_rank=0)
    # 4 ranks, TP=2: groups [0, 1] and [2, 3], one engine (and one sampling seed) per group
    tp = [engine_kwargs(RolloutConfig(tensor_parallel_size=2), "/m", "bfloat16", True, 4, r) for r in range(4)]
    assert [kwargs["seed"] for kwargs in tp] == [0, 0, 1, 1]
    assert all(k["tensor_parallel_size"] == 2 and k["distributed_executor_backend"] == "external_launcher" for k in tp)


def test_cpu_kv_cache_env_wins(monkeypatch):
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "2")
    assert "kv_cache_memory_bytes" not in engine_kwargs(RolloutConfig(), "/m", "float32", False, 1, 0)


def test_auto_dtype_is_the_saved_dtype():
    from transformers import LlamaConfig

    assert resolve_dtype("auto", LlamaConfig(dtype="float32")) == "float32"
    assert resolve_dtype("bfloat16", LlamaConfig(dtype="float32")) == "bfloat16"


@pytest.mark.skipif(torch.cuda.is_available(), reason="the head_dim limit is vLLM's CPU attention's")
def test_small_heads_fail_before_vllm_starts(tmp_path):
    from transformers import LlamaConfig

    LlamaConfig(hidden_size=64, num_attention_heads=4, num_key_value_heads=4).save_pretrained(tmp_path)
    with pytest.raises(ConfigError, match="head_dim 16; vLLM's CPU attention needs head_dim >= 32"):
        start_engine(RolloutConfig(), str(tmp_path))


def test_missing_model_dir_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="cannot read the model config"):
        start_engine(RolloutConfig(), str(tmp_path / "nowhere"))


class RecordingLLM:
    """Records the calls VLLMBackend makes on `vllm.LLM` (sleep mode needs a GPU, so it cannot run here)."""

    def __init__(self, enable_sleep_mode: bool):
        model_config = type("ModelConfig", (), {"max_model_len": 64, "enable_sleep_mode": enable_sleep_mode})
        engine_core = type("EngineCoreClient", (), {"shutdown": lambda client: None})()
        self.llm_engine = type("Engine", (), {"model_config": model_config, "engine_core": engine_core})
        self.calls = []

    def sleep(self, level):
        self.calls.append(("sleep", level))

    def wake_up(self, tags=None):
        self.calls.append(("wake_up", tuple(tags)))

    def collective_rpc(self, method, kwargs):
        self.calls.append((method, len(list(kwargs["weights_iterator"]))))

    def reset_prefix_cache(self):
        self.calls.append(("reset_prefix_cache",))
        return True


def test_sleep_then_sync_wakes_weights_first_and_kv_cache_at_wake(tiny_tokenizer, tiny_model):
    """Through the service (which owns the sleep state): vLLM's sleep / wake_up(tags) / reload_weights calls."""
    from posttrain.rollout.service import RolloutService

    llm = RecordingLLM(enable_sleep_mode=True)
    cfg = RolloutConfig(enable_sleep_mode=True, sleep_level=2)
    service = RolloutService(VLLMBackend(llm, cfg), tiny_tokenizer, cfg)
    service.sleep()
    service.sleep()  # already asleep: no second call
    service.sync_weights(tiny_model)
    service.wake_up()
    service.wake_up()  # already awake
    assert llm.calls == [
        ("sleep", 2),
        ("wake_up", ("weights",)),
        ("reload_weights", len(tiny_model.state_dict())),
        ("reset_prefix_cache",),
        ("wake_up", ("kv_cache",)),
    ]


def test_sleep_is_a_no_op_without_sleep_mode(tiny_tokenizer):
    from posttrain.rollout.service import RolloutService

    llm = RecordingLLM(enable_sleep_mode=False)
    service = RolloutService(VLLMBackend(llm, RolloutConfig()), tiny_tokenizer, RolloutConfig(enable_sleep_mode=True))
    assert service.sleep() is None
    service.wake_up()
    assert llm.calls == []
