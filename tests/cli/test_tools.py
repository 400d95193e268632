"""The small tools (generate, embed, evaluate, quantize) and `python -m trainer`: help on every one,
the nearest valid key for a misspelt one, the shared device default, evaluate's output=, the
tables quantize prints, and every documented key still accepted; on one tiny decoder run and one
tiny retrieval encoder run trained once for the module."""
from __future__ import annotations

import importlib
import json
import re
import warnings
from pathlib import Path

import pytest
import yaml

from conftest import ROOT, run_cli, tiny_cli_args
from trainer.errors import ConfigError

TOOLS = {"generate": "trainer.generate", "embed": "trainer.embed", "evaluate": "trainer.evaluate",
         "quantize": "trainer.quantize.__main__"}
ENCODER = ["model=encoder", "objective=contrastive", "data=pairs", "trainer.max_steps=2", "trainer.eval_every=2",
           "trainer.checkpoint_every=2"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A decoder run and a contrastive encoder run (data=pairs), as `python -m trainer` leaves them."""
    base = tmp_path_factory.mktemp("tool_runs")
    dec, enc = base / "dec", base / "enc"
    for run_dir, extra in ((dec, ["trainer.max_steps=2", "trainer.eval_every=2"]), (enc, ENCODER)):
        proc = run_cli(*tiny_cli_args(run_dir, *extra))
        assert proc.returncode == 0, proc.stderr[-3000:]
    return {"dec": dec, "enc": enc}


def _yaml_keys(tool: str) -> dict[str, object]:
    """{dotted key: default} of conf/tools/<tool>.yaml, read with a YAML parser (not the tool's)."""
    doc = yaml.safe_load((ROOT / "trainer" / "conf" / "tools" / f"{tool}.yaml").read_text())
    doc.pop("defaults", None)

    def flat(node: dict, prefix: str = "") -> dict:
        out = {}
        for k, v in node.items():
            out.update(flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
        return out

    return flat(doc)


def _listing(path: Path) -> dict[str, int]:
    return {str(p.relative_to(path)): p.stat().st_mtime_ns for p in path.rglob("*")}


def _one_error(rc: int, err: str) -> str:
    assert rc == 2, err
    lines = err.strip().split("\n")
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


@pytest.mark.parametrize("flag", ["--help", "-h"])
@pytest.mark.parametrize("tool", list(TOOLS))
def test_help_lists_every_key_with_its_default_and_an_example(tool, flag, capsys):
    """`--help` / `-h` anywhere on the line: exit 0, usage, each YAML key as key=default with a
    description, and an example command of this tool."""
    main = importlib.import_module(TOOLS[tool]).main
    assert main(["run_dir=x", flag]) == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: python -m trainer.")
    for key, default in _yaml_keys(tool).items():
        shown = "null" if default is None else str(default).lower() if isinstance(default, bool) else str(default)
        line = next((ln for ln in out.splitlines() if ln.strip().startswith(f"{key}={shown}")), None)
        assert line is not None, (key, out)
        assert len(line.split(f"{key}={shown}", 1)[1].strip()) > 10, line  # a description follows
    examples = out.split("\nexample", 1)[1]
    assert f"python -m trainer.{tool} run_dir=" in examples


def test_help_on_the_real_command_lines():
    """Through the interpreter: a tool's --help and `python -m trainer --help` (presets listed,
    no Hydra boilerplate first line, the tools named), both exit 0."""
    proc = run_cli("--help", module="trainer.evaluate")
    assert proc.returncode == 0, proc.stderr
    assert "data=<hub|pairs|stdlib|text>" in proc.stdout and "data.<key>=<value>" in proc.stdout
    assert "output=null" in proc.stdout
    proc = run_cli("--help")
    assert proc.returncode == 0, proc.stderr
    first = proc.stdout.splitlines()[0]
    assert "powered by Hydra" not in first and first.startswith("trainer"), first
    presets = sorted(p.stem for p in (ROOT / "trainer" / "conf" / "experiment").glob("*.yaml"))
    assert f"experiment: {', '.join(presets)}" in proc.stdout
    assert "usage: python -m trainer" in proc.stdout
    for tool in ("generate", "evaluate", "embed", "quantize"):
        assert f"python -m trainer.{tool} run_dir=" in proc.stdout
    assert "trainer:\n  batch_size:" in proc.stdout  # the config, every key with its default


@pytest.mark.parametrize("tool,arg,nearest", [
    ("generate", "max_new_token=3", "max_new_tokens"),
    ("embed", "batchsize=3", "batch_size"),
    ("evaluate", "eval_batch=1", "eval_batches"),
    ("evaluate", "data.fils=[a.txt]", "data.files"),
    ("quantize", "quantize.complie=false", "quantize.compile"),
])
def test_a_misspelt_key_suggests_the_nearest_and_writes_nothing(runs, tool, arg, nearest, capsys):
    run_dir = runs["dec"]
    before = _listing(run_dir)
    extra = ["quantize=weight_int8"] if tool == "quantize" else []
    rc = importlib.import_module(TOOLS[tool]).main([f"run_dir={run_dir}", *extra, arg])
    line = _one_error(rc, capsys.readouterr().err)
    assert f"did you mean {nearest}?" in line and arg.split("=")[0] in line, line
    assert _listing(run_dir) == before


def test_an_unknown_data_option_suggests_the_nearest(runs, capsys):
    from trainer.evaluate import main

    line = _one_error(main([f"run_dir={runs['dec']}", "data=txt"]), capsys.readouterr().err)
    assert "data=txt" in line and "did you mean text?" in line and "stdlib" in line, line


@pytest.mark.parametrize("tool", list(TOOLS))
def test_every_tool_asks_the_shared_device_rule_for_auto_by_default(runs, tool, monkeypatch, capsys):
    """No device= on the line: each tool (generate included) calls trainer.distributed.resolve_device
    with "auto"; here the rule is replaced by a probe that reports what it was asked."""
    import trainer.distributed

    def probe(kind: str, local_rank: int = 0):
        raise ConfigError(f"device rule asked for {kind}")

    module = importlib.import_module(TOOLS[tool])
    assert module.resolve_device is trainer.distributed.resolve_device  # the shared rule, imported
    monkeypatch.setattr(trainer.distributed, "resolve_device", probe)
    monkeypatch.setattr(module, "resolve_device", probe)
    args = {"generate": ["prompt=x"], "embed": ["input=x.txt", "output=x.npy"], "evaluate": [],
            "quantize": ["quantize=weight_int8"]}[tool]
    run_dir = runs["enc" if tool == "embed" else "dec"]
    rc = module.main([f"run_dir={run_dir}", *args])
    assert "device rule asked for auto" in _one_error(rc, capsys.readouterr().err)


def test_evaluate_output_writes_there_and_never_into_the_run_dir(runs, tmp_path):
    """output=<path.json> gets the metrics (eval/loss equal to the run's own final eval/loss: the same
    computation, so to fp32 summation order, 1e-5 relative); the run dir gains nothing."""
    run_dir = runs["dec"]
    before = _listing(run_dir)
    out = tmp_path / "sub" / "metrics.json"
    proc = run_cli(f"run_dir={run_dir}", f"output={out}", module="trainer.evaluate")
    assert proc.returncode == 0, proc.stderr
    assert _listing(run_dir) == before
    summary = json.loads((run_dir / "summary.json").read_text())
    assert json.loads(out.read_text())["eval/loss"] == pytest.approx(summary["eval/loss"], rel=1e-5)
    proc = run_cli(f"run_dir={run_dir}", f"output={tmp_path / 'metrics.txt'}", module="trainer.evaluate")
    assert "output=" in _one_error(proc.returncode, proc.stderr)
    assert not (tmp_path / "metrics.txt").exists()


def test_quantize_prints_the_tables_of_its_report_and_no_warning(runs):
    """An encoder's quantization: the loss, retrieval (recall, docs/s, size) and longest-document
    tables are printed, each line as quantize.md holds it; no warning line reaches the user."""
    run_dir = runs["enc"]
    proc = run_cli(f"run_dir={run_dir}", "quantize=dynamic_int8", "quantize.compile=false",
                   "quantize.latency_batches=2", "quantize.max_context=64", "trainer.threads=2",
                   module="trainer.quantize")
    assert proc.returncode == 0, proc.stderr
    report = (run_dir / "quantize.md").read_text().splitlines()
    printed = [ln for ln in proc.stderr.splitlines() if ln.startswith("|")]
    for header in ("| variant | library |", "| variant | autocast | size MB |", "| attention | longest within"):
        assert any(ln.startswith(header) for ln in printed), (header, proc.stderr)
    assert "docs/s" in proc.stderr and "recall@10" in proc.stderr
    assert set(printed) <= set(report), set(printed) - set(report)
    assert len(printed) == sum(ln.startswith("|") for ln in report)
    assert not re.search(r"Warning\b", proc.stderr), proc.stderr


def test_the_report_silences_only_the_known_torch_warning():
    """The filter matches torch's own message text (read from its source) and nothing else."""
    import torch._functorch._aot_autograd.autograd_cache as cache

    from trainer.quantize.__main__ import quiet_report_warnings

    source = Path(cache.__file__).read_text()
    text = re.search(r'f"\{type\(tensor\).__name__\}( does not implement _stable_hash_for_caching[^"]*)"', source)
    message = "Int8Tensor" + text.group(1)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        with quiet_report_warnings():
            warnings.warn(message, UserWarning)
            warnings.warn("something else", UserWarning)
        warnings.warn(message, UserWarning)
    assert [str(w.message) for w in seen] == ["something else", message]


def test_every_tool_still_takes_its_documented_keys(runs, tmp_path):
    """The README's command lines and every key of each tool, set explicitly: exit 0 and output."""
    dec, enc = runs["dec"], runs["enc"]
    proc = run_cli(f"run_dir={dec}", "prompt=def main(", "max_new_tokens=5", "temperature=0.8", "top_k=50",
                   "top_p=0.9", "seed=1", "num_samples=2", "kv_cache=false", "quantize=dynamic_int8",
                   "precision=fp32", "device=cpu", "progress=false", module="trainer.generate")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("--- sample") == 2 and proc.stdout.count("def main(") == 2
    prompt = tmp_path / "prompt.txt"
    prompt.write_text("import os")
    proc = run_cli(f"run_dir={dec}", f"prompt_file={prompt}", "max_new_tokens=3", "kv_cache=yes",
                   module="trainer.generate")
    assert proc.returncode == 0 and proc.stdout.startswith("import os"), proc.stderr
    notes = tmp_path / "notes.md"
    notes.write_text("def f(x):\n    return x + 1\n" * 40)
    proc = run_cli(f"run_dir={dec}", "data=text", f"data.files=[{notes}]", "name=notes", "split=all",
                   "batch_size=4", "eval_batches=100000", "precision=bf16", "quantize=none", "device=cpu",
                   f"output={tmp_path / 'notes.json'}", module="trainer.evaluate")
    assert proc.returncode == 0, proc.stderr
    written = json.loads((tmp_path / "notes.json").read_text())
    assert written["data"]["files"] == [str(notes)] and written["split"] == "all"
    assert written["data"]["seq_len"] == 32  # the model's block length, not data=text's default
    inp = tmp_path / "texts.jsonl"
    inp.write_text('{"body": "def add(a, b): return a + b"}\n{"body": "sum of two numbers"}\n')
    proc = run_cli(f"run_dir={enc}", f"input={inp}", "field=body", f"output={tmp_path / 'v.npy'}",
                   "precision=bf16", "quantize=weight_int8", "batch_size=1", "device=cpu", "progress=false",
                   module="trainer.embed")
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "v.npy").is_file()
