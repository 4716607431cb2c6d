"""Reward models: a causal LM's decoder plus a head on the final hidden state of the last real token.

- Bradley-Terry (`head="bt"`): r(x, y) = w . h_last, a `nn.Linear(hidden, 1, bias=False)`.
- General Preference Model (`head="gpm"`, Zhang et al. 2024, "General Preference Modeling with
  Preference Representations for Aligning Language Models"): v(y|x) = W h_last in R^{2k} (bias-free),
  L2-normalised by default; optional prompt gate lambda(x) = softmax(W_p h_prompt) in R^k, with
  h_prompt the final hidden state of the last prompt token. Score s(y_i > y_j | x) = sum_l lambda_l
  (v_i[2l] v_j[2l+1] - v_i[2l+1] v_j[2l]) (`posttrain.losses.preference.gpm_score`).
BT is the GPM with v = [r, 1]: `preference_embedding` maps BT rewards to that form, so one scoring
path (`pair_scores`, `score_matrix`) serves both heads.

With LoRA (`peft=lora`), adapters go on the decoder's projections and the head (and gate) stay fully trainable;
the saved directory holds the merged model (adapters folded into the decoder weights), in the same format.

Saved format (`save_reward_model`, loaded back by `load_reward_model`): a transformers
sequence-classification directory (e.g. `LlamaForSequenceClassification`, num_labels = 1 for BT or 2k
for GPM, whose bias-free `score` layer IS the head), so `AutoModelForSequenceClassification
.from_pretrained(dir)` loads it and its `logits` are r (BT) or the unnormalised v (GPM); plus
`reward_head.json` (head, embed_dim, normalize, prompt_gate, tau) and, with the gate,
`prompt_gate.safetensors`. Caveat of transformers' own pooling (not ours): it reads the rightmost token
that is not `pad_token_id`, so it mis-pools when pad == eos; `RewardModel` indexes last tokens directly.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from posttrain.data.batching import collate_packed
from posttrain.data.chat import render_ids
from posttrain.data.preference import PreferenceExample, collate_pairs, tokenize_response
from posttrain.errors import ConfigError
from posttrain.losses.preference import gpm_score, gpm_score_matrix
from posttrain.models.attention import decoder_hidden_states, resolve_attn_implementation, use_packed_sdpa
from posttrain.models.loading import tiny_llama_config, torch_dtype
from posttrain.models.logprob_model import base_causal_lm

HEAD_FILE = "reward_head.json"
GATE_FILE = "prompt_gate.safetensors"
HEADS = ("bt", "gpm")


@dataclass
class RewardHeadConfig:
    head: str = "bt"  # bt | gpm
    embed_dim: int = 8  # gpm: 2k (even); bt always uses 1
    normalize: bool = True  # gpm: L2-normalise v
    prompt_gate: bool = False  # gpm: lambda(x) = softmax(W_p h_prompt)
    tau: float = 0.1  # gpm: P(y_i > y_j) = sigma(s / tau) (stored for scoring; the loss takes it explicitly)

    def __post_init__(self):
        if self.head not in HEADS:
            raise ConfigError(f"reward head {self.head!r} is unknown; use one of {', '.join(HEADS)} (algo.head)")
        if self.head == "gpm" and (self.embed_dim < 2 or self.embed_dim % 2):
            raise ConfigError(f"algo.embed_dim={self.embed_dim}: a GPM embedding has even size 2k >= 2")
        if self.head == "bt" and self.prompt_gate:
            raise ConfigError("algo.prompt_gate needs algo.head=gpm (a BT reward has no blocks to gate)")

    @property
    def output_dim(self) -> int:
        return 1 if self.head == "bt" else self.embed_dim


class RewardModel(nn.Module):
    """`classifier` (a transformers *ForSequenceClassification: decoder `base_model` + head `score`, possibly
    inside a PEFT LoRA wrapper) and the optional prompt gate. forward -> (values [n, 1 or 2k] float32, gate [n, k]
    or None)."""

    def __init__(self, classifier: nn.Module, head_config: RewardHeadConfig):
        super().__init__()
        self.classifier = classifier
        self.head_config = head_config
        score = getattr(self.sequence_classifier, "score", None)
        if not isinstance(score, nn.Linear):
            name = type(self.sequence_classifier).__name__
            raise ConfigError(f"{name} has no linear `score` head; posttrain reward models need one")
        blocks = head_config.embed_dim // 2
        self.gate = (
            nn.Linear(score.in_features, blocks, bias=False, dtype=score.weight.dtype)
            if head_config.prompt_gate
            else None
        )

    @property
    def sequence_classifier(self) -> nn.Module:
        """The transformers *ForSequenceClassification (inside the LoRA wrapper, if any)."""
        return base_causal_lm(self.classifier)

    def forward(self, input_ids, last_index, prompt_index=None, position_ids=None, attention_mask=None):
        """Head outputs at flat token indices `last_index` ([n], into the flattened [B * T] token axis;
        the gate reads `prompt_index`). Packed rows ([1, N] with restarting position_ids) or padded [B, T]."""
        classifier = self.sequence_classifier
        hidden = decoder_hidden_states(classifier.base_model, input_ids, position_ids, attention_mask)
        hidden = hidden.reshape(-1, hidden.shape[-1])
        values = classifier.score(hidden[last_index]).float()
        if self.head_config.head == "gpm" and self.head_config.normalize:
            values = F.normalize(values, dim=-1)
        gate = None
        if self.gate is not None:
            if prompt_index is None:
                raise ValueError(
                    "this reward model has a prompt gate; pass prompt_index (the last prompt token of each sequence)"
                )
            gate = torch.softmax(self.gate(hidden[prompt_index]).float(), dim=-1)
        return values, gate


def preference_embedding(values: torch.Tensor, head: str) -> torch.Tensor:
    """[n, 2k] embeddings for the GPM score: GPM values as they are, BT rewards r as [r, 1]."""
    if head == "bt":
        return torch.cat([values, torch.ones_like(values)], dim=-1)
    return values


def pair_scores(values_i: torch.Tensor, values_j: torch.Tensor, gate: torch.Tensor | None, head: str) -> torch.Tensor:
    """s(y_i > y_j) per pair [B]: r_i - r_j for BT, the (gated) GPM score otherwise. > 0 prefers y_i."""
    return gpm_score(preference_embedding(values_i, head), preference_embedding(values_j, head), gate)


def score_matrix(values: torch.Tensor, gate: torch.Tensor | None, head: str) -> torch.Tensor:
    """S[i, j] = s(y_i > y_j) among K responses to ONE prompt, from their K head outputs [K, D] (each
    response embedded once: K forwards' worth, not K^2); gate [k] or None. Returns [K, K]."""
    embeddings = preference_embedding(values, head)[None]
    return gpm_score_matrix(embeddings, None if gate is None else gate.reshape(1, -1))[0]


def build_reward_model(model_cfg, tokenizer, seed: int, head_config: RewardHeadConfig, peft_cfg=None) -> RewardModel:
    """Decoder from `model.path` (a causal LM or reward model dir) or the tiny config; a fresh head seeded by `seed`.
    With `peft_cfg.enabled`: LoRA adapters on the decoder (its base weights frozen), the head and gate in full."""
    dtype = torch_dtype(model_cfg.dtype)
    attn_implementation = resolve_attn_implementation(model_cfg.attn_implementation)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if model_cfg.path:
            classifier = AutoModelForSequenceClassification.from_pretrained(
                model_cfg.path,
                num_labels=head_config.output_dim,
                dtype=dtype,
                ignore_mismatched_sizes=True,
                attn_implementation=attn_implementation,
                trust_remote_code=model_cfg.trust_remote_code,
            )
        else:
            config = tiny_llama_config(model_cfg.tiny, tokenizer)
            config.num_labels = head_config.output_dim
            config._attn_implementation = attn_implementation
            classifier = AutoModelForSequenceClassification.from_config(config, dtype=dtype)
        use_packed_sdpa(classifier)
        nn.init.normal_(classifier.score.weight, std=classifier.config.hidden_size**-0.5)  # seeded, O(1) outputs
        model = RewardModel(classifier, head_config)
        if model.gate is not None:
            nn.init.normal_(model.gate.weight, std=classifier.config.hidden_size**-0.5)
    classifier.config.pad_token_id = tokenizer.pad_token_id
    if model_cfg.gradient_checkpointing:
        classifier.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if peft_cfg is not None and peft_cfg.enabled:
        from posttrain.models.lora import wrap_lora

        model.classifier = wrap_lora(classifier, peft_cfg, task_type=None)
        classifier.score.requires_grad_(True)  # the value head is new: it trains in full, never through adapters
    return model


def save_reward_model(
    model: RewardModel, tokenizer, out_dir: Path, state: dict[str, torch.Tensor] | None = None
) -> None:
    """Write the format of the module docstring atomically (a staging dir renamed into place).

    `state` is the full RewardModel state dict (gathered under ZeRO-3 by the caller); default: the module's.
    A LoRA reward model is written merged (adapters folded into the decoder weights): the same format.
    """
    state = state if state is not None else {name: t.detach().cpu() for name, t in model.state_dict().items()}
    out_dir = Path(out_dir)
    staging = out_dir.with_name(f".tmp-{out_dir.name}")
    shutil.rmtree(staging, ignore_errors=True)
    classifier_state = {name[len("classifier.") :]: t for name, t in state.items() if name.startswith("classifier.")}
    if hasattr(model.classifier, "peft_config"):
        from posttrain.engine.export import merged_lora_state_dict

        classifier_state = merged_lora_state_dict(model.classifier, classifier_state)
    model.sequence_classifier.save_pretrained(str(staging), state_dict=classifier_state, safe_serialization=True)
    tokenizer.save_pretrained(str(staging))
    (staging / HEAD_FILE).write_text(json.dumps(asdict(model.head_config), indent=2))
    if model.gate is not None:
        save_file({"weight": state["gate.weight"].contiguous()}, str(staging / GATE_FILE))
    if out_dir.exists():
        shutil.rmtree(out_dir)
    os.rename(staging, out_dir)


def load_reward_model(path: str | Path, dtype: str = "float32"):
    """(RewardModel, tokenizer) from a `save_reward_model` directory (or any 1-label sequence classifier: BT)."""
    path = Path(path)
    head_file = path / HEAD_FILE
    head_config = (
        RewardHeadConfig(**json.loads(head_file.read_text())) if head_file.exists() else RewardHeadConfig(head="bt")
    )
    classifier = AutoModelForSequenceClassification.from_pretrained(str(path), dtype=torch_dtype(dtype))
    if classifier.score.out_features != head_config.output_dim:
        raise ConfigError(
            f"{path}: the score head has {classifier.score.out_features} outputs but {HEAD_FILE} says "
            f"{head_config.output_dim}; the directory is not a posttrain reward model"
        )
    model = RewardModel(classifier, head_config)
    if model.gate is not None:
        model.gate.weight.data.copy_(load_file(str(path / GATE_FILE))["weight"])
    return model.eval(), AutoTokenizer.from_pretrained(str(path))


@torch.no_grad()
def embed_responses(model: RewardModel, tokenizer, prompt: list[dict], responses: list[str | list[dict]]):
    """Head outputs of K responses to one prompt in ONE packed forward: (values [K, D], gate [k] or None).

    Feed them to `score_matrix` for all K x K scores: K embeddings, not K^2 pair forwards.
    """
    prompt_ids = render_ids(tokenizer, prompt, add_generation_prompt=True)
    sequences = []
    for i, response in enumerate(responses):
        messages = [{"role": "assistant", "content": response}] if isinstance(response, str) else response
        sequences.append(tokenize_response(tokenizer, prompt, messages, prompt_ids, f"response {i}"))
    lengths = torch.tensor([len(sequence.input_ids) for sequence in sequences])
    starts = torch.cumsum(lengths, 0) - lengths
    batch = collate_packed(sequences)
    device = next(model.parameters()).device
    values, gate = model(
        batch["input_ids"].to(device),
        (starts + lengths - 1).to(device),
        (starts + len(prompt_ids) - 1).to(device),
        position_ids=batch["position_ids"].to(device),
    )
    return values, None if gate is None else gate[0]


@torch.no_grad()
def score_matrices(
    model: RewardModel,
    tokenizer,
    prompts: list[list[dict]],
    responses: list[list[str]],
    sequences_per_forward: int = 64,
) -> torch.Tensor:
    """S[p, i, j] = s(y_i > y_j | x_p) for K responses (text) to each of P prompts: [P, K, K] float32 on CPU.

    Every response is embedded once (P * K sequences packed `sequences_per_forward` to a forward), then all
    K x K scores of a prompt come from its K embeddings (`score_matrix`): linear in K forwards, not quadratic.
    Exactly antisymmetric with a zero diagonal; BT models give r_i - r_j. `tokenizer` is the reward model's.
    """
    sizes = {len(group) for group in responses}
    if len(responses) != len(prompts) or len(sizes) != 1:
        raise ValueError(
            f"score_matrices needs the same number K of responses for each of the {len(prompts)} prompts; "
            f"got {len(responses)} groups of sizes {sorted(sizes)}"
        )
    sequences, prompt_lengths = [], []
    for p, (prompt, group) in enumerate(zip(prompts, responses)):
        prompt_ids = render_ids(tokenizer, prompt, add_generation_prompt=True)
        for i, response in enumerate(group):
            messages = [{"role": "assistant", "content": response}]
            sequences.append(tokenize_response(tokenizer, prompt, messages, prompt_ids, f"prompt {p} response {i}"))
            prompt_lengths.append(len(prompt_ids))
    device = next(model.parameters()).device
    values, gates = [], []
    for start in range(0, len(sequences), sequences_per_forward):
        chunk = sequences[start : start + sequences_per_forward]
        lengths = torch.tensor([len(sequence.input_ids) for sequence in chunk])
        starts = torch.cumsum(lengths, 0) - lengths
        batch = collate_packed(chunk)
        chunk_values, chunk_gate = model(
            batch["input_ids"].to(device),
            (starts + lengths - 1).to(device),
            (starts + torch.tensor(prompt_lengths[start : start + len(chunk)]) - 1).to(device),
            position_ids=batch["position_ids"].to(device),
        )
        values.append(chunk_values.cpu())
        gates.append(None if chunk_gate is None else chunk_gate.cpu())
    count, k = len(prompts), sizes.pop()
    embeddings = preference_embedding(torch.cat(values), model.head_config.head).view(count, k, -1)
    gate = None if gates[0] is None else torch.cat(gates).view(count, k, -1)[:, 0]  # one prompt, one gate
    return gpm_score_matrix(embeddings, gate)


@torch.no_grad()
def score_pairs(
    model, examples: list[PreferenceExample], pad_token_id: int, batch_size: int = 16, packing: bool = True
) -> torch.Tensor:
    """s(chosen > rejected) for every pair [N] (> 0: the model prefers chosen); `model` is a RewardModel
    or an engine wrapping one."""
    module = getattr(model, "module", model)
    device = next(module.parameters()).device
    scores = []
    for start in range(0, len(examples), batch_size):
        batch = collate_pairs(examples[start : start + batch_size], packing, pad_token_id).to(device)
        values, gate = model(
            batch.inputs["input_ids"],
            batch.last_index,
            batch.prompt_index,
            position_ids=batch.inputs["position_ids"],
            attention_mask=batch.inputs.get("attention_mask"),
        )
        pairs = batch.num_pairs
        scores.append(
            pair_scores(
                values[:pairs], values[pairs:], None if gate is None else gate[:pairs], module.head_config.head
            ).cpu()
        )
    return torch.cat(scores)


@dataclass
class PreferenceScorer:
    """A frozen preference model (GPM or BT) with its own tokenizer, scoring response texts."""

    model: RewardModel
    tokenizer: object
    tau: float  # P(y_i > y_j) = sigma(s / tau)
    sequences_per_forward: int

    def matrices(self, prompts: list[list[dict]], responses: list[list[str]]) -> torch.Tensor:
        """[P, K, K] scores s(y_i > y_j | x_p) (see `score_matrices`)."""
        return score_matrices(self.model, self.tokenizer, prompts, responses, self.sequences_per_forward)

    def versus(self, prompts: list[list[dict]], current: list[list[str]], baseline: list[list[str]]):
        """Each current response against its prompt's baseline responses: ([P, m] mean score s(y > y0) over the
        y0, [P, m] mean win probability sigma(s / tau)); m = responses per prompt in `current`."""
        m = len(current[0])
        scores = self.matrices(prompts, [c + b for c, b in zip(current, baseline)])[:, :m, m:]
        return scores.mean(-1), torch.sigmoid(scores / self.tau).mean(-1)


def reward_model_dir_problem(path: str | None, key: str) -> str | None:
    """Why `path` (named by config `key`) is not a posttrain reward-model directory, or None if it is one."""
    if path and (Path(path) / HEAD_FILE).exists():
        return None
    return (
        f"{key}={path} is not a posttrain reward-model directory (no {HEAD_FILE}); pass the final/ dir of an "
        f"algo=rm run (head=gpm or bt), e.g. {key}=runs/rm/final"
    )


def load_preference_scorer(
    path: str | Path, dtype: str, tau: float | None, sequences_per_forward: int, device=None
) -> PreferenceScorer:
    """The frozen reward model at `path` as a scorer; `tau` None takes the model's own (reward_head.json)."""
    model, tokenizer = load_reward_model(path, dtype)
    model.requires_grad_(False)
    if device is not None:
        model.to(device)
    return PreferenceScorer(model, tokenizer, tau if tau is not None else model.head_config.tau, sequences_per_forward)
