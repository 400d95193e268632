"""What a run reports: its components, the opening line and TensorBoard config, the final weights
and post-training quantization, and summary.json."""
from __future__ import annotations

import os
import time

import torch
import torch.distributed as dist
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from trainer.config.schema import to_container
from trainer.data import blocks_of, corpus_tokenizer
from trainer.distributed import Dist, unwrap
from trainer.metrics import Logger, peak_memory_mb, write_summary
from trainer.objectives import resolve_objective
from trainer.quantize import finalize_qat
from trainer.quantize.post_training import post_training_report
from trainer.runs.artifacts import save_weights
from trainer.transforms.compile import compile_enabled
from trainer.transforms.parallel import SHARDED
from trainer.runs.tp_layout import full_to_model_order


def components(cfg: DictConfig, device: torch.device | None = None) -> dict:
    """The run's choice in every config group (the sweep report's and HParams' columns); `compile`
    is whether the blocks were compiled on `device` (trainer.compile=auto decides by device)."""
    return {"model": cfg.model.arch, "attention": cfg.attention.kind, "position": cfg.position.kind,
            "norm": cfg.norm.kind, "norm.placement": cfg.norm.placement,
            "objective": resolve_objective(cfg.model.arch, cfg.objective.kind), "data": cfg.data.source,
            "precision": cfg.precision.dtype, "parallel": cfg.parallel.kind, "quantize": cfg.quantize.method,
            "optim": cfg.optim.name, "schedule": cfg.schedule.name, "compile": compile_enabled(cfg.trainer.compile, device or torch.device("cpu"))}


def announce(logger: Logger, cfg: DictConfig, run_dir: str, resume_path: str | None, step: int,
             n_params: int, corpus, device: torch.device, d: Dist) -> None:
    """Config text + HParams to TensorBoard, and one line saying what this run is."""
    hp = {k: (v if isinstance(v, (int, float, str, bool)) else str(v)) for k, v in components(cfg, device).items()}
    hp.update({f"model.{k}": v for k, v in to_container(cfg.model).items() if v is not None})
    hp.update({"optim.lr": cfg.optim.lr, "trainer.batch_size": cfg.trainer.batch_size, "seed": cfg.seed})
    if HydraConfig.initialized():  # the job's own overrides: a sweep's varied keys in the HParams tab
        for override in HydraConfig.get().overrides.task:
            key, _, text = str(override).lstrip("+~").partition("=")
            value = OmegaConf.select(cfg, key, default=text)  # typed (a group override: its option name)
            hp[key] = value if isinstance(value, (int, float, str, bool)) else text
    logger.config(OmegaConf.to_yaml(cfg, resolve=True), hp, step)
    where = f"resuming from {resume_path} at step {step}" if resume_path else "starting"
    train = "streamed" if cfg.data.streaming else str(len(blocks_of(corpus, "train")))
    logger.message(f"run dir {run_dir}: {where}; {n_params / 1e6:.2f}M parameters, "
                   f"{train} train / {len(blocks_of(corpus, 'val'))} val blocks of "
                   f"{cfg.data.seq_len} tokens ({corpus_tokenizer(corpus).kind} tokenizer), "
                   f"device {device}, {d.world_size} process(es)")


def final_weights(model: torch.nn.Module, kind: str) -> dict:
    """The trained model's full state_dict on the CPU of rank 0, in the model's own layout.

    fsdp, tp, fsdp_tp: every sharded tensor gathered once (TP's packed rows put back in the
    model's order); pp: every stage's own tensors gathered to rank 0; otherwise this process's.
    """
    if kind in ("fsdp", "tp", "fsdp_tp"):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        return full_to_model_order(model, full)
    own = {k: v.detach().cpu() for k, v in unwrap(model).state_dict().items()}
    if kind == "pp" and dist.is_initialized():
        parts = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
        dist.gather_object(own, parts, dst=0)
        own = {k: v for part in parts for k, v in part.items()} if parts is not None else {}
    return own


def finish(cfg: DictConfig, summary: dict, model: torch.nn.Module, objective, corpus, device: torch.device,
           d: Dist, t_start: float, retrieval=None) -> dict:
    """Final weights (model.pt, model.safetensors), post-training quantization (judged by
    retrieval too when the run has a held-out search), summary.json. Returns the summary."""
    sharded = cfg.parallel.kind in SHARDED
    weights = final_weights(model, cfg.parallel.kind)
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


_RETRIEVAL = (("recall@1", "recall@1"), ("recall@10", "recall@10"), ("mrr@10", "MRR@10"), ("ndcg@10", "nDCG@10"))


def headline(summary: dict) -> list[str]:
    """The closing metric lines of a run, for its objective: contrastive runs their held-out search
    (recall@1/@10, MRR@10, nDCG@10) and BM25 on the same search; language models loss, accuracy,
    perplexity and bits per byte."""
    def fmt(prefix: str) -> str:
        return "  ".join(f"{name} {summary[f'{prefix}/{k}']:.3f}" for k, name in _RETRIEVAL
                         if f"{prefix}/{k}" in summary)

    loss = summary.get("eval/loss", float("nan"))
    if summary.get("components", {}).get("objective") == "contrastive":
        lines = [f"eval: loss {loss:.4f}  {fmt('eval')}"]
        if any(f"bm25/{k}" in summary for k, _ in _RETRIEVAL):
            lines.append(f"BM25 on the same search: {fmt('bm25')}")
        return lines
    parts = [f"loss {loss:.4f}"]
    for key, name, spec in (("eval/accuracy", "accuracy", ".3f"), ("eval/perplexity", "perplexity", ".2f"),
                            ("eval/bits_per_byte", "bits/byte", ".3f")):
        if key in summary:
            parts.append(f"{name} {format(summary[key], spec)}")
    return ["eval: " + "  ".join(parts)]


def next_commands(summary: dict) -> list[str]:
    """The commands that apply to a finished run: TensorBoard, then generate/evaluate (decoders),
    embed/evaluate (encoders), evaluate (encoder-decoders), and quantize when it was not."""
    run_dir = summary["run_dir"]
    arch = summary.get("components", {}).get("model", "decoder")
    out = [f"tensorboard --logdir {run_dir}"]
    if arch == "decoder":
        out.append(f"python -m trainer.generate run_dir={run_dir} prompt='def main(' max_new_tokens=100")
    if arch == "encoder":
        out.append(f"python -m trainer.embed run_dir={run_dir} input=<texts.txt|.jsonl> output=<vectors.npy>")
    out.append(f"python -m trainer.evaluate run_dir={run_dir}")
    if summary.get("components", {}).get("quantize", "none") == "none":
        out.append(f"python -m trainer.quantize run_dir={run_dir} quantize=dynamic_int8")
    return out


def closing_lines(summary: dict) -> list[str]:
    """What a finished run prints last: where it is, its headline metrics, where it started from,
    its summary and reports, and what to run next."""
    run_dir = summary["run_dir"]
    lines = [f"run dir: {run_dir}  eval/loss {summary.get('eval/loss', float('nan')):.4f}  "
             f"summary: {os.path.join(run_dir, 'summary.json')}"]
    lines += headline(summary)
    if summary.get("init_from"):
        lines.append(f"started from: {summary['init_from']} (model.init_from)")
    if "quantize" in summary:
        lines.append(f"quantization report: {os.path.join(run_dir, 'quantize.md')}")
    lines.append("next:")
    lines += [f"  {c}" for c in next_commands(summary)]
    return lines
