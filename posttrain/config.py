"""Structured configs: dataclasses registered with Hydra's ConfigStore.

They are the schema of `conf/`: a key that is not declared here (a typo) or a value of the wrong type
fails when the config is composed, naming the key. Each `conf/<group>/<option>.yaml` starts from the
group's schema (`defaults: [<group>_schema, _self_]` where the group has more than one schema).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING

from posttrain.rollout.config import RolloutConfig, SamplingConfig


@dataclass
class TinyModelConfig:
    """The Llama-style default built from config (head_dim = hidden_size / num_heads >= 32 for vLLM CPU)."""

    hidden_size: int = 128
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 4
    intermediate_size: int = 384
    vocab_size: int = 512  # upper bound for the locally trained BPE tokenizer
    max_position_embeddings: int = 1024


@dataclass
class ModelConfig:
    path: str | None = None  # hub name or local dir; null builds the tiny model from `tiny`
    tiny: TinyModelConfig = field(default_factory=TinyModelConfig)
    dtype: str = "float32"  # float32 | bfloat16 | float16
    attn_implementation: str = "sdpa"  # sdpa | eager | flash_attention_2 (GPU)
    fused_logprobs: bool = True  # log-probs through the fused csrc/ kernel (no [tokens, vocab] logits)
    gradient_checkpointing: bool = False
    trust_remote_code: bool = False
    chat_template: str | None = None  # override the tokenizer's template (Jinja)


@dataclass
class MixtureSourceConfig:
    """One source of `data.mixture` (posttrain/data/mixer.py): exactly one of file / hub / generator, and
    exactly one amount: `fraction` (a multiple of the source: 0.5, 1.0, 2.0 = two copies) or `count` (rows)."""

    name: str | None = None  # the provenance label ("source" column); default: file stem, hub name or generator:<task>
    file: str | None = None  # local .jsonl / .json / .parquet
    hub: str | None = None  # a Hugging Face dataset name, read with datasets.load_dataset(hub, split=split)
    generator: str | None = None  # a data_recipes task
    generator_kwargs: dict[str, Any] = field(default_factory=dict)
    num_examples: int | None = None  # generator + fraction: rows generated before the fraction applies
    split: str = "train"  # hub split; generator split (train | eval)
    fraction: float | None = None
    count: int | None = None


@dataclass
class DataConfig:
    train_files: list[str] = field(default_factory=list)  # JSONL / JSON / Parquet with a "messages" column
    eval_files: list[str] = field(default_factory=list)
    generator: str | None = "arithmetic"  # a data_recipes task, used when train_files is empty
    generator_kwargs: dict[str, Any] = field(default_factory=dict)
    num_train: int = 2000
    num_eval: int = 200
    seed: int = 0
    max_length: int = 512  # tokens per example (prompt + response)
    truncation: str = "error"  # error | truncate | skip: what to do with an example longer than max_length
    on_bad_row: str = "error"  # error | skip: malformed rows stop the run, or are skipped and counted
    packing: bool = True  # padding-free: a micro-batch's examples are packed in one row
    mixture: list[MixtureSourceConfig] = field(
        default_factory=list
    )  # training rows from a mix of sources (replaces train_files)
    cache_tokenized: bool = False  # keep tokenised datasets in $POSTTRAIN_CACHE_DIR/tokenized, keyed by a content hash


@dataclass
class OptimConfig:
    lr: float = 1e-3
    weight_decay: float = 0.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    scheduler: str = "linear"  # linear | cosine | constant (all after linear warmup)
    warmup_ratio: float = 0.03
    max_grad_norm: float = 1.0


@dataclass
class DeepSpeedConfig:
    zero_stage: int = 0  # 0-3
    offload_optimizer: bool = False
    offload_params: bool = False
    overrides: dict[str, Any] = field(default_factory=dict)  # merged last into the DeepSpeed JSON config


@dataclass
class LoggerConfig:
    wandb: bool = False  # offline mode when no WANDB_API_KEY is set; never prompts for a login
    project: str = "posttrain"
    progress_bar: bool = True
    log_every: int = 1


@dataclass
class PeftConfig:
    enabled: bool = False
    r: int = 8
    alpha: int = 16
    dropout: float = 0.0
    target_modules: list[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    )


@dataclass
class TrainConfig:
    """Batching shared by every trainer. Effective batch = micro_batch_size x grad_accum x world size."""

    epochs: int = 1
    max_steps: int = -1  # optimizer steps; -1 runs the epochs
    micro_batch_size: int = 8  # examples per micro-batch per rank (packed into one row when data.packing)
    gradient_accumulation_steps: int = 1
    eval_every: int = 0  # optimizer steps; 0 evaluates only at the end


@dataclass
class CheckpointConfig:
    every: int = 0  # save every N optimizer steps (0: only at the end of training)
    keep_last: int = 2


@dataclass
class SFTAlgoConfig:
    name: str = "sft"
    # token_mean: sum of token losses / number of target tokens in the whole optimizer step, so the
    # micro-batch size never changes the gradient. sum: summed token losses (Tülu 3's published lr).
    loss_reduction: str = "token_mean"


@dataclass
class ReferenceConfig:
    """The frozen reference policy of the DPO family (unused by reference-free losses such as simpo)."""

    path: str | None = None  # reference model; null: the policy's starting point (model.path / the tiny init)
    cache: bool = True  # compute its log-probs once before training, on disk; false keeps a live reference model
    cache_dir: str | None = None  # null: $POSTTRAIN_CACHE_DIR/reference_logps or ~/.cache/posttrain/reference_logps
    micro_batch_size: int = 16  # pairs per forward while precomputing


@dataclass
class DPOAlgoConfig:
    name: str = "dpo"
    loss: str = "dpo"  # a registered DPO-family loss: dpo | dpo_norm | simpo | ipo | hinge | wpo
    beta: float = 0.1
    label_smoothing: float = 0.0
    loss_kwargs: dict[str, Any] = field(default_factory=dict)  # loss-specific, e.g. {gamma_beta_ratio: 0.3} for simpo
    # RPO (Pang et al. 2024): + nll_alpha * the chosen response's length-normalised NLL, which keeps the
    # chosen likelihood from falling with the rejected one; 0 = the plain loss (TRL's rpo_alpha)
    nll_alpha: float = 0.0
    # Step-DPO (Lai et al. 2024): score only the first step where chosen and rejected differ, a step ending
    # with this text ("\n": one line); null scores the whole responses
    step_separator: str | None = None
    reference: ReferenceConfig = field(default_factory=ReferenceConfig)


@dataclass
class RewardAlgoConfig:
    """Reward model: Bradley-Terry (head=bt, a scalar) or the General Preference Model (head=gpm)."""

    name: str = "rm"
    head: str = "bt"  # bt | gpm
    embed_dim: int = 8  # gpm: 2k, the preference embedding size (even)
    normalize: bool = True  # gpm: L2-normalise the embedding
    prompt_gate: bool = False  # gpm: lambda(x) = softmax(W_p h_prompt) scales the k blocks
    tau: float = 0.1  # gpm: P(y_i > y_j) = sigma(s / tau)
    margin: float = 0.0  # bt and gpm: loss on (score - margin)


@dataclass
class RLVRAlgoConfig:
    """GRPO-family RL with verifiable rewards (REFERENCE.md section 4). One step = one rollout batch."""

    name: str = "rlvr"
    prompts_per_step: int = 16  # prompts sampled per rollout step, over all ranks
    sampling: SamplingConfig = field(default_factory=lambda: SamplingConfig(n=8, temperature=1.0, max_tokens=64))
    advantage: str = "standard"  # standard: (r - mean) / (std + eps) | centered: r - mean
    drop_zero_variance_groups: bool = True
    clip_low: float = 0.2
    clip_high: float = 0.28  # DAPO clip-higher
    kl_beta: float = 0.0  # > 0 keeps a frozen reference policy
    kl_estimator: str = "k3"  # k1 | k2 | k3
    entropy_coef: float = 0.0
    aggregation: str = "token_mean"  # token_mean | sequence_mean | sum_constant (Dr. GRPO)
    epochs_per_batch: int = 1  # passes over each rollout batch (PPO epochs)
    minibatches_per_epoch: int = 1  # optimizer steps per pass
    verification_reward: float = 10.0  # Tülu 3: 10 for a verified answer
    nonstop_penalty: float = 0.0  # added when a completion hits max_tokens without stopping (Tülu 3: -10)
    verifier_timeout_s: float = 3.0
    reference_refresh_every: int = 0  # rollout steps between copying the policy into the reference (0: never)
    eval_every: int = 0  # rollout steps between held-out evaluations (0: only before and after)
    eval_max_tokens: int = 64
    eval_temperature: float = 0.0  # 0: greedy; else pass@1 estimated from eval_samples_per_prompt samples
    eval_samples_per_prompt: int = 1


@dataclass
class PipelineStageConfig:
    name: str = MISSING  # also the stage's run dir: <run_dir>/<name>
    overrides: list[str] = field(default_factory=list)  # the stage's `posttrain` overrides (algo=..., recipes, ...)


@dataclass
class PipelineEvalConfig:
    """`posttrain eval` after every stage (evals/runner.py)."""

    tasks: list[str] = field(default_factory=lambda: ["arithmetic"])
    num: int = 200  # prompts per task
    samples: int = 4  # samples per prompt (pass@k, maj@n); 0: greedy only
    temperature: float = 1.0
    max_tokens: int = 64
    backend: str = "vllm"
    seed: int = 0


@dataclass
class PipelineAlgoConfig:
    """Stages run in order, each from the previous stage's final/ (posttrain/pipeline.py)."""

    name: str = "pipeline"
    stages: list[PipelineStageConfig] = field(default_factory=list)
    initial_model: str | None = None  # the first stage's model.path (null: the stage's own model config)
    eval_initial: bool = False  # also evaluate initial_model before the first stage
    launcher: list[str] = field(default_factory=list)  # e.g. [torchrun, --nproc_per_node=8]; empty: this Python
    eval: PipelineEvalConfig = field(default_factory=PipelineEvalConfig)
    plot_metric: str = "arithmetic/pass@1"  # the eval metric drawn per stage in pipeline.png


@dataclass
class GPOAlgoConfig:
    """GPO / SPPO: iterative self-play against a trained preference model (REFERENCE.md section 3).

    One iteration = sample K = sampling.n responses per prompt from the current policy, score all pairs,
    regress the (best, worst) pair's log-ratios against the previous iterate onto the targets, sync weights.
    """

    name: str = "gpo"
    loss: str = "gpo"  # gpo: targets s_hat = mean GPM score / tau | sppo: mean win probability sigma(s / tau)
    reward_model: str | None = None  # required: a reward-model dir (final/ of an algo=rm run; gpm or bt head)
    beta: float = 0.001  # log-ratio target = s_hat / beta (gpo) or (P_hat - 1/2) / beta (sppo)
    tau: float | None = None  # null: the reward model's own tau (reward_head.json)
    iterations: int = 3
    prompts_per_iteration: int = 64  # over all ranks; one (best, worst) pair each
    epochs_per_iteration: int = 1  # passes over the iteration's pairs (train.micro_batch_size pairs per micro-batch)
    sampling: SamplingConfig = field(
        default_factory=lambda: SamplingConfig(n=5, temperature=0.7, top_p=0.9, max_tokens=256)
    )
    eval_prompts: int = 64  # held-out prompts (data eval split) for the score against the initial policy's samples
    eval_samples_per_prompt: int = 4  # samples per eval prompt, from the initial and from the current policy
    check_sync: bool = (
        True  # log the gap between the engine's sample log-probs and the trainer's (top_p=1, top_k=0 only)
    )
    scoring_batch_size: int = 64  # sequences per reward-model forward


@dataclass
class Config:
    algo: Any = MISSING
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    peft: PeftConfig = field(default_factory=PeftConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    run_dir: str = MISSING
    seed: int = 0
    resume: str = "auto"  # auto: continue from the newest checkpoint in run_dir if any | never


ALGO_SCHEMAS: dict[str, type] = {
    "sft": SFTAlgoConfig,
    "dpo": DPOAlgoConfig,
    "rm": RewardAlgoConfig,
    "rlvr": RLVRAlgoConfig,
    "gpo": GPOAlgoConfig,
    "pipeline": PipelineAlgoConfig,
}


def register_configs() -> None:
    """Put the schemas in Hydra's ConfigStore (idempotent)."""
    store = ConfigStore.instance()
    store.store(name="posttrain_schema", node=Config)
    for name, schema in ALGO_SCHEMAS.items():
        store.store(group="algo", name=f"{name}_schema", node=schema)
