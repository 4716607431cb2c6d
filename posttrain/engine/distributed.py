"""Process-group set-up for one process (no launcher) or under torchrun / the deepspeed launcher."""

from __future__ import annotations

import os
import socket
from collections.abc import Sequence
from typing import TypeVar

import torch
import torch.distributed as dist

T = TypeVar("T")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def export_submitit_environment() -> None:
    """In a submitit job of several tasks (`hydra/launcher=slurm`: one task per GPU), each task's RANK, LOCAL_RANK,
    WORLD_SIZE, MASTER_ADDR and MASTER_PORT from submitit's view of the Slurm job (torchrun sets them otherwise)."""
    if "WORLD_SIZE" in os.environ or not os.environ.get("SUBMITIT_EXECUTOR"):
        return
    import submitit

    if submitit.JobEnvironment().num_tasks > 1:
        # Every task keeps all of the node's GPUs visible: DeepSpeed picks cuda:LOCAL_RANK.
        submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False)


def init_distributed() -> None:
    """Initialise torch.distributed through DeepSpeed: NCCL on GPUs, gloo on CPU.

    Started without a launcher, the env of a 1-process world is filled in first.
    """
    if dist.is_available() and dist.is_initialized():
        return
    export_submitit_environment()
    if "WORLD_SIZE" not in os.environ:  # no launcher: a world of one on a fresh local port
        os.environ.update(
            RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port())
        )
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed

    if not torch.cuda.is_available() and os.environ.get("POSTTRAIN_DS_SHM_COMM", "0") != "1":
        # DeepSpeed's CPU backend JIT-compiles a shared-memory all-reduce op on first use (~2 min);
        # plain gloo is enough for CPU runs. POSTTRAIN_DS_SHM_COMM=1 opts back in.
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo", verbose=False)


def close_distributed() -> None:
    """End the world at a clean exit: every rank waits for the others, then destroys its process groups.

    Left to interpreter shut-down, gloo's worker threads can outlive it and abort a process that finished its work
    (SIGABRT, "terminate called without an active exception"), so torchrun reports a successful run as failed. Call
    it only once every rank has finished: after an error a peer may never reach the barrier.
    """
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def is_main_process() -> bool:
    return rank() == 0


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def _all_reduce(values: list[float], op) -> list[float]:
    if world_size() == 1:
        return list(values)
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(tensor, op=op)
    return tensor.tolist()


def all_reduce_sum(values: list[float]) -> list[float]:
    """Element-wise sum of `values` over ranks (float64, on CPU for gloo or the current device)."""
    return _all_reduce(values, dist.ReduceOp.SUM)


def all_reduce_max(values: list[float]) -> list[float]:
    """Element-wise max of `values` over ranks: e.g. every rank agreeing on the most forwards any rank needs."""
    return _all_reduce(values, dist.ReduceOp.MAX)


def rank_share(items: Sequence[T]) -> tuple[list[T], list[bool]]:
    """This rank's strided share of `items` (rank, rank + world, ...) and which of them are real.

    Every rank gets ceil(N / world) items, the short ones padded by wrapping around to the first items, so every
    rank runs the same number of forwards over its share: under ZeRO-3 each forward all-gathers parameters on
    every rank, and uneven counts hang. Padding items are computed and then ignored (`real` is False)."""
    count, world = len(items), world_size()
    indices = [rank() + world * k for k in range(-(-count // world))]
    return [items[i % count] for i in indices], [i < count for i in indices]


class WeightedMeans:
    """Weighted sums of named metrics on this rank; `means()` all-reduces them over ranks and divides by the
    summed weight (a collective: every rank calls it)."""

    def __init__(self, names):
        self.names = tuple(names)
        self.sums = [0.0] * len(self.names)
        self.weight = 0.0

    def add(self, metrics, weight: float) -> None:
        for position, name in enumerate(self.names):
            self.sums[position] += float(metrics[name]) * weight
        self.weight += weight

    def means(self) -> dict[str, float]:
        *sums, weight = all_reduce_sum([*self.sums, self.weight])
        return {name: value / weight if weight else 0.0 for name, value in zip(self.names, sums)}
