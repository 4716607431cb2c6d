"""Weight sync that scales: bucketed streaming, LoRA merged a bucket at a time, LoRA adapters in PEFT's format,
and the engine arguments that go with them (enforce_eager by device, LoRA ranks)."""

import copy

import pytest
import torch

from posttrain.config import PeftConfig
from posttrain.engine.export import merged_lora_state_dict
from posttrain.errors import ConfigError
from posttrain.models.lora import wrap_lora
from posttrain.rollout.config import RolloutConfig
from posttrain.rollout.service import RolloutService, validate_rollout_config
from posttrain.rollout.vllm_backend import engine_kwargs, max_lora_rank
from posttrain.rollout.weights import buckets, lora_adapter_state, merged_lora_weights, policy_weights, streamed_weights


def lora_model(model, seed=0):
    """`model` with LoRA adapters whose B is random (fresh adapters are zero and would merge to nothing)."""
    peft = wrap_lora(copy.deepcopy(model), PeftConfig(enabled=True, r=8, alpha=16))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in peft.named_parameters():
            if "lora_B" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.05)
    return peft


def test_buckets_are_bounded_and_keep_order():
    entries = [(f"w{i}", torch.zeros(n)) for i, n in enumerate([10, 20, 30, 100, 5, 5])]  # float32: 4 bytes each
    grouped = list(buckets(entries, bucket_bytes=120))
    assert [[name for name, _ in bucket] for bucket in grouped] == [["w0", "w1"], ["w2"], ["w3"], ["w4", "w5"]]
    assert all(sum(t.numel() * 4 for _, t in b) <= 120 or len(b) == 1 for b in grouped)  # w3 (400 B) alone


def test_plain_weights_stream_as_they_are(tiny_model):
    streamed = list(streamed_weights(tiny_model, bucket_bytes=1 << 10))
    state = tiny_model.state_dict()
    assert [name for name, _ in streamed] == list(state)
    assert all(tensor.data_ptr() == state[name].data_ptr() for name, tensor in streamed)  # no copies


@pytest.mark.parametrize("bucket_bytes", [1 << 10, 1 << 30], ids=["1KiB", "1GiB"])
def test_lora_merged_a_bucket_at_a_time_equals_peft_merge(tiny_model, bucket_bytes):
    peft = lora_model(tiny_model)
    before = {name: tensor.clone() for name, tensor in peft.state_dict().items()}
    expected = merged_lora_state_dict(peft, {name: t.clone() for name, t in peft.state_dict().items()})
    merged = dict(merged_lora_weights(peft, bucket_bytes))
    assert list(merged) == list(expected)  # transformers names, in order
    for name, tensor in expected.items():
        torch.testing.assert_close(merged[name], tensor, rtol=1e-6, atol=1e-6)
    changed = [name for name in expected if not torch.equal(expected[name], tiny_model.state_dict()[name])]
    assert len(changed) == 7 * tiny_model.config.num_hidden_layers  # every LoRA target (peft.target_modules)
    assert all(name.endswith("proj.weight") for name in changed)
    assert all(torch.equal(peft.state_dict()[name], tensor) for name, tensor in before.items())  # not modified
    assert list(dict(policy_weights(peft))) == list(expected)


def test_lora_adapter_state_is_what_peft_saves(tiny_model, tmp_path):
    from peft import PeftModel
    from safetensors.torch import load_file

    peft = lora_model(tiny_model)
    state = lora_adapter_state(peft)
    peft.save_pretrained(str(tmp_path))
    saved = load_file(str(tmp_path / "adapter_model.safetensors"))
    assert sorted(state) == sorted(saved) and all(torch.equal(state[name], saved[name]) for name in saved)
    assert all(".lora_A.weight" in name or ".lora_B.weight" in name for name in state)
    # The adapter directory the vLLM backend writes (these tensors + the adapter config) reloads as the policy.
    reloaded = PeftModel.from_pretrained(copy.deepcopy(tiny_model), str(tmp_path))
    ids = torch.tensor([[1, 5, 9, 13, 17]])
    torch.testing.assert_close(reloaded(ids).logits, peft(ids).logits)


class AdapterBackend:
    """A backend that takes adapters: records which kind of sync the service chose."""

    name, max_model_len, can_sleep, takes_lora_adapters = "recording", 64, False, True

    def __init__(self):
        self.calls = []

    def load_weights(self, named_tensors):
        self.calls.append(("weights", len(list(named_tensors))))

    def load_lora_adapter(self, adapter_state, peft_config):
        self.calls.append(("adapter", len(adapter_state), peft_config.r))


def test_service_syncs_lora_as_an_adapter_or_merged_by_config(tiny_model, tiny_tokenizer):
    peft = lora_model(tiny_model)
    backend = AdapterBackend()
    RolloutService(backend, tiny_tokenizer, RolloutConfig()).sync_weights(peft)
    RolloutService(backend, tiny_tokenizer, RolloutConfig(lora_sync="merged")).sync_weights(peft)
    RolloutService(backend, tiny_tokenizer, RolloutConfig()).sync_weights(tiny_model)
    layers = tiny_model.config.num_hidden_layers
    full = len(tiny_model.state_dict())
    assert backend.calls == [("adapter", 7 * 2 * layers, 8), ("weights", full), ("weights", full)]


def test_engine_arguments_for_eager_mode_and_lora(monkeypatch):
    monkeypatch.delenv("VLLM_CPU_KVCACHE_SPACE", raising=False)
    cpu = engine_kwargs(RolloutConfig(), "/m", "float32", on_gpu=False, num_ranks=1, this_rank=0)
    gpu = engine_kwargs(RolloutConfig(), "/m", "bfloat16", on_gpu=True, num_ranks=1, this_rank=0)
    assert cpu["enforce_eager"] is True and gpu["enforce_eager"] is False  # CUDA graphs on GPU by default
    forced = engine_kwargs(RolloutConfig(enforce_eager=True), "/m", "bfloat16", on_gpu=True, num_ranks=1, this_rank=0)
    assert forced["enforce_eager"] is True
    lora = engine_kwargs(RolloutConfig(), "/m", "bfloat16", True, 1, 0, lora_rank=12)
    assert lora["enable_lora"] is True and lora["max_lora_rank"] == 16 and lora["max_loras"] == 1
    assert "enable_lora" not in gpu and max_lora_rank(8) == 8
    with pytest.raises(ConfigError, match="peft.r=1024: vLLM serves LoRA ranks up to 512"):
        max_lora_rank(1024)
    with pytest.raises(ConfigError, match="rollout.lora_sync='full' is not one of adapter, merged"):
        validate_rollout_config(RolloutConfig(lora_sync="full"))
    with pytest.raises(ConfigError, match="rollout.sync_bucket_mb=0 must be >= 1"):
        validate_rollout_config(RolloutConfig(sync_bucket_mb=0))


def test_rollout_init_of_an_adapter_engine_is_the_base_model_without_adapters(tiny_model, tiny_tokenizer, tmp_path):
    from transformers import AutoModelForCausalLM

    from posttrain.rollout.samples import export_base_model

    peft = lora_model(tiny_model)
    export_base_model(peft, tiny_tokenizer, tmp_path / "base", zero_stage=0)
    reloaded = AutoModelForCausalLM.from_pretrained(str(tmp_path / "base")).state_dict()
    assert sorted(reloaded) == sorted(tiny_model.state_dict())
    assert all(torch.equal(reloaded[name], tensor) for name, tensor in tiny_model.state_dict().items())


def test_level_two_sleep_and_adapter_sync_do_not_mix(tiny_tokenizer, tmp_path):
    from posttrain.rollout.service import build_rollout_service

    cfg = RolloutConfig(enable_sleep_mode=True, sleep_level=2)
    with pytest.raises(ConfigError, match="sleep_level=2 discards the engine's base weights"):
        build_rollout_service(cfg, tmp_path, tiny_tokenizer, lora_rank=8)
