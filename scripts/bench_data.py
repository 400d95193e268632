"""Memory and start-up of the data path as the corpus grows, and tokenization throughput.

    python scripts/bench_data.py                        # 20 MB and 400 MB corpora, byte and bpe
    python scripts/bench_data.py --sizes 20 --tokenizers byte

For each synthetic corpus (standard-library source, reshuffled and numbered into 1 MB .txt files
until it reaches the size) and tokenizer, `python -m trainer` runs 20 steps twice with a fresh
cache: the first run builds the token store, the second opens it. Reported: the peak RSS of each
run (the whole process: ru_maxrss), the second run's start-up (`load_corpus` alone, in a process of
its own, and the run's `setup_time_s`: data + model + probe), and tokenization throughput
(read + tokenize + pack + write, MB of text per second) with data.num_proc=1 and 2 on the 20 MB
corpus (bpe with the tokenizer already trained, passed as tokenizer=pretrained).

Goal: peak RSS of the 400 MB run within 10% (+50 MB) of the 20 MB run's; cached start < 2 s.
The tables go to stdout and to docs/benchmarks/data_<hardware>_<date>.md (scripts/_report.py).
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import random
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _bench_common import ROOT, cpu_model_and_flags, load_average  # noqa: E402
from _report import Markdown, write_result  # noqa: E402

MB = 1 << 20
RUN = ["model.d_model=192", "trainer.max_steps=20", "trainer.eval_every=20", "trainer.eval_batches=2",
       "trainer.checkpoint_every=1000", "trainer.log_every=10", "trainer.progress=false", "trainer.device=cpu",
       "data.seq_len=128", "trainer.batch_size=16"]


def make_corpus(out_dir: str, size_mb: int) -> list[str]:
    """`size_mb` 1 MB .txt files of standard-library source, reshuffled (seeded) and numbered."""
    files = sorted(glob.glob(os.path.join(out_dir, "part_*.txt")))
    if len(files) == size_mb:
        return files
    os.makedirs(out_dir, exist_ok=True)
    from trainer.data.sources import stdlib_files

    texts = [open(f, "rb").read() for f in stdlib_files()]
    rng = random.Random(size_mb)
    files, buf, copy = [], bytearray(), 0
    while len(files) < size_mb:
        order = list(range(len(texts)))
        rng.shuffle(order)
        for i in order:
            buf += b"# copy %d\n" % copy + texts[i]
            copy += 1
            while len(buf) >= MB and len(files) < size_mb:
                path = os.path.join(out_dir, f"part_{len(files):05d}.txt")
                with open(path, "wb") as f:
                    f.write(buf[:MB])
                del buf[:MB]
                files.append(path)
    return files


def _tok_args(tok: str, tok_path: str | None) -> list[str]:
    if tok == "bpe":
        return ["tokenizer=bpe"]
    if tok == "pretrained":
        return ["tokenizer=pretrained", f"tokenizer.path={tok_path}"]
    return ["tokenizer=byte"]


def trainer_run(files: list[str], cache: str, run_dir: str, tok: str, tok_path: str | None) -> dict:
    cmd = [sys.executable, "-m", "trainer", "data=text", "data.files=[" + ",".join(files) + "]",
           f"data.cache_dir={cache}", f"hydra.run.dir={run_dir}", *RUN, *_tok_args(tok, tok_path)]
    wall, rss, _ = _timed_rss(cmd)
    with open(os.path.join(run_dir, "summary.json")) as f:
        summary = json.load(f)
    return {"wall_s": wall, "peak_rss_mb": rss, "setup_time_s": summary["setup_time_s"]}


def _timed_rss(cmd: list[str]) -> tuple[float, float, str]:
    """Run `cmd`; (wall s, its peak RSS in MB from wait4's rusage, stderr)."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    err = proc.stderr.read().decode(errors="replace")
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - t0
    if proc.returncode:
        raise SystemExit(f"failed ({proc.returncode}): {' '.join(cmd[:5])} ...\n{err[-3000:]}")
    return wall, usage.ru_maxrss / 1024, err


def load_only(args) -> None:
    """Child mode: time `load_corpus` (imports excluded) and print JSON."""
    sys.path.insert(0, str(ROOT))
    from _bench_common import compose_cfg

    from trainer.data import load_corpus

    cfg = compose_cfg(["data=text", "data.files=[" + ",".join(args.files) + "]", f"data.cache_dir={args.cache}",
                       f"data.num_proc={args.num_proc}", "data.seq_len=128", *_tok_args(args.tok, args.tok_path)])
    t0 = time.perf_counter()
    corpus = load_corpus(cfg.data, cfg.seed, cfg.tokenizer, say=lambda m: None)
    dt = time.perf_counter() - t0
    print(json.dumps({"seconds": dt, "store": corpus.store_dir, "train_blocks": len(corpus.train_blocks),
                      "tokens": corpus.num_tokens}))


def timed_load(files, cache, tok, tok_path=None, num_proc=1) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--load-only", "--cache", cache, "--tok", tok,
           "--num-proc", str(num_proc), *(["--tok-path", tok_path] if tok_path else []), "--files", *files]
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if out.returncode:
        raise SystemExit(out.stderr[-3000:])
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="+", default=[20, 400], help="corpus sizes in MB")
    p.add_argument("--tokenizers", nargs="+", default=["byte", "bpe"])
    p.add_argument("--workdir", default="/tmp/bench_data")
    p.add_argument("--load-only", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--files", nargs="*", help=argparse.SUPPRESS)
    p.add_argument("--cache", help=argparse.SUPPRESS)
    p.add_argument("--tok", default="byte", help=argparse.SUPPRESS)
    p.add_argument("--tok-path", default=None, help=argparse.SUPPRESS)
    p.add_argument("--num-proc", type=int, default=1, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.load_only:
        return load_only(args)
    cpu, flags = cpu_model_and_flags()
    print(f"CPU: {cpu}, {os.cpu_count()} CPUs, flags: {' '.join(flags) or '-'}; {load_average()}")
    rows, bpe_json = [], None
    for size in args.sizes:
        files = make_corpus(os.path.join(args.workdir, f"corpus_{size}MB"), size)
        for tok in args.tokenizers:
            cache = os.path.join(args.workdir, f"cache_{size}_{tok}_{os.getpid()}")
            runs = os.path.join(args.workdir, f"runs_{size}_{tok}_{os.getpid()}")
            first = trainer_run(files, cache, os.path.join(runs, "first"), tok, None)
            second = trainer_run(files, cache, os.path.join(runs, "second"), tok, None)
            load = timed_load(files, cache, tok)
            if tok == "bpe" and size == min(args.sizes):
                bpe_json = os.path.join(load["store"], "tokenizer.json")
            rows.append({"size_mb": size, "tokenizer": tok, "build_run_rss_mb": first["peak_rss_mb"],
                         "build_run_wall_s": first["wall_s"], "cached_run_rss_mb": second["peak_rss_mb"],
                         "cached_load_corpus_s": load["seconds"], "cached_setup_time_s": second["setup_time_s"],
                         "train_blocks": load["train_blocks"], "tokens": load["tokens"]})
            print(json.dumps(rows[-1]), flush=True)
    md = Markdown()
    md(f"Each row: `python -m trainer data=text {' '.join(RUN)}` on synthetic 1 MB .txt files of stdlib "
       f"source, run twice on a fresh cache (the first builds the token store, the second opens it); "
       f"peak RSS is the whole process's (ru_maxrss).")
    md("\n| corpus | tokenizer | tokens | peak RSS, building run (MB) | peak RSS, cached run (MB) | "
       "cached load_corpus (s) | cached setup_time_s |\n|---|---|---|---|---|---|---|")
    for r in rows:
        md(f"| {r['size_mb']} MB | {r['tokenizer']} | {r['tokens'] / 1e6:.1f} M | {r['build_run_rss_mb']:.0f} | "
           f"{r['cached_run_rss_mb']:.0f} | {r['cached_load_corpus_s']:.2f} | {r['cached_setup_time_s']:.2f} |")
    small = min(args.sizes)
    files = make_corpus(os.path.join(args.workdir, f"corpus_{small}MB"), small)
    md(f"\nTokenization throughput on the {small} MB corpus (read + tokenize + pack + write):\n")
    for tok in args.tokenizers:
        for num_proc in (1, 2):
            kind, path = ("pretrained", bpe_json) if tok == "bpe" else (tok, None)
            if tok == "bpe" and not path:
                continue
            cache = os.path.join(args.workdir, f"tp_{tok}_{num_proc}_{os.getpid()}")
            r = timed_load(files, cache, kind, path, num_proc)
            md(f"- {tok} data.num_proc={num_proc}: {small / r['seconds']:.1f} MB/s ({r['seconds']:.1f} s)")
    write_result("data", md.text())


if __name__ == "__main__":
    main()
