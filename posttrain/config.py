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

from posttrain.data.prompts import TULU3_VERIFIER_MAP
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
    attn_implementation: str = (
        "sdpa"  # auto (flash_attention_2 on a GPU with flash_attn, else sdpa) | sdpa | eager | ...
    )
    fused_logprobs: bool = True  # log-probs through the fused csrc/ kernel (no [tokens, vocab] logits)
    # SFT: the token-weighted NLL through the loss-fused csrc/ kernel (gradients formed in the forward, 3 GEMMs
    # instead of 4); only with fused_logprobs (fused_logprobs=false is the plain path for every trainer)
    fused_cross_entropy: bool = True
    # ZeRO-3: load model.path's weights (policy and reference) partitioned through transformers' DeepSpeed
    # integration (deepspeed.zero.Init), never whole on one rank; false loads whole copies first (RSS-hungry)
    sharded_init: bool = True
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
    num_proc: int = 1  # processes tokenising a split (datasets.map); the cache is built once, by rank 0
    # RLVR rows without a "verifier" column: their "dataset" value -> verifier name (Tülu 3's mapping by default)
    verifier_map: dict[str, str] = field(default_factory=lambda: dict(TULU3_VERIFIER_MAP))


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
    # Token budget of one forward: each rank's examples of an optimizer step (RL: its rollout sequences of the
    # update) are packed into micro-batches of at most this many tokens (padded tokens count when data.packing
    # is off; a pair's two sequences stay together) instead of the fixed micro_batch_size split. The loss is
    # unchanged: each micro-batch weighs its share of the step's normaliser. null: fixed-size micro-batches.
    max_tokens_per_micro_batch: int | None = None
    eval_every: int = 0  # optimizer steps between held-out evaluations (0: only at the start and the end)
    eval_at_start: bool = True  # evaluate before the first step (the baseline of every eval curve)
    # The number of ranks the batch settings were written for (a recipe's published effective batch is
    # micro_batch_size x gradient_accumulation_steps x assumed_world_size); a run on another world size warns
    # with the accumulation that would restore it. null: no assumption.
    assumed_world_size: int | None = None


@dataclass
class CheckpointConfig:
    every: int = 0  # save every N optimizer steps (0: only at the end of training)
    keep_last: int = 2


@dataclass
class EvalSamplingConfig:
    """How held-out prompts are sampled, the same for every in-run eval (RLVR, GPO), the pipeline's evals and
    `posttrain eval`: greedy always, and with `samples` > 0 also that many samples per prompt at
    `temperature` / `top_p` (sampled accuracy, pass@k, maj@n)."""

    samples: int = 0  # samples per prompt besides the greedy one (0: greedy only)
    temperature: float = 1.0  # for the samples (> 0)
    top_p: float = 1.0
    max_tokens: int = 256  # new tokens per completion, greedy and sampled
    seed: int = 0


def sampled_eval_request(eval_cfg, n: int | None = None, seed: int | None = None) -> SamplingConfig:
    """The request for the eval samples of `eval_cfg` (an EvalSamplingConfig or its DictConfig); `n` overrides
    `samples`, `seed` the configured seed."""
    return SamplingConfig(
        n=eval_cfg.samples if n is None else n,
        temperature=eval_cfg.temperature,
        top_p=eval_cfg.top_p,
        max_tokens=eval_cfg.max_tokens,
        seed=eval_cfg.seed if seed is None else seed,
    )


def greedy_eval_request(eval_cfg) -> SamplingConfig:
    return SamplingConfig(n=1, temperature=0.0, max_tokens=eval_cfg.max_tokens)


def eval_sampling_problems(eval_cfg, key: str = "eval") -> list[str]:
    checks = {
        f"{key}.samples={eval_cfg.samples} must be >= 0 (0: greedy only)": eval_cfg.samples < 0,
        f"{key}.temperature={eval_cfg.temperature} must be > 0 for sampled evals": (
            eval_cfg.samples > 0 and eval_cfg.temperature <= 0
        ),
        f"{key}.top_p={eval_cfg.top_p} must be in (0, 1]": not 0 < eval_cfg.top_p <= 1,
        f"{key}.max_tokens={eval_cfg.max_tokens} must be >= 1": eval_cfg.max_tokens < 1,
    }
    return [problem for problem, failed in checks.items() if failed]


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
    eval: EvalSamplingConfig = field(default_factory=EvalSamplingConfig)
    run_dir: str = MISSING
    seed: int = 0
    resume: str = "auto"  # auto: continue from the newest checkpoint in run_dir if any | never


def undeclared_keys(node, prefix: str = "") -> list[str]:
    """Dotted keys of `node` (a composed config) that its dataclass schemas do not declare: added with
    `+key=value`, which Hydra allows even on a structured config, and otherwise ignored without a word. Keys
    under free-form dict fields (`data.generator_kwargs`, `deepspeed.overrides`, ...) are not checked."""
    import dataclasses

    from omegaconf import DictConfig, ListConfig, OmegaConf

    schema = OmegaConf.get_type(node) if isinstance(node, DictConfig) else None
    declared = {item.name for item in dataclasses.fields(schema)} if dataclasses.is_dataclass(schema) else None
    found = []
    children = enumerate(node) if isinstance(node, ListConfig) else ((key, None) for key in node.keys())
    for key, _ in children:
        path = f"{prefix}{key}"
        if declared is not None and key not in declared:
            found.append(path)
            continue
        child = node._get_node(key)
        if isinstance(child, (DictConfig, ListConfig)) and not child._is_none() and not child._is_missing():
            found += undeclared_keys(child, path + ".")
    return found


def register_configs() -> None:
    """Put the schemas in Hydra's ConfigStore (idempotent): the top-level one and each algorithm's own."""
    from posttrain.trainers import load_algorithms

    store = ConfigStore.instance()
    store.store(name="posttrain_schema", node=Config)
    algorithms = load_algorithms()
    for name in algorithms.names():
        store.store(group="algo", name=f"{name}_schema", node=algorithms.get(name).schema)
