"""ZeRO-2 and ZeRO-3 under torchrun with 2 CPU processes match the single-process run."""

import subprocess
import sys

import pytest
import torch
from helpers import cli_env, run_posttrain

from posttrain.engine.distributed import free_port
from posttrain.logging import read_metrics

pytestmark = [pytest.mark.integration, pytest.mark.distributed]

ARGS = [
    "data.num_train=256",
    "data.num_eval=16",
    "logger.progress_bar=false",
    "train.max_steps=6",
    "optim.lr=3e-3",
    "optim.warmup_ratio=0",
]


UNEVEN_BUDGET = 184  # tokens (examples of 44-48): 5 of the 6 steps pack one rank into 1 micro-batch, the other into 2


@pytest.fixture(scope="module")
def single_process_losses(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("single")
    result = run_posttrain(f"run_dir={run_dir}", "train.micro_batch_size=8", *ARGS)
    assert result.returncode == 0, result.stderr[-2000:]
    return [m["loss"] for m in read_metrics(run_dir) if "loss" in m]


@pytest.mark.parametrize("zero", ["zero2", "zero3"])
def test_two_process_zero_matches_single_process(zero, tmp_path, single_process_losses):
    run_dir = tmp_path / zero
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node=2",
        f"--master_port={free_port()}",
        "-m",
        "posttrain",
        f"run_dir={run_dir}",
        f"deepspeed={zero}",
        "train.micro_batch_size=4",
        *ARGS,
    ]
    result = subprocess.run(command, env=cli_env(), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    losses = [m["loss"] for m in read_metrics(run_dir) if "loss" in m]
    # Same examples per step (4 per rank x 2 ranks = 8), so the same curve up to float reduction order.
    assert losses == pytest.approx(single_process_losses, rel=1e-4)
    assert losses[-1] < losses[0]
    assert (run_dir / "checkpoints" / "step_6" / "rng_rank1.json").exists()
    assert (run_dir / "final" / "model.safetensors").exists()
    # The same command again: both ranks load the sharded checkpoint (torch.load weights-only) and only export.
    rows = (run_dir / "metrics.jsonl").read_text()
    port = next(i for i, arg in enumerate(command) if arg.startswith("--master_port="))
    command[port] = f"--master_port={free_port()}"
    again = subprocess.run(command, env=cli_env(), capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resumed from" in again.stderr and "step 6 of 6" in again.stderr
    assert (run_dir / "metrics.jsonl").read_text() == rows


def torchrun(*overrides, timeout=600):
    """`posttrain` under torchrun, 2 CPU processes; a hang fails the test at `timeout` instead of blocking CI."""
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}"]
    result = subprocess.run(
        [*command, "-m", "posttrain", *overrides], env=cli_env(), capture_output=True, text=True, timeout=timeout
    )
    assert result.returncode == 0, result.stderr[-3000:]


DPO_ARGS = [
    "algo=dpo",
    "data=arithmetic_preference",
    "data.num_train=48",
    "data.num_eval=15",  # 8 and 7 pairs per rank: uneven eval shares and reference-cache shards
    "algo.reference.micro_batch_size=3",
    "train.max_steps=3",
    "train.eval_every=3",
    "optim.lr=1e-2",
    "optim.warmup_ratio=0",
    "logger.progress_bar=false",
]


def test_zero3_dpo_reference_cache_and_uneven_eval_match_single_process(tmp_path):
    """The ZeRO-3 run builds its reference cache and trains under a token budget (pairs packed up to 128 tokens a
    forward, so the ranks' forward counts may differ), the single-process one in fixed batches: same numbers."""
    single = run_posttrain(
        f"run_dir={tmp_path / 'single'}", f"algo.reference.cache_dir={tmp_path / 'cache1'}",
        "train.micro_batch_size=8", *DPO_ARGS,
    )  # fmt: skip
    assert single.returncode == 0, single.stderr[-2000:]
    torchrun(
        f"run_dir={tmp_path / 'zero3'}", f"algo.reference.cache_dir={tmp_path / 'cache2'}", "deepspeed=zero3",
        "train.micro_batch_size=4", "train.max_tokens_per_micro_batch=128", *DPO_ARGS,
    )  # fmt: skip
    for split in sorted(path.name for path in (tmp_path / "cache1").glob("*.pt")):
        expected, got = (torch.load(tmp_path / cache / split, weights_only=True) for cache in ("cache1", "cache2"))
        assert torch.allclose(expected["chosen"], got["chosen"], rtol=1e-5)
        assert torch.allclose(expected["rejected"], got["rejected"], rtol=1e-5)
    assert len(list((tmp_path / "cache2").glob("*.pt"))) == 2  # train and eval
    one, two = read_metrics(tmp_path / "single"), read_metrics(tmp_path / "zero3")
    for key in ("loss", "eval_loss", "eval_logp_accuracy"):
        assert [m[key] for m in two if key in m] == pytest.approx([m[key] for m in one if key in m], rel=1e-4), key
    # At step 0 policy = reference: every margin is 0 up to float noise, which a different forward layout tips
    # either way (ties count 1/2); after training the margins are real.
    assert two[-1]["eval_accuracy"] == pytest.approx(one[-1]["eval_accuracy"])


@pytest.fixture(scope="module")
def solving_sft_model(tmp_path_factory):
    """final/ of a 300-step SFT run: solves some arithmetic prompts, so sampled groups differ in reward."""
    sft = tmp_path_factory.mktemp("solving_sft")
    result = run_posttrain(
        f"run_dir={sft}", "train.max_steps=300", "optim.lr=3e-3", "data.num_eval=0", "logger.progress_bar=false"
    )
    assert result.returncode == 0, result.stderr[-2000:]
    return sft / "final"


def test_zero3_rlvr_with_groups_dropped_unevenly_matches_zero2(tmp_path, solving_sft_model):
    """A KL reference and two epochs per rollout batch (so the old-log-prob pass runs) from a model that solves
    some prompts: kept groups differ between the two ranks; ZeRO-3 must finish and match ZeRO-2. Under a token
    budget (176 = prompt + response limits): the old-log-prob, reference and training forwards are packed up to it,
    so their counts differ between the ranks too."""
    rlvr = [
        "recipe=tiny_rlvr", f"model.path={solving_sft_model}", "rollout.backend=hf", "algo.kl_beta=0.05",
        "algo.epochs_per_batch=2", "algo.prompts_per_step=8", "algo.sampling.n=4", "algo.sampling.temperature=1.0",
        "train.max_steps=8", "train.max_tokens_per_micro_batch=176",
        "data.num_eval=5", "train.eval_every=4", "logger.progress_bar=false",
    ]  # fmt: skip
    for zero in ("zero2", "zero3"):
        torchrun(f"run_dir={tmp_path / zero}", f"deepspeed={zero}", *rlvr)
    two, three = read_metrics(tmp_path / "zero2"), read_metrics(tmp_path / "zero3")
    kept = [round(m["groups_kept_fraction"] * 8) for m in three if "groups_kept_fraction" in m]
    assert any(k % 2 for k in kept), f"no step kept an odd number of groups (so none was uneven): {kept}"
    for key in ("reward_mean", "groups_kept_fraction", "eval_greedy_accuracy"):
        assert [m[key] for m in three if key in m] == [m[key] for m in two if key in m], key
    for key in ("kl", "clip_fraction"):
        assert [m[key] for m in three if key in m] == pytest.approx([m[key] for m in two if key in m], abs=1e-4), key


def test_zero3_online_dpo_with_a_rank_short_of_pairs_matches_zero2(tmp_path, solving_sft_model):
    """Online DPO (verifier oracle) from a model that solves some prompts: the ranks keep different numbers of
    pairs, and in some optimizer steps one has none (it runs the pair loss on a stand-in pair, times 0). Such a
    step once hung ZeRO-3 (the stand-in's backward reached another model output than the real one's, so DeepSpeed's
    parameter traces differed). ZeRO-3 must finish (a hang fails at the timeout) and match ZeRO-2."""
    dno = [
        "recipe=tiny_online_dpo", f"model.path={solving_sft_model}", "rollout=hf", "algo.iterations=2",
        "algo.prompts_per_iteration=32", "data.num_eval=8", "logger.progress_bar=false",
    ]  # fmt: skip
    for zero in ("zero2", "zero3"):
        torchrun(f"run_dir={tmp_path / zero}", f"deepspeed={zero}", *dno, timeout=400)
    two, three = read_metrics(tmp_path / "zero2"), read_metrics(tmp_path / "zero3")
    updates = [m for m in three if "idle_micro_steps" in m]
    assert any(m["idle_micro_steps"] > 0 for m in updates), f"no rank ran short of pairs: {updates}"
    for key in ("pairs_kept_fraction", "idle_micro_steps", "eval_greedy_accuracy"):
        assert [m[key] for m in three if key in m] == [m[key] for m in two if key in m], key
    for key in ("loss", "rewards/margin"):
        assert [m[key] for m in three if key in m] == pytest.approx([m[key] for m in two if key in m], abs=1e-4), key


def test_zero3_token_budget_matches_single_process(tmp_path, single_process_losses):
    """SFT under ZeRO-3 on 2 ranks with train.max_tokens_per_micro_batch (2 micro-batches a rank and step instead
    of 1, the accumulation boundary set explicitly) finishes (a hang fails at the timeout) with the
    single-process fixed-split losses. On this data both ranks pack into equally many micro-batches: uneven
    counts (the zero-weight micro-steps) are not exercised here."""
    run_dir = tmp_path / "budget"
    budget = ["train.micro_batch_size=4", "train.max_tokens_per_micro_batch=160"]
    torchrun(f"run_dir={run_dir}", "deepspeed=zero3", *budget, *ARGS, timeout=600)
    losses = [m["loss"] for m in read_metrics(run_dir) if "loss" in m]
    assert losses == pytest.approx(single_process_losses, rel=1e-4)


def test_zero3_uneven_token_budget_micro_batches_match_single_process(tmp_path, single_process_losses):
    """A budget that packs the two ranks' shares into different numbers of micro-batches in some steps: the rank
    with fewer runs zero-weight micro-steps up to the agreed count, so under ZeRO-3 both finish (a hang fails at
    the timeout) with the single-process fixed-split losses. The run's own metrics show that the counts differed."""
    run_dir = tmp_path / "uneven"
    budget = ["train.micro_batch_size=4", f"train.max_tokens_per_micro_batch={UNEVEN_BUDGET}"]
    torchrun(f"run_dir={run_dir}", "deepspeed=zero3", *budget, *ARGS, timeout=600)
    records = [m for m in read_metrics(run_dir) if "loss" in m]
    assert any(m["micro_batches"] > m["micro_batches_fewest"] for m in records), [
        (m["micro_batches"], m["micro_batches_fewest"]) for m in records
    ]
    assert [m["loss"] for m in records] == pytest.approx(single_process_losses, rel=1e-4)
