"""Typed config schemas (dataclasses) and their ConfigStore registration.

Hydra merges `conf/` YAML into these dataclasses, so an unknown key or a wrong type is rejected
before any work starts; `trainer.config.validate` then checks what types cannot express. This
module imports no domain module: the lists of valid choices live with the code that owns them.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import List, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

# The YAML config groups, shipped inside the package (`conf/` at the repository root links here).
CONF_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "conf")


@dataclass
class ModelConfig:
    arch: str = "decoder"
    d_model: int = 192
    num_layers: int = 4
    num_heads: int = 6
    num_kv_heads: Optional[int] = None  # None: same as num_heads (plain multi-head)
    d_ff: int = 768
    dropout: float = 0.0
    attn_dropout: float = 0.0
    num_decoder_layers: Optional[int] = None  # encoder_decoder only; None: num_layers
    activation: str = "gelu"  # gelu (exact) | gelu_tanh | relu | swiglu
    tie_embeddings: bool = True
    # A run dir, a weights file, a Hugging Face / sentence-transformers folder (it then defines the
    # architecture, sizes and tokenizer: trainer.pretrained) or a packaged model's name (all-minilm-l6-v2).
    init_from: Optional[str] = None
    # Architecture choices pretrained families need; the defaults are the models above, and each
    # also works from scratch.
    head_dim: Optional[int] = None  # per-head size; None: d_model // num_heads
    bias: bool = False  # biases on every linear layer of the blocks (BERT, GPT-2)
    qkv_bias: bool = False  # biases on the query/key/value projections only (Qwen2)
    qk_norm: bool = False  # RMS norm of each head's queries and keys (Qwen3), any attention kernel
    embed_norm: bool = False  # a norm of the embeddings (tokens + positions) before the first block (BERT)
    token_types: int = 0  # rows of a token-type (segment) embedding, type 0 added to every token; 0: none
    max_positions: Optional[int] = None  # position=learned: table rows; None: data.seq_len
    position_offset: int = 0  # position=learned: leading table rows no position reads (RoBERTa: pad id + 1)
    head_scale: Optional[float] = None  # factor on the hidden states entering the LM head; None: automatic
    # Token ids the LM head may predict (rows above get -inf logits); None: the tokenizer's whole
    # vocabulary. A pretrained folder sets its vocab_size: tokens its tokenizer gains here stay unpredicted.
    num_tokens: Optional[int] = None
    # Output logits soft-capped to c * tanh(logits / c) (Gemma 2, modded-nanogpt); None: off.
    logit_softcap: Optional[float] = None


@dataclass
class AttentionConfig:
    kind: str = "flash"
    block_size: int = 128  # attention=tiled: query/key block length


@dataclass
class PositionConfig:
    kind: str = "sinusoidal"
    num_buckets: int = 32  # position=relative
    max_distance: int = 128  # position=relative
    rope_base: float = 10000.0  # position=rope


@dataclass
class NormConfig:
    kind: str = "layernorm"
    placement: str = "pre"
    eps: float = 1e-5


@dataclass
class ObjectiveConfig:
    kind: str = "auto"
    mask_prob: float = 0.15  # mlm: fraction of tokens predicted
    noise_density: float = 0.15  # span: fraction of tokens corrupted
    mean_span: float = 3.0  # span: mean corrupted span length
    temperature: float = 0.05  # contrastive: InfoNCE temperature (the starting value if learned)
    learn_temperature: bool = False  # contrastive: learn log(1/temperature) (CLIP) instead of fixing it
    pooling: str = "mean"  # contrastive: mean | cls (the first token's vector) -> the embedding
    # z-loss coefficient (PaLM): coef x log(Z)^2 per target added to the training loss; 0: off.
    z_loss: float = 0.0


@dataclass
class DataConfig:
    source: str = "stdlib"
    seq_len: int = 128
    files: List[str] = field(default_factory=list)  # data=text
    name: Optional[str] = None  # data=hub: a Hugging Face dataset name
    subset: Optional[str] = None  # data=hub: its configuration name
    split: str = "train"  # data=hub
    text_field: str = "text"
    # None: text files are taken byte for byte (the byte tokenizer sees exactly the file) and
    # .jsonl must be UTF-8; a codec name (e.g. latin-1) decodes every file with it first.
    encoding: Optional[str] = None
    val_fraction: float = 0.05
    max_files: Optional[int] = None  # data=stdlib: use only the first N files (small runs)
    val_files: List[str] = field(default_factory=list)  # held-out split from these files (else by val_fraction)
    streaming: bool = False  # read data=text|hub through `datasets` streaming (no copy)
    num_proc: int = 1  # processes that tokenize while the token store is built
    query_field: str = "query"  # data=pairs (.jsonl): the query text field
    document_field: str = "document"  # data=pairs (.jsonl): the document text field
    corpus_files: List[str] = field(default_factory=list)  # data=pairs: extra documents to search (.jsonl/.txt)
    cache_dir: str = "${oc.env:TRAINER_CACHE,${oc.env:HOME}/.cache/trainer}"
    # Training windows start at random token offsets drawn per step from (seed, step) (nanoGPT's
    # sampling) instead of the store's fixed blocks; held-out blocks stay fixed. None (auto): on for
    # token-store data, off for data=pairs and data.streaming (which have no token stream to cut).
    random_offsets: Optional[bool] = None


@dataclass
class TokenizerConfig:
    kind: str = "byte"  # byte | bpe (trained on the training split) | pretrained (tokenizer.path)
    vocab_size: int = 8192  # bpe: target vocabulary size, specials included
    path: Optional[str] = None  # pretrained: a tokenizer.json, or a folder holding one


@dataclass
class PrecisionConfig:
    dtype: str = "fp32"
    init_scale: float = 65536.0  # fp16: GradScaler's starting loss scale


@dataclass
class ParallelConfig:
    kind: str = "single"
    timeout_s: int = 300  # collective timeout, so a dead rank cannot hang the others forever
    tp_size: Optional[int] = None  # fsdp_tp: ranks per tensor-parallel group (None: 2); tp uses every rank
    pp_schedule: str = "gpipe"  # pp: gpipe | 1f1b, over trainer.grad_accum micro-batches


@dataclass
class QuantizeConfig:
    method: str = "none"
    group_size: int = 32  # weight_int4: weights per scale
    eval_batches: Optional[int] = None  # quality sample in batches; None: trainer.eval_batches (eval/loss's)
    latency_batches: int = 5  # forward passes timed per variant
    compile: str = "both"  # latency rows: false (eager) | true (torch.compile) | both
    context_budget_mb: float = 256.0  # contrastive runs: longest document per attention kernel within this
    max_context: Optional[int] = None  # ... trying lengths up to this (None: 16 x data.seq_len)
    # The token embedding in int8 (weight-only) too; None: true for encoders, false for decoders
    # and encoder-decoders (their tied LM head keeps full-precision logits). trainer.quantize.embedding.
    embeddings: Optional[bool] = None


@dataclass
class OptimConfig:
    name: str = "adamw"
    lr: float = 2e-3
    weight_decay: float = 0.1
    betas: List[float] = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8
    # optim=muon: Muon on the blocks' linear weights (AdamW above for the rest).
    muon_lr: float = 0.02
    muon_momentum: float = 0.95
    muon_weight_decay: float = 0.0
    muon_nesterov: bool = True
    muon_ns_steps: int = 5
    muon_adjust_lr: str = "original"  # original (sqrt(max(1, rows/cols))) | match_rms_adamw


@dataclass
class ScheduleConfig:
    name: str = "cosine"
    # Warmup length: warmup_steps when set, else warmup_fraction x trainer.max_steps (rounded).
    warmup_steps: Optional[int] = None
    warmup_fraction: Optional[float] = 0.1
    min_lr_ratio: float = 0.1
    decay_fraction: float = 0.2  # schedule=wsd: the share of trainer.max_steps spent decaying
    decay_shape: str = "linear"  # schedule=wsd: linear | sqrt (1 - sqrt, Hägele et al. 2024)


@dataclass
class TrainerConfig:
    batch_size: int = 16  # global: split across ranks and grad_accum micro-batches
    max_steps: int = 300
    grad_accum: int = 1
    eval_every: int = 100
    eval_batches: int = 8
    log_every: int = 10
    checkpoint_every: int = 100
    keep_checkpoints: int = 2
    resume: str = "auto"  # auto | never | <path to a checkpoint file or directory>
    steps_per_run: Optional[int] = None  # stop (checkpointed) after this many steps in one invocation
    grad_clip: float = 1.0
    compile: str = "auto"  # auto (compile on CUDA, eager on CPU where it measured no gain) | true | false
    device: str = "auto"
    threads: Optional[int] = None  # torch intra-op threads; None keeps torch's default
    progress: bool = True
    async_checkpoint: bool = False  # parallel=fsdp: write sharded checkpoints in the background
    activation_checkpointing: str = "none"  # none | full (every block) | selective (every ac_every-th block)
    ac_every: int = 2  # activation_checkpointing=selective: recompute every ac_every-th block


@dataclass
class SweepConfig:
    """How a multirun's report is read; changes no run's numbers."""

    # The configuration the others are compared with: overrides naming exactly one of the sweep's
    # configurations, e.g. "attention=standard"; None: the first configuration.
    baseline: Optional[str] = None
    metric: str = "eval/loss"  # the summary key a job returns to Hydra's sweeper (Optuna) and the report leads with


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    attention: AttentionConfig = field(default_factory=AttentionConfig)
    position: PositionConfig = field(default_factory=PositionConfig)
    norm: NormConfig = field(default_factory=NormConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    data: DataConfig = field(default_factory=DataConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    precision: PrecisionConfig = field(default_factory=PrecisionConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    quantize: QuantizeConfig = field(default_factory=QuantizeConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    seed: int = 0
    sweep: SweepConfig = field(default_factory=SweepConfig)


def register_configs() -> None:
    """Register the root schema so `conf/config.yaml` can extend it."""
    ConfigStore.instance().store(name="base_config", node=Config)


def to_container(cfg: DictConfig) -> dict:
    """Plain resolved dict of the config (for logs and summaries)."""
    return OmegaConf.to_container(cfg, resolve=True)  # type: ignore[return-value]
