"""run(cfg): build what a run needs, in the build order, then fit and finish. Tests call it
directly; `python -m trainer` wraps it."""
from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, replace

import torch
from omegaconf import DictConfig, OmegaConf

from models.build import num_params
from models.ops.backend import attention_backend
from trainer.config.schema import to_container
from trainer.config.validate import validate
from trainer.data import corpus_tokenizer, blocks_of, model_vocab_size
from trainer.data.loading import build_batch_stream, load_run_corpus
from trainer.data.tokenizer import VOCAB_SIZE
from trainer.distributed import Dist, init_distributed, resolve_device, teardown
from trainer.errors import ConfigError, StopRequested
from trainer.evaluation.heldout import HeldOutLoss
from trainer.evaluation.retrieval import RetrievalSearch, build_retrieval_set
from trainer.flops import datasheet_peak, peak_flops, train_flops_per_token
from trainer.loop import Loop, TrainState, evaluate, fit
from trainer.metrics import Logger, reset_peak_memory
from trainer.objectives import build_objective, resolve_objective
from trainer.optim import build_optimizer, build_scheduler, warmup_steps
from trainer.precision import DTYPES, build_scaler
from trainer.pretrained import apply_pretrained_config
from trainer.runs import checkpoints as ckpt
from trainer.runs.init_from import apply_init_from
from trainer.runs.model import build_run_model
from trainer.runs.process import process_scope, seed_all
from trainer.runs.resume import check_line, check_resume_config, set_aside
from trainer.runs.summary import announce, components, finish
from trainer.transforms import apply_transforms
from trainer.transforms.compile import reset_compile
from trainer.transforms.parallel import SHARDED, model_copies

__all__ = ["run", "build", "build_wrapped_model", "place", "components", "hydra_run_dir"]


def hydra_run_dir() -> str:
    """The Hydra job's output directory (run dir or sweep subdir)."""
    from hydra.core.hydra_config import HydraConfig  # only inside a Hydra job

    if not HydraConfig.initialized():
        raise ConfigError("run(cfg) needs run_dir=... when called outside a Hydra job.")
    return HydraConfig.get().runtime.output_dir


def run(cfg: DictConfig, run_dir: str | None = None) -> dict:
    """Train (or resume) one run described by `cfg`; returns the summary dict.

    Build order (`build`): distributed + seeds -> data -> model -> transforms (QAT, compile,
    parallel) -> optimizer, schedule, scaler -> resume -> then `fit` -> final checkpoint, weights,
    post-training quantization -> summary.json. Raises ConfigError (bad input), NonFiniteLoss or
    StopRequested.
    """
    run_dir = os.path.abspath(run_dir or hydra_run_dir())
    d = init_distributed("cuda" if cfg.trainer.device != "cpu" and torch.cuda.is_available() else "cpu",
                         cfg.parallel.timeout_s)
    try:
        cfg = _with_pretrained(cfg, run_dir, d)
        validate(cfg, d.world_size, d.launched)
        with process_scope(cfg.trainer.threads) as received:
            return _build_and_train(cfg, run_dir, d, received)
    finally:
        if str(cfg.trainer.compile).lower() != "false":
            reset_compile()  # a multirun's next job starts without this run's graphs and guards
        teardown(d)


def _build_and_train(cfg: DictConfig, run_dir: str, d: Dist, received: list[int]) -> dict:
    """`build` then `train`, in a frame of its own: the model (a DDP reducer holds the process group)
    is released when this returns, before `run` tears the process group down; destroying the group
    while a DDP model still holds it can hang gloo's destructor at exit."""
    t_start = time.perf_counter()
    r = build(cfg, run_dir, d, received)
    summary = train(r, t_start)
    if d.world_size > 1:
        # Every rank is done (rank 0 wrote the final files): no rank tears the group down while
        # another may still be sending to it (gloo aborts a process whose peer vanished mid-send).
        torch.distributed.barrier()
    return summary


def _with_pretrained(cfg: DictConfig, run_dir: str, d: Dist) -> DictConfig:
    """`cfg` with a pretrained `model.init_from` folder's architecture, tokenizer and pooling written
    in (`trainer.pretrained.apply_pretrained_config`); the run dir's `.hydra/config.yaml`, which Hydra
    wrote before the job started, is rewritten to match, so the saved config is what runs."""
    applied = apply_pretrained_config(cfg)
    hydra_yaml = os.path.join(run_dir, ".hydra", "config.yaml")
    if applied is not cfg and d.is_main and os.path.isfile(hydra_yaml):
        tmp = hydra_yaml + ".tmp"
        OmegaConf.save(applied, tmp)
        os.replace(tmp, hydra_yaml)
    return applied


@dataclass
class Run:
    """Everything a run needs, built by `build`."""

    cfg: DictConfig
    run_dir: str
    loop: Loop
    state: TrainState
    corpus: object
    n_params: int
    flops_per_token: float
    peak_flops: float
    ckpt_dir: str
    already_complete: bool = False  # resumed from a checkpoint at trainer.max_steps: nothing to do


def _finished_summary(r: Run) -> dict:
    """The summary.json of a run that was already complete, marked so the caller can say so."""
    path = os.path.join(r.run_dir, "summary.json")
    summary = {}
    if os.path.isfile(path):
        with open(path) as f:
            summary = json.load(f)
    summary.update(run_dir=r.run_dir, steps=r.state.step, complete=True, already_complete=True)
    return summary


def build_wrapped_model(cfg: DictConfig, device: torch.device, d: Dist,
                        vocab_size: int = VOCAB_SIZE, num_tokens: int | None = None) -> tuple[torch.nn.Module, int]:
    """The run's model with `model.init_from` applied and every transform (`apply_transforms`).

    Returns the wrapped model and its parameter count (benchmarks reuse this with their vocab).
    """
    model = apply_init_from(build_run_model(cfg, vocab_size, num_tokens=num_tokens), cfg.model.init_from)
    n_params = num_params(model)
    return apply_transforms(model, cfg, device, d), n_params


def check_resume(cfg: DictConfig, ckpt_dir: str, resume_path: str | None,
                 payload: dict | None) -> tuple[list[tuple[str, object, object]], list[str]]:
    """Refuse a resume that would mix two lines of training in one run dir or change what the
    checkpoint trained (`trainer.runs.resume`). Returns (the honoured changes to log, the newer
    checkpoints of this run dir that an older resume point supersedes)."""
    if resume_path is None:
        return [], []
    superseded = check_line(resume_path, ckpt_dir, ckpt.list_checkpoints(ckpt_dir))
    saved = (payload or {}).get("meta", {}).get("config")
    return (check_resume_config(saved, to_container(cfg), resume_path) if saved else []), superseded


def place(cfg: DictConfig, d: Dist) -> Dist:
    """`d` with `copies` set for `cfg.parallel`: under tensor / pipeline parallelism the ranks of one
    model replica share the rows of every batch (`Dist.dp_rank`, `Dist.dp_size`, `Dist.counts`)."""
    return replace(d, copies=model_copies(cfg.parallel.kind, cfg.parallel.get("tp_size"), d.world_size))


def build(cfg: DictConfig, run_dir: str, d: Dist, received: list[int] | None = None) -> Run:
    """Build a run in order: device, resume checkpoint, corpus and tokenizer, model (seeded the same
    on every rank), optimizer, schedule, scaler, restored state, objective, evaluators, logger."""
    received = received if received is not None else []
    d = place(cfg, d)
    device = resolve_device(cfg.trainer.device, d.local_rank)
    reset_peak_memory(device)  # this run's own peak, not the process's (a multirun shares it)
    ckpt_dir = os.path.join(run_dir, "checkpoints")
    resume_path = ckpt.find_resume(cfg.trainer.resume, ckpt_dir)
    meta = {"structure": ckpt.structure(cfg), "config": to_container(cfg)}
    payload = ckpt.read_checkpoint(resume_path, meta) if resume_path else None
    honoured, superseded = check_resume(cfg, ckpt_dir, resume_path, payload)
    if d.world_size > 1:
        torch.distributed.barrier()  # every rank has read the checkpoint list before rank 0 moves any
    aside = set_aside(superseded, ckpt_dir, payload["step"]) if d.is_main and superseded else None
    corpus = load_run_corpus(cfg, d)
    tokenizer = corpus_tokenizer(corpus)
    meta["structure"]["tokenizer"] = tokenizer.ident  # a resume with another tokenizer is refused
    if payload is not None:
        ckpt.check_structure(payload, resume_path, {"tokenizer": tokenizer.ident}, {"tokenizer": "byte"})
    if d.is_main and tokenizer.kind != "byte":
        tokenizer.save(os.path.join(run_dir, "tokenizer.json"))
    seed_all(cfg.seed)  # identical init on every rank (FSDP shards each rank's local copy)
    vocab = model_vocab_size(tokenizer)
    model, n_params = build_wrapped_model(cfg, device, d, vocab, num_tokens=tokenizer.vocab_size)
    optimizer = build_optimizer(model, cfg.optim, device)
    scheduler = build_scheduler(optimizer, cfg.schedule, cfg.trainer.max_steps)
    scaler = build_scaler(cfg.precision.dtype, device, cfg.precision.init_scale)
    gen = torch.Generator().manual_seed(cfg.seed)  # objective masks: same stream on every rank
    # Dropout differs per data-parallel rank, reproducibly; the ranks of one tensor-parallel replica
    # draw the same masks (their activations are replicated).
    seed_all(cfg.seed + 1 + d.dp_rank)

    sharded = cfg.parallel.kind in SHARDED
    state = TrainState()
    saved_max_steps = None
    if payload is not None:
        saved_max_steps = payload.get("meta", {}).get("config", {}).get("trainer", {}).get("max_steps")
        state = TrainState(**ckpt.restore(payload, resume_path, model=model, optimizer=optimizer,
                                          scheduler=scheduler, scaler=scaler, gen=gen, d=d, sharded=sharded))
        del payload
    objective = build_objective(resolve_objective(cfg.model.arch, cfg.objective.kind), cfg.objective, tokenizer)
    if objective.name == "contrastive":
        objective.mini_batches = cfg.trainer.grad_accum  # GradCache pieces per rank
    val_blocks = blocks_of(corpus, "val")
    evaluators: list = [HeldOutLoss(objective, val_blocks, cfg.trainer.eval_batches)]
    if objective.name == "contrastive":
        search = build_retrieval_set(corpus, objective, val_blocks, cfg.trainer.batch_size, cfg.trainer.eval_batches)
        evaluators.append(RetrievalSearch(search, objective.pad_id, objective.pooling))
    fpt = train_flops_per_token(cfg.model, cfg.data.seq_len, vocab)
    # The machine's peak (a GEMM probe, cached per machine) is taken now, in setup, so neither the
    # first logged window's throughput nor the training time pays for it.
    peak = peak_flops(device, cfg.precision.dtype, cfg.data.cache_dir) * d.world_size
    # A run whose final checkpoint and summary.json exist has nothing left to do (killed before its
    # summary: it is finished below from the checkpoint's metrics instead).
    already_complete = (resume_path is not None and state.step >= cfg.trainer.max_steps
                        and os.path.isfile(os.path.join(run_dir, "summary.json")))
    # No new event file (or config text) for a run that has nothing left to do.
    logger = Logger(run_dir, d.is_main and not already_complete, cfg.trainer.max_steps, state.step,
                    cfg.trainer.progress)
    if d.is_main and not already_complete:
        announce(logger, cfg, run_dir, resume_path, state.step, n_params, corpus, device, d)
        if saved_max_steps is not None and saved_max_steps != cfg.trainer.max_steps:
            logger.message(f"note: trainer.max_steps changed from {saved_max_steps} (the checkpoint's) to "
                           f"{cfg.trainer.max_steps}; the {cfg.schedule.name} schedule now ends at step "
                           f"{cfg.trainer.max_steps}, from step {state.step} on.")
        warm = warmup_steps(cfg.schedule, cfg.trainer.max_steps)
        if cfg.trainer.max_steps and warm >= cfg.trainer.max_steps:
            logger.message(f"note: the warmup ({warm} steps) covers the whole run of {cfg.trainer.max_steps} steps, "
                           f"so it ends at the peak lr; set schedule.warmup_fraction (e.g. 0.1) or a smaller "
                           f"schedule.warmup_steps to compare runs after warmup.")
        if aside:
            logger.message(f"note: resuming from step {state.step} starts a new line of training here; the "
                           f"{len(superseded)} newer checkpoint(s) of the old line were moved to {aside}.")
        others = [(k, s, v) for k, s, v in honoured if k != "trainer.max_steps"]
        if others:
            logger.message("note: resuming with " + ", ".join(f"{k}={v!r} (the checkpoint's: {s!r})"
                                                             for k, s, v in others) + ".")

    def save(step: int) -> None:
        ckpt.save_checkpoint(ckpt_dir, step, model=model, optimizer=optimizer, scheduler=scheduler,
                             scaler=scaler, gen=gen, train_state=vars(state) | {"last": dict(state.last)},
                             meta=meta, keep=cfg.trainer.keep_checkpoints, d=d, sharded=sharded,
                             async_save=cfg.trainer.async_checkpoint)

    loop = Loop(model=model, optimizer=optimizer, scheduler=scheduler, scaler=scaler, objective=objective,
                stream=build_batch_stream(cfg, corpus, d), evaluators=evaluators, gen=gen, device=device,
                precision=cfg.precision.dtype, dist=d, logger=logger, cfg=cfg.trainer,
                mfu=lambda tps: tps * fpt / peak if peak > 0 else 0.0, save=save,
                stop_signal=lambda: received[0] if received else 0)
    return Run(cfg=cfg, run_dir=run_dir, loop=loop, state=state, corpus=corpus, n_params=n_params,
               flops_per_token=fpt, peak_flops=peak, ckpt_dir=ckpt_dir, already_complete=already_complete)


def _hardware_facts(cfg: DictConfig, device: torch.device, summary: dict, world_size: int) -> dict:
    """Which attention implementation ran, and MFU against the datasheet peak where one is known
    (beside `mfu`, against the measured peak)."""
    m = cfg.model
    heads = m.num_heads
    head_dim = m.head_dim or m.d_model // heads
    dtype = DTYPES[cfg.precision.dtype]
    out = {"attention_backend": attention_backend(cfg.attention.kind, device, dtype, cfg.data.seq_len, heads,
                                                  head_dim, causal=m.arch != "encoder", dropout=m.attn_dropout)}
    sheet = datasheet_peak(device, cfg.precision.dtype)
    out["peak_flops_datasheet"] = sheet * world_size if sheet else None
    if sheet:
        out["mfu_datasheet"] = summary.get("train/tokens_per_sec", 0.0) * summary["flops_per_token"] / (sheet * world_size)
    return out


def train(r: Run, t_start: float) -> dict:
    """Fit a built run to `trainer.max_steps` (or `steps_per_run` more), save, and finish."""
    cfg, lp, d, state = r.cfg, r.loop, r.loop.dist, r.state
    if r.already_complete:  # a finished run run again: nothing to train, nothing rewritten
        lp.logger.close()
        return _finished_summary(r)
    if d.is_main and state.step == 0:
        for ev in lp.evaluators:  # reference numbers (BM25) once per run, at step 0
            baseline = ev.baseline()
            if baseline:
                state.last.update(baseline)
                lp.logger.scalars(baseline, 0)
                lp.logger.message(ev.describe_baseline(baseline))
    start_step = state.step
    t_fit = time.perf_counter()
    try:
        if cfg.trainer.max_steps == 0:  # the starting weights, evaluated (and reported) untrained
            metrics = evaluate(lp)
            if metrics is None:
                raise StopRequested(lp.stop_signal() or 15, 0)
            state.last.update(metrics, eval_step=0)
            lp.logger.scalars(metrics, 0)
        else:
            state = fit(lp, state)
            if state.step > start_step or not ckpt.list_checkpoints(r.ckpt_dir):
                lp.save(state.step)
    finally:
        ckpt.wait_for_checkpoints()  # an async sharded save still writing is completed and renamed
        lp.logger.close()
    complete = state.step >= cfg.trainer.max_steps
    if not complete and d.is_main:
        lp.logger.message(f"paused at step {state.step} of {cfg.trainer.max_steps} after trainer.steps_per_run="
                          f"{cfg.trainer.steps_per_run} steps; checkpoint saved.")
    summary = {"components": components(cfg, lp.device), "parameters": r.n_params, "steps": state.step,
               "complete": complete, "tokens": state.tokens, "skipped_steps": state.skipped_steps,
               "flops_per_token": r.flops_per_token, "peak_flops": r.peak_flops, "world_size": d.world_size,
               "device": str(lp.device), "run_dir": r.run_dir, "setup_time_s": t_fit - t_start,
               "train_time_s": time.perf_counter() - t_fit, "init_from": cfg.model.init_from, **state.last}
    summary.update(_hardware_facts(cfg, lp.device, summary, d.world_size))
    search = next((ev.retrieval for ev in lp.evaluators if hasattr(ev, "retrieval")), None)
    return finish(cfg, summary, lp.model, lp.objective, r.corpus, lp.device, d, t_start, search)
