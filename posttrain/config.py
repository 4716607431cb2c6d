"""Structured configs: dataclasses registered with Hydra's ConfigStore.

They are the schema of `conf/`: a key that is not declared here (a typo) or a value of the wrong type
fails when the config is composed, naming the key. Each `conf/<group>/<option>.yaml` starts from the
group's schema (`defaults: [<group>_schema, _self_]` where the group has more than one schema).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING


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
    path: Optional[str] = None  # hub name or local dir; null builds the tiny model from `tiny`
    tiny: TinyModelConfig = field(default_factory=TinyModelConfig)
    dtype: str = "float32"  # float32 | bfloat16 | float16
    attn_implementation: str = "sdpa"  # sdpa | eager | flash_attention_2 (GPU)
    fused_logprobs: bool = True  # log-probs through the fused csrc/ kernel (no [tokens, vocab] logits)
    gradient_checkpointing: bool = False
    trust_remote_code: bool = False
    chat_template: Optional[str] = None  # override the tokenizer's template (Jinja)


@dataclass
class DataConfig:
    train_files: list[str] = field(default_factory=list)  # JSONL / JSON / Parquet with a "messages" column
    eval_files: list[str] = field(default_factory=list)
    generator: Optional[str] = "arithmetic"  # a data_recipes task, used when train_files is empty
    generator_kwargs: dict[str, Any] = field(default_factory=dict)
    num_train: int = 2000
    num_eval: int = 200
    seed: int = 0
    max_length: int = 512  # tokens per example (prompt + response)
    truncation: str = "error"  # error | truncate | skip: what to do with an example longer than max_length
    on_bad_row: str = "error"  # error | skip: malformed rows stop the run, or are skipped and counted
    packing: bool = True  # padding-free: a micro-batch's examples are packed in one row


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
    run_dir: str = MISSING
    seed: int = 0
    resume: str = "auto"  # auto: continue from the newest checkpoint in run_dir if any | never
    init_from: Optional[str] = None  # reserved for pipelines: a previous stage's final/ dir


ALGO_SCHEMAS: dict[str, type] = {"sft": SFTAlgoConfig}


def register_configs() -> None:
    """Put the schemas in Hydra's ConfigStore (idempotent)."""
    store = ConfigStore.instance()
    store.store(name="posttrain_schema", node=Config)
    for name, schema in ALGO_SCHEMAS.items():
        store.store(group="algo", name=f"{name}_schema", node=schema)
