"""Rollout groups under torchrun: W ranks form W / T groups of T = rollout.tensor_parallel_size consecutive ranks.

Each group runs one engine spread over its ranks (vLLM's external_launcher executor: SPMD, every rank of
the group calls generate with the same requests; vLLM builds its tensor-parallel groups from consecutive
ranks the same way). Groups are data parallel: each trainer rank asks for its own prompts, the group
gathers its ranks' prompts (and sampling), every rank of the group runs the same engine calls over all of
them (`group_generates`), and each rank keeps the completions of its own prompts. A rank with no prompts still
joins (SPMD: every rank must make the same calls), so callers generate on every rank, never behind `if prompts`.
A weight sync streams full (gathered) tensors on every rank; each engine rank's `load_weights` keeps only its
tensor-parallel shard of each.
"""

from __future__ import annotations

from dataclasses import dataclass

from posttrain.errors import ConfigError
from posttrain.rollout.completion import Completion
from posttrain.rollout.config import SamplingConfig


def tensor_parallel_groups(world: int, group_size: int) -> list[list[int]]:
    """Consecutive ranks in groups of `group_size`: [[0 .. T-1], [T .. 2T-1], ...] (vLLM's TP layout)."""
    if group_size < 1 or world % group_size != 0:
        raise ConfigError(
            f"rollout.tensor_parallel_size={group_size} must divide the number of ranks {world} (each group of "
            "that many ranks runs one engine)"
        )
    return [list(range(start, start + group_size)) for start in range(0, world, group_size)]


@dataclass
class RolloutGroup:
    """This rank's rollout group: its member ranks and a gloo process group over them (for prompt lists)."""

    ranks: list[int]
    index: int  # which group (0 .. W / T - 1)
    process_group: object

    def gather(self, prompt_ids: list[list[int]], sampling: SamplingConfig) -> tuple[list[MemberRequest], int]:
        """Every member's request (its prompts, possibly none, and its sampling) in rank order, and this rank's
        position among them. A collective over the group: every member calls it, also with no prompts."""
        import torch.distributed as dist

        gathered: list = [None] * len(self.ranks)
        dist.all_gather_object(gathered, (prompt_ids, sampling), group=self.process_group)
        return [MemberRequest(list(ids), member_sampling) for ids, member_sampling in gathered], self.ranks.index(
            dist.get_rank()
        )


@dataclass
class MemberRequest:
    """What one member of a rollout group asked for."""

    prompt_ids: list[list[int]]
    sampling: SamplingConfig


@dataclass
class GroupGenerate:
    """One engine call a rollout group makes: the prompts of `members` (positions in the group) concatenated in
    rank order under one sampling."""

    members: list[int]
    prompt_ids: list[list[int]]
    sampling: SamplingConfig

    def start_of(self, member: int, requests: list[MemberRequest]) -> int:
        """Where `member`'s prompts start in this call's prompt list."""
        return sum(len(requests[m].prompt_ids) for m in self.members if m < member)


def group_generates(requests: list[MemberRequest]) -> list[GroupGenerate]:
    """The engine calls that answer a group's gathered requests, the same list on every member (SPMD).

    One call over all prompts when every member asked with the same sampling and the position of a prompt in
    the call does not matter (greedy, or no seed); else one call per member with prompts, so that a seeded
    sample of prompt i (seed + i * n + j) is the one that member would draw alone. No prompts at all: no call.
    """
    asking = [m for m, request in enumerate(requests) if request.prompt_ids]
    if not asking:
        return []
    first = requests[asking[0]].sampling
    same = all(requests[m].sampling == first for m in asking)
    if same and (first.seed is None or first.temperature == 0):
        return [GroupGenerate(asking, [ids for m in asking for ids in requests[m].prompt_ids], first)]
    return [GroupGenerate([m], requests[m].prompt_ids, requests[m].sampling) for m in asking]


def own_completions(completions: list[Completion], start: int, count: int) -> list[Completion]:
    """The completions of prompts start .. start + count - 1 of a gathered request, re-indexed from 0."""
    own = [c for c in completions if start <= c.prompt_index < start + count]
    for completion in own:
        completion.prompt_index -= start
    return own


def build_rollout_group(group_size: int) -> RolloutGroup | None:
    """This rank's group when running under torch.distributed with groups of more than one rank, else None.

    A collective: every rank calls it at the same point (each process group is created on all ranks)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return None  # one process: a tensor-parallel vLLM engine runs its own worker processes
    groups = tensor_parallel_groups(dist.get_world_size(), group_size)
    if group_size == 1:
        return None
    mine = None
    for index, ranks in enumerate(groups):
        process_group = dist.new_group(ranks, backend="gloo")  # every rank creates every group
        if dist.get_rank() in ranks:
            mine = RolloutGroup(ranks, index, process_group)
    return mine
