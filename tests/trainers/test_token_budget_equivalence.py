"""train.max_tokens_per_micro_batch changes how a step is split, never its gradient: SFT and DPO (whole runs) and
RLVR (its optimizer step on a DeepSpeed engine) accumulate, at DeepSpeed's gradient-accumulation boundary, the
same gradients with a token budget (several micro-batches of varying count) as with fixed-size micro-batches."""

import copy

import pytest
import torch
from helpers import compose_config
from test_rlvr_mechanics import make_sequences

from posttrain.engine import backend
from posttrain.engine.distributed import init_distributed
from posttrain.logging import read_metrics
from posttrain.models.logprob_model import CausalLMWithLogprobs
from posttrain.models.logprobs import completion_logprobs
from posttrain.trainers.rlvr import RLVR
from posttrain.training import run_algorithm

pytestmark = pytest.mark.integration

# lr 0: the weights stay put, so the second step's gradient is comparable too (and shows the first step's
# gradients were cleared at its boundary, not carried over).
UNPATCHED_STEP = backend.step
COMMON = ["logger.progress_bar=false", "train.max_steps=2", "optim.lr=0", "train.eval_at_start=false"]


def record_boundaries(monkeypatch) -> dict:
    """Counts backend.step calls (micro-steps) and keeps the accumulated gradients at each accumulation boundary."""
    record = {"micro_steps": 0, "gradients": []}

    def step(engine, max_grad_norm):
        record["micro_steps"] += 1
        if engine.is_gradient_accumulation_boundary():
            named = engine.module.named_parameters()
            record["gradients"].append({n: p.grad.detach().clone() for n, p in named if p.grad is not None})
        UNPATCHED_STEP(engine, max_grad_norm)

    monkeypatch.setattr(backend, "step", step)
    return record


def run_and_record(monkeypatch, overrides) -> tuple[dict, list]:
    record = record_boundaries(monkeypatch)
    run_dir = run_algorithm(compose_config([*COMMON, *overrides]))
    return record, [m for m in read_metrics(run_dir) if "loss" in m]


def assert_same_gradients(budgeted, fixed):
    assert len(budgeted) == len(fixed) == 2  # one boundary per optimizer step
    for with_budget, without in zip(budgeted, fixed):
        assert with_budget.keys() == without.keys() and without
        for name, gradient in without.items():
            assert gradient.abs().sum() > 0, name  # every parameter gets a gradient: the comparison means something
            torch.testing.assert_close(with_budget[name], gradient, atol=1e-6, rtol=1e-5, msg=name)


@pytest.mark.parametrize("packing", [True, False])
def test_sft_budget_gives_the_fixed_split_gradient(tmp_path, monkeypatch, packing):
    data = ["data.num_train=64", "data.num_eval=0", f"data.packing={packing}", "data.max_length=128"]
    fixed, fixed_metrics = run_and_record(monkeypatch, [f"run_dir={tmp_path / 'fixed'}", *data,
                                                        "train.micro_batch_size=8"])  # fmt: skip
    budget = ["train.micro_batch_size=4", "train.gradient_accumulation_steps=2", "train.max_tokens_per_micro_batch=160"]
    budgeted, budget_metrics = run_and_record(monkeypatch, [f"run_dir={tmp_path / 'budget'}", *data, *budget])
    assert fixed["micro_steps"] == 2 and budgeted["micro_steps"] > 4  # 1 vs several micro-batches a step
    assert_same_gradients(budgeted["gradients"], fixed["gradients"])
    for a, b in zip(budget_metrics, fixed_metrics):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-6)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-5)


def test_dpo_budget_gives_the_fixed_split_gradient(tmp_path, monkeypatch):
    data = ["algo=dpo", "data=arithmetic_preference", "data.num_train=32", "data.num_eval=0",
            f"algo.reference.cache_dir={tmp_path / 'cache'}"]  # fmt: skip
    fixed, fixed_metrics = run_and_record(monkeypatch, [f"run_dir={tmp_path / 'fixed'}", *data,
                                                        "train.micro_batch_size=8"])  # fmt: skip
    budgeted, budget_metrics = run_and_record(monkeypatch, [f"run_dir={tmp_path / 'budget'}", *data,
        "train.micro_batch_size=8", "train.max_tokens_per_micro_batch=160"])  # fmt: skip
    assert fixed["micro_steps"] == 2 and budgeted["micro_steps"] > 4
    assert_same_gradients(budgeted["gradients"], fixed["gradients"])
    for a, b in zip(budget_metrics, fixed_metrics):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-6)


def optimizer_step_gradients(tmp_path, monkeypatch, module, tokenizer, samples, aggregation, overrides) -> dict:
    """`record_boundaries` of one RLVR optimizer step over `samples` on a DeepSpeed engine training a copy of
    `module`, configured by `overrides` (share_prompts as the trainer resolves it)."""
    cfg = compose_config([f"run_dir={tmp_path}", "algo=rlvr", f"algo.aggregation={aggregation}",
                          "algo.entropy_coef=0.01", *overrides])  # fmt: skip
    trainer = object.__new__(RLVR)
    trainer.cfg, trainer.tokenizer = cfg, tokenizer
    trainer.engine = backend.build_engine(copy.deepcopy(module), cfg, total_steps=1)
    trainer.share_prompts = cfg.algo.share_prompts and module.shares_prompts
    record = record_boundaries(monkeypatch)
    trainer.optimizer_step(samples)
    return record


@pytest.mark.parametrize("aggregation", ["token_mean", "sequence_mean", "sum_constant"])
def test_rlvr_budget_gives_the_fixed_split_gradient(tmp_path, monkeypatch, tiny_model, tiny_tokenizer,
                                                    arithmetic_rows, aggregation):  # fmt: skip
    init_distributed()
    samples = make_sequences(tiny_tokenizer, arithmetic_rows[:12], [1.0, -0.5, 0.25, -1.0, 2.0, -0.75] * 2)
    module = CausalLMWithLogprobs(tiny_model, fused=False)
    with torch.no_grad():
        logprobs, _, mask = completion_logprobs(
            module, [s.example for s in samples], [s.prompt_length for s in samples]
        )
    for sample, row, row_mask in zip(samples, logprobs, mask):
        sample.rollout_logprobs = (row[row_mask > 0] - 0.05).tolist()  # a small rollout/trainer mismatch

    def step_gradients(overrides):
        return optimizer_step_gradients(tmp_path, monkeypatch, module, tiny_tokenizer, samples, aggregation, overrides)

    fixed = step_gradients(["train.gradient_accumulation_steps=1"])
    longest = max(len(s.example.input_ids) for s in samples)
    budgeted = step_gradients(
        ["train.gradient_accumulation_steps=1", f"train.max_tokens_per_micro_batch={2 * longest}"]
    )
    assert fixed["micro_steps"] == 1 and budgeted["micro_steps"] >= 6  # 12 sequences, at most 2 a micro-batch
    assert len(fixed["gradients"]) == len(budgeted["gradients"]) == 1
    for name, gradient in fixed["gradients"][0].items():
        torch.testing.assert_close(budgeted["gradients"][0][name], gradient, atol=1e-6, rtol=1e-5, msg=name)


@pytest.mark.parametrize("aggregation", ["token_mean", "sequence_mean"])
def test_rlvr_shared_prompt_forwards_give_the_plain_gradient(tmp_path, monkeypatch, tiny_model, tiny_tokenizer,
                                                             arithmetic_rows, aggregation):  # fmt: skip
    """algo.share_prompts: a micro-batch's groups put each prompt in the forward once; the step's gradient is the
    one of every completion's own forward. 3 prompts x 4 completions, interleaved, in 3 micro-batches."""
    init_distributed()
    rows = [
        {"prompt": arithmetic_rows[group]["prompt"], "messages": arithmetic_rows[3 + 4 * group + k]["messages"]}
        for k in range(4)
        for group in range(3)
    ]
    samples = make_sequences(tiny_tokenizer, rows, [1.0, -0.5, 0.25, -1.0, 2.0, -0.75] * 2)
    module = CausalLMWithLogprobs(tiny_model, fused=False)
    assert module.shares_prompts
    with torch.no_grad():
        logprobs, _, mask = completion_logprobs(
            module, [s.example for s in samples], [s.prompt_length for s in samples]
        )
    for sample, row, row_mask in zip(samples, logprobs, mask):
        sample.rollout_logprobs = (row[row_mask > 0] - 0.05).tolist()

    forwards = []
    original = RLVR.optimizer_step.__globals__["completion_logprobs"]

    def counting(model, examples, prompt_lengths, temperature=1.0, share_prompts=False):
        forwards.append((len(examples), len({tuple(e.input_ids[:p]) for e, p in zip(examples, prompt_lengths)}),
                         share_prompts))  # fmt: skip
        return original(model, examples, prompt_lengths, temperature, share_prompts)

    monkeypatch.setitem(RLVR.optimizer_step.__globals__, "completion_logprobs", counting)
    common = ["train.gradient_accumulation_steps=3"]
    plain = optimizer_step_gradients(
        tmp_path, monkeypatch, module, tiny_tokenizer, samples, aggregation, [*common, "algo.share_prompts=false"]
    )
    shared = optimizer_step_gradients(tmp_path, monkeypatch, module, tiny_tokenizer, samples, aggregation, common)
    # Without sharing the split keeps the interleaved order (3 prompts a micro-batch); with it, the samples are
    # grouped by prompt first, so each micro-batch holds one whole group: one prompt for 4 completions.
    assert forwards == [(4, 3, False)] * 3 + [(4, 1, True)] * 3
    assert len(plain["gradients"]) == len(shared["gradients"]) == 1
    for name, gradient in plain["gradients"][0].items():
        assert gradient.abs().sum() > 0, name
        torch.testing.assert_close(shared["gradients"][0][name], gradient, atol=1e-6, rtol=1e-5, msg=name)
