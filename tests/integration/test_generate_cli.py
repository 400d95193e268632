"""Using a trained run: model.safetensors + load_model, `python -m trainer.generate`, and
`python -m trainer.evaluate`, on one briefly trained decoder (plus hand-built runs for bad input)."""
from __future__ import annotations

import json
import os

import pytest
import torch

from conftest import compose_cfg, run_cli
from models.build import build_model
from trainer import load_model
from trainer.runs.checkpoints import safe_load
from trainer.config.schema import to_container
from trainer.data import VOCAB_SIZE
from trainer.evaluate import run_evaluate
from trainer.generate import main as generate_main
from trainer.runs.artifacts import save_weights
from trainer.run import run

LEARN = ["model.d_model=64", "model.num_heads=4", "model.num_kv_heads=2", "model.d_ff=256", "data.seq_len=64",
         "trainer.batch_size=16", "trainer.max_steps=150", "trainer.eval_every=150", "trainer.eval_batches=4",
         "trainer.log_every=50", "trainer.checkpoint_every=1000", "optim.lr=3e-3", "schedule.warmup_steps=10",
         "position=rope"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("run")
    summary = run(compose_cfg(*LEARN), run_dir=str(run_dir))
    return run_dir, summary


def _fake_run(path, *overrides: str):
    """A run dir holding only model.safetensors (random weights, config in the header)."""
    cfg = compose_cfg(*overrides)
    model = build_model(cfg.model, cfg.attention, cfg.position, cfg.norm, vocab_size=VOCAB_SIZE,
                        max_len=cfg.data.seq_len)
    os.makedirs(path, exist_ok=True)
    save_weights(model.state_dict(), os.path.join(path, "model.safetensors"), to_container(cfg))
    return str(path)


def test_load_model_round_trips_the_final_weights(trained):
    run_dir, _ = trained
    model, tok, cfg = load_model(run_dir)
    pt = safe_load(str(run_dir / "model.pt"))
    state = model.state_dict()
    assert set(state) == set(pt) and "head.weight" not in state  # tied: embed.weight stored once
    assert all(torch.equal(state[k], pt[k]) for k in pt)
    assert cfg.model.d_model == 64 and cfg.position.kind == "rope" and not model.training
    assert tok.decode(tok.encode("déf x:")) == "déf x:"


def test_evaluate_equals_the_runs_final_eval_loss(trained):
    run_dir, summary = trained
    report = run_evaluate([f"run_dir={run_dir}"])
    assert abs(report["eval/loss"] - summary["eval/loss"]) < 1e-6
    assert abs(report["eval/accuracy"] - summary["eval/accuracy"]) < 1e-6
    written = json.loads((run_dir / "eval_stdlib.json").read_text())
    assert written["eval/loss"] == report["eval/loss"] and "eval/bits_per_byte" in written


def test_generate_cli_greedy_cache_equals_no_cache_and_writes_python(trained):
    run_dir, _ = trained
    args = [f"run_dir={run_dir}", "prompt=def ", "max_new_tokens=60", "temperature=0"]
    with_cache, without = run_cli(*args, module="trainer.generate"), run_cli(*args, "kv_cache=false",
                                                                             module="trainer.generate")
    assert with_cache.returncode == 0, with_cache.stderr
    assert with_cache.stdout == without.stdout and with_cache.stdout.startswith("def ")
    sample = run_cli(f"run_dir={run_dir}", "prompt=import ", "max_new_tokens=300", "temperature=0.7",
                     "seed=0", module="trainer.generate").stdout
    printable = sum(c.isprintable() or c in "\n\t" for c in sample) / len(sample)
    assert printable > 0.95, sample
    assert any(k in sample for k in ("def ", "self", "return", "import", " in ", " if ", "None")), sample


def test_seeded_sampling_is_reproducible(trained, capsys):
    run_dir, _ = trained
    outs = []
    for seed in (3, 3, 4):
        assert generate_main([f"run_dir={run_dir}", "prompt=class ", "max_new_tokens=40", f"seed={seed}",
                              "num_samples=2"]) == 0
        outs.append(capsys.readouterr().out)
    assert outs[0] == outs[1] != outs[2]
    assert outs[0].count("--- sample") == 2


def _one_error(rc: int, err: str, *needles: str) -> None:
    assert rc == 2, err
    lines = err.strip().split("\n")
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for n in needles:
        assert n in lines[0], lines[0]


def test_generate_bad_input(tmp_path, capsys):
    proc = run_cli(f"run_dir={tmp_path / 'missing'}", "prompt=x", module="trainer.generate")
    _one_error(proc.returncode, proc.stderr, "missing", "not a directory")
    encoder = _fake_run(tmp_path / "enc", "model=encoder")
    proc = run_cli(f"run_dir={encoder}", "prompt=x", module="trainer.generate")
    _one_error(proc.returncode, proc.stderr, "encoder")
    (tmp_path / "empty").mkdir()
    learned = _fake_run(tmp_path / "learned", "position=learned")  # data.seq_len=32
    cases = [([f"run_dir={tmp_path / 'empty'}"], ("no weights",)),
             ([f"run_dir={learned}", "prompt=" + "x" * 40], ("41", "32", "position=learned")),
             ([f"run_dir={learned}", "tempreature=1"], ("tempreature",)),
             ([f"run_dir={learned}", "top_p=0"], ("top_p=0",)),
             ([f"run_dir={learned}", "max_new_tokens=many"], ("max_new_tokens=many",))]
    for argv, needles in cases:
        rc = generate_main(argv)
        _one_error(rc, capsys.readouterr().err, *needles)
    assert generate_main([f"run_dir={learned}", "prompt=ab", "max_new_tokens=100", "temperature=0"]) == 0
    out = capsys.readouterr()
    assert "at most 30 new tokens" in out.err  # BOS + 2 bytes at 0..2; tokens fed at 3..31, the last one sampled unfed


def test_encoder_decoder_generates_from_the_source(tmp_path, capsys):
    run_dir = _fake_run(tmp_path / "t5", "model=encoder_decoder", "position=relative")
    argv = [f"run_dir={run_dir}", "prompt=def f(x):", "max_new_tokens=20", "temperature=0"]
    assert generate_main(argv) == 0
    cached = capsys.readouterr().out
    assert generate_main(argv + ["kv_cache=false"]) == 0
    assert capsys.readouterr().out == cached
