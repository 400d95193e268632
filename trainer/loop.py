"""The single training loop: train_step, evaluate, fit. Every mode (precision, DDP, FSDP, QAT,
compile) arrives here already applied to the model; nothing below branches on it."""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.nn as nn

from trainer.distributed import Dist, all_reduce_max, all_reduce_sum, clip_grad_norm, grad_sync
from trainer.errors import NonFiniteLoss, StopRequested
from trainer.evaluation import EvalContext, evaluate_all
from trainer.evaluation.retrieval import RETRIEVAL_LOGGED
from trainer.metrics import Logger
from trainer.objectives.base import Objective, to_device
from trainer.precision import autocast
from trainer.transforms.tensor_parallel import sum_partial_grads

__all__ = ["Loop", "TrainState", "train_step", "evaluate", "fit", "NonFiniteLoss", "StopRequested"]


@dataclass
class TrainState:
    step: int = 0
    tokens: int = 0
    skipped_steps: int = 0  # fp16 steps the GradScaler skipped (inf/nan gradients)
    last: dict = field(default_factory=dict)  # most recent logged train/eval metrics


@dataclass
class Loop:
    """What the loop needs, already built and wrapped by `trainer.run.build`."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any
    scaler: torch.amp.GradScaler
    objective: Objective
    stream: Any  # .batch(step) -> the global batch's blocks (trainer.data.BatchStream or streaming)
    evaluators: list  # trainer.evaluation evaluators, run at every evaluation
    gen: torch.Generator  # the objective's masks (same stream on every rank)
    device: torch.device
    precision: str
    dist: Dist
    logger: Logger
    cfg: Any  # cfg.trainer
    mfu: Callable[[float], float]  # tokens/s -> model FLOPs utilisation
    save: Callable[[int], None]
    stop_signal: Callable[[], int]  # 0, or the signal number that asked us to stop


def train_step(lp: Loop, step: int) -> dict[str, torch.Tensor]:
    """One optimizer step on the global batch of `step`; returns un-synced metric tensors.

    The objective cuts this rank's rows into micro-batches; each gets one `loss` and one backward.
    The loss is a sum over targets divided by the global number of targets, known before any
    forward, so gradients equal one process's whatever the world size and accumulation.
    """
    batch = lp.objective.prepare(lp.stream.batch(step), lp.gen)
    total = max(lp.objective.num_targets(batch), 1)  # global: the loss is a mean over every target
    lr = lp.optimizer.param_groups[0]["lr"]  # the lr this step's update uses (logged as train/lr)
    d = lp.dist
    micros = lp.objective.micro_batches(batch, d.dp_rank, d.dp_size, lp.cfg.grad_accum)
    # Data parallelism averages gradients over the replicas, so scale by their number to get the
    # global mean.
    factor = d.dp_size / total
    forward_backward = getattr(lp.model, "forward_backward", None)  # pipeline stages run their own schedule
    if forward_backward is not None:
        with autocast(lp.precision, lp.device):
            loss_sum, correct = forward_backward(micros, lp.objective, factor, lp.scaler)
    else:
        loss_sum = torch.zeros((), device=lp.device)
        correct = torch.zeros((), device=lp.device)
        for i, micro in enumerate(micros):
            with grad_sync(lp.model, i == len(micros) - 1):
                with autocast(lp.precision, lp.device):
                    ls, c = lp.objective.loss(lp.model, to_device(micro, lp.device))
                lp.scaler.scale(ls * factor).backward()
            loss_sum += ls.detach().float()
            correct += c.detach()
    sum_partial_grads(lp.model)  # tensor parallel: parameters each rank used on its own heads only
    # Gradients are unscaled before clipping, so the clip threshold and the logged norm are the
    # true ones under fp16 as well.
    lp.scaler.unscale_(lp.optimizer)
    clip = lp.cfg.grad_clip if lp.cfg.grad_clip > 0 else float("inf")
    grad_norm = clip_grad_norm(lp.model, clip)
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


def evaluate(lp: Loop) -> dict[str, float] | None:
    """Every evaluator's metrics on the held-out data (None when a stop signal arrived)."""
    ctx = EvalContext(lp.device, lp.precision, lp.dist, lp.cfg.batch_size, lp.stop_signal)
    return evaluate_all(lp.evaluators, lp.model, ctx)


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
    # Ranks holding pieces of one replica (tensor / pipeline parallel) hold the same sums: count one.
    sums = all_reduce_sum(torch.stack([window["loss_sum"], window["correct"]]).float() * float(lp.dist.counts),
                          lp.dist).tolist()
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
