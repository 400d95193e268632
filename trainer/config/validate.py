"""Cross-field config checks: what the typed schema cannot express.

Each list of valid choices is read from the module that owns the choice (the attention kernels
from `models.ops.attention`, the objectives from `trainer.objectives`, ...), so a new choice is
added in one place. Every failure is a `ConfigError` whose message is one sentence naming the key,
the value and what would be valid.
"""
from __future__ import annotations

import os

from omegaconf import DictConfig

from models.blocks import ACTIVATIONS, PLACEMENTS
from models.build import ARCHS
from models.norm import NORMS
from models.ops.attention import KERNELS as ATTENTIONS
from models.ops.linear import requested_backend
from models.position import POSITIONS
from trainer.config.schema import Config
from trainer.data.sources import SOURCES, check_files
from trainer.data.tokenizer import TOKENIZERS, tokenizer_file
from trainer.distributed import DEVICES
from trainer.errors import ConfigError
from trainer.objectives import OBJECTIVE_ARCHS, OBJECTIVES, resolve_objective, span_lengths
from trainer.optim import DECAY_SHAPES, MUON_ADJUST_LR, OPTIMIZERS, SCHEDULES
from trainer.pretrained.packaged import PACKAGED, is_packaged_name
from trainer.precision import PRECISIONS
from trainer.quantize import QUANTIZE
from trainer.retrieval.embedding import POOLINGS
from trainer.transforms.checkpointing import AC_MODES
from trainer.transforms.compile import COMPILE_CHOICES
from trainer.transforms.parallel import MODEL_PARALLEL, PARALLELS, SHARDED, model_copies
from trainer.transforms.pipeline import PP_SCHEDULES


def _choice(value: str, valid: tuple, key: str) -> None:
    if value not in valid:
        raise ConfigError(f"{key}={value!r} is not valid; choose one of: {', '.join(valid)}.")


def _positive(value: float, key: str, zero_ok: bool = False) -> None:
    if value < 0 or (value == 0 and not zero_ok):
        bound = ">= 0" if zero_ok else "> 0"
        raise ConfigError(f"{key}={value} is out of range; it must be {bound}.")


def _fraction(value: float, key: str, lo_open: bool = True) -> None:
    if not ((0 < value < 1) if lo_open else (0 <= value < 1)):
        raise ConfigError(f"{key}={value} is out of range; it must be in {'(' if lo_open else '['}0, 1).")


def validate(cfg: DictConfig | Config, world_size: int = 1, launched: bool = False) -> None:
    """Check what types cannot: choices, ranges and combinations. Raises ConfigError."""
    m, t = cfg.model, cfg.trainer
    for value, valid, key in [
        (m.arch, ARCHS, "model"), (cfg.attention.kind, ATTENTIONS, "attention"),
        (cfg.position.kind, POSITIONS, "position"), (cfg.norm.kind, NORMS, "norm"),
        (cfg.norm.placement, PLACEMENTS, "norm.placement"),
        (cfg.objective.kind, OBJECTIVES, "objective"), (cfg.data.source, SOURCES, "data"),
        (cfg.precision.dtype, PRECISIONS, "precision"), (cfg.parallel.kind, PARALLELS, "parallel"),
        (cfg.quantize.method, QUANTIZE, "quantize"), (cfg.optim.name, OPTIMIZERS, "optim"),
        (cfg.schedule.name, SCHEDULES, "schedule"), (m.activation, ACTIVATIONS, "model.activation"),
        (t.device, DEVICES, "trainer.device"),
    ]:
        _choice(value, valid, key)
    for key in ("d_model", "num_layers", "num_heads", "d_ff"):
        _positive(getattr(m, key), f"model.{key}")
    kv = m.num_kv_heads if m.num_kv_heads is not None else m.num_heads
    _positive(kv, "model.num_kv_heads")
    if m.d_model % m.num_heads:
        raise ConfigError(f"model.num_heads={m.num_heads} must divide model.d_model={m.d_model} "
                          f"(each head gets d_model / num_heads dimensions).")
    if m.num_heads % kv:
        raise ConfigError(f"model.num_kv_heads={kv} must divide model.num_heads={m.num_heads} "
                          f"(each key/value head serves a whole group of query heads).")
    if m.num_decoder_layers is not None:
        _positive(m.num_decoder_layers, "model.num_decoder_layers")
    _fraction(m.dropout, "model.dropout", lo_open=False)
    _fraction(m.attn_dropout, "model.attn_dropout", lo_open=False)
    _validate_architecture(cfg)
    if cfg.attention.kind == "tiled" and m.attn_dropout > 0:
        raise ConfigError("attention=tiled does not support model.attn_dropout > 0; "
                          "set model.attn_dropout=0 or use attention=standard|flash.")
    _positive(cfg.attention.block_size, "attention.block_size")
    objective = resolve_objective(m.arch, cfg.objective.kind)
    if m.arch not in OBJECTIVE_ARCHS[objective]:
        raise ConfigError(f"objective={objective} cannot train model={m.arch}; it needs model="
                          f"{'|'.join(OBJECTIVE_ARCHS[objective])} (objective=auto picks the right one).")
    _fraction(cfg.objective.mask_prob, "objective.mask_prob")
    _fraction(cfg.objective.noise_density, "objective.noise_density")
    _positive(cfg.objective.mean_span, "objective.mean_span")
    _positive(cfg.objective.temperature, "objective.temperature")
    _validate_retrieval(cfg, objective)
    if cfg.data.seq_len < 8:
        raise ConfigError(f"data.seq_len={cfg.data.seq_len} is out of range; it must be >= 8.")
    if objective == "span":
        src_len, tgt_len = span_lengths(cfg.data.seq_len, cfg.objective.noise_density, cfg.objective.mean_span)
        if cfg.position.kind == "learned" and max(src_len, tgt_len) > cfg.data.seq_len:
            raise ConfigError(
                f"objective=span with objective.noise_density={cfg.objective.noise_density} and "
                f"objective.mean_span={cfg.objective.mean_span} makes {src_len}-token inputs and {tgt_len}-token "
                f"targets, longer than position=learned's table of data.seq_len={cfg.data.seq_len}; lower "
                f"objective.noise_density or use another position scheme.")
    _fraction(cfg.data.val_fraction, "data.val_fraction")
    if cfg.data.source == "text" and not cfg.data.files:
        raise ConfigError("data=text needs data.files=[path, ...] (.txt, .jsonl with a text field, or .parquet).")
    if cfg.data.source == "text":
        for f in cfg.data.files:
            if not os.path.isfile(os.path.expanduser(f)):
                raise ConfigError(f"data.files: no such file {f!r}.")
    if cfg.data.source == "hub" and not cfg.data.name:
        raise ConfigError("data=hub needs data.name=<a Hugging Face dataset name>.")
    _validate_tokens(cfg)
    _validate_trainer(cfg, world_size, launched)
    _validate_model_parallel(cfg, objective, world_size)
    _validate_recipe(cfg, objective)
    try:
        requested_backend()
    except ValueError as e:
        raise ConfigError(str(e)) from None


def _validate_architecture(cfg: DictConfig | Config) -> None:
    """The architecture choices pretrained families need (head_dim, positions table, head scale)."""
    m = cfg.model
    head_dim = m.head_dim
    if head_dim is not None:
        _positive(head_dim, "model.head_dim")
    head_dim = head_dim or m.d_model // m.num_heads
    if cfg.position.kind == "rope" and head_dim % 2:
        raise ConfigError(f"position=rope needs an even head size, but the head size (model.head_dim or "
                          f"d_model/num_heads) is {head_dim}.")
    _positive(m.token_types, "model.token_types", zero_ok=True)
    _positive(m.position_offset, "model.position_offset", zero_ok=True)
    if m.head_scale is not None:
        _positive(m.head_scale, "model.head_scale")
    if m.max_positions is not None:
        _positive(m.max_positions, "model.max_positions")
    if m.num_tokens is not None:
        _positive(m.num_tokens, "model.num_tokens")
    if (m.position_offset or m.max_positions is not None) and cfg.position.kind != "learned":
        key = "model.position_offset" if m.position_offset else "model.max_positions"
        raise ConfigError(f"{key} sizes a learned position table, but position={cfg.position.kind}; use "
                          f"position=learned or leave {key} unset.")
    if cfg.position.kind == "learned" and m.max_positions is not None:
        room = m.max_positions - m.position_offset
        if room < cfg.data.seq_len:
            raise ConfigError(f"data.seq_len={cfg.data.seq_len} needs more positions than model.max_positions="
                              f"{m.max_positions} minus model.position_offset={m.position_offset} leaves ({room}); "
                              f"lower data.seq_len or raise model.max_positions.")


def _validate_tokens(cfg: DictConfig | Config) -> None:
    """Tokenizer choice and files, data.val_files, data.streaming and data.num_proc."""
    tok, data = cfg.tokenizer, cfg.data
    _choice(tok.kind, TOKENIZERS, "tokenizer")
    if tok.kind == "bpe" and tok.vocab_size < 384:
        raise ConfigError(f"tokenizer.vocab_size={tok.vocab_size} is too small for tokenizer=bpe; it must be "
                          f">= 384 (256 byte symbols, 104 special tokens, and room for merges).")
    if tok.kind == "pretrained":
        if not tok.path:
            raise ConfigError("tokenizer=pretrained needs tokenizer.path=<a tokenizer.json or a folder holding one>.")
        tokenizer_file(tok.path)
    _positive(data.num_proc, "data.num_proc")
    if data.val_files:
        if data.source == "hub":
            raise ConfigError(f"data.val_files works with data=stdlib|text|pairs, not data={data.source}.")
        if data.source == "pairs":
            for f in data.val_files:
                if not os.path.isfile(os.path.expanduser(f)):
                    raise ConfigError(f"data.val_files: no such file {f!r}.")
        else:
            check_files(data.val_files, "data.val_files")
    if data.streaming and data.source not in ("text", "hub"):
        raise ConfigError(f"data.streaming=true reads data=text|hub through datasets' streaming mode; "
                          f"data={data.source} is read from the token store (set data.streaming=false).")
    if data.streaming and (tok.kind == "bpe" or data.encoding):
        what = "tokenizer=bpe (it is trained on the whole training split)" if tok.kind == "bpe" else "data.encoding"
        raise ConfigError(f"data.streaming=true cannot be combined with {what}; use tokenizer=byte|pretrained "
                          f"and UTF-8 data, or data.streaming=false.")


def _validate_retrieval(cfg: DictConfig | Config, objective: str) -> None:
    """Contrastive/retrieval settings: pooling, pairs data, learned temperature, init_from."""
    _choice(cfg.objective.pooling, POOLINGS, "objective.pooling")
    if cfg.data.source == "pairs" and objective != "contrastive":
        raise ConfigError(f"data=pairs holds (query, document) pairs for objective=contrastive, not "
                          f"objective={objective}; add objective=contrastive (with model=encoder).")
    if cfg.data.source == "pairs" and cfg.tokenizer.kind == "bpe":
        raise ConfigError("data=pairs cannot train tokenizer=bpe (it is trained on a language-model corpus); use "
                          "tokenizer=byte, or tokenizer=pretrained tokenizer.path=<run dir>/tokenizer.json of the "
                          "run the encoder starts from.")
    if cfg.data.source == "pairs":
        for key in ("files", "corpus_files"):
            for f in cfg.data[key]:
                if not os.path.isfile(os.path.expanduser(f)):
                    raise ConfigError(f"data.{key}: no such file {f!r}.")
    if objective == "contrastive" and cfg.objective.learn_temperature and cfg.parallel.kind == "fsdp":
        raise ConfigError("objective.learn_temperature=true is not supported with parallel=fsdp (its scalar "
                          "cannot be sharded); use parallel=ddp or a fixed objective.temperature.")
    src = cfg.model.init_from
    if src and not os.path.exists(os.path.expanduser(src)) and not is_packaged_name(src):
        raise ConfigError(f"model.init_from={src}: no such run dir, weights file or model folder (nor a packaged "
                          f"model: {', '.join(PACKAGED)}).")


def _validate_trainer(cfg: DictConfig | Config, world_size: int, launched: bool) -> None:
    t, o = cfg.trainer, cfg.optim
    if str(t.compile).lower() not in COMPILE_CHOICES:
        raise ConfigError(f"trainer.compile={t.compile!r} is not valid; choose one of: {', '.join(COMPILE_CHOICES)} "
                          f"(auto: compile on CUDA, eager on CPU).")
    for key in ("batch_size", "grad_accum", "eval_every", "eval_batches",
                "log_every", "checkpoint_every", "keep_checkpoints"):
        _positive(getattr(t, key), f"trainer.{key}")
    _positive(t.max_steps, "trainer.max_steps", zero_ok=True)  # 0: evaluate the starting weights only
    _positive(t.grad_clip, "trainer.grad_clip", zero_ok=True)
    if t.steps_per_run is not None:
        _positive(t.steps_per_run, "trainer.steps_per_run")
    if t.threads is not None:
        _positive(t.threads, "trainer.threads")
    if t.resume not in ("auto", "never"):
        if not os.path.exists(os.path.expanduser(t.resume)):
            raise ConfigError(f"trainer.resume={t.resume!r}: no such checkpoint file or run dir "
                              f"(use auto, never, or a path).")
    par = cfg.parallel
    copies = model_copies(par.kind, par.get("tp_size"), world_size) if world_size > 1 else 1
    replicas = max(world_size // copies, 1)
    per_step = replicas * t.grad_accum
    if t.batch_size % per_step:
        what = "world size" if copies == 1 else f"data-parallel replicas (world size / {copies} ranks per replica)"
        raise ConfigError(f"trainer.batch_size={t.batch_size} (global) must be divisible by "
                          f"{what} x trainer.grad_accum = {replicas} x {t.grad_accum}.")
    _positive(o.lr, "optim.lr")
    _positive(o.weight_decay, "optim.weight_decay", zero_ok=True)
    if len(o.betas) != 2 or not all(0 <= b < 1 for b in o.betas):
        raise ConfigError(f"optim.betas={list(o.betas)} must be two numbers in [0, 1).")
    if cfg.schedule.warmup_steps is not None:
        _positive(cfg.schedule.warmup_steps, "schedule.warmup_steps", zero_ok=True)
    if getattr(cfg.schedule, "warmup_fraction", None) is not None and not 0 <= cfg.schedule.warmup_fraction <= 1:
        raise ConfigError(f"schedule.warmup_fraction={cfg.schedule.warmup_fraction} is out of range; it must be "
                          f"in [0, 1] (the share of trainer.max_steps spent warming up).")
    _fraction(cfg.schedule.min_lr_ratio, "schedule.min_lr_ratio", lo_open=False)
    if cfg.parallel.kind != "single" and not launched:
        raise ConfigError(f"parallel={cfg.parallel.kind} needs a torchrun launch, e.g. "
                          f"torchrun --nproc_per_node=N -m trainer parallel={cfg.parallel.kind}.")
    if cfg.parallel.kind in SHARDED and cfg.quantize.method == "qat_int8":
        raise ConfigError(f"quantize=qat_int8 cannot be combined with parallel={cfg.parallel.kind}; use parallel=ddp.")
    if t.async_checkpoint and cfg.parallel.kind not in SHARDED:
        raise ConfigError(f"trainer.async_checkpoint=true needs sharded checkpoints (parallel={'|'.join(SHARDED)}), "
                          f"but parallel={cfg.parallel.kind}; set trainer.async_checkpoint=false or use parallel=fsdp.")
    _choice(t.activation_checkpointing, AC_MODES, "trainer.activation_checkpointing")
    _positive(t.ac_every, "trainer.ac_every")




def _validate_model_parallel(cfg: DictConfig | Config, objective: str, world_size: int) -> None:
    """parallel=tp | fsdp_tp | pp: what a model split across ranks needs (sizes that divide, and
    the objectives and transforms built for it)."""
    par, m, kind = cfg.parallel, cfg.model, cfg.parallel.kind
    if kind not in MODEL_PARALLEL:
        return
    _choice(par.pp_schedule, PP_SCHEDULES, "parallel.pp_schedule")
    if par.tp_size is not None:
        _positive(par.tp_size, "parallel.tp_size")
    if objective == "contrastive":
        raise ConfigError(f"objective=contrastive cannot be combined with parallel={kind} (its in-batch negatives "
                          f"are gathered over every rank); use parallel=ddp|fsdp.")
    if str(cfg.trainer.compile).lower() == "true":
        raise ConfigError(f"trainer.compile=true is not supported with parallel={kind}; use trainer.compile=false "
                          f"(or auto, which stays eager there).")
    if kind == "tp" and par.tp_size not in (None, world_size):
        raise ConfigError(f"parallel=tp splits the model over every rank (world size {world_size}), but "
                          f"parallel.tp_size={par.tp_size}; for TP groups inside a larger job use parallel=fsdp_tp "
                          f"parallel.tp_size={par.tp_size}.")
    copies = model_copies(kind, par.tp_size, world_size)
    if world_size % copies:
        raise ConfigError(f"parallel.tp_size={copies} must divide the world size {world_size} (parallel=fsdp_tp "
                          f"lays the ranks out as world / tp_size FSDP rows of tp_size TP ranks).")
    if kind == "pp":
        if m.arch != "decoder" or objective != "clm":
            raise ConfigError(f"parallel=pp trains model=decoder with objective=clm; got model={m.arch} "
                              f"objective={objective} (use parallel=ddp|fsdp|tp for it).")
        if m.num_layers < world_size:
            raise ConfigError(f"parallel=pp puts at least one block on each of the {world_size} ranks, but "
                              f"model.num_layers={m.num_layers}; use more layers or fewer processes.")
        if par.pp_schedule == "1f1b" and cfg.trainer.grad_accum < world_size:
            raise ConfigError(f"parallel.pp_schedule=1f1b needs trainer.grad_accum (the micro-batches) >= the "
                              f"{world_size} pipeline stages; got {cfg.trainer.grad_accum}.")
        return
    kv = m.num_kv_heads if m.num_kv_heads is not None else m.num_heads
    tp = copies if kind == "fsdp_tp" else world_size
    for key, value in (("model.num_heads", m.num_heads), ("model.num_kv_heads", kv), ("model.d_ff", m.d_ff)):
        if value % tp:
            raise ConfigError(f"{key}={value} must be divisible by the {tp} tensor-parallel ranks of parallel={kind} "
                              f"(each rank computes {key.split('.')[1]} / {tp} of it).")


def _validate_recipe(cfg: DictConfig | Config, objective: str) -> None:
    """optim=muon, schedule=wsd, objective.z_loss, model.logit_softcap, data.random_offsets."""
    o, sch = cfg.optim, cfg.schedule
    if o.name == "muon":
        _positive(o.muon_lr, "optim.muon_lr")
        _fraction(o.muon_momentum, "optim.muon_momentum", lo_open=False)
        _positive(o.muon_weight_decay, "optim.muon_weight_decay", zero_ok=True)
        _positive(o.muon_ns_steps, "optim.muon_ns_steps")
        _choice(o.muon_adjust_lr, MUON_ADJUST_LR, "optim.muon_adjust_lr")
        if cfg.parallel.kind in ("fsdp", "tp", "fsdp_tp"):
            raise ConfigError(f"optim=muon cannot be combined with parallel={cfg.parallel.kind} (Muon orthogonalizes "
                              f"whole weight matrices, which are sharded across ranks there); use "
                              f"parallel=ddp|single|pp or optim=adamw.")
    if sch.name == "wsd":
        if not 0 < sch.decay_fraction <= 1:
            raise ConfigError(f"schedule.decay_fraction={sch.decay_fraction} is out of range; it must be in (0, 1] "
                              f"(the share of trainer.max_steps spent decaying).")
        _choice(sch.decay_shape, DECAY_SHAPES, "schedule.decay_shape")
    z = cfg.objective.z_loss
    _positive(z, "objective.z_loss", zero_ok=True)
    if z > 0 and objective == "contrastive":
        raise ConfigError(f"objective.z_loss={z} regularizes a language model's softmax over the vocabulary; "
                          f"objective=contrastive has none, so set objective.z_loss=0.")
    cap = cfg.model.logit_softcap
    if cap is not None:
        _positive(cap, "model.logit_softcap")
    if cfg.data.random_offsets is True and (cfg.data.streaming or cfg.data.source == "pairs"):
        what = "data.streaming=true" if cfg.data.streaming else "data=pairs"
        raise ConfigError(f"data.random_offsets=true cuts windows from the token store, which {what} does not "
                          f"read; set data.random_offsets=false.")
