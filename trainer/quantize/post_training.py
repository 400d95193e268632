"""The post-training quantization report of a finished run: fp32, bf16 and the quantized model
compared on size, latency and held-out quality (and, for a retrieval encoder, on the held-out
search and the longest document per attention kernel); writes model_<method>.pt and quantize.md."""
from __future__ import annotations

import copy
import os
import sys

import torch

from trainer.quantize import apply_ptq, apply_qat, build_float_model, full_precision, plan, quantized_layers
from trainer.quantize.embedding import quantize_embeddings
from trainer.quantize.formats import format_formats_table, tensor_formats
from trainer.quantize.long_context import format_long_context, longest_documents
from trainer.quantize.report import compare_variants, cpu_flags, format_table, quiet_report_warnings
from trainer.quantize.retrieval_report import compare_retrieval, format_retrieval_table


def post_training_report(cfg, model, weights, val_blocks, objective, device, run_dir, retrieval=None) -> dict:
    """Quantize the trained weights and compare them with fp32 and bf16; writes model_<method>.pt
    and quantize.md.

    Args:
        cfg: the root config. model: the trained model, unused: every variant is rebuilt from
            `weights`, so no DDP/compile/FSDP wrapper or fake-quant layer leaks into the numbers.
        weights: the plain trained state_dict. val_blocks: validation token blocks.
        objective: the run's objective. device: where to measure. run_dir: output directory.
        retrieval: for a contrastive run, the held-out search (`trainer.pair_data.RetrievalSet`):
            fp32, bf16 (autocast and weights) and the quantized model are also compared on it.
    Returns:
        The numbers for summary.json: per-variant rows plus the quantized-vs-fp32 headline.
    """
    with quiet_report_warnings():  # third-party warnings a user cannot act on (report.QUIET)
        out = _measure_and_write(cfg, model, weights, val_blocks, objective, device, run_dir, retrieval)
    print_tables(out)
    return out


def _measure_and_write(cfg, model, weights, val_blocks, objective, device, run_dir, retrieval) -> dict:
    """`post_training_report`'s work: the variants measured, the files written, summary's numbers."""
    q, precision = cfg.quantize, cfg.precision.dtype
    compile_mode = str(q.get("compile", "both")).lower()
    fp32 = build_float_model(cfg, weights).to(device)
    dense = {"library": "torch", "config": "-", "fallback": ""}
    variants = {"fp32": (fp32, precision, {**dense, "kernel": "dense matmul"}),
                "bf16 weights": (copy.deepcopy(fp32).to(torch.bfloat16), "fp32",
                                 {**dense, "config": "model.to(bfloat16)", "kernel": "dense bf16 matmul"})}
    info = plan(q.method, device, q.group_size, precision)
    if q.method == "qat_int8":
        variants["qat_int8 (fake-quant)"] = (apply_qat(copy.deepcopy(fp32), q), precision,
                                             {**info, "kernel": "torchao fake-quantize + dense matmul",
                                              "config": "QATConfig(step=prepare, IntxFakeQuantizeConfig: int8 "
                                                        "per-token asymmetric activations, per-channel weights)",
                                              "compile": False})
    name = "qat_int8 -> dynamic_int8" if q.method == "qat_int8" else q.method
    with_table = quantize_embeddings(q.get("embeddings"), fp32)
    quant = apply_ptq(apply_qat(copy.deepcopy(fp32), q), q.method, q.group_size, embeddings=with_table)
    formats = tensor_formats(quant)
    variants[name] = (quant, precision, info)
    eval_n = q.eval_batches if q.eval_batches is not None else cfg.trainer.eval_batches
    rows = compare_variants(variants, objective, val_blocks, cfg.trainer.batch_size, eval_n,
                            q.latency_batches, device, compile=compile_mode)
    batches = rows.pop("_batches")
    path = os.path.join(run_dir, f"model_{q.method}.pt")
    torch.save({k: v.detach().cpu() for k, v in quant.state_dict().items()}, path)
    n_layers = quantized_layers(quant)
    import torchao

    header = (f"# Quantization report: {q.method}\n\n"
              f"Device {device} ({cpu_flags() if device.type == 'cpu' else torch.cuda.get_device_name(device)}), "
              f"{torch.get_num_threads()} CPU threads, precision {precision}, torch {torch.__version__}, "
              f"torchao {torchao.__version__}; quality on {batches['eval_blocks']} validation blocks spread over the "
              f"held-out split (the eval/loss sample, measured without compile), latency = median forward+loss "
              f"over {batches['latency']} batches, with and without torch.compile as quantize.compile="
              f"{compile_mode} asks.\nQuantized: {n_layers} Linear layers inside the transformer blocks with "
              f"{info['library']} {info['config']}"
              + (f" (fallback: {info['fallback']})" if info["fallback"] else "")
              + (f"; the token embedding with torchao Int8WeightOnlyConfig (quantize.embeddings=true)"
                 if with_table else "")
              + f". Kept in full precision: {full_precision(with_table)}.\nSaved: {os.path.basename(path)} "
              f"(load with trainer.quantize.load_quantized).\n\n## Tensor formats of {name}\n\n"
              f"{format_formats_table(formats)}\n\n")
    retrieval_rows = None
    if retrieval is not None:
        by_retrieval = {"fp32": (fp32, "fp32"), "bf16 autocast": (fp32, "bf16"),
                        "bf16 weights": variants["bf16 weights"][:2], name: (quant, "fp32")}
        retrieval_rows = compare_retrieval(by_retrieval, retrieval, objective.pad_id, objective.pooling,
                                           cfg.trainer.batch_size, device)
        budget = q.get("context_budget_mb", 256.0)
        longest = longest_documents(cfg, budget, cfg.data.seq_len, q.get("max_context") or 16 * cfg.data.seq_len,
                                    device)
        header += (f"## Retrieval on the held-out search\n\n{len(retrieval.queries)} queries x "
                   f"{len(retrieval.documents)} documents; docs/s = embedding throughput (batch "
                   f"{cfg.trainer.batch_size}, same threads, variants interleaved, median of 3 passes); Δ in "
                   f"metric points against fp32.\n\n{format_retrieval_table(retrieval_rows)}\n\n## Longest document per attention kernel\n\n"
                   f"One document (batch 1, no grad) embedded at doubling lengths; extra memory measured (peak "
                   f"{'allocated' if device.type == 'cuda' else 'resident set'} above the level before).\n\n"
                   f"{format_long_context(longest, budget)}\n\n## Loss\n\n")
    with open(os.path.join(run_dir, "quantize.md"), "w") as f:
        f.write(header + format_table(rows) + "\n")
    print(f"quantize={q.method}: {path}\n{format_table(rows)}\n\ntensor formats of {name}:\n"
          f"{format_formats_table(formats)}", file=sys.stderr)
    head = rows[name] if name in rows else rows[name + " + compile"]
    out = {"method": q.method, "file": path, "device": str(device), "precision": precision,
           "threads": torch.get_num_threads(), "quantized_layers": n_layers, "full_precision": full_precision(with_table),
           "embeddings": with_table, "formats": formats,
           "eval_batches": batches["eval"], "latency_batches": batches["latency"], "compile": compile_mode,
           "cpu_flags": cpu_flags(),
           **{k: head[k] for k in ("size_mb", "size_ratio", "linears_ratio", "latency_ms", "speedup", "eval_loss",
                                   "loss_delta", "accuracy", "accuracy_delta", "library", "config", "kernel",
                                   "fallback")},
           "fp32": {k: rows[batches["baseline"]][k] for k in ("size_mb", "latency_ms", "eval_loss", "accuracy")},
           "variants": rows}
    if retrieval_rows is not None:
        out["retrieval"] = retrieval_rows
        out["longest_document"] = {"budget_mb": budget, **longest}
    if name + " + compile" in rows:
        out["compiled"] = {k: rows[name + " + compile"][k] for k in ("latency_ms", "speedup", "kernel")}
    return out


def print_tables(report: dict) -> None:
    """The tables of quantize.md besides the loss table (which the report prints as it measures):
    for a retrieval encoder, the retrieval comparison and the longest document per attention kernel."""
    if "retrieval" not in report:
        return
    longest = dict(report["longest_document"])
    budget = longest.pop("budget_mb")
    print(f"retrieval on the held-out search:\n{format_retrieval_table(report['retrieval'])}\n\n"
          f"longest document per attention kernel:\n{format_long_context(longest, budget)}", file=sys.stderr)
