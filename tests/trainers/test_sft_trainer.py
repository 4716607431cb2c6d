"""SFT end to end on the tiny default (in-process): learning, export, accumulation equivalence, LoRA, wandb."""

import json

import pytest
import torch
from helpers import compose_config, wandb_offline_config
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from posttrain.logging import read_metrics
from posttrain.training import run_algorithm

pytestmark = pytest.mark.integration

FAST = ["data.num_train=256", "data.num_eval=32", "logger.progress_bar=false"]


def run_sft(run_dir, *overrides):
    cfg = compose_config([f"run_dir={run_dir}", *FAST, *overrides])
    return run_algorithm(cfg)


def test_sft_loss_falls_and_final_loads_and_generates(tmp_path):
    run_dir = run_sft(tmp_path / "run", "train.max_steps=30", "optim.lr=3e-3")
    metrics = [m for m in read_metrics(run_dir) if "loss" in m]
    assert [m["step"] for m in metrics] == list(range(1, 31))
    for key in ("loss", "lr", "grad_norm", "tokens_per_second"):
        assert all(isinstance(m[key], float) for m in metrics), key
    first, last = metrics[0]["loss"], sum(m["loss"] for m in metrics[-5:]) / 5
    assert last < 0.5 * first, (first, last)
    assert "eval_loss" in read_metrics(run_dir)[-1]

    final = run_dir / "final"
    assert (final / "model.safetensors").exists() and (run_dir / "config.yaml").exists()
    model = AutoModelForCausalLM.from_pretrained(final)
    tokenizer = AutoTokenizer.from_pretrained(final)
    assert tokenizer.chat_template
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is 12 + 30?"}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )
    output = model.generate(**prompt, max_new_tokens=12, do_sample=False)
    assert output.shape[1] > prompt["input_ids"].shape[1]
    # The exported weights are the trained ones, not the initialisation.
    assert (run_dir / "checkpoints" / "step_30").is_dir()


def _final_weights(run_dir):
    return load_file(str(run_dir / "final" / "model.safetensors"))


def test_micro_batch_1_x_accum_8_equals_micro_batch_8_x_accum_1(tmp_path):
    common = ["train.max_steps=3", "optim.lr=1e-2", "optim.warmup_ratio=0"]
    a = run_sft(tmp_path / "a", "train.micro_batch_size=1", "train.gradient_accumulation_steps=8", *common)
    b = run_sft(tmp_path / "b", "train.micro_batch_size=8", "train.gradient_accumulation_steps=1", *common)
    losses_a = [m["loss"] for m in read_metrics(a) if "loss" in m]
    losses_b = [m["loss"] for m in read_metrics(b) if "loss" in m]
    assert losses_a == pytest.approx(losses_b, rel=1e-5)
    weights_a, weights_b = _final_weights(a), _final_weights(b)
    # Adam divides by sqrt(v), which magnifies float rounding in near-zero gradients into visible
    # update differences; 2e-4 is 2% of one lr-sized (1e-2) step. Gradients are compared tightly in
    # tests/trainers/test_sft_gradients.py.
    for name in weights_a:
        torch.testing.assert_close(weights_a[name], weights_b[name], atol=2e-4, rtol=0)
    # Guard: the runs did move the weights (so equality is not trivially two untouched models).
    c = run_sft(tmp_path / "c", "train.micro_batch_size=8", "train.max_steps=3", "optim.lr=0", "optim.warmup_ratio=0")
    moved = max((weights_b[n] - _final_weights(c)[n]).abs().max().item() for n in weights_b)
    assert moved > 1e-3


def test_loss_fused_kernel_and_plain_paths_train_alike(tmp_path):
    """model.fused_cross_entropy (default) vs the per-token log-prob path vs model.fused_logprobs=false (plain
    reference), under a token budget (micro-batches weighted by their share of the step): same logged losses and
    weights. Gradients are compared tightly in tests/trainers/test_sft_gradients.py; Adam divides by sqrt(v), which
    turns float rounding in near-zero gradients into update differences: 5e-4 is 5% of one lr-sized step."""
    common = ["train.max_steps=3", "optim.lr=1e-2", "optim.warmup_ratio=0", "train.micro_batch_size=4"]
    common += ["train.gradient_accumulation_steps=2", "train.max_tokens_per_micro_batch=160"]
    runs = {
        "loss_fused": run_sft(tmp_path / "loss_fused", *common),
        "per_token": run_sft(tmp_path / "per_token", "model.fused_cross_entropy=false", *common),
        "plain": run_sft(tmp_path / "plain", "model.fused_logprobs=false", *common),
    }
    losses = {name: [m["loss"] for m in read_metrics(run) if "loss" in m] for name, run in runs.items()}
    assert len(losses["loss_fused"]) == 3
    weights = {name: _final_weights(run) for name, run in runs.items()}
    for other in ("per_token", "plain"):
        assert losses["loss_fused"] == pytest.approx(losses[other], rel=1e-5), other
        for name in weights[other]:
            torch.testing.assert_close(weights["loss_fused"][name], weights[other][name], atol=5e-4, rtol=0)


def test_padded_batches_match_packed_batches(tmp_path):
    common = ["train.max_steps=2", "optim.lr=1e-2", "optim.warmup_ratio=0"]
    packed = run_sft(tmp_path / "packed", "data.packing=true", *common)
    padded = run_sft(tmp_path / "padded", "data.packing=false", *common)
    assert [m["loss"] for m in read_metrics(packed) if "loss" in m] == pytest.approx(
        [m["loss"] for m in read_metrics(padded) if "loss" in m], rel=1e-4
    )


def test_bf16_mixed_precision_trains_like_fp32(tmp_path):
    """model.dtype=bfloat16 (model=hf's default): DeepSpeed's bf16 mode, bf16 weights and compute with fp32 master
    weights and Adam state. From the same initialisation and data as fp32: the first loss agrees to bf16 rounding,
    the loss falls as far, and final/ holds bf16 weights."""
    common = ["train.max_steps=20", "optim.lr=3e-3", "data.num_eval=0"]
    fp32 = [m["loss"] for m in read_metrics(run_sft(tmp_path / "fp32", *common)) if "loss" in m]
    run_dir = run_sft(tmp_path / "bf16", *common, "model.dtype=bfloat16")
    bf16 = [m["loss"] for m in read_metrics(run_dir) if "loss" in m]
    assert len(bf16) == len(fp32) == 20
    assert bf16[0] == pytest.approx(fp32[0], rel=2e-2)
    last_fp32, last_bf16 = sum(fp32[-5:]) / 5, sum(bf16[-5:]) / 5
    assert last_bf16 < 0.5 * bf16[0], (bf16[0], last_bf16)
    assert last_bf16 == pytest.approx(last_fp32, rel=0.15), (last_fp32, last_bf16)
    weights = _final_weights(run_dir)
    assert {tensor.dtype for tensor in weights.values()} == {torch.bfloat16}


def test_lora_trains_adapters_and_exports_a_merged_model(tmp_path):
    run_dir = run_sft(tmp_path / "lora", "peft=lora", "train.max_steps=6", "optim.lr=1e-2")
    base = run_sft(tmp_path / "base", "train.max_steps=6", "optim.lr=0", "optim.warmup_ratio=0")
    merged, untouched = _final_weights(run_dir), _final_weights(base)
    assert not any("lora" in name for name in merged), "final/ must hold plain (merged) weights"
    assert set(merged) == set(untouched)
    changed = [n for n in merged if not torch.equal(merged[n], untouched[n])]
    assert any("q_proj" in n for n in changed) and any("down_proj" in n for n in changed)
    assert not any("embed_tokens" in n or "lm_head" in n for n in changed), "LoRA must leave non-adapted weights alone"
    AutoModelForCausalLM.from_pretrained(run_dir / "final")


def test_wandb_logger_runs_offline_with_the_resolved_config(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    run_dir = run_sft(tmp_path / "wandb", "logger=wandb", "train.max_steps=2", "optim.lr=2.5e-3")
    assert list((run_dir / "wandb").rglob("offline-run-*")), "wandb should have written an offline run in the run dir"
    config = wandb_offline_config(run_dir)
    assert config["optim"]["lr"] == 2.5e-3 and config["train"]["max_steps"] == 2 and config["algo"]["name"] == "sft"
    assert config["run_dir"] == str(run_dir) and config["model"]["tiny"]["hidden_size"] == 128  # resolved, whole
    assert [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()] == [0, 1, 2]
