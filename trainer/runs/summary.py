"""What a run reports: its components, the opening line and TensorBoard config, the final weights
and post-training quantization, and summary.json."""
from __future__ import annotations

import os
import time

import torch
from omegaconf import DictConfig, OmegaConf

from trainer.config.schema import to_container
from trainer.data import blocks_of, corpus_tokenizer
from trainer.distributed import Dist, unwrap
from trainer.metrics import Logger, peak_memory_mb, write_summary
from trainer.objectives import resolve_objective
from trainer.quantize import finalize_qat, post_training_report
from trainer.runs.artifacts import save_weights


def components(cfg: DictConfig) -> dict:
    """The run's choice in every config group (the sweep report's and HParams' columns)."""
    return {"model": cfg.model.arch, "attention": cfg.attention.kind, "position": cfg.position.kind,
            "norm": cfg.norm.kind, "norm.placement": cfg.norm.placement,
            "objective": resolve_objective(cfg.model.arch, cfg.objective.kind), "data": cfg.data.source,
            "precision": cfg.precision.dtype, "parallel": cfg.parallel.kind, "quantize": cfg.quantize.method,
            "optim": cfg.optim.name, "schedule": cfg.schedule.name, "compile": cfg.trainer.compile}


def announce(logger: Logger, cfg: DictConfig, run_dir: str, resume_path: str | None, step: int,
             n_params: int, corpus, device: torch.device, d: Dist) -> None:
    """Config text + HParams to TensorBoard, and one line saying what this run is."""
    hp = {k: (v if isinstance(v, (int, float, str, bool)) else str(v)) for k, v in components(cfg).items()}
    hp.update({f"model.{k}": v for k, v in to_container(cfg.model).items() if v is not None})
    hp.update({"optim.lr": cfg.optim.lr, "trainer.batch_size": cfg.trainer.batch_size, "seed": cfg.seed})
    logger.config(OmegaConf.to_yaml(cfg, resolve=True), hp, step)
    where = f"resuming from {resume_path} at step {step}" if resume_path else "starting"
    train = "streamed" if cfg.data.streaming else str(len(blocks_of(corpus, "train")))
    logger.message(f"run dir {run_dir}: {where}; {n_params / 1e6:.2f}M parameters, "
                   f"{train} train / {len(blocks_of(corpus, 'val'))} val blocks of "
                   f"{cfg.data.seq_len} tokens ({corpus_tokenizer(corpus).kind} tokenizer), "
                   f"device {device}, {d.world_size} process(es)")


def final_weights(model: torch.nn.Module, sharded: bool) -> dict:
    """The trained model's full state_dict on the CPU (FSDP: gathered once from every rank)."""
    if sharded:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return {k: v.detach().cpu() for k, v in unwrap(model).state_dict().items()}


def finish(cfg: DictConfig, summary: dict, model: torch.nn.Module, objective, corpus, device: torch.device,
           d: Dist, t_start: float, retrieval=None) -> dict:
    """Final weights (model.pt, model.safetensors), post-training quantization (judged by
    retrieval too when the run has a held-out search), summary.json. Returns the summary."""
    sharded = cfg.parallel.kind == "fsdp"
    weights = final_weights(model, sharded)
    if cfg.quantize.method == "qat_int8":
        weights = finalize_qat(unwrap(model), weights)
    summary.update(wall_time_s=time.perf_counter() - t_start, peak_memory_mb=peak_memory_mb(device),
                   tokens_per_sec=summary.get("train/tokens_per_sec", 0.0), mfu=summary.get("train/mfu", 0.0))
    if d.is_main:
        run_dir = summary["run_dir"]
        torch.save(weights, os.path.join(run_dir, "model.pt"))
        save_weights(weights, os.path.join(run_dir, "model.safetensors"), to_container(cfg))
        if cfg.quantize.method != "none":
            summary["quantize"] = post_training_report(cfg, unwrap(model) if not sharded else None, weights,
                                                       blocks_of(corpus, "val"), objective, device, run_dir,
                                                       retrieval=retrieval)
        write_summary(os.path.join(run_dir, "summary.json"), summary)
    return summary
