"""The `hf` rollout backend: transformers `generate` on a private copy of the policy, same outputs as `vllm`.

Sampling is done by transformers with its own warpers switched off and posttrain's in their place
(temperature, top-k, top-p, in vLLM's order), followed by `SampledTokenLogprobs`, which records the
log-prob of each sampled token under the scores it was sampled from: the processed distribution, or
the raw logits with logprobs_mode=raw_logprobs. Greedy (temperature 0) uses the raw logits, as vLLM.
Prompts are left-padded into batches of `hf_batch_size` x n rows.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, GenerationConfig, LogitsProcessor, LogitsProcessorList
from transformers.generation.logits_process import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

from posttrain.engine.distributed import rank
from posttrain.errors import ConfigError
from posttrain.models.loading import torch_dtype
from posttrain.rollout.completion import Completion, completion_text
from posttrain.rollout.config import RolloutConfig, SamplingConfig
from posttrain.rollout.weights import NamedTensors


class SampledTokenLogprobs(LogitsProcessor):
    """Records log_softmax(scores)[sampled token] for every generated position (rows x steps, float32).

    transformers calls processors before sampling, so the token sampled from step t's scores is read
    from `input_ids` at step t + 1 (or from the final sequences in `finish`). Keeps one [rows, vocab]
    tensor, not one per step.
    """

    def __init__(self):
        self._pending: torch.Tensor | None = None
        self._steps: list[torch.Tensor] = []

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        self._collect(input_ids)
        self._pending = torch.log_softmax(scores.float(), dim=-1)
        return scores

    def _collect(self, sequences: torch.Tensor) -> None:
        if self._pending is not None:
            self._steps.append(self._pending.gather(-1, sequences[:, -1:]).squeeze(-1))
            self._pending = None

    def finish(self, sequences: torch.Tensor) -> torch.Tensor:
        self._collect(sequences)
        return torch.stack(self._steps, dim=1)


def sampling_processors(
    sampling: SamplingConfig, logprobs_mode: str
) -> tuple[LogitsProcessorList, SampledTokenLogprobs]:
    """The warpers for `sampling` with the log-prob recorder placed before (raw) or after (processed) them."""
    recorder = SampledTokenLogprobs()
    warpers = []
    if sampling.temperature > 0:
        if sampling.temperature != 1.0:
            warpers.append(TemperatureLogitsWarper(sampling.temperature))
        if sampling.top_k > 0:
            warpers.append(TopKLogitsWarper(sampling.top_k))
        if sampling.top_p < 1.0:
            warpers.append(TopPLogitsWarper(sampling.top_p))
    ordered = [recorder, *warpers] if logprobs_mode == "raw_logprobs" else [*warpers, recorder]
    return LogitsProcessorList(ordered), recorder


def left_pad(rows: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask) [rows, longest], padded on the left."""
    longest = max(len(row) for row in rows)
    input_ids = torch.full((len(rows), longest), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), longest), dtype=torch.long)
    for index, row in enumerate(rows):
        input_ids[index, longest - len(row) :] = torch.tensor(row, dtype=torch.long)
        attention_mask[index, longest - len(row) :] = 1
    return input_ids.to(device), attention_mask.to(device)


class HFBackend:
    """Generation with transformers on its own copy of the policy; weight sync copies into it."""

    name = "hf"

    def __init__(self, model: torch.nn.Module, tokenizer, cfg: RolloutConfig):
        self.model = model.eval().requires_grad_(False)
        # A clean generation config, so nothing from a hub generation_config.json changes sampling.
        self.model.generation_config = GenerationConfig(
            pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id
        )
        self.tokenizer = tokenizer
        self.cfg = cfg
        self.max_model_len = cfg.max_model_len
        self._device = self.model.device  # where generation runs (the model visits the host while asleep)
        with torch.random.fork_rng(devices=self._cuda_devices()):
            torch.manual_seed(cfg.seed + rank() // cfg.tensor_parallel_size)  # one stream per rollout group
            self._own_rng_states = self._rng_states()

    def generate(self, prompt_token_ids: list[list[int]], sampling: SamplingConfig) -> list[Completion]:
        rows = [(index, sample, ids) for index, ids in enumerate(prompt_token_ids) for sample in range(sampling.n)]
        size = self.cfg.hf_batch_size * sampling.n
        completions = []
        with self._random_stream(sampling.seed):
            for start in range(0, len(rows), size):
                completions.extend(self._generate_rows(rows[start : start + size], sampling))
        return completions

    def _cuda_devices(self) -> list:
        return [self._device] if self._device.type == "cuda" else []

    def _rng_states(self) -> list[torch.Tensor]:
        return [torch.get_rng_state(), *(torch.cuda.get_rng_state(device) for device in self._cuda_devices())]

    @contextlib.contextmanager
    def _random_stream(self, seed: int | None):
        """Sample from `seed`, or else from the backend's own stream (rollout.seed + rank), never the trainer's."""
        with torch.random.fork_rng(devices=self._cuda_devices()):
            if seed is not None:
                torch.manual_seed(seed)
            else:
                torch.set_rng_state(self._own_rng_states[0])
                for device, state in zip(self._cuda_devices(), self._own_rng_states[1:]):
                    torch.cuda.set_rng_state(state, device)
            yield
            if seed is None:
                self._own_rng_states = self._rng_states()

    def stop_token_ids(self, sampling: SamplingConfig) -> list[int]:
        eos = [] if sampling.ignore_eos or self.tokenizer.eos_token_id is None else [self.tokenizer.eos_token_id]
        return eos + [token for token in sampling.stop_token_ids if token not in eos]

    @torch.no_grad()
    def _generate_rows(self, rows: list[tuple[int, int, list[int]]], sampling: SamplingConfig) -> list[Completion]:
        input_ids, attention_mask = left_pad(
            [ids for _, _, ids in rows], self.tokenizer.pad_token_id, self.model.device
        )
        processors, recorder = sampling_processors(sampling, self.cfg.logprobs_mode)
        stop_ids = self.stop_token_ids(sampling)
        do_sample = sampling.temperature > 0
        # transformers' own warpers stay neutral (ours are in `processors`); set only when sampling, as it asks.
        neutral_warpers = dict(temperature=1.0, top_k=0, top_p=1.0) if do_sample else {}
        config = GenerationConfig(
            max_new_tokens=sampling.max_tokens,
            do_sample=do_sample,
            **neutral_warpers,
            eos_token_id=stop_ids or None,
            pad_token_id=self.tokenizer.pad_token_id,
            stop_strings=list(sampling.stop) or None,
            return_dict_in_generate=True,
        )
        output = self.model.generate(
            input_ids=input_ids,
            attention_mask=attention_mask,
            generation_config=config,
            logits_processor=processors,
            tokenizer=self.tokenizer if sampling.stop else None,
        )
        logprobs = recorder.finish(output.sequences).cpu()
        new_tokens = output.sequences[:, input_ids.shape[1] :].cpu()
        return [
            self._completion(
                prompt_index, sample, ids, new_tokens[row].tolist(), logprobs[row].tolist(), stop_ids, sampling.stop
            )
            for row, (prompt_index, sample, ids) in enumerate(rows)
        ]

    def _completion(self, prompt_index, sample, prompt_ids, tokens, logprobs, stop_ids, stop_strings) -> Completion:
        length, stopped_by = finish_point(tokens, set(stop_ids), list(stop_strings), self._text)
        # As vLLM: a stop token is kept in token_ids but not in the text; text is cut before a stop string.
        if stopped_by == "string":
            text = self._text(tokens[:length])
            text = text[: min(text.find(stop) for stop in stop_strings if stop in text)].rstrip("\ufffd")
        else:
            text = completion_text(self._text, tokens[:length], stopped_by == "token")
        reason = "stop" if stopped_by else "length"
        return Completion(prompt_index, sample, list(prompt_ids), tokens[:length], text, logprobs[:length], reason)

    def _text(self, tokens: list[int]) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=True)

    @torch.no_grad()
    def load_weights(self, named_tensors: NamedTensors) -> None:
        """Copy transformers-named tensors into the private model; every weight must be given exactly once by name."""
        targets = self.model.state_dict(keep_vars=True)
        loaded = set()
        for name, tensor in named_tensors:
            if name not in targets:
                raise ConfigError(
                    f"sync_weights: the rollout model has no weight {name!r}; is it the same architecture?"
                )
            targets[name].copy_(tensor)
            loaded.add(name)
        missing = sorted(set(targets) - loaded)
        if missing:
            raise ConfigError(f"sync_weights: {len(missing)} rollout weights were not given, e.g. {missing[:3]}")

    @property
    def can_sleep(self) -> bool:
        """On a GPU the private copy can leave it while the trainer steps (to host memory, at either level)."""
        return self._device.type == "cuda"

    def sleep(self, level: int) -> None:
        self.model.to("cpu")
        torch.cuda.empty_cache()

    def wake_up(self, tags: Sequence[str]) -> None:
        if "weights" in tags:
            self.model.to(self._device)

    def close(self) -> None:
        """Nothing to shut down: the model goes with the backend."""


def finish_point(tokens: list[int], stop_ids: set[int], stop_strings: list[str], decode) -> tuple[int, str | None]:
    """(tokens kept, what stopped the row: "token", "string" or None): through the first stop token id
    or the token completing the first stop string, whichever comes first.

    A row that never stopped ran to max_tokens: transformers only pads a row after it stopped.
    """
    end = next((position + 1 for position, token in enumerate(tokens) if token in stop_ids), None)
    limit = end or len(tokens)
    if stop_strings and any(stop in decode(tokens[:limit]) for stop in stop_strings):
        low, high = 1, limit  # smallest prefix whose text contains a stop string (containment only grows)
        while low < high:
            middle = (low + high) // 2
            if any(stop in decode(tokens[:middle]) for stop in stop_strings):
                high = middle
            else:
                low = middle + 1
        return low, "string"
    return (end, "token") if end else (len(tokens), None)


def build_hf_backend(cfg: RolloutConfig, model_dir: str | Path, tokenizer) -> HFBackend:
    """Load `model_dir` with transformers (on the GPU when there is one) for the `hf` backend."""
    dtype = "auto" if cfg.dtype == "auto" else torch_dtype(cfg.dtype)
    try:
        model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=dtype)
    except Exception as error:
        raise ConfigError(f"rollout=hf: cannot load a causal LM from {model_dir}: {error}") from error
    if torch.cuda.is_available():
        model = model.to(torch.device("cuda", torch.cuda.current_device()))
    return HFBackend(model, tokenizer, cfg)
