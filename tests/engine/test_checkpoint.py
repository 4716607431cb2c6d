"""Atomic checkpoints: a save that dies part-way never becomes a checkpoint resume would pick."""

import json
from pathlib import Path

import pytest

from posttrain.engine.checkpoint import latest_checkpoint, list_checkpoints, save_checkpoint


class FakeEngine:
    """Writes a shard like DeepSpeed's save_checkpoint; optionally dies half-way."""

    def __init__(self, die=False):
        self.die = die

    def save_checkpoint(self, save_dir, tag, save_latest):
        (Path(save_dir) / tag).mkdir()
        (Path(save_dir) / tag / "shard.pt").write_text("half")
        if self.die:
            raise KeyboardInterrupt("killed during save")


def test_interrupted_save_is_invisible_and_cleaned_next_time(tmp_path):
    save_checkpoint(FakeEngine(), tmp_path, 2, {"algo": "sft"}, keep_last=3)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(FakeEngine(die=True), tmp_path, 4, {"algo": "sft"}, keep_last=3)
    assert (tmp_path / "checkpoints" / ".tmp-step_4").exists()
    assert latest_checkpoint(tmp_path).name == "step_2"
    save_checkpoint(FakeEngine(), tmp_path, 4, {"algo": "sft"}, keep_last=3)
    assert latest_checkpoint(tmp_path).name == "step_4"
    assert not (tmp_path / "checkpoints" / ".tmp-step_4").exists()
    assert json.loads((tmp_path / "checkpoints" / "step_4" / "trainer_state.json").read_text())["step"] == 4


def test_keep_last_prunes_oldest(tmp_path):
    for step in (1, 2, 3, 4):
        save_checkpoint(FakeEngine(), tmp_path, step, {}, keep_last=2)
    assert [step for step, _ in list_checkpoints(tmp_path)] == [3, 4]


def test_resaving_a_step_replaces_it(tmp_path):
    save_checkpoint(FakeEngine(), tmp_path, 5, {"version": 1}, keep_last=2)
    save_checkpoint(FakeEngine(), tmp_path, 5, {"version": 2}, keep_last=2)
    assert json.loads((tmp_path / "checkpoints" / "step_5" / "trainer_state.json").read_text())["version"] == 2
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["step_5"]
