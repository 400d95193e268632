"""Bad input through the real CLI: exit code 2, exactly one stderr line `error: ...` naming the
key/value, and nothing written: no run dir, no checkpoint, no event file, an existing run untouched."""
from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from conftest import run_cli, tiny_cli_args

CASES = [
    pytest.param(["model.d_modle=3"], ["model.d_modle"], id="unknown-key"),
    pytest.param(["model.d_model=abc"], ["model.d_model", "abc"], id="wrong-type"),
    pytest.param(["attention=quantum"], ["attention", "quantum", "flash"], id="unknown-group-option"),
    pytest.param(["trainer.max_steps=-1"], ["trainer.max_steps=-1"], id="out-of-range"),
    pytest.param(["model.num_heads=5"], ["model.num_heads=5", "model.d_model=32"], id="heads-do-not-divide"),
    pytest.param(["objective=mlm"], ["objective=mlm", "model=decoder"], id="objective-for-wrong-model"),
    pytest.param(["data=text", "data.files=[/nonexistent/corpus.txt]"], ["/nonexistent/corpus.txt"],
                 id="missing-data-file"),
    pytest.param(["trainer.resume=/nonexistent/step_00000003.pt"], ["trainer.resume", "/nonexistent/step_00000003.pt"],
                 id="missing-resume-checkpoint"),
]


def _assert_one_error_line(proc: subprocess.CompletedProcess, needles: list[str]) -> str:
    assert proc.returncode == 2, (proc.returncode, proc.stderr)
    lines = proc.stderr.rstrip("\n").split("\n")
    assert len(lines) == 1, proc.stderr
    line = lines[0]
    assert line.startswith("error: "), line
    for needle in needles:
        assert needle in line, (needle, line)
    return line


def _written(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


@pytest.mark.parametrize("overrides,needles", CASES)
def test_bad_input_exits_2_with_one_line_and_writes_nothing(tmp_path, overrides, needles):
    run_dir = tmp_path / "run"
    proc = run_cli(*tiny_cli_args(run_dir, *overrides), timeout=120)
    _assert_one_error_line(proc, needles)
    assert not run_dir.exists(), _written(tmp_path)
    assert _written(tmp_path) == []  # no checkpoint, event file or .hydra anywhere


def test_bad_input_leaves_an_existing_run_untouched(tmp_path):
    """A run dir that holds work keeps it byte for byte: nothing is rewritten, added or removed."""
    run_dir = tmp_path / "run"
    (run_dir / "checkpoints").mkdir(parents=True)
    (run_dir / ".hydra").mkdir()
    files = {run_dir / "checkpoints" / "step_00000003.pt": b"weights of a long run",
             run_dir / ".hydra" / "config.yaml": b"model: {}\n",
             run_dir / "events.out.tfevents.1.host": b"events"}
    for path, data in files.items():
        path.write_bytes(data)
    before = {p: p.stat().st_mtime_ns for p in run_dir.rglob("*")}
    proc = run_cli(*tiny_cli_args(run_dir, "model.num_heads=5"), timeout=120)
    _assert_one_error_line(proc, ["model.num_heads=5"])
    assert {p: p.stat().st_mtime_ns for p in run_dir.rglob("*")} == before
    for path, data in files.items():
        assert path.read_bytes() == data


def test_bad_fp32_gemm_environment_variable_is_bad_input(tmp_path):
    """TRAINER_CPU_FP32_GEMM (models.linear) is input too: a value other than onednn/blas is one
    sentence naming the variable and the valid values, exit 2, nothing written."""
    run_dir = tmp_path / "run"
    proc = run_cli(*tiny_cli_args(run_dir), env={"TRAINER_CPU_FP32_GEMM": "mkl"}, timeout=120)
    _assert_one_error_line(proc, ["TRAINER_CPU_FP32_GEMM='mkl'", "onednn, blas"])
    assert _written(tmp_path) == []
