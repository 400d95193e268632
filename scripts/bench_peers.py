"""Our decoder against two widely used implementations of the same network, one training step each.

Models (same sizes, taken from the composed config; default `experiment=bench_ref`: 6 layers,
d_model 384, 6 heads, d_ff 1536, seq_len 256, batch 8), all with a 256-token byte vocabulary:

    ours          models.build.build_model(..., vocab_size=256)
    x-transformers  TransformerWrapper(num_tokens=256, max_seq_len=T, attn_layers=Decoder(dim, depth,
                  heads, attn_flash=True, ff_mult=d_ff/d_model))
    hf-gpt2       transformers GPT2LMHeadModel(GPT2Config(n_embd, n_layer, n_head, n_inner, vocab 256,
                  n_positions=T, dropout = ours (0)), attn_implementation="sdpa")
    ours-loop     ours again, but stepped by trainer.loop.train_step (the CLI path: adds the accuracy
                  argmax, the finite-loss check and the schedule) to show the loop's own overhead
    ours-sdpa     (ablation, only with --models) ours with SDPA's kernel at every dtype and length
    ours-blas     (ablation, only with --models) ours with fp32 linears on PyTorch's default BLAS (MKL)
                  instead of oneDNN (models.linear; oneDNN is the default on AMD CPUs only)
    ours-compile  (ablation, only with --models) ours with trainer.compile=true's regional compile

Every model gets the identical step: forward under the project's autocast (trainer.precision),
next-token cross-entropy on fp32 logits, backward, clip_grad_norm_(1.0), and an AdamW step from
trainer.optim.build_optimizer (same hyper-parameters and weight-decay groups for all; the fused
kernel where this torch has it). Same random byte batches, same threads, one process; the
measurements are interleaved (every model/precision steps once per repeat) so machine noise hits
all of them alike. MFU counts FLOPs per token with trainer.flops.forward_flops_per_token (x3 for
training) at the same sizes for every model, against trainer.flops.peak_flops.

The peers are optional: `pip install -e .[bench]`; a missing one is skipped with a message.

    python scripts/bench_peers.py --threads 2 --steps 10 --warmup 3
    python scripts/bench_peers.py --precisions fp32 --models ours x-transformers
    python scripts/bench_peers.py --overrides model.num_layers=12 data.seq_len=512
    python scripts/bench_peers.py --models ours x-transformers hf-gpt2 ours-loop ours-sdpa ours-compile --profile

The machine line above the table names the CPU, its GEMM-relevant flags (AVX2, AVX512, VNNI,
AVX512-BF16, AMX) and the measured GEMM peaks used for MFU; --profile adds, per model, where one
step's time goes (GEMMs, attention, norms, casts, optimizer, elementwise). The tables go to
stdout and to docs/benchmarks/peers_<hardware>_<date>.md (scripts/_report.py).
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Callable

sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import _bench_common as bc  # noqa: E402
from _report import Markdown, write_result  # noqa: E402

PRESET = "experiment=bench_ref"
VOCAB = 256
MODELS = ("ours", "x-transformers", "hf-gpt2", "ours-loop")
# Ablations of ours, interleaved with the rest when asked for with --models: `ours-sdpa` forces
# SDPA's flash kernel at every dtype and length (no matmul-softmax path), `ours-blas` runs fp32
# linears on PyTorch's default BLAS instead of oneDNN (models.linear), `ours-compile` is
# ours with trainer.compile=true's regional compile (each block).
ABLATIONS = ("ours-sdpa", "ours-blas", "ours-compile")


def build_ours(cfg) -> tuple[nn.Module, callable]:
    from models.build import build_model

    model = build_model(cfg.model, cfg.attention, cfg.position, cfg.norm, vocab_size=VOCAB,
                        max_len=cfg.data.seq_len)
    return model, lambda m, x: m(x)


def build_x_transformers(cfg) -> tuple[nn.Module, callable]:
    from x_transformers import Decoder, TransformerWrapper

    m = cfg.model
    model = TransformerWrapper(num_tokens=VOCAB, max_seq_len=cfg.data.seq_len,
                               attn_layers=Decoder(dim=m.d_model, depth=m.num_layers, heads=m.num_heads,
                                                   attn_dim_head=m.d_model // m.num_heads,
                                                   attn_flash=cfg.attention.kind == "flash",
                                                   ff_mult=m.d_ff / m.d_model))
    return model, lambda mod, x: mod(x)


def build_hf_gpt2(cfg) -> tuple[nn.Module, callable]:
    from transformers import GPT2Config, GPT2LMHeadModel

    m = cfg.model
    conf = GPT2Config(n_embd=m.d_model, n_layer=m.num_layers, n_head=m.num_heads, n_inner=m.d_ff,
                      vocab_size=VOCAB, n_positions=cfg.data.seq_len, resid_pdrop=m.dropout,
                      embd_pdrop=m.dropout, attn_pdrop=m.attn_dropout, bos_token_id=VOCAB - 1,
                      eos_token_id=VOCAB - 1)
    try:
        model = GPT2LMHeadModel(conf, attn_implementation="sdpa")
    except TypeError:  # transformers >= 5 takes it through _from_config
        model = GPT2LMHeadModel._from_config(conf, attn_implementation="sdpa")
    impl = getattr(model.config, "_attn_implementation", None)
    if impl != "sdpa":
        bc.log(f"note: hf-gpt2 runs attention implementation {impl!r}, not sdpa")
    return model, lambda mod, x: mod(input_ids=x, use_cache=False).logits


BUILDERS = {"ours": build_ours, "x-transformers": build_x_transformers, "hf-gpt2": build_hf_gpt2}
PACKAGES = {"x-transformers": "x_transformers", "hf-gpt2": "transformers"}


def make_generic_case(name: str, cfg, precision: str, device: torch.device, blocks: torch.Tensor, compile_: bool):
    """(step_fn, model) for one model at one precision, stepped by the shared generic step."""
    from trainer.data import BatchStream
    from trainer.optim import build_optimizer
    from trainer.precision import autocast

    torch.manual_seed(cfg.seed)
    model, forward = BUILDERS["ours" if name.startswith("ours") else name](cfg)
    model.to(device).train()
    counted = {id(p): p for p in model.parameters() if p.requires_grad}
    n_params = sum(p.numel() for p in counted.values())
    if name.startswith("ours") and (compile_ or name == "ours-compile"):  # trainer.compile=true: each block
        from trainer.transforms.compile import apply_compile

        run_model = apply_compile(model, True)
    else:
        run_model = torch.compile(model) if compile_ else model
    optimizer = build_optimizer(model, cfg.optim, device)
    stream = BatchStream(blocks, cfg.trainer.batch_size, cfg.seed)
    clip = cfg.trainer.grad_clip if cfg.trainer.grad_clip > 0 else float("inf")
    counter = {"step": 0}

    import models.ops.attention as attention_mod

    import models.ops.linear as linear_mod

    max_scores = {} if name == "ours-sdpa" else attention_mod.MATMUL_SOFTMAX_MAX_SCORES
    gemm = "blas" if name == "ours-blas" else None

    def step():
        attention_mod.MATMUL_SOFTMAX_MAX_SCORES = max_scores  # cases interleave: set for this one
        linear_mod.FP32_GEMM_OVERRIDE = gemm
        batch = stream.batch(counter["step"]).to(device, non_blocking=True)
        x, y = batch[:, :-1], batch[:, 1:]
        with autocast(precision, device):
            logits = forward(run_model, x).float()  # fp32 softmax, as trainer.objectives does
            loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        counter["step"] += 1
        return loss

    return step, n_params, bc.optimizer_kind(optimizer)


def make_loop_case(cfg, precision: str, device: torch.device, blocks: torch.Tensor, compile_: bool):
    """Ours through trainer.loop.train_step (the config's precision and compile settings)."""
    from trainer.loop import train_step

    import models.ops.attention as attention_mod

    import models.ops.linear as linear_mod

    lp, n_params = bc.build_loop(cfg, device, blocks, vocab_size=VOCAB)
    counter = {"step": 0}
    max_scores = attention_mod.MATMUL_SOFTMAX_MAX_SCORES  # the default: an ours-sdpa case may run between

    def step():
        attention_mod.MATMUL_SOFTMAX_MAX_SCORES = max_scores
        linear_mod.FP32_GEMM_OVERRIDE = None
        out = train_step(lp, counter["step"])
        counter["step"] += 1
        return out

    return step, n_params, bc.optimizer_kind(lp.optimizer)


def paired_ratios(ours: list[float], peer: list[float]) -> dict[str, float]:
    """Per-round speed-up of ours over a peer, peer_s / ours_s for each interleaved round (both ran
    back to back in it), summarised as median and quartiles: a load change between rounds hits
    both sides of a pair, so the paired ratio is steadier than a ratio of the two medians."""
    import statistics

    r = sorted(p / o for o, p in zip(ours, peer))
    q = statistics.quantiles(r, n=4) if len(r) >= 2 else [r[0]] * 3
    return {"median": statistics.median(r), "q1": q[0], "q3": q[2]}


def print_breakdown(cases: dict, device: torch.device, out: Callable[[str], None] = print) -> None:
    """One profiled step per case: milliseconds (and share) per `_bench_common.TIME_CATEGORIES`."""
    cols = {}
    for label, fn in cases.items():
        _, self_s = bc.profile_ops(fn, device)
        cols[label] = bc.time_breakdown(self_s)
    cats = list(next(iter(cols.values())))
    rows = [[cat] + [f"{1e3 * c[cat]:.0f} ({100 * c[cat] / max(sum(c.values()), 1e-12):.0f}%)" for c in cols.values()]
            for cat in cats]
    rows.append(["total (profiled step)"] + [f"{1e3 * sum(c.values()):.0f}" for c in cols.values()])
    out("\nWhere one profiled step's time goes (torch.profiler self time, ms and share):\n")
    out(bc.markdown_table(["category", *cols], rows))


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    bc.add_common_args(p)
    p.add_argument("--precisions", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16", "fp16"])
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS + ABLATIONS)
    p.add_argument("--compile", action="store_true", help="torch.compile every model")
    p.add_argument("--no-mfu", action="store_true",
                   help="skip MFU (trainer.flops.peak_flops runs a GEMM probe once per machine/precision; "
                        "a bf16 probe on a CPU without native bf16 GEMM takes minutes)")
    p.add_argument("--fresh-peak", action="store_true",
                   help="probe the peak again (best of 3 probes, into a temporary cache) instead of trusting "
                        "the cached probe, which keeps whatever the machine's load was when it first ran")
    p.add_argument("--quiet", action="store_true", help="no per-step progress on stderr")
    p.add_argument("--profile", action="store_true",
                   help="after timing, profile one more step of each model (torch.profiler) and print where "
                        "its time goes: GEMMs, attention, norms, casts, optimizer, elementwise")
    args = p.parse_args(argv)

    threads = bc.setup_threads(args.threads)
    device = bc.get_device(args.device)
    base = [PRESET, *args.overrides, f"trainer.device={device.type}"]
    cfg = bc.compose_cfg(base)
    blocks = bc.random_blocks(max(64, cfg.trainer.batch_size * 4), cfg.data.seq_len, VOCAB, args.seed)

    available = []
    for name in args.models:
        pkg = PACKAGES.get(name)
        if pkg:
            try:
                __import__(pkg)
            except ImportError:
                bc.log(f"skip {name}: package {pkg!r} is not installed (pip install -e .[bench])")
                continue
        available.append(name)

    cases, meta = {}, {}
    for precision in args.precisions:
        for name in available:
            label = f"{name} {precision}"
            try:
                if name == "ours-loop":
                    c = bc.compose_cfg([*base, f"precision={precision}"]
                                       + (["trainer.compile=true"] if args.compile else []))
                    fn, n, opt = make_loop_case(c, precision, device, blocks, args.compile)
                else:
                    fn, n, opt = make_generic_case(name, cfg, precision, device, blocks, args.compile)
            except Exception as e:  # a peer whose API changed: report and keep the others
                bc.log(f"skip {label}: {type(e).__name__}: {e}")
                continue
            cases[label], meta[label] = fn, {"name": name, "precision": precision, "params": n, "opt": opt}
    if not cases:
        raise SystemExit("nothing to run")

    bc.log(f"timing {len(cases)} model/precision pairs: {args.warmup} warm-up + {args.steps} timed steps each, "
           f"interleaved round-robin")
    load_before = bc.load_average()
    times, cpu_times = bc.round_robin(cases, device, args.steps, args.warmup, log=None if args.quiet else bc.log)

    from trainer.flops import forward_flops_per_token

    m = cfg.model
    fpt = 3 * forward_flops_per_token(d_model=m.d_model, num_layers=m.num_layers, num_heads=m.num_heads,
                                      num_kv_heads=m.num_heads, d_ff=m.d_ff, seq_len=cfg.data.seq_len,
                                      vocab_size=VOCAB)
    peaks = {}
    if not args.no_mfu:
        # fp32's peak too: on a CPU without native bf16/fp16 GEMMs it is the hardware's real ceiling.
        for prec in dict.fromkeys([*args.precisions, "fp32"]):
            bc.log(f"peak FLOP/s ({prec}): trainer.flops.peak_flops ...")
            peaks[prec] = bc.peak(device, prec, fresh=args.fresh_peak)

    tokens = cfg.trainer.batch_size * cfg.data.seq_len
    stats = {label: bc.summarize(t) for label, t in times.items()}
    lowp_cols = any(pr != "fp32" for pr in args.precisions)
    rows = []
    for label in cases:
        info, s = meta[label], stats[label]
        tps = tokens / s["median"]
        ours = f"ours {info['precision']}"
        paired = paired_ratios(times[ours], times[label]) if ours in times else None
        rows.append([info["name"], info["precision"], f"{info['params'] / 1e6:.2f}M", info["opt"],
                     f"{s['median']:.3f}", f"{s['iqr']:.3f}", f"{bc.summarize(cpu_times[label])['median']:.3f}",
                     f"{tps:,.0f}",
                     "-" if paired is None else f"{paired['median']:.2f} ({paired['q1']:.2f}-{paired['q3']:.2f})",
                     f"{100 * tps * fpt / peaks[info['precision']]:.1f}%" if peaks else "-"]
                    + ([f"{100 * tps * fpt / peaks['fp32']:.1f}%" if peaks else "-"] if lowp_cols else []))
    md = Markdown()
    md(f"\n### One training step, ours vs peers: {PRESET} {' '.join(args.overrides)}".rstrip())
    md(f"\n{bc.environment(device)}")
    md(f"{m.num_layers} layers, d_model {m.d_model}, {m.num_heads} heads, d_ff {m.d_ff}, seq_len "
       f"{cfg.data.seq_len}, batch {cfg.trainer.batch_size}, vocab {VOCAB}, attention={cfg.attention.kind}"
       f"{', torch.compile' if args.compile else ''}; threads {threads}; {args.warmup} warm-up + "
       f"{args.steps} timed steps, interleaved ({load_before} before timing, "
       f"{bc.load_average().split(' on ')[0]} after); AdamW lr {cfg.optim.lr} wd {cfg.optim.weight_decay} "
       f"betas {list(cfg.optim.betas)}, clip {cfg.trainer.grad_clip}\n")
    md(bc.markdown_table(["model", "precision", "params", "AdamW", "s/step (median)", "IQR s", "CPU s/step",
                          "tokens/s",
                          "ours/peer (q1-q3)", "MFU"] + (["MFU vs fp32 peak"] if lowp_cols else []), rows))
    md(f"\nours/peer: this row's s/step divided by ours at the same precision in the same round (= our "
       f"tokens/s over its; >1: ours is faster), median and quartiles over the {args.steps} rounds (pairing "
       f"by round cancels load that changes between rounds). "
       f"MFU: tokens/s x {fpt / 1e6:.1f} MFLOP/token (trainer.flops, same formula for every model) / peak"
       + ("; peaks: " + ", ".join(f"{k} {v / 1e9:,.1f} GFLOP/s" for k, v in peaks.items())
          + (" (best of 3 fresh probes)" if args.fresh_peak else " (cached probe; --fresh-peak re-probes)")
          if peaks else "")
       + ".")
    if args.profile:
        print_breakdown(cases, device, md)
    if device.type == "cpu" and any(pr != "fp32" for pr in args.precisions) and not bc.cpu_has_fast_bf16():
        md("Note: this CPU has no native bf16/fp16 GEMM in oneDNN (needs AVX512-BF16/AMX/AVX-NE-CONVERT); "
           "low-precision matmuls run on a generic fallback kernel, and the bf16 peak probe measures that "
           "kernel at its 2048^3 shape.")
    write_result("peers", md.text(), device=device)


if __name__ == "__main__":
    main()
