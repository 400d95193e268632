"""What precision, quantization and the attention kernel cost a retrieval encoder, side by side.

Usage:
    python scripts/bench_retrieval.py --run-dir outputs/rag_encoder [--threads 2] [--repeats 3]
        [--methods dynamic_int8 weight_int8 weight_int4] [--budget-mb 256] [--max-length 16384]
        [--out table.md]
    python scripts/bench_retrieval.py --run-dir all-minilm-l6-v2 --set experiment=rag_minilm \
        --topic retrieval_minilm --max-length 0            # zero-shot, the real model
    python scripts/bench_retrieval.py --run-dir <run of experiment=rag_minilm> --topic retrieval_minilm \
        --max-length 0                                     # fine-tuned

`--run-dir` is a finished run, or a pretrained folder / packaged model name (zero-shot: composed
with `--set` overrides, e.g. experiment=rag_minilm, so the held-out search is that run's).
`--int4-torchao` adds the torchao CPU int4 path (`torchao.prototype.quantization.int4`
PrototypeInt4WeightOnlyConfig, `_weight_int4pack_mm_for_cpu`; bf16 weights and activations) beside
the trainer's packed int4 layer in bf16, so the two are compared on the same model.

Takes a trained contrastive encoder (`python -m trainer experiment=rag_encoder ...`) and, in one
process, on its held-out search (the run's data=pairs held-out queries against every held-out
document), measures for fp32, bf16 autocast (mixed precision: fp32 weights, bf16 matmuls), bf16
weights, and each torchao quantization: the serialized size, the embedding throughput in
documents per second (same batch size and threads, the variants interleaved, median of
`--repeats` passes), recall@1, recall@10, MRR@10 and nDCG@10, and their deltas against fp32.
Beside them: the BM25 baseline on the same text, and the longest document each attention kernel
(standard, flash, tiled) embeds within `--budget-mb` of extra memory, measured by running it.
The last lines put the numbers next to the published figures the table is meant to check.
The tables go to stdout and to docs/benchmarks/retrieval_<hardware>_<date>.md (scripts/_report.py).
"""
from __future__ import annotations

import argparse
import copy
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

import _bench_common as bc  # noqa: E402
from _report import write_result  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run-dir", required=True, help="a finished contrastive encoder run (data=pairs)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda", "auto"])
    p.add_argument("--repeats", type=int, default=3, help="timed passes per variant (median reported)")
    p.add_argument("--batch-size", type=int, default=None, help="embedding batch (default: the run's)")
    p.add_argument("--methods", nargs="*", default=["dynamic_int8", "weight_int8", "weight_int4"])
    p.add_argument("--budget-mb", type=float, default=256.0, help="memory budget of the long-document test")
    p.add_argument("--max-length", type=int, default=16384, help="longest document tried")
    p.add_argument("--out", help="also write the tables to this markdown file")
    p.add_argument("--set", nargs="*", default=[], help="Hydra overrides for a pretrained --run-dir "
                   "(e.g. experiment=rag_minilm)")
    p.add_argument("--topic", default="retrieval", help="docs/benchmarks/<topic>_<hardware>_<date>.md")
    p.add_argument("--throughput-docs", type=int, default=512, help="documents embedded per timed pass")
    p.add_argument("--int4-torchao", action="store_true", help="also measure torchao's CPU int4 (bf16) "
                   "and the trainer's int4 layer in bf16")
    return p.parse_args(argv)


def load_encoder(source: str, overrides: list[str]):
    """(fp32 model, tokenizer, config) of a run dir, or of a pretrained folder / packaged name
    composed with the Hydra `overrides` (the zero-shot starting point of that run)."""
    from omegaconf import open_dict

    from trainer.data.tokenizer import load_pretrained, model_vocab_size
    from trainer.pretrained import apply_pretrained_config, pretrained_folder
    from trainer.quantize import build_float_model
    from trainer.runs.artifacts import load_tokenizer, read_run
    from trainer.runs.init_from import apply_init_from
    from trainer.runs.model import build_run_model

    cfg = bc.compose_cfg(overrides)
    if pretrained_folder(source, cfg.data.cache_dir) is None:
        weights, cfg = read_run(os.path.abspath(source))
        return build_float_model(cfg, weights), load_tokenizer(os.path.abspath(source), cfg), cfg
    with open_dict(cfg):
        cfg.model.init_from = source
    cfg = apply_pretrained_config(cfg, [*overrides, f"model.init_from={source}"])
    tokenizer = load_pretrained(cfg.tokenizer.path, say=lambda _msg: None)
    with torch.random.fork_rng(devices=[]):
        model = build_run_model(cfg, model_vocab_size(tokenizer), num_tokens=tokenizer.vocab_size)
    apply_init_from(model, cfg.model.init_from)
    return model.eval(), tokenizer, cfg


def int4_torchao(fp32, group_size: int):
    """The model in bf16 with its block linears in torchao's CPU int4 (PrototypeInt4WeightOnlyConfig,
    tinygemm `_weight_int4pack_mm_for_cpu`), embedding in int8 as apply_ptq does for an encoder."""
    from torchao.prototype.quantization.int4 import PrototypeInt4WeightOnlyConfig

    from trainer.quantize import _ao, block_linears
    from trainer.quantize.embedding import apply_embedding_int8

    tq = _ao()
    model = copy.deepcopy(fp32).cpu().to(torch.bfloat16)
    ids = {id(lin) for *_, lin in block_linears(model)}
    tq.quantize_(model, PrototypeInt4WeightOnlyConfig(group_size=group_size, set_inductor_config=False),
                 filter_fn=lambda module, fqn: id(module) in ids)
    return apply_embedding_int8(model, tq)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    from trainer.objectives.contrastive import Contrastive
    from trainer.data.pairs import load_pair_corpus
    from trainer.quantize import apply_ptq, plan
    from trainer.quantize.formats import format_formats_table, tensor_formats
    from trainer.quantize.long_context import format_long_context, longest_documents
    from trainer.quantize.retrieval_report import compare_retrieval, format_retrieval_table
    from trainer.retrieval.bm25 import bm25_baseline

    threads = bc.setup_threads(args.threads)
    device = bc.get_device(args.device)
    fp32, tokenizer, cfg = load_encoder(args.run_dir, args.set)
    if cfg.model.arch != "encoder" or cfg.data.source != "pairs":
        raise SystemExit(f"--run-dir {args.run_dir}: needs a model=encoder data=pairs run (this one is "
                         f"model={cfg.model.arch} data={cfg.data.source}).")
    corpus = load_pair_corpus(cfg.data, cfg.seed, tokenizer)
    retrieval = corpus.retrieval
    batch = args.batch_size or cfg.trainer.batch_size
    fp32 = fp32.to(device)
    variants = {"fp32": (fp32, "fp32"), "bf16 autocast": (fp32, "bf16"),
                "bf16 weights": (copy.deepcopy(fp32).to(torch.bfloat16), "fp32")}
    kernels = {}
    for method in args.methods:
        info = plan(method, device, cfg.quantize.group_size, "fp32")
        variants[method] = (apply_ptq(copy.deepcopy(fp32).cpu(), method, cfg.quantize.group_size).to(device), "fp32")
        kernels[method] = f"{info['library']} {info['config']}; kernel: {info['kernel']}" + (
            f" (fallback: {info['fallback']})" if info["fallback"] else "")
    if args.int4_torchao:
        g = cfg.quantize.group_size
        variants["weight_int4, bf16 weights"] = (apply_ptq(copy.deepcopy(fp32).cpu().to(torch.bfloat16),
                                                           "weight_int4", g), "fp32")
        kernels["weight_int4, bf16 weights"] = (f"trainer Int4WeightLinear(group_size={g}) on the bf16 model; "
                                                f"kernel: {plan('weight_int4', device, g, 'bf16')['kernel']}")
        variants["torchao int4 (prototype), bf16 weights"] = (int4_torchao(fp32, g), "fp32")
        kernels["torchao int4 (prototype), bf16 weights"] = (
            f"torchao.prototype.quantization.int4.PrototypeInt4WeightOnlyConfig(group_size={g}) on the bf16 "
            f"model; kernel: torch._weight_int4pack_mm_for_cpu (tinygemm)")
    obj = Contrastive(cfg.objective.temperature, cfg.objective.pooling, tokenizer.pad_id)
    bc.log(f"{bc.environment(device)}; {threads} threads; {bc.load_average()}")
    bc.log(f"held-out search: {len(retrieval.queries)} queries x {len(retrieval.documents)} documents, "
           f"seq_len {cfg.data.seq_len}, batch {batch}")
    rows = compare_retrieval(variants, retrieval, obj.pad_id, obj.pooling, batch, device, repeats=args.repeats,
                             throughput_docs=args.throughput_docs)
    bm25 = bm25_baseline(retrieval.query_texts, retrieval.document_texts, retrieval.positives,
                         query_groups=retrieval.query_groups)
    long = longest_documents(cfg, args.budget_mb, cfg.data.seq_len, args.max_length, device) if args.max_length else {}
    quantized = [name for name in variants if name not in ("fp32", "bf16 autocast", "bf16 weights")]
    formats = [f"Tensor formats of {name}:\n\n{format_formats_table(tensor_formats(variants[name][0]))}\n"
               for name in quantized]
    out = [f"Encoder {args.run_dir}: {cfg.model.d_model} x {cfg.model.num_layers} layers, position "
           f"{cfg.position.kind}, pooling {cfg.objective.pooling}; {bc.environment(device)}; {threads} threads.",
           "", format_retrieval_table(rows), "",
           f"BM25 (bm25s, same truncated text): recall@1 {bm25['recall@1']:.3f}  recall@10 {bm25['recall@10']:.3f}  "
           f"MRR@10 {bm25['mrr@10']:.3f}  nDCG@10 {bm25['ndcg@10']:.3f}", "",
           *[f"- {m}: {k}" for m, k in kernels.items()], "", *formats,
           *([f"Longest document embedded (batch 1, no grad) within {args.budget_mb:g} MiB of extra memory:", "",
              format_long_context(long, args.budget_mb), ""] if long else [])]
    mixed = rows["bf16 autocast"]
    out.append("Against the published figures:")
    out.append(f"- mixed precision: -40% latency at no retrieval loss -> here bf16 autocast takes "
               f"{1 / mixed['speedup']:.0%} of fp32's time ({1 / mixed['speedup'] - 1:+.0%}), "
               f"recall@10 {mixed['recall@10_delta']:+.3f}, MRR@10 {mixed['mrr@10_delta']:+.3f}.")
    for method in quantized:
        r = rows[method]
        table = "int8" if type(variants[method][0].embed.weight) is not torch.nn.Parameter else "fp32"
        bits = "4-bit (beyond the 8-bit claim)" if "int4" in method else "8-bit"
        out.append(f"- 8-bit quantization: -75% size for a 1-2% precision drop -> {method} ({bits}): size "
                   f"{1 / r['size_ratio'] - 1:+.0%} (whole model; token embedding {table}), recall@1 "
                   f"{r['recall@1_delta']:+.3f}, recall@10 {r['recall@10_delta']:+.3f}, nDCG@10 "
                   f"{r['ndcg@10'] - rows['fp32']['ndcg@10']:+.3f}, speed {r['speedup']:.2f}x.")
    std = long.get("standard", {}).get("max_length", 0)
    for kind in ("flash", "tiled"):
        if kind in long and std:
            out.append(f"- flash attention: 4x longer documents -> {kind}: {long[kind]['max_length']} vs standard {std} "
                       f"tokens ({long[kind]['max_length'] / std:.0f}x) within {args.budget_mb:g} MiB"
                       + (" (capped by --max-length)" if long[kind]["max_length"] * 2 > args.max_length else ""))
    text = "\n".join(out)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    write_result(args.topic, text, device=device)


if __name__ == "__main__":
    main()
