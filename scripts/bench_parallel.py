"""Per-rank memory and throughput of the parallel layouts (parallel=single|ddp|fsdp|...).

The script is its own launcher and worker. The launcher runs one subprocess per kind: `single` as
one plain process, every other kind as `torchrun --standalone --nproc_per_node=N` (gloo on CPU,
nccl on CUDA). Each worker composes the real config (Hydra, conf/ + the overrides below +
`parallel=<kind>`), builds the model with `trainer.run.build_wrapped_model` (every transform,
DDP/FSDP2 included) and the optimizer, schedule, scaler and objective as `trainer.run.build` does,
and steps it with `trainer.loop.train_step` on random byte blocks (the same global batch for every
kind, split over the ranks by the objective). Rank 0 gathers every rank's numbers into a JSON
file; the launcher writes docs/benchmarks/parallel_<hardware>_<date>.md (scripts/_report.py).

Measured on every rank:
- parameters, gradients and optimizer state (AdamW moments and step counters): bytes of the live
  tensors this rank holds, summed as `untyped_storage().nbytes()` with a storage shared by several
  tensors counted once (a DTensor counts its `.to_local()` shard). Gradients are read inside the
  first optimizer step (a step pre-hook: `train_step` sets them to None after the step),
  parameters and optimizer state right after it. Not counted: DDP's gradient buckets (a second
  gradient-sized buffer inside the reducer), FSDP2's transient all-gathered blocks, activations.
- peak process memory: the RSS high-water mark (`getrusage(RUSAGE_SELF).ru_maxrss`, which never
  goes down) after the timed steps and again after one checkpoint save
  (`trainer.runs.checkpoints.save_checkpoint`: one `.pt` from rank 0, or a sharded `.dcp` for the
  kinds trainer.run.build saves sharded); on CUDA also `torch.cuda.max_memory_allocated` of the
  steps and of the save, each from a reset.
- throughput: global tokens/s over `--steps` timed steps after `--warmup` steps, each of
  `--repeats` repeats timed between barriers; the median repeat is reported.
The FSDP/DDP ratio of per-rank state (parameters + gradients + optimizer state) is printed and
written; with 2 ranks it is near 1/2. The activation-memory saving of activation checkpointing at
T=1024 comes from scripts/bench_memory_ac.py's `measure` (modes none and full), in the same report.

    python scripts/bench_parallel.py                       # single,ddp,fsdp,tp,pp; d_model 256, 4 layers, T=256, batch 8
    python scripts/bench_parallel.py --kinds ddp,fsdp --nproc 2 --steps 10 --repeats 5
    python scripts/bench_parallel.py --overrides model.d_model=512 model.num_layers=8 precision=bf16
    python scripts/bench_parallel.py --device cuda --overrides trainer.threads=null   # one GPU per rank
    python scripts/bench_parallel.py --no-ac --out-dir /tmp/bench          # skip the AC rows; write elsewhere

Internal (what the launcher runs per kind):

    torchrun --standalone --nproc_per_node=2 scripts/bench_parallel.py --worker --kind fsdp --out X.json ...
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

import _bench_common as bc  # noqa: E402  (puts the repo root on sys.path)
from _report import Markdown, write_result  # noqa: E402

SCRIPT = Path(__file__).resolve()
KINDS = "single,ddp,fsdp,tp,pp"
# About a minute or two for the three default kinds on 2 shared CPU cores, one thread per process.
DEFAULTS = ["model.d_model=256", "model.num_layers=4", "model.num_heads=4", "model.d_ff=1024",
            "data.seq_len=256", "trainer.batch_size=8", "trainer.threads=1", "model.dropout=0.0",
            "trainer.max_steps=1000"]


# ----------------------------------------------------------------------------------------------
# Worker: one process of one kind
# ----------------------------------------------------------------------------------------------


def local_tensor(t: torch.Tensor) -> torch.Tensor:
    """This rank's part of `t`: the local shard of a DTensor, `t` itself otherwise."""
    return t.to_local() if hasattr(t, "to_local") else t


def storage_bytes(tensors) -> int:
    """Bytes of the storages behind `tensors` (each rank's local part), each storage once."""
    seen: dict[tuple, int] = {}
    for t in tensors:
        if not isinstance(t, torch.Tensor):
            continue
        s = local_tensor(t).untyped_storage()
        seen[(str(s.device), s.data_ptr(), s.nbytes())] = s.nbytes()
    return sum(seen.values())


def max_rss_bytes() -> int:
    """The process's resident-set high-water mark (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def current_rss_bytes() -> int:
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))
    except (OSError, StopIteration):
        return 0


def compose(overrides: list[str]):
    from hydra import compose as hydra_compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from trainer.config.schema import register_configs

    register_configs()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(bc.CONF), version_base="1.3"):
        return hydra_compose(config_name="config", overrides=overrides)


def measure_kind(cfg, d, a) -> dict:
    """Build, step, time and checkpoint one layout on this rank; returns this rank's numbers."""
    import torch.distributed as dist

    from trainer.config.schema import to_container
    from trainer.data import VOCAB_SIZE, BatchStream
    from trainer.distributed import all_reduce_sum, resolve_device
    from trainer.loop import Loop, train_step
    from trainer.objectives import build_objective, resolve_objective
    from trainer.optim import build_optimizer, build_scheduler
    from trainer.precision import build_scaler
    from trainer.run import build_wrapped_model, place
    from trainer.runs import checkpoints as ckpt
    from trainer.runs.process import seed_all

    from trainer.transforms.parallel import SHARDED

    # As trainer.run.build: the ranks of one model replica (tensor / pipeline parallel) share the
    # rows of a batch, and a kind's checkpoints are sharded (DCP) or one .pt.
    d = place(cfg, d)
    sharded = cfg.parallel.kind in SHARDED
    device = resolve_device(cfg.trainer.device, d.local_rank)
    cuda = device.type == "cuda"
    barrier = (lambda: dist.barrier()) if d.world_size > 1 else (lambda: None)
    rss_start = current_rss_bytes()
    seed_all(cfg.seed)  # identical init on every rank, as trainer.run.build
    model, n_params = build_wrapped_model(cfg, device, d, VOCAB_SIZE)
    optimizer = build_optimizer(model, cfg.optim, device)
    scheduler = build_scheduler(optimizer, cfg.schedule, cfg.trainer.max_steps)
    scaler = build_scaler(cfg.precision.dtype, device, cfg.precision.init_scale)
    objective = build_objective(resolve_objective(cfg.model.arch, cfg.objective.kind), cfg.objective)
    gen = torch.Generator().manual_seed(cfg.seed)
    seed_all(cfg.seed + 1 + d.dp_rank)
    n_steps = 1 + a.warmup + a.repeats * a.steps
    blocks = bc.random_blocks(cfg.trainer.batch_size * n_steps, cfg.data.seq_len, seed=cfg.seed)
    model.train()
    lp = Loop(model=model, optimizer=optimizer, scheduler=scheduler, scaler=scaler, objective=objective,
              stream=BatchStream(blocks, cfg.trainer.batch_size, cfg.seed), evaluators=[], gen=gen,
              device=device, precision=cfg.precision.dtype, dist=d, logger=None, cfg=cfg.trainer,
              mfu=lambda tps: 0.0, save=lambda step: None, stop_signal=lambda: 0)
    rss_built = current_rss_bytes()

    # Step 1: gradients are read inside the optimizer step, before they are set to None.
    grads: dict[str, int] = {}

    def read_grads(opt, args, kwargs):
        grads.setdefault("bytes", storage_bytes(p.grad for g in opt.param_groups for p in g["params"]
                                                if p.grad is not None))

    hook = optimizer.register_step_pre_hook(read_grads)
    out = train_step(lp, 0)
    hook.remove()
    # Each replica's loss once (the loop's own rule: `Dist.counts`), over the global targets.
    counted = out["loss_sum"].detach().float() * float(d.counts)
    loss1 = (all_reduce_sum(counted, d) / out["total"]).item()
    params = storage_bytes(model.parameters())
    optim_state = storage_bytes(v for st in optimizer.state.values() for v in st.values())

    step = 1
    for _ in range(a.warmup):
        train_step(lp, step)
        step += 1
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    tokens_per_s, step_s = [], []
    for _ in range(a.repeats):
        barrier()
        bc.synchronize(device)
        t0, tokens = time.perf_counter(), 0
        for _ in range(a.steps):
            tokens += int(train_step(lp, step)["tokens"])
            step += 1
        bc.synchronize(device)
        barrier()
        elapsed = time.perf_counter() - t0
        tokens_per_s.append(tokens / elapsed)
        step_s.append(elapsed / a.steps)
    rss_step = max_rss_bytes()
    cuda_step = torch.cuda.max_memory_allocated(device) if cuda else None

    # One checkpoint save of the whole state, as the run's `save` closure does it.
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    meta = {"structure": ckpt.structure(cfg), "config": to_container(cfg)}
    barrier()
    t0 = time.perf_counter()
    path = ckpt.save_checkpoint(a.ckpt_dir, step, model=model, optimizer=optimizer, scheduler=scheduler,
                                scaler=scaler, gen=gen, train_state={"step": step}, meta=meta, keep=1, d=d,
                                sharded=sharded, async_save=False)
    ckpt.wait_for_checkpoints()
    barrier()
    save_s = time.perf_counter() - t0
    rss_save = max_rss_bytes()
    cuda_save = torch.cuda.max_memory_allocated(device) if cuda else None
    on_disk = 0
    if path and d.is_main:
        p = Path(path)
        on_disk = sum(f.stat().st_size for f in p.rglob("*") if f.is_file()) if p.is_dir() else p.stat().st_size

    del lp, optimizer, model  # the DDP reducer holds the process group: release it before teardown
    return {"rank": d.rank, "world_size": d.world_size, "n_params": n_params, "param_bytes": params,
            "grad_bytes": grads.get("bytes", 0), "optim_bytes": optim_state, "loss_step1": loss1,
            "rss_start": rss_start, "rss_built": rss_built, "rss_peak_step": rss_step, "rss_peak_save": rss_save,
            "cuda_peak_step": cuda_step, "cuda_peak_save": cuda_save, "tokens_per_s": tokens_per_s,
            "step_s": step_s, "save_s": save_s, "ckpt_bytes": on_disk, "ckpt_format": "dcp" if sharded else "pt",
            "threads": torch.get_num_threads(), "device": str(device)}


def worker(a) -> None:
    import torch.distributed as dist

    from trainer.config.validate import validate
    from trainer.distributed import init_distributed, teardown

    cfg = compose([*DEFAULTS, f"trainer.device={a.device}", *a.overrides, f"parallel={a.kind}"])
    d = init_distributed("cuda" if cfg.trainer.device != "cpu" and torch.cuda.is_available() else "cpu",
                         cfg.parallel.timeout_s)
    try:
        validate(cfg, d.world_size, d.launched)
        if cfg.trainer.threads:
            torch.set_num_threads(cfg.trainer.threads)
        mine = measure_kind(cfg, d, a)
        ranks = [mine]
        if d.world_size > 1:
            ranks = [None] * d.world_size
            dist.all_gather_object(ranks, mine)
            dist.barrier()  # no rank tears the group down while another still uses it
    finally:
        teardown(d)
    if d.is_main:
        c = cfg
        Path(a.out).write_text(json.dumps({
            "kind": a.kind, "ranks": ranks,
            "config": {"d_model": c.model.d_model, "num_layers": c.model.num_layers, "num_heads": c.model.num_heads,
                       "d_ff": c.model.d_ff, "seq_len": c.data.seq_len, "batch_size": c.trainer.batch_size,
                       "precision": c.precision.dtype, "optim": c.optim.name,
                       "threads": c.trainer.threads}}))


# ----------------------------------------------------------------------------------------------
# Launcher
# ----------------------------------------------------------------------------------------------


def run_kind(kind: str, a, tmp: Path) -> dict | str:
    """Run one kind's worker(s); its JSON, or the tail of its output when it failed."""
    out, ckpt_dir = tmp / f"{kind}.json", tmp / f"ckpt_{kind}"
    worker_args = [str(SCRIPT), "--worker", "--kind", kind, "--out", str(out), "--ckpt-dir", str(ckpt_dir),
                   "--device", a.device, "--steps", str(a.steps), "--warmup", str(a.warmup),
                   "--repeats", str(a.repeats), "--overrides", *a.overrides]
    if kind == "single":
        cmd = [sys.executable, *worker_args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={a.nproc}",
               *worker_args]
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    bc.log(f"{kind}: {' '.join(cmd[1:4])} ...")
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, cwd=bc.ROOT, env=env, capture_output=True, text=True, timeout=a.timeout)
    except subprocess.TimeoutExpired:
        return f"timed out after {a.timeout}s"
    if proc.returncode != 0 or not out.exists():
        lines = (proc.stderr + proc.stdout).strip().splitlines()
        # The worker's own exception, not torchrun's summary of which rank exited how.
        errors = [ln.strip() for ln in lines if ("Error" in ln or "Exception" in ln)
                  and not ln.lstrip().startswith(("torch.distributed.elastic", "traceback", "raise ", "File "))]
        return f"exit {proc.returncode}: " + (errors[-1] if errors else "\n".join(lines[-15:]))
    bc.log(f"{kind}: done in {time.perf_counter() - t0:.0f}s")
    return json.loads(out.read_text())


def mib(n: float | None) -> str:
    return "-" if n is None else f"{n / 2 ** 20:,.1f}"


def state_of(r: dict) -> int:
    return r["param_bytes"] + r["grad_bytes"] + r["optim_bytes"]


def report(results: dict[str, dict | str], a, md: Markdown) -> None:
    ok = {k: v for k, v in results.items() if isinstance(v, dict)}
    if ok:
        c = next(iter(ok.values()))["config"]
        r0 = next(iter(ok.values()))["ranks"][0]
        md(f"Model: decoder, d_model {c['d_model']}, {c['num_layers']} layers, {c['num_heads']} heads, d_ff "
           f"{c['d_ff']} ({r0['n_params'] / 1e6:.2f}M parameters), {c['precision']}, optim={c['optim']}; global batch "
           f"{c['batch_size']} x seq_len {c['seq_len']} random byte blocks per step (the same for every kind, split "
           f"over the ranks); {r0['threads']} torch thread(s) per process on {r0['device']}; {a.nproc} processes "
           f"for every kind but `single` (one). Throughput: {a.steps} timed steps per repeat after {a.warmup + 1} "
           f"warm-up steps, median of {a.repeats} repeats.")
        md()
    failed = {k: v for k, v in results.items() if isinstance(v, str)}
    if not ok:
        for kind, why in failed.items():
            md(f"- `{kind}` failed: {why}")
        return
    cuda = any(r.get("cuda_peak_step") is not None for v in ok.values() for r in v["ranks"])
    md("Per rank: bytes of the live tensors this rank holds after one optimizer step (parameters, gradients "
       "read inside the step, AdamW state), and the process's RSS high-water mark after the timed steps and "
       "after one checkpoint save (RSS at start and after the build for reference)" +
       ("; CUDA peaks are `max_memory_allocated` from a reset before the steps and before the save." if cuda else "."))
    md()
    headers = ["kind", "rank", "params MiB", "grads MiB", "optim MiB", "state MiB", "RSS start MiB",
               "RSS built MiB", "peak RSS step MiB", "peak RSS save MiB"]
    if cuda:
        headers += ["CUDA peak step MiB", "CUDA peak save MiB"]
    rows = []
    for kind, v in ok.items():
        for r in v["ranks"]:
            row = [kind, f"{r['rank']}/{r['world_size']}", mib(r["param_bytes"]), mib(r["grad_bytes"]),
                   mib(r["optim_bytes"]), mib(state_of(r)), mib(r["rss_start"]), mib(r["rss_built"]),
                   mib(r["rss_peak_step"]), mib(r["rss_peak_save"])]
            if cuda:
                row += [mib(r["cuda_peak_step"]), mib(r["cuda_peak_save"])]
            rows.append(row)
    md(bc.markdown_table(headers, rows))
    md()
    md("Per kind: global tokens/s (median repeat, with the slowest and fastest), time per step, one checkpoint "
       "save (wall time, format, bytes on disk) and the loss of step 1 (the same model, data and init for "
       "every kind, so it should agree to ~1e-5).")
    md()
    rows = []
    for kind, v in ok.items():
        r = v["ranks"][0]
        tps = r["tokens_per_s"]
        rows.append([kind, r["world_size"], f"{statistics.median(tps):,.0f}", f"{min(tps):,.0f}-{max(tps):,.0f}",
                     f"{1000 * statistics.median(r['step_s']):,.0f}", f"{r['save_s']:.2f}", r["ckpt_format"],
                     mib(r["ckpt_bytes"]), f"{r['loss_step1']:.5f}"])
    md(bc.markdown_table(["kind", "ranks", "tokens/s", "range", "ms/step", "save s", "ckpt", "ckpt MiB",
                          "loss step 1"], rows))
    md()

    def mean_state(kind: str) -> float:
        return statistics.mean(state_of(r) for r in ok[kind]["ranks"])

    lines = []
    if "ddp" in ok and "fsdp" in ok:
        ratio = mean_state("fsdp") / mean_state("ddp")
        lines.append(f"FSDP/DDP per-rank state (params + grads + optim, mean over ranks): {mib(mean_state('fsdp'))} / "
                     f"{mib(mean_state('ddp'))} MiB = **{ratio:.3f}** (1/{ok['fsdp']['ranks'][0]['world_size']} "
                     f"= {1 / ok['fsdp']['ranks'][0]['world_size']:.3f} expected: each rank holds its shard).")
    if "single" in ok:
        base = mean_state("single")
        for kind in ok:
            if kind != "single":
                lines.append(f"{kind}/single per-rank state: {mean_state(kind) / base:.3f}.")
    for line in lines:
        md(f"- {line}")
    if lines:
        md()
    for kind, why in failed.items():
        md(f"- `{kind}` failed: " + why.replace("\n", " / ")[-600:])
    if failed:
        md()
    md("Not in the per-rank bytes: DDP's gradient buckets (the reducer keeps a second gradient-sized buffer "
       "it all-reduces from), FSDP2's all-gathered full blocks during forward/backward, activations, and "
       "the allocator's cache; they show up in the RSS (and CUDA) peaks instead. The RSS peak is a "
       "high-water mark of the whole process (Python, torch, gloo), so the save column exceeds the step "
       "column only where the save pushed memory above the step's peak.")


def activation_checkpointing(a, md: Markdown) -> None:
    """bench_memory_ac.measure (imported, not copied) for modes none and full at its T=1024 defaults."""
    import bench_memory_ac as ac

    cfg = compose([*ac.DEFAULTS, f"trainer.device={a.device}"])
    device = bc.get_device(a.device)
    md()
    md(f"Activation checkpointing (scripts/bench_memory_ac.py `measure`, one process): T={cfg.data.seq_len}, "
       f"batch {cfg.trainer.batch_size}, d_model {cfg.model.d_model}, {cfg.model.num_layers} layers; bytes "
       f"autograd saves for backward" + (", and the CUDA peak above the start." if device.type == "cuda" else "."))
    md()
    rows, base = [], None
    for mode in ("none", "full"):
        r = ac.measure(cfg, mode, 2, device)
        base = base or r["saved_mb"]
        rows.append([mode, f"{r['saved_mb']:,.1f}", f"{r['saved_mb'] / base:.2f}x",
                     f"{r['peak_mb']:,.1f}" if "peak_mb" in r else "-", f"{r['loss']:.5f}"])
    md(bc.markdown_table(["trainer.activation_checkpointing", "saved for backward MiB", "vs none",
                          "CUDA peak MiB", "loss"], rows))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--kinds", default=KINDS, help=f"comma list of parallel=<kind> to run (default {KINDS})")
    p.add_argument("--nproc", type=int, default=2, help="processes per kind other than single")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="trainer.device of every worker")
    p.add_argument("--steps", type=int, default=5, help="timed steps per repeat")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps after the first (measured) step")
    p.add_argument("--repeats", type=int, default=3, help="timed repeats (median reported)")
    p.add_argument("--overrides", nargs="*", default=[],
                   help="Hydra overrides after the defaults: " + " ".join(DEFAULTS))
    p.add_argument("--no-ac", action="store_true", help="skip the activation-checkpointing rows")
    p.add_argument("--out-dir", default=None, help="where the report goes (default docs/benchmarks/)")
    p.add_argument("--timeout", type=int, default=900, help="seconds per kind before it counts as failed")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--kind", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    p.add_argument("--ckpt-dir", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.worker:
        return worker(a)
    kinds = [k.strip() for k in a.kinds.split(",") if k.strip()]
    results: dict[str, dict | str] = {}
    with tempfile.TemporaryDirectory(prefix="bench_parallel_") as tmp:
        for kind in kinds:
            results[kind] = run_kind(kind, a, Path(tmp))
            if isinstance(results[kind], str):
                bc.log(f"{kind}: FAILED\n{results[kind]}")
    md = Markdown()
    report(results, a, md)
    if not any(isinstance(v, dict) for v in results.values()):
        sys.exit("every kind failed; no report written")
    if not a.no_ac:
        activation_checkpointing(a, md)
    write_result("parallel", md.text(), device=bc.get_device(a.device) if a.device == "cuda" else None,
                 out_dir=a.out_dir)


if __name__ == "__main__":
    main()
