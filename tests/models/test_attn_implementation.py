"""model.attn_implementation=auto: flash_attention_2 with flash_attn 2 and a CUDA GPU, sdpa otherwise; logged.
Packed rows reach the flash kernel as position ids (padding-free), never as a block mask."""

import logging

import pytest
import torch
from helpers import compose_config
from transformers.modeling_flash_attention_utils import prepare_fa_kwargs_from_position_ids

from posttrain.data.batching import collate_packed
from posttrain.data.chat import tokenize_conversation
from posttrain.models import attention
from posttrain.models.loading import load_model
from posttrain.models.reward import RewardHeadConfig, build_reward_model


@pytest.mark.parametrize(
    "flash_version, gpu, expected, reason",
    [
        ("2.7.4", True, "flash_attention_2", "flash_attn 2.7.4, CUDA GPU present"),
        ("2.7.4", False, "sdpa", "no CUDA GPU"),
        (None, True, "sdpa", "the flash_attn 2 package does not import"),
        (None, False, "sdpa", "no CUDA GPU"),
    ],
)
def test_auto_picks_flash_attention_2_only_with_the_package_and_a_gpu(
    monkeypatch, caplog, flash_version, gpu, expected, reason
):
    monkeypatch.setattr(attention, "flash_attn_2_version", lambda: flash_version)
    monkeypatch.setattr(attention, "cuda_available", lambda: gpu)
    with caplog.at_level(logging.INFO, logger="posttrain"):
        assert attention.resolve_attn_implementation("auto") == expected
    assert f"model.attn_implementation=auto: {expected} ({reason})" in caplog.text


def test_explicit_names_pass_through(monkeypatch):
    monkeypatch.setattr(attention, "flash_attn_2_version", lambda: "2.7.4")
    monkeypatch.setattr(attention, "cuda_available", lambda: True)
    assert [attention.resolve_attn_implementation(name) for name in ("sdpa", "eager", "flash_attention_2")] == [
        "sdpa",
        "eager",
        "flash_attention_2",
    ]


def test_flash_attn_version_is_none_when_the_import_fails(monkeypatch):
    def failing_import(name):
        raise ImportError(f"{name}: undefined symbol (built for another torch)")

    monkeypatch.setattr(attention.importlib, "import_module", failing_import)
    assert attention.flash_attn_2_version() is None


def test_policy_and_reward_model_are_built_with_the_resolved_kernel(tmp_path, tiny_tokenizer, monkeypatch):
    cfg = compose_config([f"run_dir={tmp_path}", "model.attn_implementation=auto"])
    monkeypatch.setattr(attention, "cuda_available", lambda: False)  # this machine's answer, also on a GPU box
    policy = load_model(cfg.model, tiny_tokenizer, seed=0)
    reward = build_reward_model(cfg.model, tiny_tokenizer, 0, RewardHeadConfig())
    # sdpa, as its per-sequence variant for packed rows (the tiny model is a Llama: `use_packed_sdpa`)
    assert policy.config._attn_implementation == attention.PACKED_SDPA
    assert reward.classifier.config._attn_implementation == attention.PACKED_SDPA


def test_tulu3_recipes_ask_for_auto(tmp_path):
    for name in ("tulu3_8b_sft", "tulu3_70b_sft", "tulu3_8b_dpo", "tulu3_70b_dpo", "tulu3_8b_rlvr_grpo", "tulu3_8b_rm"):
        assert compose_config([f"recipe={name}", f"run_dir={tmp_path}"]).model.attn_implementation == "auto", name


def test_packed_rows_give_the_flash_varlen_kernel_one_segment_per_document(tiny_tokenizer, arithmetic_rows):
    """transformers' flash_attention_2 path reads cumulative sequence lengths off the restarting position ids of
    a packed row (no attention mask is passed): they must fall exactly on posttrain's document boundaries."""
    examples = [tokenize_conversation(tiny_tokenizer, row["messages"]) for row in arithmetic_rows[:5]]
    batch = collate_packed(examples)
    assert "attention_mask" not in batch and batch["input_ids"].shape[0] == 1
    (cu_seqlens, _), (max_length, _) = prepare_fa_kwargs_from_position_ids(batch["position_ids"])
    lengths = torch.tensor([len(example.input_ids) for example in examples])
    assert cu_seqlens.tolist() == [0, *torch.cumsum(lengths, 0).tolist()]
    assert int(max_length) == int(lengths.max())
