"""algo=distill: config checks, the divergence mechanics on a real tiny model, and tiny end-to-end runs."""

import pytest
import torch
from helpers import compose_config

from posttrain.data.chat import IGNORE_INDEX, TokenizedExample, render_ids
from posttrain.errors import ConfigError
from posttrain.logging import read_metrics
from posttrain.losses.distill import forward_kl, reverse_kl
from posttrain.models.distillation import student_vocab_divergence, target_logprobs, teacher_logits, vocab_distances
from posttrain.models.logprob_model import CausalLMWithLogprobs
from posttrain.trainers.distill import check_config
from posttrain.training import run_algorithm


def test_config_errors_name_the_key(tmp_path):
    cfg = compose_config(["recipe=tiny_distill", f"run_dir={tmp_path}"])
    with pytest.raises(ConfigError, match=r"algo.teacher=None must be a model directory"):
        check_config(cfg)
    bad = ["algo.on_policy_fraction=1.5", "algo.beta=1.0", "algo.eval_responses=[teacher]", f"algo.teacher={tmp_path}"]
    cfg = compose_config(["recipe=tiny_distill", f"run_dir={tmp_path}", *bad])
    with pytest.raises(ConfigError) as error:
        check_config(cfg)
    message = str(error.value)
    assert "algo.on_policy_fraction=1.5" in message and "algo.beta=1.0" in message and "eval_responses" in message
    base = ["recipe=tiny_distill", f"run_dir={tmp_path}", f"algo.teacher={tmp_path}"]
    cfg = compose_config([*base, "algo.divergence=k3"])
    with pytest.raises(ConfigError, match="algo.divergence='k3': unknown distillation divergence"):
        check_config(cfg)


def examples(tokenizer):
    """Two conversations; labels on the reply tokens only (the scored positions are the ones before them)."""
    out = []
    for question, answer in (("What is 1 + 2?", "1 + 2 = 3\n#### 3"), ("What is 40 + 9?", "#### 49")):
        prompt = render_ids(tokenizer, [{"role": "user", "content": question}], add_generation_prompt=True)
        reply = tokenizer(answer, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        out.append(TokenizedExample(list(prompt) + reply, [IGNORE_INDEX] * len(prompt) + reply))
    return out


def plain_logits(model, batch):
    """[M, V] float32 logits of the HF model at the scored positions (the [N, V] baseline)."""
    logits = model(input_ids=batch[0], position_ids=batch[1], use_cache=False).logits.float()
    return logits.reshape(-1, logits.shape[-1])[batch[2].reshape(-1) != IGNORE_INDEX]


def test_divergence_mechanics_match_plain_logits(tiny_tokenizer, tiny_model):
    """teacher_logits = the HF logits at the scored positions; the chunked student divergence (values and every
    parameter gradient) equals the plain one on full logits; target_logprobs = log_softmax at the targets;
    a model's distance to itself is 0."""
    from posttrain.config import ModelConfig
    from posttrain.data.batching import collate_packed
    from posttrain.models.loading import load_model

    torch.manual_seed(0)
    student = CausalLMWithLogprobs(tiny_model, fused=False)
    teacher = CausalLMWithLogprobs(load_model(ModelConfig(), tiny_tokenizer, seed=1), fused=False)
    batch = examples(tiny_tokenizer)
    packed = collate_packed(batch)
    inputs = (packed["input_ids"], packed["position_ids"], packed["targets"])
    scored = int((packed["targets"] != IGNORE_INDEX).sum())
    with torch.no_grad():
        expected_teacher = plain_logits(teacher.policy, inputs)
    got_teacher = teacher_logits(teacher, batch, chunk_size=3)
    assert got_teacher.shape == (scored, expected_teacher.shape[-1])
    torch.testing.assert_close(got_teacher, expected_teacher, rtol=1e-5, atol=1e-5)

    ours = student_vocab_divergence(student, batch, got_teacher, "reverse_kl", chunk_size=5)
    grads = torch.autograd.grad(ours.sum(), list(student.parameters()))
    plain = reverse_kl(plain_logits(student.policy, inputs).double(), expected_teacher.double())
    plain_grads = torch.autograd.grad(plain.sum(), list(student.parameters()))
    torch.testing.assert_close(ours.double(), plain, rtol=1e-5, atol=1e-5)
    for got, want in zip(grads, plain_grads):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)

    targets = packed["targets"].reshape(-1)
    targets = targets[targets != IGNORE_INDEX]
    with torch.no_grad():
        reference = torch.log_softmax(plain_logits(student.policy, inputs), -1).gather(-1, targets[:, None])[:, 0]
        torch.testing.assert_close(target_logprobs(student, batch), reference, rtol=1e-5, atol=1e-5)
        distances = vocab_distances(student, {"self": student, "teacher": teacher}, batch, chunk_size=4)
    assert distances["tokens"] == scored
    assert abs(distances["self_forward_kl"]) < 1e-4 and abs(distances["self_jsd"]) < 1e-4
    expected_sum = float(forward_kl(plain_logits(student.policy, inputs), expected_teacher).sum())
    assert distances["teacher_forward_kl"] == pytest.approx(expected_sum, rel=1e-4)


@pytest.fixture(scope="module")
def tiny_teacher(tmp_path_factory):
    """final/ of a short SFT run on the default task (the student is the tiny model built from config)."""
    run_dir = tmp_path_factory.mktemp("teacher")
    cfg = compose_config([f"run_dir={run_dir}", "train.max_steps=60", "logger.progress_bar=false", "data.num_eval=0"])
    return run_algorithm(cfg) / "final"


@pytest.mark.integration
@pytest.mark.parametrize(
    "divergence, fraction, metric, factor",
    # measured once: forward KL 3.38 -> 1.50 (0.44x), sampled reverse KL 2.27 -> 1.82 (0.80x, a one-sample
    # estimator learns slower)
    [("forward_kl", 0.5, "teacher_forward_kl", 0.7), ("sampled_reverse_kl", 1.0, "teacher_reverse_kl", 0.9)],
)
def test_distill_reduces_the_teacher_distance(tiny_teacher, tmp_path, divergence, fraction, metric, factor):
    """From random weights, 12 steps of the tiny recipe (mixed offline / on-policy with a vocabulary divergence, or
    fully on-policy with the sampled estimator) bring the student's held-out distance to the teacher down."""
    cfg = compose_config([
        "recipe=tiny_distill", f"algo.teacher={tiny_teacher}", f"algo.oracle={tiny_teacher}",
        f"algo.divergence={divergence}", f"algo.on_policy_fraction={fraction}", "train.max_steps=12",
        "train.eval_every=0", "algo.eval_prompts=16", f"run_dir={tmp_path / 'distill'}", "logger.progress_bar=false",
    ])  # fmt: skip
    run_dir = run_algorithm(cfg)
    metrics = read_metrics(run_dir)
    evals = [m for m in metrics if "teacher_distance" in m]
    before, after = evals[0][metric], evals[-1][metric]
    losses = [m["loss"] for m in metrics if "loss" in m]
    print(f"{divergence}: held-out {metric} {before:.3f} -> {after:.3f}; losses {[round(x, 3) for x in losses]}")
    assert after < factor * before, (before, after)
    assert evals[-1]["oracle_distance"] == pytest.approx(evals[-1]["teacher_distance"])  # the same model here
    on_policy = [m["on_policy_token_fraction"] for m in metrics if "loss" in m]
    assert all((0 < f < 1) if fraction < 1 else f == 1.0 for f in on_policy), on_policy
    assert (run_dir / "final" / "model.safetensors").exists()


@pytest.mark.integration
@pytest.mark.distributed
def test_two_process_zero3_matches_single_process(tiny_teacher, tmp_path):
    """Offline distillation under torchrun, 2 CPU ranks, ZeRO-3 (student and frozen teacher partitioned): the same
    step losses and held-out dataset distances as one process (same prompts per step: 4 x 2 ranks = 8); then a
    mixed on-policy run with 5 eval prompts over 2 ranks (an uneven split: padded forwards) must finish."""
    import subprocess
    import sys

    from helpers import cli_env, free_port

    common = ["recipe=tiny_distill", f"algo.teacher={tiny_teacher}", "train.max_steps=3", "train.eval_every=0",
              "data.num_eval=5", "algo.eval_prompts=5", "algo.eval_responses=[dataset]"]  # fmt: skip
    common.append("logger.progress_bar=false")
    single = run_algorithm(compose_config([*common, f"run_dir={tmp_path / 'one'}", "algo.on_policy_fraction=0"]))
    launch = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "-m", "posttrain", *common,
              "deepspeed=zero3", "train.micro_batch_size=8"]  # fmt: skip
    for name, extra in (("zero3", ["algo.on_policy_fraction=0"]), ("mixed", ["algo.eval_responses=[student]"])):
        command = [*launch[:4], f"--master_port={free_port()}", *launch[4:], f"run_dir={tmp_path / name}", *extra]
        result = subprocess.run(command, env=cli_env(), capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, result.stderr[-3000:]
    keys = ("loss", "dataset_teacher_distance")
    expected = [[m[k] for k in keys if k in m] for m in read_metrics(single)]
    got = [[m[k] for k in keys if k in m] for m in read_metrics(tmp_path / "zero3")]
    assert got == [pytest.approx(row, rel=1e-4) for row in expected]
    assert read_metrics(tmp_path / "mixed")[-1]["teacher_distance"] > 0
