"""CPU benchmark: each rank's peak host memory while a ZeRO-3 run loads a ~200M model and takes its first step,
with `model.sharded_init` on (partitioned while loading) and off (every rank loads a whole copy first).

    python benchmarks/sharded_load.py                     # prepares the model once, then both runs
    python benchmarks/sharded_load.py --modes on          # one run
    python benchmarks/sharded_load.py --algo dpo_live     # DPO with a live (uncached) frozen reference too
    python benchmarks/sharded_load.py --small-buckets     # DeepSpeed's ZeRO-3 buffers capped at 50M elements
    python benchmarks/sharded_load.py --trim-phases --workdir DIR  # "after": once freed heap is handed back

Set-up (in --workdir, once): a Llama built from config with random weights (seed 0; hidden 1024, 12 layers,
16 heads, intermediate 4096, the arithmetic tokenizer's 512-token vocabulary: 202M parameters), saved in float32
as a Hugging Face directory (one 808 MB model.safetensors).

Each run is `torchrun --nproc_per_node=2` of this script (2 CPU processes, gloo, DeepSpeed's CPU accelerator,
one torch thread each), `deepspeed=zero3`, fp32, `model.path` the directory above, driven through the
trainer-core API as `posttrain` drives it: `start_run`, the registered trainer class (SFT, or DPO with
`algo.reference.cache=false`), then `train_step(0)`. The trainer's own `policy_module` / `build_engine` are
wrapped so each rank records its memory right after them. Phases, in order:

- imports: process start, torch / transformers / deepspeed / posttrain imported;
- model load: the policy loaded from `model.path` (`policy_module`; for dpo_live this phase includes the
  frozen reference, loaded and partitioned before the policy);
- engine build: the DeepSpeed engine (ZeRO-3 partitioning when sharded_init is off, fp32 master partitions,
  AdamW states are created lazily: see first step);
- first step: `train_step(0)` (forward, backward, the optimizer step that allocates Adam's m and v).

For each phase a rank reads /proc/self/status when the phase ends: VmHWM (the peak resident set since the
previous phase ended: the counter is reset with /proc/self/clear_refs at each boundary, as benchmarks/common.py
does), VmRSS, and its split into RssAnon (the process's own memory) and RssFile (file pages mapped in, e.g. a
memory-mapped safetensors file: shared with the page cache, dropped under memory pressure). The kernel keeps no
peak of the two parts, so a thread polls them every 2 ms for the peaks of RssAnon and RssFile in each phase.
A table per rank is printed and everything is written to --workdir/sharded_load-<algo>.json. One full fp32 copy
of the model is 808 MB.

--small-buckets sets, through `deepspeed.overrides`, reduce_bucket_size, stage3_prefetch_bucket_size and
stage3_max_live_parameters to 5e7 elements (200 MB in fp32) and stage3_max_reuse_distance to 0 (DeepSpeed's
defaults: a 5e8-element gradient bucket, 2 GB in fp32, and up to 1e9 gathered parameters kept live).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
SMALL_BUCKETS = (
    "++deepspeed.overrides={zero_optimization:{stage:3,stage3_gather_16bit_weights_on_model_save:true,"
    "reduce_bucket_size:50000000,stage3_prefetch_bucket_size:50000000,stage3_max_live_parameters:50000000,"
    "stage3_max_reuse_distance:0}}"
)
SIZE = {"hidden_size": 1024, "num_layers": 12, "num_heads": 16, "num_kv_heads": 16, "intermediate_size": 4096}
FIELDS = ("VmHWM", "VmRSS", "RssAnon", "RssFile")


def memory() -> dict[str, float]:
    """VmHWM, VmRSS, RssAnon and RssFile of this process in MB."""
    values = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        name, _, rest = line.partition(":")
        if name in FIELDS:
            values[name] = int(rest.split()[0]) / 1024
    return values


def reset_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS


class SplitPeaks:
    """The largest RssAnon and RssFile seen in /proc/self/status by a thread polling every 2 ms (the kernel keeps
    a peak of their sum only, VmHWM; a short spike between two polls can be missed, so these are lower bounds)."""

    def __init__(self):
        self.anon = self.file = 0.0
        threading.Thread(target=self._poll, daemon=True).start()

    def _poll(self) -> None:
        while True:
            now = memory()
            self.anon, self.file = max(self.anon, now["RssAnon"]), max(self.file, now["RssFile"])
            time.sleep(0.002)

    def take(self) -> dict[str, float]:
        """The peaks since the previous take, then restart from the current values."""
        peaks, now = {"peak RssAnon": self.anon, "peak RssFile": self.file}, memory()
        self.anon, self.file = now["RssAnon"], now["RssFile"]
        return peaks


def tag(algo: str, sharded_init: str, small_buckets: bool, stored: str = "float32") -> str:
    cast = "" if stored == "float32" else f"-{stored}_file"
    return f"{algo}-{sharded_init}{'-small_buckets' if small_buckets else ''}{cast}"


def model_dir(workdir: Path, stored: str) -> Path:
    return workdir / ("model" if stored == "float32" else f"model-{stored}")


def prepare(workdir: Path, stored: str = "float32") -> Path:
    """The benchmark model directory (the float32 one; with `stored` bfloat16 also a bf16 copy), built once."""
    directory = model_dir(workdir, "float32")
    if not (directory / "model.safetensors").exists():
        sys.path.insert(0, str(REPO_ROOT))
        from common import arithmetic_tokenizer, save_tiny_llama

        model = save_tiny_llama(directory, arithmetic_tokenizer(), SIZE, seed=0)
        print(f"saved {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters to {directory}", flush=True)
    if stored == "float32":
        return directory
    cast_dir = model_dir(workdir, stored)
    if not (cast_dir / "model.safetensors").exists():
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        dtype = getattr(torch, stored)
        AutoModelForCausalLM.from_pretrained(directory, dtype=dtype).save_pretrained(cast_dir)
        AutoTokenizer.from_pretrained(directory).save_pretrained(cast_dir)
    return cast_dir


def worker(args) -> None:
    """One rank of a run (under torchrun): record the phases, write this rank's JSON."""
    phases: list[dict] = []
    split_peaks = SplitPeaks()

    def record(phase: str) -> None:
        if args.trim_phases:
            from posttrain.models.loading import release_free_heap

            peaks = {"VmHWM": memory()["VmHWM"], **split_peaks.take()}
            release_free_heap()
            phases.append({"phase": phase, "seconds": time.perf_counter() - started, **memory(), **peaks})
            return reset_peak()
        phases.append({"phase": phase, "seconds": time.perf_counter() - started, **memory(), **split_peaks.take()})
        reset_peak()

    started = time.perf_counter()
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    sys.path.insert(0, str(REPO_ROOT))
    import deepspeed  # noqa: F401  (imported here so the imports phase holds it)
    from hydra import compose, initialize_config_dir

    import posttrain.trainers.dpo as dpo_module
    import posttrain.trainers.sft as sft_module
    from posttrain.cli import CONF_DIR
    from posttrain.config import register_configs
    from posttrain.trainers import get_algorithm
    from posttrain.training import start_run

    record("imports")
    trainer_module = sft_module if args.algo == "sft" else dpo_module
    for name, phase in (("policy_module", "model load"), ("build_engine", "engine build")):
        original = getattr(trainer_module, name)

        def wrapped(*a, _original=original, _phase=phase, **k):
            result = _original(*a, **k)
            record(_phase)
            return result

        setattr(trainer_module, name, wrapped)
    register_configs()
    overrides = [
        f"model.path={model_dir(args.workdir, args.stored_dtype)}",
        f"model.sharded_init={args.sharded_init}",
        "model.dtype=float32",
        "model.gradient_checkpointing=false",
        "deepspeed=zero3",
        "logger.progress_bar=false",
        "train.micro_batch_size=2",
        "train.max_steps=1",
        "data.num_eval=0",
        "checkpoint.every=0",
        f"run_dir={args.workdir / f'run-{tag(args.algo, args.sharded_init, args.small_buckets, args.stored_dtype)}'}",
    ]
    if args.small_buckets:
        overrides.append(SMALL_BUCKETS)
    if args.algo == "sft":
        overrides += ["data.num_train=64"]
    else:
        overrides += ["algo=dpo", "data=arithmetic_preference", "data.num_train=16", "algo.reference.cache=false"]
    with initialize_config_dir(str(CONF_DIR), version_base=None):
        cfg = compose("config", overrides=overrides)
    algorithm = get_algorithm("sft" if args.algo == "sft" else "dpo")
    trainer = algorithm.entry(start_run(cfg, algorithm))
    trainer.train_step(0)
    record("first step")
    run_tag = tag(args.algo, args.sharded_init, args.small_buckets, args.stored_dtype)
    out = args.workdir / f"rank{os.environ['RANK']}-{run_tag}.json"
    out.write_text(json.dumps(phases))


def launch(args, sharded_init: bool) -> list[list[dict]]:
    """One torchrun run of `worker`; each rank's phases."""
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO_ROOT)}
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29517",
        str(Path(__file__).resolve()), "--worker", "--workdir", str(args.workdir), "--algo", args.algo,
        "--sharded-init", str(sharded_init).lower(), *(["--small-buckets"] if args.small_buckets else []),
        *(["--trim-phases"] if args.trim_phases else []), "--stored-dtype", args.stored_dtype,
    ]  # fmt: skip
    result = subprocess.run(command, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        sys.exit(f"torchrun failed (sharded_init={sharded_init}):\n{result.stderr[-4000:]}")
    return [
        json.loads(
            (
                args.workdir
                / f"rank{rank}-{tag(args.algo, str(sharded_init).lower(), args.small_buckets, args.stored_dtype)}.json"
            ).read_text()
        )
        for rank in range(2)
    ]


def table(results: dict) -> str:
    lines = [
        "| sharded_init | rank | phase | peak RSS (VmHWM) | peak RssAnon | peak RssFile | RSS after | RssAnon after "
        "| RssFile after |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for mode, ranks in results.items():
        for rank, phases in enumerate(ranks):
            for p in phases:
                lines.append(
                    f"| {mode} | {rank} | {p['phase']} | {p['VmHWM']:.0f} | {p['peak RssAnon']:.0f} | "
                    f"{p['peak RssFile']:.0f} | {p['VmRSS']:.0f} | {p['RssAnon']:.0f} | {p['RssFile']:.0f} |"
                )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/posttrain-sharded-load"))
    parser.add_argument("--modes", nargs="+", choices=("on", "off"), default=["on", "off"])
    parser.add_argument("--algo", choices=("sft", "dpo_live"), default="sft")
    parser.add_argument("--small-buckets", action="store_true", help="cap DeepSpeed's ZeRO-3 buffers (see above)")
    parser.add_argument(
        "--trim-phases", action="store_true", help="read 'after' once malloc_trim(0) handed freed heap back"
    )
    parser.add_argument(
        "--stored-dtype",
        choices=("float32", "bfloat16"),
        default="float32",
        help="the checkpoint's dtype; bfloat16: loaded as float32, a cast, so no parameter stays a view on the file",
    )
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--sharded-init", default="true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    args.workdir.mkdir(parents=True, exist_ok=True)
    prepare(args.workdir, args.stored_dtype)
    results = {mode: launch(args, mode == "on") for mode in args.modes}
    print(
        f"algo={args.algo}, small_buckets={args.small_buckets}, stored {args.stored_dtype} loaded as float32, "
        "ZeRO-3, 2 CPU ranks, fp32 model of 808 MB, "
        f"memory in MB; load average "
        f"{os.getloadavg()[0]:.1f}"
    )
    print(table(results))
    cast = "" if args.stored_dtype == "float32" else f"-{args.stored_dtype}_file"
    name = f"sharded_load-{args.algo}{'-small_buckets' if args.small_buckets else ''}{cast}.json"
    (args.workdir / name).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
