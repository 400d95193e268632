"""`python -m trainer.quantize run_dir=<run> quantize=<method>`: quantizes a finished run and writes the
same report as a training run with quantize=<method>; bad input is one `error: ` line and exit 2."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from conftest import compose_cfg, run_cli
from trainer.quantize import load_quantized, quantized_layers
from trainer.run import run


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> Path:
    """A tiny trained run dir as `python -m trainer` leaves it: .hydra/config.yaml, model.pt, summary.json."""
    run_dir = tmp_path_factory.mktemp("run")
    cfg = compose_cfg("trainer.threads=1", "trainer.eval_batches=2")
    run(cfg, run_dir=str(run_dir))
    (run_dir / ".hydra").mkdir()
    OmegaConf.save(cfg, run_dir / ".hydra" / "config.yaml")
    return run_dir


def _error_line(proc) -> str:
    assert proc.returncode == 2, (proc.returncode, proc.stderr)
    lines = proc.stderr.rstrip("\n").split("\n")
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    return lines[0]


def test_quantizes_a_finished_run(finished_run: Path) -> None:
    before = json.loads((finished_run / "summary.json").read_text())
    proc = run_cli(f"run_dir={finished_run}", "quantize=weight_int8", "quantize.compile=false",
                   "quantize.latency_batches=2", module="trainer.quantize")
    assert proc.returncode == 0, proc.stderr
    assert "quantization report:" in proc.stderr
    after = json.loads((finished_run / "summary.json").read_text())
    report = after.pop("quantize")
    assert after == {k: v for k, v in before.items() if k != "quantize"}  # nothing else changed
    assert report["method"] == "weight_int8" and report["config"] == "Int8WeightOnlyConfig"
    assert report["speedup"] == pytest.approx(report["fp32"]["latency_ms"] / report["latency_ms"], rel=1e-9)
    # the quality sample is the run's eval/loss sample: the fp32 row reproduces the logged eval/loss
    assert report["fp32"]["eval_loss"] == pytest.approx(before["eval/loss"], abs=1e-4)
    table = (finished_run / "quantize.md").read_text()
    assert "| weight_int8 | torchao | Int8WeightOnlyConfig |" in table
    cfg = OmegaConf.load(finished_run / ".hydra" / "config.yaml")
    model = load_quantized(str(finished_run / "model_weight_int8.pt"), cfg, "weight_int8")
    assert quantized_layers(model) == report["quantized_layers"] == 4 * cfg.model.num_layers
    tokens = torch.randint(0, 256, (2, cfg.data.seq_len))
    with torch.no_grad():
        assert torch.isfinite(model(tokens)).all()


@pytest.mark.parametrize("args,needles", [
    (["run_dir={missing}", "quantize=dynamic_int8"], ["run_dir=", "is not a directory"]),
    (["run_dir={empty}", "quantize=dynamic_int8"], ["has no .hydra/config.yaml"]),
    (["run_dir={no_weights}", "quantize=dynamic_int8"], ["has no model.pt"]),
    (["run_dir={run}", "quantize=int3"], ["quantize='int3'", "dynamic_int8", "qat_int8"]),
    (["run_dir={run}", "quantize=none"], ["quantize='none'"]),
    (["run_dir={run}"], ["quantize=... are both required"]),
    (["run_dir={run}", "quantize=weight_int8", "quantize.colour=red"], ["quantize.colour=red"]),
    (["run_dir={run}", "quantize=weight_int4", "quantize.group_size=48"], ["quantize.group_size=48"]),
], ids=["missing-dir", "not-a-run", "no-weights", "unknown-method", "none", "no-method", "unknown-key",
        "bad-group-size"])
def test_bad_input_is_one_sentence_and_exit_2(finished_run: Path, tmp_path: Path, args, needles) -> None:
    (tmp_path / "empty").mkdir()
    (tmp_path / "no_weights" / ".hydra").mkdir(parents=True)
    (tmp_path / "no_weights" / ".hydra" / "config.yaml").write_text("seed: 0\n")
    paths = {"missing": tmp_path / "missing", "empty": tmp_path / "empty", "no_weights": tmp_path / "no_weights",
             "run": finished_run}
    files_before = sorted(p.name for p in finished_run.iterdir())
    line = _error_line(run_cli(*(a.format(**paths) for a in args), module="trainer.quantize"))
    for needle in needles:
        assert needle in line, (needle, line)
    assert sorted(p.name for p in finished_run.iterdir()) == files_before  # nothing written
