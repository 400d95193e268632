"""run(cfg): the build order, top to bottom. Tests call it directly; the CLI wraps it."""
from __future__ import annotations

import contextlib
import os
import random
import signal
import sys
import threading
import time
from typing import Iterator

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from models.build import build_model, num_params
from trainer import checkpoint as ckpt
from trainer.config import ConfigError, resolve_objective, to_container, validate
from trainer.contrastive import apply_learned_temperature
from trainer.init_from import apply_init_from
from trainer.data import VOCAB_SIZE, BatchStream, blocks_of, corpus_tokenizer, load_corpus, model_vocab_size
from trainer.compile import apply_compile, reset_compile
from trainer.distributed import Dist, apply_parallel, init_distributed, teardown, unwrap
from trainer.flops import peak_flops, train_flops_per_token
from trainer.loop import Loop, TrainState, fit
from trainer.metrics import Logger, peak_memory_mb, reset_peak_memory, write_summary
from trainer.objectives import build_objective
from trainer.optim import build_optimizer, build_scheduler
from trainer.precision import build_scaler
from trainer.quantize import apply_qat, finalize_qat, post_training_report


def hydra_run_dir() -> str:
    """The Hydra job's output directory (run dir or sweep subdir)."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        raise ConfigError("run(cfg) needs run_dir=... when called outside a Hydra job.")
    return HydraConfig.get().runtime.output_dir


def resolve_device(kind: str, d: Dist) -> torch.device:
    if kind == "cuda" or (kind == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise ConfigError("trainer.device=cuda but no CUDA device is available; use trainer.device=cpu or auto.")
        torch.cuda.set_device(d.local_rank)
        return torch.device("cuda", d.local_rank)
    return torch.device("cpu")


@contextlib.contextmanager
def _process_scope(threads: int | None) -> Iterator[list[int]]:
    """Per-run global state, set on entry and undone on exit (a multirun shares one process):
    thread count and SIGTERM/SIGINT handlers that ask the loop to stop after its step."""
    old_threads = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    received: list[int] = []
    handlers = {}
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGINT):
            handlers[sig] = signal.signal(sig, lambda signum, frame: received.append(signum))
    try:
        yield received
    finally:
        for sig, h in handlers.items():
            signal.signal(sig, h)
        torch.set_num_threads(old_threads)


def _seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _structure(cfg: DictConfig) -> dict:
    """What a checkpoint's tensors depend on (checked on resume, for a one-sentence mismatch error)."""
    m = cfg.model
    out = {f"model.{k}": v for k, v in to_container(m).items() if k not in ("dropout", "attn_dropout")}
    out.update({"position": cfg.position.kind, "norm": cfg.norm.kind, "norm.placement": cfg.norm.placement,
                "quantize": cfg.quantize.method if cfg.quantize.method == "qat_int8" else "none"})
    if cfg.position.kind == "learned":
        out["data.seq_len"] = cfg.data.seq_len
    return out


def components(cfg: DictConfig) -> dict:
    return {"model": cfg.model.arch, "attention": cfg.attention.kind, "position": cfg.position.kind,
            "norm": cfg.norm.kind, "norm.placement": cfg.norm.placement,
            "objective": resolve_objective(cfg.model.arch, cfg.objective.kind), "data": cfg.data.source,
            "precision": cfg.precision.dtype, "parallel": cfg.parallel.kind, "quantize": cfg.quantize.method,
            "optim": cfg.optim.name, "schedule": cfg.schedule.name, "compile": cfg.trainer.compile}


def run(cfg: DictConfig, run_dir: str | None = None) -> dict:
    """Train (or resume) one run described by `cfg`; returns the summary dict.

    Build order: distributed + seeds -> data -> model -> QAT -> compile + parallel -> optimizer,
    schedule, scaler -> resume -> fit -> final checkpoint, weights, post-training quantization
    -> summary.json. Raises ConfigError (bad input), NonFiniteLoss or StopRequested.
    """
    run_dir = os.path.abspath(run_dir or hydra_run_dir())
    d = init_distributed("cuda" if cfg.trainer.device != "cpu" and torch.cuda.is_available() else "cpu",
                         cfg.parallel.timeout_s)
    try:
        validate(cfg, d.world_size, d.launched)
        with _process_scope(cfg.trainer.threads) as received:
            return _run(cfg, run_dir, d, received)
    finally:
        if cfg.trainer.compile:
            reset_compile()  # a multirun's next job starts without this run's graphs and guards
        teardown(d)


def _run(cfg: DictConfig, run_dir: str, d: Dist, received: list[int]) -> dict:
    t_start = time.perf_counter()
    device = resolve_device(cfg.trainer.device, d)
    reset_peak_memory(device)  # this run's own peak, not the process's (a multirun shares it)
    ckpt_dir = os.path.join(run_dir, "checkpoints")
    resume_path = ckpt.find_resume(cfg.trainer.resume, ckpt_dir)
    meta = {"structure": _structure(cfg), "config": to_container(cfg)}
    payload = ckpt.read_checkpoint(resume_path, meta) if resume_path else None
    corpus = _load_corpus(cfg, d)
    tokenizer = corpus_tokenizer(corpus)
    meta["structure"]["tokenizer"] = tokenizer.ident  # a resume with another tokenizer is refused
    if payload is not None:
        ckpt.check_structure(payload, resume_path, {"tokenizer": tokenizer.ident}, {"tokenizer": "byte"})
    if d.is_main and tokenizer.kind != "byte":
        tokenizer.save(os.path.join(run_dir, "tokenizer.json"))
    _seed_all(cfg.seed)  # identical init on every rank (FSDP shards each rank's local copy)
    model, n_params = build_wrapped_model(cfg, device, d, vocab_size=model_vocab_size(tokenizer))
    optimizer = build_optimizer(model, cfg.optim, device)
    scheduler = build_scheduler(optimizer, cfg.schedule, cfg.trainer.max_steps)
    scaler = build_scaler(cfg.precision.dtype, device, cfg.precision.init_scale)
    gen = torch.Generator().manual_seed(cfg.seed)  # objective masks: same stream on every rank
    _seed_all(cfg.seed + 1 + d.rank)  # dropout differs per rank, reproducibly

    sharded = cfg.parallel.kind == "fsdp"
    state = TrainState()
    payload_max_steps = None
    if payload is not None:
        payload_max_steps = payload.get("meta", {}).get("config", {}).get("trainer", {}).get("max_steps")
        state = TrainState(**ckpt.restore(payload, resume_path, model=model, optimizer=optimizer,
                                          scheduler=scheduler, scaler=scaler, gen=gen, d=d, sharded=sharded))
        del payload
    objective = build_objective(resolve_objective(cfg.model.arch, cfg.objective.kind), cfg.objective, tokenizer)
    fpt = train_flops_per_token(cfg.model, cfg.data.seq_len, model_vocab_size(tokenizer))
    # The machine's peak (a GEMM probe, cached per machine) is taken now, in setup, so neither the
    # first logged window's throughput nor the training time pays for it.
    peak = peak_flops(device, cfg.precision.dtype) * d.world_size
    logger = Logger(run_dir, d.is_main, cfg.trainer.max_steps, state.step, cfg.trainer.progress)
    if d.is_main:
        _announce(logger, cfg, run_dir, resume_path, state.step, n_params, corpus, device, d)
        if payload_max_steps is not None and payload_max_steps != cfg.trainer.max_steps:
            logger.message(f"note: trainer.max_steps changed from {payload_max_steps} (the checkpoint's) to "
                           f"{cfg.trainer.max_steps}; the {cfg.schedule.name} schedule now ends at step "
                           f"{cfg.trainer.max_steps}, from step {state.step} on.")

    def save(step: int) -> None:
        ckpt.save_checkpoint(ckpt_dir, step, model=model, optimizer=optimizer, scheduler=scheduler,
                             scaler=scaler, gen=gen, train_state=vars(state) | {"last": dict(state.last)},
                             meta=meta, keep=cfg.trainer.keep_checkpoints, d=d, sharded=sharded)

    lp = Loop(model=model, optimizer=optimizer, scheduler=scheduler, scaler=scaler, objective=objective,
              stream=_batch_stream(cfg, corpus, d), val_blocks=blocks_of(corpus, "val"),
              gen=gen, device=device, precision=cfg.precision.dtype, dist=d, logger=logger, cfg=cfg.trainer,
              flops_per_token=fpt, save=save,
              mfu=lambda tps: tps * fpt / peak if peak > 0 else 0.0,
              stop_signal=lambda: received[0] if received else 0,
              retrieval=_retrieval_set(cfg, objective, corpus))
    if d.is_main and lp.retrieval is not None and state.step == 0:
        _bm25(lp.retrieval, logger, state)
    start_step = state.step
    t_fit = time.perf_counter()
    try:
        state = fit(lp, state)
        if state.step > start_step or not ckpt.list_checkpoints(ckpt_dir):
            save(state.step)
    finally:
        logger.close()
    complete = state.step >= cfg.trainer.max_steps
    if not complete and d.is_main:
        logger.message(f"paused at step {state.step} of {cfg.trainer.max_steps} after trainer.steps_per_run="
                       f"{cfg.trainer.steps_per_run} steps; checkpoint saved, run the same command again to "
                       f"continue.")
    summary = {"components": components(cfg), "parameters": n_params, "steps": state.step,
               "complete": complete, "tokens": state.tokens, "skipped_steps": state.skipped_steps,
               "flops_per_token": fpt, "peak_flops": peak, "world_size": d.world_size, "device": str(device),
               "run_dir": run_dir, "setup_time_s": t_fit - t_start, "train_time_s": time.perf_counter() - t_fit,
               **state.last}
    return _finish(cfg, summary, model, objective, corpus, device, d, t_start, lp.retrieval)


def _retrieval_set(cfg: DictConfig, objective, corpus):
    """What a contrastive run's evaluation searches: the held-out pairs (data=pairs), or else the
    two halves of each block of the held-out sample (first half -> its second half)."""
    if objective.name != "contrastive":
        return None
    if hasattr(corpus, "retrieval"):
        return corpus.retrieval
    from trainer.heldout import eval_indices
    from trainer.loop import EVAL_SEED
    from trainer.pair_data import RetrievalSet

    val = blocks_of(corpus, "val")
    blocks = val[eval_indices(len(val), cfg.trainer.batch_size, cfg.trainer.eval_batches)]
    batch = objective.prepare(blocks, torch.Generator().manual_seed(EVAL_SEED))
    return RetrievalSet(queries=batch["a"], documents=batch["b"], positives=torch.arange(len(blocks)),
                        query_texts=[], document_texts=[])


def _bm25(retrieval, logger: Logger, state: TrainState) -> None:
    """The lexical baseline on the same held-out search (once per run; data=pairs only)."""
    if not retrieval.query_texts:
        return
    import logging

    from trainer.retrieval import bm25_baseline

    import bm25s  # noqa: F401  (imported first: it sets its own logger to DEBUG on import)

    logging.getLogger("bm25s").setLevel(logging.WARNING)  # its index build would print at DEBUG

    out = bm25_baseline(retrieval.query_texts, retrieval.document_texts, retrieval.positives)
    metrics = {f"bm25/{k}": v for k, v in out.items() if k in ("recall@1", "recall@10", "mrr@10", "ndcg@10")}
    state.last.update(metrics)
    logger.scalars(metrics, 0)
    logger.message(f"BM25 baseline on the {len(retrieval.query_texts)} held-out queries x "
                   f"{len(retrieval.document_texts)} documents (the text the encoder sees): " + "  ".join(f"{k[5:]} {v:.3f}" for k, v in metrics.items()))


def _load_corpus(cfg: DictConfig, d: Dist):
    if not d.is_main and d.world_size > 1:
        torch.distributed.barrier()  # rank 0 builds the on-disk corpus cache first
    say = (lambda m: print(m, file=sys.stderr, flush=True)) if d.is_main else (lambda m: None)
    if cfg.data.source == "pairs":
        from trainer.pair_data import load_pair_corpus, pair_tokenizer

        corpus = load_pair_corpus(cfg.data, cfg.seed, pair_tokenizer(cfg.tokenizer, say))
    else:
        if cfg.data.streaming:
            from trainer.data.streaming import load_stream_corpus

            corpus = load_stream_corpus(cfg.data, cfg.seed, cfg.tokenizer,
                                        cfg.trainer.batch_size * cfg.trainer.eval_batches, say=say)
        else:
            corpus = load_corpus(cfg.data, cfg.seed, cfg.tokenizer, say=say)
    if d.is_main and d.world_size > 1:
        torch.distributed.barrier()
    return corpus


def _batch_stream(cfg: DictConfig, corpus, d: Dist):
    """Training batches by step: from the memory-mapped store, or (data.streaming) from `datasets`."""
    if cfg.data.streaming:
        from trainer.data.streaming import StreamingBatches

        return StreamingBatches(cfg.data, cfg.seed, corpus.tokenizer, cfg.trainer.batch_size, d, corpus.skip_docs)
    return BatchStream(blocks_of(corpus, "train"), cfg.trainer.batch_size, cfg.seed)


def build_wrapped_model(cfg: DictConfig, device: torch.device, d: Dist,
                        vocab_size: int = VOCAB_SIZE) -> tuple[torch.nn.Module, int]:
    """Build the model and apply the transforms in order: QAT, device, compile, parallel.

    Returns the wrapped model and its parameter count (benchmarks reuse this with their vocab).
    """
    model = build_model(cfg.model, cfg.attention, cfg.position, cfg.norm, vocab_size=vocab_size,
                        max_len=cfg.data.seq_len)
    if resolve_objective(cfg.model.arch, cfg.objective.kind) == "contrastive" and cfg.objective.learn_temperature:
        apply_learned_temperature(model, cfg.objective.temperature)
    model = apply_init_from(model, cfg.model.init_from)
    n_params = num_params(model)
    model = apply_qat(model, cfg.quantize)
    model.to(device)
    model = apply_compile(model, cfg.trainer.compile)  # regional: each block, in place
    return apply_parallel(model, cfg.parallel.kind, device, d), n_params


def _announce(logger: Logger, cfg: DictConfig, run_dir: str, resume_path: str | None, step: int,
              n_params: int, corpus, device: torch.device, d: Dist) -> None:
    """Config text + HParams to TensorBoard, and one line saying what this run is."""
    hp = {k: (v if isinstance(v, (int, float, str, bool)) else str(v)) for k, v in components(cfg).items()}
    hp.update({f"model.{k}": v for k, v in to_container(cfg.model).items() if v is not None})
    hp.update({"optim.lr": cfg.optim.lr, "trainer.batch_size": cfg.trainer.batch_size, "seed": cfg.seed})
    logger.config(OmegaConf.to_yaml(cfg, resolve=True), hp, step)
    where = f"resuming from {resume_path} at step {step}" if resume_path else "starting"
    logger.message(f"run dir {run_dir}: {where}; {n_params / 1e6:.2f}M parameters, "
                   f"{_train_size(cfg, corpus)} train / {len(blocks_of(corpus, 'val'))} val blocks of "
                   f"{cfg.data.seq_len} tokens ({corpus_tokenizer(corpus).kind} tokenizer), "
                   f"device {device}, {d.world_size} process(es)")


def _train_size(cfg: DictConfig, corpus) -> str:
    return "streamed" if cfg.data.streaming else str(len(blocks_of(corpus, "train")))


def _finish(cfg: DictConfig, summary: dict, model: torch.nn.Module, objective, corpus, device: torch.device,
            d: Dist, t_start: float, retrieval=None) -> dict:
    """Final weights (model.pt), post-training quantization (judged by retrieval too when the run
    has a held-out search), summary.json."""
    sharded = cfg.parallel.kind == "fsdp"
    weights = _final_weights(model, sharded)
    if cfg.quantize.method == "qat_int8":
        weights = finalize_qat(unwrap(model), weights)
    summary.update(wall_time_s=time.perf_counter() - t_start, peak_memory_mb=peak_memory_mb(device),
                   tokens_per_sec=summary.get("train/tokens_per_sec", 0.0), mfu=summary.get("train/mfu", 0.0))
    if d.is_main:
        run_dir = summary["run_dir"]
        torch.save(weights, os.path.join(run_dir, "model.pt"))
        from trainer.load import save_weights  # model.safetensors: the shareable copy, config in its header

        save_weights(weights, os.path.join(run_dir, "model.safetensors"), to_container(cfg))
        if cfg.quantize.method != "none":
            summary["quantize"] = post_training_report(cfg, unwrap(model) if not sharded else None, weights,
                                                       blocks_of(corpus, "val"), objective, device, run_dir,
                                                       retrieval=retrieval)
        write_summary(os.path.join(run_dir, "summary.json"), summary)
    return summary


def _final_weights(model: torch.nn.Module, sharded: bool) -> dict:
    if sharded:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return {k: v.detach().cpu() for k, v in unwrap(model).state_dict().items()}
