"""Nothing a checkpoint or cache holds is unpickled with arbitrary globals: DeepSpeed's shards load with
weights_only=True (ZeRO-0 and ZeRO-2 states round-trip exactly), and a crafted file that would run a command
is refused with a clear error, running nothing."""

import json
import os

import pytest
import torch
from helpers import compose_config

from posttrain.engine import backend
from posttrain.engine.checkpoint import CheckpointError, file_sizes, load_checkpoint, save_checkpoint
from posttrain.engine.distributed import init_distributed
from posttrain.engine.reference import ReferenceLogprobs, cached_reference_logprobs


class RunsCommand:
    """Unpickling this runs `touch marker`."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def trained_engine(zero_stage: int, seed: int):
    """A DeepSpeed engine over a 2-layer MLP after one AdamW step (so the optimizer holds state)."""
    init_distributed()
    torch.manual_seed(seed)
    module = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
    cfg = compose_config([f"deepspeed.zero_stage={zero_stage}", "train.micro_batch_size=1"])
    engine = backend.build_engine(module, cfg, total_steps=10)
    loss = engine(torch.randn(1, 8)).sum()
    engine.backward(loss)
    engine.step()
    return engine


def flat_optimizer_state(engine) -> list[torch.Tensor]:
    state = engine.optimizer.state_dict()
    found = []

    def walk(value):
        if torch.is_tensor(value):
            found.append(value.detach().clone().float().flatten())
        elif isinstance(value, dict):
            for key in sorted(value, key=str):
                walk(value[key])
        elif isinstance(value, (list, tuple)):
            for item in value:
                walk(item)

    walk(state)
    return found


def rewrite_manifest(path):
    manifest = json.loads((path / "manifest.json").read_text())
    manifest["files"] = file_sizes(path)
    (path / "manifest.json").write_text(json.dumps(manifest))


@pytest.mark.parametrize("zero_stage", [0, 2])
def test_deepspeed_states_round_trip_weights_only_and_a_crafted_shard_runs_nothing(tmp_path, zero_stage):
    saved = trained_engine(zero_stage, seed=0)
    path = save_checkpoint(saved, tmp_path, 1, {"algo": "sft"}, keep_last=2)
    fresh = trained_engine(zero_stage, seed=1)
    state = load_checkpoint(fresh, path)
    assert state["step"] == 1
    for a, b in zip(saved.module.parameters(), fresh.module.parameters(), strict=True):
        assert torch.equal(a, b)
    expected, loaded = flat_optimizer_state(saved), flat_optimizer_state(fresh)
    assert len(expected) == len(loaded) > 0 and all(torch.equal(a, b) for a, b in zip(expected, loaded))
    assert fresh.global_steps == saved.global_steps == 1
    assert os.environ.get("TORCH_FORCE_WEIGHTS_ONLY_LOAD") is None  # forced only while loading

    marker = tmp_path / "pwned"
    shard = path / "engine" / "mp_rank_00_model_states.pt"
    torch.save({"module": RunsCommand(marker)}, shard)
    rewrite_manifest(path)  # an attacker who rewrites files rewrites the manifest too
    with pytest.raises(CheckpointError, match=r"refused by torch.load\(weights_only=True\).*does not unpickle"):
        load_checkpoint(trained_engine(zero_stage, seed=2), path)
    assert not marker.exists()


def cache_args(tmp_path, calls):
    def compute():
        calls.append(1)
        return ReferenceLogprobs(torch.tensor([-1.0, -2.0, -3.0]), torch.tensor([-4.0, -5.0, -6.0]))

    return "abc123", tmp_path, 3, compute


def test_a_truncated_reference_cache_is_detected_and_rebuilt(tmp_path, caplog):
    calls = []
    first, hit = cached_reference_logprobs(*cache_args(tmp_path, calls))
    assert not hit and len(calls) == 1
    path = tmp_path / "abc123.pt"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    again, hit = cached_reference_logprobs(*cache_args(tmp_path, calls))
    assert not hit and len(calls) == 2 and "is unreadable" in caplog.text
    assert torch.equal(again.chosen, first.chosen)
    third, hit = cached_reference_logprobs(*cache_args(tmp_path, calls))  # the rebuilt file is whole again
    assert hit and len(calls) == 2 and torch.equal(third.rejected, first.rejected)


def test_a_crafted_pickle_reference_cache_runs_nothing_and_is_rebuilt(tmp_path, caplog):
    marker = tmp_path / "pwned"
    crafted = {"key": "abc123", "chosen": RunsCommand(marker), "rejected": RunsCommand(marker)}
    torch.save(crafted, tmp_path / "abc123.pt")
    calls = []
    _, hit = cached_reference_logprobs(*cache_args(tmp_path, calls))
    assert not hit and len(calls) == 1 and not marker.exists()
    assert "abc123.pt is unreadable (UnpicklingError" in caplog.text
