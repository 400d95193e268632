"""Learning quality: our decoder against two peers, trained identically, held-out loss side by side.

Models (sizes from the composed config; `position=learned` by default, like GPT-2), vocab 384:

    ours            models.build.build_model(cfg.model, cfg.attention, cfg.position, cfg.norm)
    hf-gpt2         transformers GPT2LMHeadModel(GPT2Config(n_embd, n_layer, n_head, n_inner=d_ff,
                    n_positions=T, dropout 0, GELU (erf), tied head)), attn_implementation="sdpa"
    x-transformers  TransformerWrapper(Decoder(dim, depth, heads, attn_dim_head=dim/heads, ff_mult=d_ff/dim),
                    learned absolute positions, tie_embedding=True)

Every model is initialised by its own library under torch.manual_seed(s) and then sees exactly the
same thing: the project's default corpus (trainer.data.load_corpus: byte-level stdlib source), the
same training batches (trainer.data.BatchStream(train, batch, data_seed).batch(step), fixed data
seed, so only the init varies with s), next-token cross-entropy in fp32, grad clip, and AdamW with
one decay rule for all (decay on Linear/Conv1D weights and the token embedding; none on norms,
biases, position tables) and trainer.optim.build_scheduler's warmup + cosine. The held-out loss is
the mean next-token cross-entropy over trainer.heldout.eval_sample (the trainer's own sample),
model.eval(), no_grad. All (model, seed) pairs are stepped in lockstep in one process (everyone
does step k before anyone does step k+1), so machine noise hits them alike; s/step is reported too.

Presets: `tiny` = nanoGPT's CPU Shakespeare config (4 x 128, 4 heads, d_ff 512, T 64, batch 12,
lr 1e-3, betas (0.9, 0.99), wd 0.1, warmup 100, cosine to 1e-4, 2000 steps); `ref` =
`experiment=bench_ref` (6 x 384, 6 heads, d_ff 1536, T 256, batch 8; the config's optimizer), 300 steps.
The peers are optional (`pip install -e .[bench]`); a missing one is skipped with a message.

    python scripts/bench_quality.py --preset tiny --seeds 0 1 2 --threads 1
    python scripts/bench_quality.py --preset tiny --steps 500 --overrides position=sinusoidal
    python scripts/bench_quality.py --preset tiny --seeds 0 --out s0.json   # one seed per process,
    python scripts/bench_quality.py --merge s0.json s1.json s2.json        # then one table

The table goes to stdout and to docs/benchmarks/quality_<hardware>_<date>.md (scripts/_report.py);
a run with --out is one part of a merged table, so it writes only its JSON, and --merge writes the
result file with every part's command.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import _bench_common as bc  # noqa: E402
from _report import invocation, write_result  # noqa: E402

VOCAB = 384  # trainer.data.VOCAB_SIZE: bytes + special ids
MODELS = ("ours", "hf-gpt2", "x-transformers")
PACKAGES = {"x-transformers": "x_transformers", "hf-gpt2": "transformers"}
PRESETS = {
    "tiny": dict(steps=2000, eval_at=[250, 500, 1000, 2000], overrides=[
        "model.d_model=128", "model.num_layers=4", "model.num_heads=4", "model.d_ff=512", "data.seq_len=64",
        "trainer.batch_size=12", "optim.lr=1e-3", "optim.betas=[0.9,0.99]", "optim.weight_decay=0.1",
        "schedule.warmup_steps=100", "schedule.min_lr_ratio=0.1"]),
    "ref": dict(steps=300, eval_at=[100, 200, 300], overrides=["experiment=bench_ref"]),
}


# ----------------------------------------------------------------------------------------------
# Models: (module, forward(module, x) -> logits, token embedding)
# ----------------------------------------------------------------------------------------------


def build_ours(cfg):
    from models.build import build_model

    model = build_model(cfg.model, cfg.attention, cfg.position, cfg.norm, vocab_size=VOCAB, max_len=cfg.data.seq_len)
    return model, lambda mod, x: mod(x), model.embed


def build_hf_gpt2(cfg):
    from transformers import GPT2Config, GPT2LMHeadModel

    m = cfg.model
    conf = GPT2Config(n_embd=m.d_model, n_layer=m.num_layers, n_head=m.num_heads, n_inner=m.d_ff, vocab_size=VOCAB,
                      n_positions=cfg.data.seq_len, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                      activation_function="gelu", tie_word_embeddings=True, bos_token_id=VOCAB - 1,
                      eos_token_id=VOCAB - 1)
    try:
        model = GPT2LMHeadModel(conf, attn_implementation="sdpa")
    except TypeError:  # transformers >= 5 takes it through _from_config
        model = GPT2LMHeadModel._from_config(conf, attn_implementation="sdpa")
    impl = getattr(model.config, "_attn_implementation", None)
    if impl != "sdpa":
        bc.log(f"note: hf-gpt2 runs attention implementation {impl!r}, not sdpa")
    return model, lambda mod, x: mod(input_ids=x, use_cache=False).logits, model.get_input_embeddings()


def build_x_transformers(cfg):
    from x_transformers import Decoder, TransformerWrapper

    m = cfg.model
    model = TransformerWrapper(num_tokens=VOCAB, max_seq_len=cfg.data.seq_len, use_abs_pos_emb=True,
                               tie_embedding=True,
                               attn_layers=Decoder(dim=m.d_model, depth=m.num_layers, heads=m.num_heads,
                                                   attn_dim_head=m.d_model // m.num_heads,
                                                   attn_flash=cfg.attention.kind == "flash",
                                                   ff_mult=m.d_ff / m.d_model))
    return model, lambda mod, x: mod(x), model.token_emb.emb


BUILDERS = {"ours": build_ours, "hf-gpt2": build_hf_gpt2, "x-transformers": build_x_transformers}


def decay_split(model: nn.Module, token_embedding: nn.Embedding) -> tuple[list, list]:
    """(decayed, not decayed): Linear/Conv1D weights and the token embedding vs everything else
    (norms, biases, position tables), by module kind; tied tensors counted once."""
    ids = {id(mod.weight) for mod in model.modules() if isinstance(mod, nn.Linear) or type(mod).__name__ == "Conv1D"}
    ids.add(id(token_embedding.weight))
    unique = {id(p): p for p in model.parameters() if p.requires_grad}
    return [p for i, p in unique.items() if i in ids], [p for i, p in unique.items() if i not in ids]


class Case:
    """One (model, seed): its module, optimizer and schedule, stepped on the shared batches."""

    def __init__(self, name: str, seed: int, cfg, steps: int):
        from trainer.optim import build_scheduler, decay_parameters

        torch.manual_seed(seed)
        self.name, self.seed, self.clip = name, seed, cfg.trainer.grad_clip if cfg.trainer.grad_clip > 0 else math.inf
        self.model, self.forward, tok = BUILDERS[name](cfg)
        decay, no_decay = decay_split(self.model, tok)
        if name == "ours":  # the generic rule must be the trainer's own rule on our model
            ref = decay_parameters(self.model)
            assert [id(p) for p in decay] == [id(p) for p in ref[0]] and len(no_decay) == len(ref[1])
        self.params = sum(p.numel() for p in decay + no_decay)
        o = cfg.optim
        groups = [{"params": decay, "weight_decay": o.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
        try:
            self.opt = torch.optim.AdamW(groups, lr=o.lr, betas=tuple(o.betas), eps=o.eps, fused=True)
        except (RuntimeError, TypeError, ValueError):
            self.opt = torch.optim.AdamW(groups, lr=o.lr, betas=tuple(o.betas), eps=o.eps, foreach=True)
        self.sched = build_scheduler(self.opt, cfg.schedule, steps)
        self.seconds, self.last_loss = 0.0, float("nan")
        self.model.train()

    def step(self, blocks: torch.Tensor) -> None:
        t0 = time.perf_counter()
        x, y = blocks[:, :-1], blocks[:, 1:]  # (B, T) inputs and next-token targets
        logits = self.forward(self.model, x).float()  # (B, T, V)
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.clip)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        self.sched.step()
        self.seconds += time.perf_counter() - t0
        self.last_loss = loss.item()

    @torch.no_grad()
    def evaluate(self, sample: list[torch.Tensor]) -> float:
        """Mean next-token cross-entropy over every target of the held-out sample."""
        self.model.eval()
        total, n = 0.0, 0
        for blocks in sample:
            logits = self.forward(self.model, blocks[:, :-1]).float()  # (B, T, V)
            total += F.cross_entropy(logits.reshape(-1, VOCAB), blocks[:, 1:].reshape(-1), reduction="sum").item()
            n += blocks[:, 1:].numel()
        self.model.train()
        return total / n


# ----------------------------------------------------------------------------------------------
# Training in lockstep, and the report
# ----------------------------------------------------------------------------------------------


def train(args, cfg) -> dict:
    from trainer.data import BatchStream, load_corpus
    from trainer.data.heldout import eval_sample

    corpus = load_corpus(cfg.data, cfg.seed)
    stream = BatchStream(corpus.train, cfg.trainer.batch_size, args.data_seed)
    sample = list(eval_sample(corpus.val, cfg.trainer.batch_size, cfg.trainer.eval_batches))
    bc.log(f"corpus: {len(corpus.train):,} train / {len(corpus.val):,} val blocks of {cfg.data.seq_len + 1}; "
           f"eval sample {sum(len(b) for b in sample)} blocks")
    cases: list[Case] = []
    for name in args.models:
        try:
            if name in PACKAGES:
                __import__(PACKAGES[name])
        except ImportError:
            bc.log(f"skip {name}: package {PACKAGES[name]!r} is not installed (pip install -e .[bench])")
            continue
        cases += [Case(name, s, cfg, args.steps) for s in args.seeds]
        bc.log(f"{name}: {cases[-1].params / 1e6:.3f}M parameters")
    names = list(dict.fromkeys(c.name for c in cases))
    evals: dict[str, dict[str, dict[str, float]]] = {n: {} for n in names}  # model -> seed -> step -> loss
    for c in cases:
        evals[c.name][str(c.seed)] = {}
    wall0 = time.perf_counter()
    for step in range(1, args.steps + 1):
        blocks = stream.batch(step - 1)  # the same batch for every model and seed
        for c in cases:
            c.step(blocks)
        if step in args.eval_at:
            for c in cases:
                evals[c.name][str(c.seed)][str(step)] = c.evaluate(sample)
        if step % args.log_every == 0 or step in args.eval_at:
            bc.log(f"step {step}/{args.steps} ({time.perf_counter() - wall0:.0f}s): " + ", ".join(
                f"{c.name}/s{c.seed} {c.last_loss:.3f}" + (f" eval {evals[c.name][str(c.seed)][str(step)]:.3f}"
                                                            if step in args.eval_at else "") for c in cases))
    seconds = {n: sum(c.seconds for c in cases if c.name == n) / (args.steps * len(args.seeds)) for n in names}
    params = {n: next(c.params for c in cases if c.name == n) for n in names}
    return {"evals": evals, "s_per_step": {n: [v] for n, v in seconds.items()}, "params": params,
            "eval_at": args.eval_at, "steps": args.steps, "wall_s": [time.perf_counter() - wall0],
            "env": bc.environment(torch.device("cpu")),
            "command": "python scripts/bench_quality.py " + " ".join(map(shlex.quote, sys.argv[1:])),
            "config": describe(cfg, args)}


def describe(cfg, args) -> str:
    m, o, s = cfg.model, cfg.optim, cfg.schedule
    return (f"{m.num_layers} layers, d_model {m.d_model}, {m.num_heads} heads, d_ff {m.d_ff}, T {cfg.data.seq_len}, "
            f"batch {cfg.trainer.batch_size}, vocab {VOCAB}, position={cfg.position.kind}, "
            f"attention={cfg.attention.kind}; AdamW lr {o.lr} betas {list(o.betas)} wd {o.weight_decay}, warmup "
            f"{s.warmup_steps} + {s.name} to {s.min_lr_ratio}x over {args.steps} steps, clip {cfg.trainer.grad_clip}, "
            f"fp32; data seed {args.data_seed}; eval: {cfg.trainer.eval_batches} x {cfg.trainer.batch_size} held-out "
            f"blocks (trainer.heldout.eval_sample)")


def merge(results: list[dict]) -> dict:
    out = results[0]
    for r in results[1:]:
        for name, seeds in r["evals"].items():
            out["evals"].setdefault(name, {}).update(seeds)
        for name, v in r["s_per_step"].items():
            out["s_per_step"].setdefault(name, []).extend(v)
        out["params"].update(r["params"])
        out["wall_s"] += r["wall_s"]
        out["command"] += "\n" + r["command"]
    return out


def mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def report(res: dict) -> str:
    steps = [str(s) for s in res["eval_at"]]
    finals, rows = {}, []
    for name, seeds in res["evals"].items():
        cells = []
        for s in steps:
            cells.append("{:.3f} ± {:.3f}".format(*mean_std([v[s] for v in seeds.values()])))
        finals[name] = mean_std([v[steps[-1]] for v in seeds.values()])
        rows.append([name, f"{res['params'][name] / 1e6:.2f}M", *cells,
                     f"{statistics.fmean(res['s_per_step'][name]):.4f}"])
    n = len(next(iter(res["evals"].values())))
    lines = [f"`{c}`" for c in res["command"].splitlines()]
    lines += ["", res["env"], res["config"],
              f"held-out loss, mean ± std over {n} init seed(s) ({', '.join(next(iter(res['evals'].values())))}); "
              f"wall {max(res['wall_s']):.0f}s", "",
              bc.markdown_table(["model", "params", *[f"step {s}" for s in steps[:-1]], f"final (step {steps[-1]})",
                                 "s/step"], rows)]
    peers = {k: v for k, v in finals.items() if k != "ours"}
    if "ours" in finals and peers:
        best = min(peers, key=lambda k: peers[k][0])
        (mo, so), (mp, sp) = finals["ours"], peers[best]
        diff = mo - mp
        se = math.sqrt((so ** 2 + sp ** 2) / n) if n > 1 else float("nan")
        beyond = "n/a (one seed)" if n < 2 else ("yes" if abs(diff) > 2 * se else "no")
        lines += ["", f"Verdict: ours {mo:.3f} vs best peer {best} {mp:.3f} at step {steps[-1]}: difference "
                      f"{diff:+.3f} nats ({'ours better' if diff < 0 else 'ours worse' if diff > 0 else 'equal'}); "
                      f"seed std ours {so:.3f}, {best} {sp:.3f}; beyond seed noise (|diff| > 2 standard errors "
                      f"= {2 * se:.3f}): {beyond}."]
    return "\n".join(lines)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
    p.add_argument("--steps", type=int, help="training steps (default: the preset's); the cosine spans them")
    p.add_argument("--eval-at", type=int, nargs="+", help="eval steps (default: the preset's, <= --steps, + last)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="model init seeds")
    p.add_argument("--data-seed", type=int, default=0, help="batch order seed (fixed: only the init varies)")
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    p.add_argument("--overrides", nargs="*", default=[], help="Hydra overrides on top of the preset, "
                   "e.g. position=sinusoidal (default position=learned, for parity with GPT-2)")
    p.add_argument("--log-every", type=int, default=100)
    p.add_argument("--out", help="also write the raw results as JSON (for --merge)")
    p.add_argument("--merge", nargs="+", metavar="JSON", help="print one table from --out files; no training")
    args = p.parse_args(argv)

    if args.merge:
        res = merge([json.loads(Path(f).read_text()) for f in args.merge])
        text = report(res)
        print(text)
        write_result("quality", text, command=res["command"] + "\n" + invocation())
        return
    preset = PRESETS[args.preset]
    args.steps = args.steps or preset["steps"]
    args.eval_at = sorted({s for s in (args.eval_at or preset["eval_at"]) if 0 < s <= args.steps} | {args.steps})
    bc.setup_threads(args.threads)
    cfg = bc.compose_cfg(["position=learned", *preset["overrides"], *args.overrides, "trainer.device=cpu"])
    res = train(args, cfg)
    text = report(res)
    print(text)
    if args.out:  # one part of a table that --merge writes
        Path(args.out).write_text(json.dumps(res, indent=1))
    else:
        write_result("quality", text, command=res["command"])


if __name__ == "__main__":
    main()
