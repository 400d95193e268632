"""One training step of our model at fp32, bf16 and fp16, side by side in one process.

The step is `trainer.loop.train_step` (forward under the project's autocast, backward through the
GradScaler, gradient clipping, the AdamW step, the schedule) on a `trainer.loop.Loop` built in
`trainer.run`'s order from the composed Hydra config, so what is timed is what the CLI runs.
Data are random byte blocks in memory (the content does not change the cost).

Reported per configuration: median seconds/step over --steps timed steps after --warmup untimed
ones (the configurations are interleaved step by step), tokens/s, the extra memory of one step
(CUDA: allocator peak above the bytes held at the start; CPU: peak of PyTorch's CPU allocator
above the start, from torch.profiler's memory events), the bytes held between steps (weights,
optimizer state), and ratios to fp32.

    python scripts/bench_precision.py                      # experiment=bench_ref, fp32/bf16/fp16
    python scripts/bench_precision.py --threads 2 --steps 10 --warmup 3
    python scripts/bench_precision.py --precisions fp32 bf16 --variants base compile foreach \\
        attention=standard lowp-weights trainer.threads=1
    python scripts/bench_precision.py --overrides data.seq_len=512 trainer.batch_size=4
    python scripts/bench_precision.py --precisions fp32 --profile --mfu --fresh-peak  # where the time goes

--profile adds, per configuration, the top ops by self time and a split into GEMMs (the
projections and LM head, with their achieved FLOP/s and the floor at the probed peak), SDPA
kernels and everything else. On CPU the table also gives the process CPU time per step: far
below threads x wall time means other processes are taking the cores.

Variants (--variants; each runs at every --precisions value):
    base            the config as composed
    compile         trainer.compile=true (torch.compile of the model, as the CLI does it)
    foreach         AdamW with foreach=True instead of the fused kernel build_optimizer picks
    lowp-weights    (bf16/fp16 only) model weights stored in the low precision with an fp32 master
                    copy in the optimizer: no per-step weight casts under autocast
    KEY=VALUE[,..]  any Hydra overrides, e.g. attention=standard or trainer.threads=1
                    (trainer.threads is applied around each of that variant's steps)

The tables go to stdout and to docs/benchmarks/precision_<hardware>_<date>.md (scripts/_report.py).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402

import _bench_common as bc  # noqa: E402
from _report import Markdown, write_result  # noqa: E402

PRESET = "experiment=bench_ref"


class MasterWeightAdamW(torch.optim.Optimizer):
    """Optimizer for a model whose parameters are stored in bf16/fp16: AdamW (built by the
    project's build_optimizer) runs on fp32 master copies; after each step the masters are
    rounded back into the model. Exposes the inner optimizer's param_groups so the schedule works.
    """

    def __init__(self, model: nn.Module, optim_cfg, device: torch.device, factory):
        self.model_params = [p for p in model.parameters() if p.requires_grad]
        shadow = nn.Module()
        shadow.params = nn.ParameterList([nn.Parameter(p.detach().float().clone()) for p in self.model_params])
        self.master = list(shadow.params)
        self.inner = factory(shadow, optim_cfg, device)
        # Share the inner optimizer's groups/state/hooks instead of calling Optimizer.__init__.
        self.defaults, self.param_groups, self.state = self.inner.defaults, self.inner.param_groups, self.inner.state
        for attr in ("_optimizer_step_pre_hooks", "_optimizer_step_post_hooks",
                     "_optimizer_state_dict_pre_hooks", "_optimizer_state_dict_post_hooks",
                     "_optimizer_load_state_dict_pre_hooks", "_optimizer_load_state_dict_post_hooks"):
            setattr(self, attr, getattr(self.inner, attr, {}))

    @torch.no_grad()
    def step(self, closure=None):
        for p, m in zip(self.model_params, self.master):
            m.grad = None if p.grad is None else p.grad.float()
        self.inner.step()
        torch._foreach_copy_(self.model_params, self.master)

    def zero_grad(self, set_to_none: bool = True):
        for p in self.model_params:
            p.grad = None
        self.inner.zero_grad(set_to_none=set_to_none)


def foreach_adamw(model: nn.Module, cfg, device: torch.device) -> torch.optim.Optimizer:
    """build_optimizer's groups and hyper-parameters, with the multi-tensor foreach path."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps, foreach=True)


def make_case(precision: str, variant: str, args, device: torch.device, blocks: torch.Tensor):
    """(step_fn, info) for one row: step_fn() runs the next train_step of that configuration."""
    from trainer.loop import train_step
    from trainer.optim import build_optimizer
    from trainer.precision import DTYPES

    overrides = [PRESET, *args.overrides, f"precision={precision}", f"trainer.device={device.type}"]
    factory = build_optimizer
    lowp = False
    if variant == "compile":
        overrides.append("trainer.compile=true")
    elif variant == "foreach":
        factory = foreach_adamw
    elif variant == "lowp-weights":
        if precision == "fp32":
            return None, "lowp-weights needs bf16 or fp16"
        if precision == "fp16":
            return None, "lowp-weights with fp16 needs a GradScaler over the master grads (not built)"
        lowp = True
    elif "=" in variant:
        overrides += variant.split(",")
    elif variant != "base":
        raise SystemExit(f"unknown variant {variant!r}")
    cfg = bc.compose_cfg(overrides)
    if lowp:
        dtype = DTYPES[precision]

        def factory(model, ocfg, dev):  # noqa: F811 - the model is cast before its optimizer exists
            model.to(dtype)
            return MasterWeightAdamW(model, ocfg, dev, build_optimizer)

    lp, n_params = bc.build_loop(cfg, device, blocks, optimizer_factory=factory)
    counter = {"step": 0, "skipped": 0}
    threads = cfg.trainer.threads

    def step():
        old = torch.get_num_threads()
        if threads:
            torch.set_num_threads(threads)
        try:
            out = train_step(lp, counter["step"])
        finally:
            if threads:
                torch.set_num_threads(old)
        counter["step"] += 1
        counter["skipped"] += int(out["skipped"])
        return out

    info = {"cfg": cfg, "loop": lp, "params": n_params, "counter": counter,
            "tokens": cfg.trainer.batch_size * cfg.data.seq_len, "threads": threads or torch.get_num_threads(),
            "opt": bc.optimizer_kind(lp.optimizer.inner if lowp else lp.optimizer)}
    return step, info


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    bc.add_common_args(p)
    p.add_argument("--precisions", nargs="+", default=["fp32", "bf16", "fp16"], choices=["fp32", "bf16", "fp16"])
    p.add_argument("--variants", nargs="+", default=["base"],
                   help="base | compile | foreach | lowp-weights | KEY=VALUE[,KEY=VALUE] (Hydra overrides)")
    p.add_argument("--mfu", action="store_true",
                   help="also report MFU against trainer.flops.peak_flops (a GEMM probe, cached per "
                        "machine; the first bf16/fp16 probe on a CPU without native bf16 can take minutes)")
    p.add_argument("--fresh-peak", action="store_true",
                   help="probe the peak again (best of 3 probes, into a temporary cache) instead of trusting "
                        "the cached probe, which keeps whatever the machine's load was when it first ran")
    p.add_argument("--profile", action="store_true",
                   help="after timing, profile one more step of each configuration (top ops by self time)")
    p.add_argument("--no-memory", action="store_true", help="skip the (untimed) memory-accounting step")
    p.add_argument("--quiet", action="store_true", help="no per-step progress on stderr")
    args = p.parse_args(argv)

    threads = bc.setup_threads(args.threads)
    device = bc.get_device(args.device)
    torch.manual_seed(args.seed)
    cfg0 = bc.compose_cfg([PRESET, *args.overrides])
    blocks = bc.random_blocks(max(64, cfg0.trainer.batch_size * 4), cfg0.data.seq_len, 256, args.seed)
    log = None if args.quiet else bc.log

    cases, infos = {}, {}
    for variant in args.variants:
        for precision in args.precisions:
            label = f"{precision} {variant}"
            try:
                fn, info = make_case(precision, variant, args, device, blocks)
            except Exception as e:  # a variant this torch/device cannot build: say so, keep going
                bc.log(f"skip {label}: {type(e).__name__}: {e}")
                continue
            if fn is None:
                bc.log(f"skip {label}: {info}")
                continue
            cases[label], infos[label] = fn, info
    if not cases:
        raise SystemExit("nothing to run")

    bc.log(f"timing {len(cases)} configuration(s): {args.warmup} warm-up + {args.steps} timed steps each, "
           f"interleaved")
    load_before = bc.load_average()
    times, cpu_times = bc.round_robin(cases, device, args.steps, args.warmup, log=log)

    mem = {}
    if not args.no_memory:
        for label, fn in cases.items():
            mem[label] = bc.step_memory(fn, device)

    peaks = {}
    if args.mfu:
        for key in sorted({(label.split()[0], infos[label]["threads"]) for label in cases}):
            prec, n = key
            bc.log(f"peak FLOP/s probe ({prec}, {n} threads) ...")
            torch.set_num_threads(n)  # the probe is cached per thread count
            peaks[key] = bc.peak(device, prec, fresh=args.fresh_peak)
        torch.set_num_threads(threads)

    from trainer.data import VOCAB_SIZE
    from trainer.flops import train_flops_per_token

    stats = {label: bc.summarize(t) for label, t in times.items()}
    for label, info in infos.items():
        lp = info["loop"]
        if isinstance(lp.optimizer, MasterWeightAdamW):  # fp32 masters + state, plus the low-precision model
            info["held"] = bc.state_bytes(lp.model, lp.optimizer.inner) + bc.tensor_bytes(lp.optimizer.master)
        else:
            info["held"] = bc.state_bytes(lp.model, lp.optimizer)

    def ref_label(precision: str, variant: str) -> str | None:
        """The row a ratio compares against: fp32 of the same variant (else fp32 base)."""
        for cand in (f"{precision} {variant}", f"{precision} base"):
            if cand in infos:
                return cand
        return None

    rows = []
    for label, info in infos.items():
        precision, variant = label.split(" ", 1)
        med = stats[label]["median"]
        tps = info["tokens"] / med
        r32, rb = ref_label("fp32", variant), (f"{precision} base" if f"{precision} base" in infos else None)
        m = mem.get(label)
        m32 = mem.get(r32) if r32 else None
        name = variant
        if info["counter"]["skipped"]:
            name += f" ({info['counter']['skipped']} steps skipped by GradScaler)"
        row = [precision, name, info["opt"], f"{med:.3f}", f"{stats[label]['iqr']:.3f}",
               f"{bc.summarize(cpu_times[label])['median']:.3f}", f"{tps:,.0f}",
               f"{stats[r32]['median'] / med:.2f}x" if r32 else "-",
               f"{stats[rb]['median'] / med:.2f}x" if rb and rb != label else "-",
               bc.mib(m["extra"]) if m else "-",
               f"{m['extra'] / m32['extra']:.2f}x" if m and m32 and m32["extra"] else "-",
               bc.mib(info["held"])]
        if args.mfu:
            fpt = train_flops_per_token(info["cfg"].model, info["cfg"].data.seq_len, VOCAB_SIZE)
            row.append(f"{100 * tps * fpt / peaks[(precision, info['threads'])]:.1f}%")
        rows.append(row)
    headers = ["precision", "variant", "AdamW", "s/step (median)", "IQR s", "CPU s/step", "tokens/s", "speed vs fp32",
               "speed vs base", "step extra MiB", "mem vs fp32", "held MiB"]
    if args.mfu:
        headers.append("MFU")
    c = cfg0
    md = Markdown()
    md(f"\n### One training step (trainer.loop.train_step): {PRESET} {' '.join(args.overrides)}".rstrip())
    md(f"\n{bc.environment(device)}")
    md(f"model: {c.model.arch}, {c.model.num_layers} layers, d_model {c.model.d_model}, {c.model.num_heads} heads, "
       f"d_ff {c.model.d_ff}, attention={c.attention.kind}, seq_len {c.data.seq_len}, batch {c.trainer.batch_size}, "
       f"{next(iter(infos.values()))['params'] / 1e6:.2f}M params; threads {threads}; "
       f"{args.warmup} warm-up + {args.steps} timed steps, interleaved; {load_before} before timing, "
       f"{bc.load_average().split(' on ')[0]} after\n")
    md(bc.markdown_table(headers, rows))
    md("\nspeed vs fp32 / vs base: ratio of median step times (>1 = faster than the reference row). "
       "CPU s/step: median process CPU time (all threads) per step; compare with s/step to see "
       "time lost to other processes. "
       "step extra MiB: peak allocator memory of one step above what was held at its start "
       "(activations, gradients, temporaries). held MiB: weights + buffers + optimizer state between steps.")
    if args.mfu:
        md("MFU peaks (trainer.flops.peak_flops): "
           + ", ".join(f"{p} at {n} thread(s) {v / 1e9:,.1f} GFLOP/s" for (p, n), v in sorted(peaks.items()))
           + (" (best of 3 fresh probes)" if args.fresh_peak else
              " (the cached probe: on a shared machine it keeps the load of the moment it first ran; "
              "--fresh-peak re-probes)"))
    if device.type == "cpu" and any(l.split()[0] != "fp32" for l in cases) and not bc.cpu_has_fast_bf16():
        md("\nNote: this CPU has no native bf16/fp16 GEMM in oneDNN (needs AVX512-BF16/AMX/AVX-NE-CONVERT); "
           "low-precision matmuls run on a generic fallback kernel.")

    if args.profile:
        from trainer.flops import forward_flops_per_token

        for label, fn in cases.items():
            info = infos[label]
            m, T = info["cfg"].model, info["cfg"].data.seq_len
            # seq_len=0 drops the attention score/value terms: what is left runs as GEMMs (projections, head).
            gemm_flops = 3 * info["tokens"] * forward_flops_per_token(
                d_model=m.d_model, num_layers=m.num_layers, num_heads=m.num_heads,
                num_kv_heads=m.num_kv_heads or m.num_heads, d_ff=m.d_ff, seq_len=0, vocab_size=VOCAB_SIZE,
                swiglu=m.activation == "swiglu") if m.arch == "decoder" else 0.0
            table, self_s = bc.profile_ops(fn, device)
            md(f"\n#### Profile: {label} (one step, top ops by self time)\n")
            md(bc.gemm_summary(self_s, gemm_flops, peaks.get((label.split()[0], info["threads"]))) + "\n")
            md("```\n" + table + "```")
    write_result("precision", md.text(), device=device)


if __name__ == "__main__":
    main()
