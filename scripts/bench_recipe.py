"""What each training-recipe choice buys: the AdamW/GPT-2 baseline against each choice alone and all
of them together, on the same data, token budget and seeds, through the trainer itself (run(cfg)).

Configuration: `experiment=shakespeare` (nanoGPT's CPU Shakespeare config: 4 x 128, 4 heads, d_ff
512, T 64, batch 12, AdamW lr 1e-3 betas (0.9, 0.99) wd 0.1, warmup 100 + cosine to 1e-4, grad clip
1, learned positions, dropout 0, 2000 steps; data=text on nanoGPT's input.txt with its 90/10 split)
plus, per configuration:

    baseline   nothing else (AdamW, GELU, cosine)
    muon       optim=muon (torch.optim.Muon on the blocks' matrices, AdamW on the rest)
    qk_norm    model.qk_norm=true
    relu2      model.activation=relu2
    softcap    model.logit_softcap=15
    wsd        schedule=wsd (warmup 100, stable, linear decay over the last 20% to 0)
    z_loss     objective.z_loss=1e-4
    all        every choice above together

Reported per configuration, mean ± spread (half the range) over the seeds: held-out loss
(eval/loss, the trainer's fixed sample) at fixed token counts, the tokens (and steps) it takes to
reach the baseline's final mean loss (linear between evaluations; "-" when never), and the median
train/step_time_s (a loaded machine: read it as a ratio).

    python scripts/bench_recipe.py --text input.txt --seeds 0 1 2                     # the full study
    python scripts/bench_recipe.py --text input.txt --seeds 0 --configs baseline muon --out a.json
    python scripts/bench_recipe.py --merge a.json b.json                              # one table

`--text` is nanoGPT's `data/shakespeare_char/input.txt` (tiny Shakespeare, 1,115,394 characters).
The table goes to stdout and docs/benchmarks/recipe_<hardware>_<date>.md (scripts/_report.py); a run
with --out writes only its JSON, and --merge writes the result file.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _bench_common as bc  # noqa: E402
from _report import invocation, write_result  # noqa: E402

CONFIGS = {
    "baseline": [],
    "muon": ["optim=muon"],
    "qk_norm": ["model.qk_norm=true"],
    "relu2": ["model.activation=relu2"],
    "softcap": ["model.logit_softcap=15"],
    "wsd": ["schedule=wsd", "schedule.warmup_steps=100"],
    "z_loss": ["objective.z_loss=1e-4"],
}
CONFIGS["all"] = [o for name, overrides in CONFIGS.items() if name != "baseline" for o in overrides]


def scalars(run_dir: str, tag: str) -> dict[int, float]:
    """{step: value} of TensorBoard tag `tag` in `run_dir` (TensorBoard's own reader)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(run_dir, size_guidance={"scalars": 0})
    acc.Reload()
    return {ev.step: ev.value for ev in acc.Scalars(tag)} if tag in acc.Tags()["scalars"] else {}


def run_one(name: str, seed: int, args, workdir: str) -> dict:
    """Train configuration `name` with `seed`; its eval curve, tokens per step and step time."""
    from trainer.run import run

    overrides = ["experiment=shakespeare", f"data.files=[{os.path.abspath(args.text)}]", f"seed={seed}",
                 f"trainer.max_steps={args.steps}", f"trainer.eval_every={args.eval_every}",
                 "trainer.checkpoint_every=1000000", "trainer.progress=false", "trainer.resume=never",
                 "trainer.device=cpu", *CONFIGS[name], *args.overrides]
    if args.threads:
        overrides.append(f"trainer.threads={args.threads}")
    cfg = bc.compose_cfg(overrides)
    run_dir = os.path.join(workdir, f"{name}_s{seed}")
    t0 = time.perf_counter()
    summary = run(cfg, run_dir=run_dir)
    evals = scalars(run_dir, "eval/loss")
    times = list(scalars(run_dir, "train/step_time_s").values())
    bc.log(f"{name} seed {seed}: eval/loss {summary['eval/loss']:.4f} ({time.perf_counter() - t0:.0f}s)")
    return {"evals": {str(k): v for k, v in sorted(evals.items())}, "step_time_s": statistics.median(times),
            "tokens_per_step": summary["tokens"] / max(summary["steps"], 1), "overrides": CONFIGS[name]}


def mean_spread(values: list[float]) -> tuple[float, float]:
    """(mean, half the range): with 1-3 seeds the range says more than a standard deviation."""
    return statistics.fmean(values), (max(values) - min(values)) / 2


def steps_to_reach(curve: dict[int, float], target: float) -> float | None:
    """The first step where the eval curve reaches `target`, linear between evaluations (None: never)."""
    pts = sorted(curve.items())
    for (s0, l0), (s1, l1) in zip([(0, float("inf"))] + pts, pts):
        if l1 <= target:
            return float(s1) if l0 == float("inf") else s0 + (s1 - s0) * (l0 - target) / (l0 - l1)
    return None


def report(res: dict) -> str:
    runs = res["runs"]  # name -> seed -> result
    names = [n for n in CONFIGS if n in runs]
    steps = sorted({int(s) for seeds in runs.values() for r in seeds.values() for s in r["evals"]})
    shown = [s for s in steps if s in {steps[len(steps) // 4 - 1] if len(steps) >= 4 else steps[0],
                                       steps[len(steps) // 2 - 1], steps[-1]}]
    tps = next(iter(next(iter(runs.values())).values()))["tokens_per_step"]
    base = runs.get("baseline")
    target = statistics.fmean(r["evals"][str(steps[-1])] for r in base.values()) if base else None
    rows = []
    for n in names:
        seeds = runs[n].values()
        cells = ["{:.3f} ± {:.3f}".format(*mean_spread([r["evals"][str(s)] for r in seeds])) for s in shown]
        reach = [steps_to_reach({int(k): v for k, v in r["evals"].items()}, target) for r in seeds] if target else []
        if reach and all(x is not None for x in reach):
            m, sp = mean_spread(reach)
            reach_cell = f"{m * tps / 1e6:.2f}M ({m:.0f} ± {sp:.0f} steps)"
        else:
            reach_cell = "-"
        rows.append([n, " ".join(runs[n][next(iter(runs[n]))]["overrides"]) or "(none)", *cells, reach_cell,
                     f"{statistics.fmean(r['step_time_s'] for r in seeds):.3f}"])
    headers = ["config", "overrides", *[f"eval/loss @ {s * tps / 1e6:.2f}M tok (step {s})" for s in shown],
               f"tokens to baseline's final {target:.3f}" if target else "tokens to baseline", "s/step"]
    n_seeds = sorted({s for seeds in runs.values() for s in seeds})
    lines = [f"`{c}`" for c in res["command"].splitlines()]
    lines += ["", res["env"], "", f"{res['steps']} steps of {tps:.0f} tokens; seeds {', '.join(n_seeds)}; "
              f"mean ± half the range over the seeds; eval/loss is the trainer's held-out sample.", "",
              bc.markdown_table(headers, rows)]
    return "\n".join(lines)


def merge(parts: list[dict]) -> dict:
    out = parts[0]
    for p in parts[1:]:
        for name, seeds in p["runs"].items():
            out["runs"].setdefault(name, {}).update(seeds)
        out["command"] += "\n" + p["command"]
    return out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--text", help="nanoGPT's shakespeare_char input.txt")
    p.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--eval-every", type=int, default=250)
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads per run")
    p.add_argument("--overrides", nargs="*", default=[], help="Hydra overrides added to every configuration")
    p.add_argument("--out", help="write the raw results as JSON (for --merge) instead of the result file")
    p.add_argument("--merge", nargs="+", metavar="JSON", help="one table from --out files; no training")
    args = p.parse_args(argv)
    if args.merge:
        res = merge([json.loads(Path(f).read_text()) for f in args.merge])
        text = report(res)
        print(text)
        write_result("recipe", text, command=res["command"] + "\n" + invocation())
        return
    if not args.text or not os.path.isfile(args.text):
        p.error("--text must name nanoGPT's shakespeare_char input.txt")
    import torch

    runs: dict[str, dict[str, dict]] = {}
    with tempfile.TemporaryDirectory(prefix="bench_recipe_") as workdir:
        for name in args.configs:
            for seed in args.seeds:
                runs.setdefault(name, {})[str(seed)] = run_one(name, seed, args, workdir)
    res = {"runs": runs, "steps": args.steps, "env": bc.environment(torch.device("cpu")),
           "command": "python scripts/bench_recipe.py " + " ".join(map(shlex.quote, sys.argv[1:] if argv is None
                                                                         else argv))}
    text = report(res)
    print(text)
    if args.out:
        Path(args.out).write_text(json.dumps(res, indent=1))
    else:
        write_result("recipe", text, command=res["command"])


if __name__ == "__main__":
    main()
