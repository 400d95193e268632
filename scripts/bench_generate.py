"""Generation speed with and without the KV cache: tokens/s at several lengths and precisions.

`trainer.generate.generate` (the CLI's own code path), batch 1, greedy, a 16-token prompt, EOS
ignored so every run produces exactly N tokens; the time includes the prompt's forward pass. The
model is a run's (--run-dir) or, by default, `make train`'s decoder built from the composed config
with random weights (the weights do not change the cost).

    python scripts/bench_generate.py --threads 2                          # 64/256/1024, fp32 and bf16
    python scripts/bench_generate.py --run-dir outputs/<date>/<time> --lengths 64 256 --precisions fp32

The table goes to stdout, row by row, and to docs/benchmarks/generate_<hardware>_<date>.md
(scripts/_report.py).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from trainer.generate import generate  # noqa: E402

from _report import Markdown, write_result  # noqa: E402


def build(run_dir: str | None, overrides: list[str]) -> tuple[torch.nn.Module, str]:
    if run_dir:
        from trainer import load_model

        model, _, cfg = load_model(run_dir)
    else:
        from hydra import compose, initialize_config_dir

        from models.build import build_model
        from trainer.config.schema import register_configs
        from trainer.data import VOCAB_SIZE

        register_configs()
        conf = str(Path(__file__).resolve().parents[1] / "conf")
        with initialize_config_dir(config_dir=conf, version_base="1.3"):
            cfg = compose(config_name="config", overrides=overrides)
        torch.manual_seed(0)
        model = build_model(cfg.model, cfg.attention, cfg.position, cfg.norm, vocab_size=VOCAB_SIZE,
                            max_len=cfg.data.seq_len).eval()
    m = cfg.model
    desc = (f"{m.arch} {m.num_layers}x{m.d_model}, {m.num_heads} heads, attention={cfg.attention.kind}, "
            f"position={cfg.position.kind}, {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters")
    return model, desc


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run-dir", default=None)
    p.add_argument("--lengths", type=int, nargs="+", default=[64, 256, 1024])
    p.add_argument("--precisions", nargs="+", default=["fp32", "bf16"])
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--repeats", type=int, default=1, help="timed runs per cell (the best is kept)")
    p.add_argument("--no-cache-max", type=int, default=None,
                   help="skip the (quadratic) no-cache run above this many new tokens")
    p.add_argument("--overrides", nargs="*", default=[], help="Hydra overrides for the default model")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model, desc = build(args.run_dir, args.overrides)
    if getattr(model.decoder.position, "max_len", None):
        raise SystemExit("position=learned cannot generate past its table; benchmark another position scheme.")
    prompt = torch.randint(0, 256, (1, 16), generator=torch.Generator().manual_seed(0))
    md = Markdown()
    md(f"model: {desc}; torch {torch.__version__}, {torch.get_num_threads()} threads, batch 1, "
       f"16-token prompt, greedy, best of {args.repeats}\n")
    md("| new tokens | precision | no cache tok/s | KV cache tok/s | speed-up |")
    md("|---:|---|---:|---:|---:|")
    for precision in args.precisions:
        generate(model, prompt, 8, precision=precision, eos_id=None)  # warm-up
        generate(model, prompt, 8, precision=precision, eos_id=None, kv_cache=False)
        for n in args.lengths:
            rate = {}
            for cache in (False, True):
                if not cache and args.no_cache_max is not None and n > args.no_cache_max:
                    rate[cache] = float("nan")
                    continue
                best = float("inf")
                for _ in range(args.repeats):
                    t0 = time.perf_counter()
                    out = generate(model, prompt, n, precision=precision, eos_id=None, kv_cache=cache)
                    best = min(best, time.perf_counter() - t0)
                assert out.shape[1] == n
                rate[cache] = n / best
            if rate[False] == rate[False]:
                md(f"| {n} | {precision} | {rate[False]:,.1f} | {rate[True]:,.1f} | "
                   f"{rate[True] / rate[False]:.1f}x |")
            else:
                md(f"| {n} | {precision} | (skipped) | {rate[True]:,.1f} | |")
    write_result("generate", md.text())


if __name__ == "__main__":
    main()
