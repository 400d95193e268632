"""The single training loop: train_step, evaluate, fit. Every mode (precision, DDP, FSDP, QAT,
compile) arrives here already applied to the model; nothing below branches on it."""
from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.nn as nn

from trainer.data import BatchStream
from trainer.distributed import Dist, all_reduce_max, all_reduce_sum
from trainer.heldout import eval_sample
from trainer.metrics import Logger
from trainer.objectives import Objective, split_rows
from trainer.precision import autocast


RETRIEVAL_LOGGED = ("eval/recall@1", "eval/recall@10", "eval/mrr@10", "eval/ndcg@10")
EVAL_SEED = 1234  # the evaluation masks' generator seed (fixed: comparable across steps and jobs)


class NonFiniteLoss(RuntimeError):
    """The loss became NaN/inf; the run stops before the optimizer step."""


class StopRequested(Exception):
    """SIGTERM/SIGINT arrived; the step finished and a checkpoint was written."""

    def __init__(self, signum: int, step: int):
        super().__init__(f"signal {signum} at step {step}")
        self.signum, self.step = signum, step


@dataclass
class TrainState:
    step: int = 0
    tokens: int = 0
    skipped_steps: int = 0  # fp16 steps the GradScaler skipped (inf/nan gradients)
    last: dict = field(default_factory=dict)  # most recent logged train/eval metrics


@dataclass
class Loop:
    """What the loop needs, already built and wrapped by `run.py`."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any
    scaler: torch.amp.GradScaler
    objective: Objective
    stream: BatchStream
    val_blocks: torch.Tensor
    gen: torch.Generator
    device: torch.device
    precision: str
    dist: Dist
    logger: Logger
    cfg: Any  # cfg.trainer
    flops_per_token: float
    mfu: Callable[[float], float]
    save: Callable[[int], None]
    stop_signal: Callable[[], int]  # 0, or the signal number that asked us to stop
    retrieval: Any = None  # contrastive: a trainer.pair_data.RetrievalSet scored at every evaluation


def _micro_batches(lp: Loop, batch: dict) -> list[dict]:
    """This rank's rows of the global batch, cut into grad_accum micro-batches."""
    rows = batch[lp.objective.rows_key].shape[0]
    per_rank = rows // lp.dist.world_size
    micro = per_rank // lp.cfg.grad_accum
    start = lp.dist.rank * per_rank
    return [split_rows(batch, start + i * micro, start + (i + 1) * micro) for i in range(lp.cfg.grad_accum)]


def _to_device(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def _sync_context(model: nn.Module, last: bool) -> contextlib.AbstractContextManager:
    """Skip the gradient all-reduce on all but the last micro-batch (DDP no_sync / FSDP2)."""
    if hasattr(model, "set_requires_gradient_sync"):  # FSDP2
        model.set_requires_gradient_sync(last)
    if not last and hasattr(model, "no_sync"):  # DDP
        return model.no_sync()
    return contextlib.nullcontext()


def train_step(lp: Loop, step: int) -> dict[str, torch.Tensor]:
    """One optimizer step on the global batch of `step`; returns un-synced metric tensors."""
    batch = lp.objective.prepare(lp.stream.batch(step), lp.gen)
    total = max(lp.objective.num_targets(batch), 1)  # global: the loss is a mean over every target
    lr = lp.optimizer.param_groups[0]["lr"]  # the lr this step's update uses (logged as train/lr)
    micros = _micro_batches(lp, batch)
    loss_sum = torch.zeros((), device=lp.device)
    correct = torch.zeros((), device=lp.device)
    global_negatives = getattr(lp.objective, "global_negatives", False)
    if global_negatives and (len(micros) > 1 or lp.dist.world_size > 1):
        # Contrastive: every document of the global batch is a negative for every query, so the
        # batch is not split into independent losses; GradCache gives the whole batch's gradients.
        from trainer.contrastive import grad_cache_step

        loss_sum, correct = grad_cache_step(lp, micros, total)
        micros = []
    for i, micro in enumerate(micros):
        with _sync_context(lp.model, i == len(micros) - 1):
            with autocast(lp.precision, lp.device):
                ls, c = lp.objective.loss(lp.model, _to_device(micro, lp.device))
            # DDP/FSDP average gradients over ranks, so scale by world size to get the global mean.
            lp.scaler.scale(ls * (lp.dist.world_size / total)).backward()
        loss_sum += ls.detach().float()
        correct += c.detach()
    lp.scaler.unscale_(lp.optimizer)
    clip = lp.cfg.grad_clip if lp.cfg.grad_clip > 0 else float("inf")
    grad_norm = torch.nn.utils.clip_grad_norm_(lp.model.parameters(), clip)
    if hasattr(grad_norm, "full_tensor"):  # FSDP2 returns a DTensor
        grad_norm = grad_norm.full_tensor()
    # One small collective per step: every rank must agree to stop (bad loss or a signal).
    flags = all_reduce_max(torch.tensor([float(not torch.isfinite(loss_sum)), float(lp.stop_signal())]),
                           lp.dist).tolist()
    if flags[0]:
        raise NonFiniteLoss(f"the training loss became non-finite at step {step + 1}; stopped before the "
                            f"optimizer step (try a lower optim.lr, precision=bf16, or trainer.grad_clip)")
    scale_before = lp.scaler.get_scale() if lp.scaler.is_enabled() else 0.0
    lp.scaler.step(lp.optimizer)
    lp.scaler.update()
    # fp16: the GradScaler skips the update when gradients overflowed (and halves its scale). A
    # skipped step is not an optimizer step, so it does not advance the schedule (as accelerate).
    skipped = lp.scaler.is_enabled() and lp.scaler.get_scale() < scale_before
    if not skipped:
        lp.scheduler.step()
    lp.optimizer.zero_grad(set_to_none=True)
    return {"loss_sum": loss_sum, "correct": correct, "total": torch.tensor(float(total)),
            "grad_norm": grad_norm.detach(), "tokens": lp.objective.tokens(batch), "skipped": skipped,
            "stop": int(flags[1]), "lr": lr}


@torch.no_grad()
def evaluate(lp: Loop) -> dict[str, float] | None:
    """Held-out loss, token accuracy and perplexity on the fixed held-out sample.

    The sample (`trainer.heldout.eval_sample`) is spread over the whole validation split, and its
    masks come from a private generator with a fixed seed: the same blocks and masks at every
    evaluation and in every job, and the training generators are never touched. Returns None,
    without finishing, when a stop signal arrives (every rank agrees, batch by batch).

    `eval/bits_per_byte` = summed loss (nats) / ln 2 / UTF-8 bytes of the targets' text, where
    the objective defines the targets (`Objective.num_target_bytes`: clm the next tokens, mlm the
    original tokens at the masked positions, span the corrupted spans) and special ids (BOS, EOS,
    PAD, sentinels) count 0 bytes; comparable across tokenizers.
    """
    lp.model.eval()
    gen = torch.Generator().manual_seed(EVAL_SEED)
    sums = torch.zeros(5, device=lp.device)  # loss_sum, correct, targets, blocks, target bytes
    try:
        for blocks in eval_sample(lp.val_blocks, lp.cfg.batch_size, lp.cfg.eval_batches):
            if all_reduce_max(torch.tensor([float(lp.stop_signal())]), lp.dist).item():
                return None
            batch = lp.objective.prepare(blocks, gen)
            rows = batch[lp.objective.rows_key].shape[0]
            lo, hi = rows * lp.dist.rank // lp.dist.world_size, rows * (lp.dist.rank + 1) // lp.dist.world_size
            whole = getattr(lp.objective, "global_negatives", False)
            if whole:  # negatives span the batch: every rank scores all of it, rank 0's numbers count
                lo, hi = 0, rows
            part = split_rows(batch, lo, hi)
            with autocast(lp.precision, lp.device):
                ls, c = lp.objective.loss(lp.model, _to_device(part, lp.device))
            if not whole or lp.dist.is_main:
                # None: bits per byte is undefined (contrastive)
                nbytes = getattr(lp.objective, "num_target_bytes", lambda b: None)(part)
                sums += torch.tensor([float(ls), float(c), float(lp.objective.num_targets(part)), float(hi - lo),
                                      float("nan") if nbytes is None else float(nbytes)],
                                     device=lp.device)
    finally:
        lp.model.train()
    all_reduce_sum(sums, lp.dist)
    loss_sum, correct, n, blocks_seen, n_bytes = sums.tolist()
    loss = loss_sum / max(n, 1)
    if n_bytes == n_bytes and n_bytes > 0:  # summed nats / ln 2 / UTF-8 bytes of the targets' text
        extra_bpb = {"eval/bits_per_byte": loss_sum / math.log(2) / n_bytes}
    else:
        extra_bpb = {}
    extra = {}
    if lp.retrieval is not None:
        from trainer.contrastive import evaluate_retrieval

        r = lp.retrieval
        extra = evaluate_retrieval(lp, r.queries, r.documents, r.positives)
    return {**extra, **extra_bpb, "eval/loss": loss, "eval/accuracy": correct / max(n, 1), "eval/perplexity": math.exp(min(loss, 50.0)),
            "eval/blocks": blocks_seen, "eval/targets": n}


def fit(lp: Loop, state: TrainState) -> TrainState:
    """Train from `state.step` to `cfg.max_steps`: log, evaluate and checkpoint on schedule.

    With `steps_per_run`, stops early after that many steps (the caller saves; rerun to resume).
    Raises StopRequested after saving when a signal asked to stop, NonFiniteLoss on a bad loss.
    """
    cfg = lp.cfg
    end = cfg.max_steps if cfg.steps_per_run is None else min(cfg.max_steps, state.step + cfg.steps_per_run)
    lp.model.train()
    window = {"loss_sum": torch.zeros((), device=lp.device), "correct": torch.zeros((), device=lp.device),
              "total": 0.0, "tokens": 0, "steps": 0}
    t_window = time.perf_counter()
    while state.step < end:
        out = train_step(lp, state.step)
        state.step += 1
        state.tokens += out["tokens"]
        state.skipped_steps += int(out["skipped"])
        for k in ("loss_sum", "correct"):
            window[k] += out[k]
        window["total"] += float(out["total"])
        window["tokens"] += out["tokens"]
        window["steps"] += 1
        lp.logger.advance(1)
        if state.step % cfg.log_every == 0 or state.step == cfg.max_steps:
            elapsed = time.perf_counter() - t_window
            _log_train(lp, state, window, out, elapsed)
            window.update(loss_sum=window["loss_sum"] * 0, correct=window["correct"] * 0, total=0.0,
                          tokens=0, steps=0)
            t_window = time.perf_counter()
        if out["stop"]:  # a stop request is honoured at the step boundary: save, skip evaluation
            lp.save(state.step)
            raise StopRequested(out["stop"], state.step)
        if state.step % cfg.eval_every == 0 or state.step == cfg.max_steps:
            metrics = evaluate(lp)
            if metrics is None:  # a signal arrived during the evaluation
                lp.save(state.step)
                raise StopRequested(lp.stop_signal() or 15, state.step)
            state.last.update(metrics, eval_step=state.step)
            lp.logger.scalars(metrics, state.step)
            lp.logger.message(f"step {state.step}: eval/loss {metrics['eval/loss']:.4f}  "
                              f"eval/accuracy {metrics['eval/accuracy']:.3f}  "
                              f"({int(metrics['eval/blocks'])} held-out blocks, {int(metrics['eval/targets'])} targets)"
                              + "".join(f"  {k[5:]} {metrics[k]:.3f}" for k in RETRIEVAL_LOGGED if k in metrics))
            t_window = time.perf_counter()  # throughput excludes evaluation
        if state.step % cfg.checkpoint_every == 0 and state.step < end:
            lp.save(state.step)
            t_window = time.perf_counter()
    return state


def _log_train(lp: Loop, state: TrainState, window: dict, out: dict, elapsed: float) -> None:
    sums = all_reduce_sum(torch.stack([window["loss_sum"], window["correct"]]).float(), lp.dist).tolist()
    loss = sums[0] / max(window["total"], 1.0)
    tps = window["tokens"] / max(elapsed, 1e-9)
    metrics = {"train/loss": loss, "train/accuracy": sums[1] / max(window["total"], 1.0),
               "train/lr": out["lr"], "train/grad_norm": float(out["grad_norm"]),
               "train/tokens_per_sec": tps, "train/mfu": lp.mfu(tps),
               "train/step_time_s": elapsed / max(window["steps"], 1)}
    if lp.scaler.is_enabled():
        metrics["train/loss_scale"] = lp.scaler.get_scale()
        metrics["train/skipped_steps"] = state.skipped_steps
    state.last.update(metrics)
    lp.logger.scalars(metrics, state.step)
    lp.logger.progress(state.step, {"loss": f"{loss:.3f}", "lr": f"{out['lr']:.3g}", "tok/s": f"{tps:,.0f}"})
