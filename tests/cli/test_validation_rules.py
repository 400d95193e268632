"""Every cross-field rule of trainer/config/validate.py, driven through the real CLI: `python -m
trainer <overrides>` exits 2 before any work, stderr is exactly one `error: ...` line naming the key
(and the value where there is one), and nothing is written: no run dir, no `.hydra`, no checkpoint.

One case per rule, checked in process through `trainer.command.precheck` (what the CLI runs
before Hydra starts), and a sample of them through a real subprocess each. The cases are listed in
the order of validate.py so a new rule has an obvious place to add its case.
"""
from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from conftest import run_cli, tiny_cli_args

ENC = ["model=encoder", "objective=contrastive"]  # a retrieval encoder (data=pairs needs it)
MISSING = "/nonexistent/for-validation/file.txt"
LAUNCHED = {"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0"}  # what torchrun sets (nothing is joined)
LAUNCHED3 = {**LAUNCHED, "WORLD_SIZE": "3"}
LAUNCHED4 = {**LAUNCHED, "WORLD_SIZE": "4"}

# (overrides, words the one error line must contain, extra environment)
RULES = [
    # ---- choices that are plain keys (group choices are refused by Hydra's composition)
    pytest.param(["model.arch=recurrent"], ["model=", "recurrent", "decoder"], None, id="model-arch-choice"),
    pytest.param(["attention.kind=quantum"], ["attention=", "quantum", "tiled"], None, id="attention-kind-choice"),
    pytest.param(["position.kind=spiral"], ["position=", "spiral", "rope"], None, id="position-kind-choice"),
    pytest.param(["norm.kind=groupnorm"], ["norm=", "groupnorm", "rmsnorm"], None, id="norm-kind-choice"),
    pytest.param(["norm.placement=middle"], ["norm.placement", "middle", "pre"], None, id="norm-placement-choice"),
    pytest.param(["objective.kind=ranking"], ["objective", "ranking", "contrastive"], None, id="objective-kind-choice"),
    pytest.param(["data.source=ftp"], ["data=", "ftp", "stdlib"], None, id="data-source-choice"),
    pytest.param(["precision.dtype=fp8"], ["precision=", "fp8", "bf16"], None, id="precision-dtype-choice"),
    pytest.param(["parallel.kind=pipeline"], ["parallel=", "pipeline", "fsdp"], None, id="parallel-kind-choice"),
    pytest.param(["quantize.method=int2"], ["quantize=", "int2", "weight_int4"], None, id="quantize-method-choice"),
    pytest.param(["optim.name=sgd"], ["optim=", "sgd", "adamw"], None, id="optim-name-choice"),
    pytest.param(["schedule.name=step"], ["schedule=", "step", "cosine"], None, id="schedule-name-choice"),
    pytest.param(["model.activation=tanh"], ["model.activation", "tanh"], None, id="activation-choice"),
    pytest.param(["trainer.device=tpu"], ["trainer.device", "tpu", "cpu"], None, id="device-choice"),
    pytest.param(["trainer.compile=maybe"], ["trainer.compile", "maybe", "auto"], None, id="compile-choice"),
    # ---- model sizes
    pytest.param(["model.d_model=0"], ["model.d_model=0", "> 0"], None, id="d-model-positive"),
    pytest.param(["model.num_layers=-1"], ["model.num_layers=-1", "> 0"], None, id="num-layers-positive"),
    pytest.param(["model.num_heads=0"], ["model.num_heads=0", "> 0"], None, id="num-heads-positive"),
    pytest.param(["model.d_ff=0"], ["model.d_ff=0", "> 0"], None, id="d-ff-positive"),
    pytest.param(["model.num_kv_heads=0"], ["model.num_kv_heads=0", "> 0"], None, id="num-kv-heads-positive"),
    pytest.param(["model.num_heads=3"], ["model.num_heads=3", "model.d_model=32"], None, id="heads-divide-d-model"),
    pytest.param(["model.num_kv_heads=3"], ["model.num_kv_heads=3", "model.num_heads=4"], None,
                 id="kv-heads-divide-heads"),
    pytest.param(["model=encoder_decoder", "model.num_decoder_layers=0"], ["model.num_decoder_layers=0"], None,
                 id="decoder-layers-positive"),
    pytest.param(["model.dropout=1.0"], ["model.dropout=1.0", "[0, 1)"], None, id="dropout-fraction"),
    pytest.param(["model.attn_dropout=-0.1"], ["model.attn_dropout=-0.1", "[0, 1)"], None,
                 id="attn-dropout-fraction"),
    pytest.param(["position=rope", "model.num_heads=32"], ["position=rope", "head size", "1"], None,
                 id="rope-even-head-size"),
    # tiled attention has no dropout path: it used to die mid-run after writing the run dir
    pytest.param(["attention=tiled", "model.attn_dropout=0.1"], ["attention=tiled", "model.attn_dropout"], None,
                 id="tiled-attention-dropout"),
    pytest.param(["attention.block_size=0"], ["attention.block_size=0", "> 0"], None, id="attention-block-size"),
    # ---- objective
    pytest.param(["objective=span"], ["objective=span", "model=decoder", "encoder_decoder"], None,
                 id="objective-arch"),
    pytest.param(["model=encoder", "objective.mask_prob=0"], ["objective.mask_prob=0", "(0, 1)"], None,
                 id="mask-prob-fraction"),
    pytest.param(["objective.noise_density=1.5"], ["objective.noise_density=1.5", "(0, 1)"], None,
                 id="noise-density-fraction"),
    pytest.param(["objective.mean_span=0"], ["objective.mean_span=0", "> 0"], None, id="mean-span-positive"),
    pytest.param(["objective.temperature=0"], ["objective.temperature=0", "> 0"], None, id="temperature-positive"),
    # ---- retrieval
    pytest.param([*ENC, "objective.pooling=max"], ["objective.pooling", "max", "mean"], None, id="pooling-choice"),
    pytest.param(["data=pairs"], ["data=pairs", "objective=clm", "objective=contrastive"], None,
                 id="pairs-needs-contrastive"),
    pytest.param([*ENC, "data=pairs", "tokenizer=bpe"], ["data=pairs", "tokenizer=bpe"], None, id="pairs-with-bpe"),
    pytest.param([*ENC, "data=pairs", f"data.files=[{MISSING}]"], ["data.files", MISSING], None,
                 id="pairs-files-missing"),
    pytest.param([*ENC, "data=pairs", f"data.corpus_files=[{MISSING}]"], ["data.corpus_files", MISSING], None,
                 id="pairs-corpus-files-missing"),
    pytest.param([*ENC, "objective.learn_temperature=true", "parallel=fsdp"],
                 ["objective.learn_temperature=true", "parallel=fsdp"], None, id="learned-temperature-with-fsdp"),
    pytest.param([f"model.init_from={MISSING}"], ["model.init_from", MISSING], None, id="init-from-missing"),
    # ---- data
    pytest.param(["data.seq_len=4"], ["data.seq_len=4", ">= 8"], None, id="seq-len-minimum"),
    pytest.param(["model=encoder_decoder", "position=learned", "objective.noise_density=0.5",
                  "objective.mean_span=1"], ["objective=span", "position=learned", "data.seq_len=32"], None,
                 id="span-longer-than-learned-table"),
    pytest.param(["data.val_fraction=0"], ["data.val_fraction=0", "(0, 1)"], None, id="val-fraction"),
    pytest.param(["data=text"], ["data=text", "data.files"], None, id="text-needs-files"),
    pytest.param(["data=text", f"data.files=[{MISSING}]"], ["data.files", MISSING], None, id="text-file-missing"),
    pytest.param(["data=hub"], ["data=hub", "data.name"], None, id="hub-needs-name"),
    # ---- tokenizer and data loading
    pytest.param(["tokenizer.kind=wordpiece"], ["tokenizer=", "wordpiece", "bpe"], None, id="tokenizer-choice"),
    pytest.param(["tokenizer=bpe", "tokenizer.vocab_size=383"], ["tokenizer.vocab_size=383", ">= 384"], None,
                 id="bpe-vocab-minimum"),
    pytest.param(["tokenizer=pretrained"], ["tokenizer=pretrained", "tokenizer.path"], None,
                 id="pretrained-needs-path"),
    pytest.param(["tokenizer=pretrained", f"tokenizer.path={MISSING}"], ["tokenizer.path", MISSING], None,
                 id="pretrained-path-missing"),
    pytest.param(["data.num_proc=0"], ["data.num_proc=0", "> 0"], None, id="num-proc-positive"),
    pytest.param(["data=hub", "data.name=some/dataset", f"data.val_files=[{MISSING}]"],
                 ["data.val_files", "data=hub"], None, id="val-files-with-hub"),
    pytest.param([*ENC, "data=pairs", f"data.val_files=[{MISSING}]"], ["data.val_files", MISSING], None,
                 id="pairs-val-files-missing"),
    pytest.param([f"data.val_files=[{MISSING}]"], ["data.val_files", MISSING], None, id="val-files-missing"),
    pytest.param(["data.streaming=true"], ["data.streaming=true", "data=stdlib"], None, id="streaming-stdlib"),
    pytest.param(["data=text", "data.files=[{TEXT}]", "data.streaming=true", "tokenizer=bpe"],
                 ["data.streaming=true", "tokenizer=bpe"], None, id="streaming-with-bpe"),
    pytest.param(["data=text", "data.files=[{TEXT}]", "data.streaming=true", "data.encoding=latin-1"],
                 ["data.streaming=true", "data.encoding"], None, id="streaming-with-encoding"),
    # ---- trainer
    pytest.param(["trainer.max_steps=-1"], ["trainer.max_steps=-1", ">= 0"], None, id="max-steps-non-negative"),
    *[pytest.param([f"trainer.{key}=0"], [f"trainer.{key}=0", "> 0"], None, id=f"{key.replace('_', '-')}-positive")
      for key in ("batch_size", "grad_accum", "eval_every", "eval_batches", "log_every",
                  "checkpoint_every", "keep_checkpoints")],
    pytest.param(["trainer.grad_clip=-1.0"], ["trainer.grad_clip=-1.0", ">= 0"], None, id="grad-clip-non-negative"),
    pytest.param(["trainer.steps_per_run=0"], ["trainer.steps_per_run=0", "> 0"], None, id="steps-per-run-positive"),
    pytest.param(["trainer.threads=0"], ["trainer.threads=0", "> 0"], None, id="threads-positive"),
    pytest.param([f"trainer.resume={MISSING}"], ["trainer.resume", MISSING], None, id="resume-missing"),
    pytest.param(["trainer.grad_accum=3"], ["trainer.batch_size=8", "trainer.grad_accum", "1 x 3"], None,
                 id="batch-divisible-by-accumulation"),
    pytest.param(["parallel=ddp", "trainer.grad_accum=3", "trainer.batch_size=9"],
                 ["trainer.batch_size=9", "2 x 3"], LAUNCHED, id="batch-divisible-by-world-size"),
    pytest.param(["optim.lr=0"], ["optim.lr=0", "> 0"], None, id="lr-positive"),
    pytest.param(["optim.weight_decay=-0.1"], ["optim.weight_decay=-0.1", ">= 0"], None, id="weight-decay"),
    pytest.param(["optim.betas=[0.9,1.0]"], ["optim.betas", "[0, 1)"], None, id="betas"),
    pytest.param(["schedule.warmup_steps=-1"], ["schedule.warmup_steps=-1", ">= 0"], None, id="warmup-non-negative"),
    pytest.param(["schedule.warmup_fraction=1.5"], ["schedule.warmup_fraction=1.5", "[0, 1]"], None,
                 id="warmup-fraction"),
    pytest.param(["schedule.min_lr_ratio=1.0"], ["schedule.min_lr_ratio=1.0", "[0, 1)"], None, id="min-lr-ratio"),
    pytest.param(["parallel=ddp"], ["parallel=ddp", "torchrun"], None, id="parallel-needs-torchrun"),
    pytest.param(["quantize=qat_int8", "parallel=fsdp"], ["quantize=qat_int8", "parallel=fsdp"], LAUNCHED,
                 id="qat-int8-with-fsdp"),
    pytest.param(["trainer.async_checkpoint=true", "parallel=ddp"], ["trainer.async_checkpoint=true", "parallel=ddp"],
                 LAUNCHED, id="async-checkpoint-needs-sharded"),
    # ---- tensor / pipeline parallelism (_validate_model_parallel)
    pytest.param(["parallel=pp", "parallel.pp_schedule=zb"], ["parallel.pp_schedule", "zb", "1f1b"], LAUNCHED,
                 id="pp-schedule-choice"),
    pytest.param(["parallel=fsdp_tp", "parallel.tp_size=0"], ["parallel.tp_size=0", "> 0"], LAUNCHED,
                 id="tp-size-positive"),
    pytest.param([*ENC, "parallel=tp"], ["objective=contrastive", "parallel=tp"], LAUNCHED, id="contrastive-with-tp"),
    pytest.param(["parallel=tp", "trainer.compile=true"], ["trainer.compile=true", "parallel=tp"], LAUNCHED,
                 id="compile-with-tp"),
    pytest.param(["parallel=tp", "parallel.tp_size=4"], ["parallel.tp_size=4", "parallel=fsdp_tp"], LAUNCHED,
                 id="tp-uses-every-rank"),
    pytest.param(["parallel=fsdp_tp", "parallel.tp_size=3"], ["parallel.tp_size=3", "world size 2"], LAUNCHED,
                 id="tp-size-divides-world"),
    pytest.param(["model=encoder", "parallel=pp"], ["parallel=pp", "model=encoder", "objective=mlm"], LAUNCHED,
                 id="pp-decoder-only"),
    pytest.param(["parallel=pp"], ["parallel=pp", "model.num_layers=2", "4 ranks"], LAUNCHED4,
                 id="pp-block-per-rank"),
    pytest.param(["parallel=pp", "parallel.pp_schedule=1f1b"], ["parallel.pp_schedule=1f1b", "trainer.grad_accum",
                                                                "got 1"], LAUNCHED, id="pp-1f1b-micro-batches"),
    pytest.param(["parallel=tp"], ["model.num_heads=4", "3 tensor-parallel ranks"], LAUNCHED3, id="tp-heads-divisible"),
    pytest.param(["parallel=tp", "model.d_ff=65"], ["model.d_ff=65", "2 tensor-parallel ranks"], LAUNCHED,
                 id="tp-d-ff-divisible"),
]


def _written(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


def _inputs(tmp_path: Path, overrides: list[str]) -> list[str]:
    text = tmp_path / "inputs" / "corpus.txt"  # an existing text file for rules that need one
    text.parent.mkdir(exist_ok=True)
    text.write_text("some text to train on\n" * 20)
    return [o.replace("{TEXT}", str(text)) for o in overrides]


@pytest.mark.parametrize("overrides,needles,env", RULES)
def test_validation_rule_refuses_before_any_work(tmp_path, monkeypatch, overrides, needles, env):
    """`trainer.command.precheck`, the check `python -m trainer` runs before Hydra creates the run
    dir, refuses the command with one sentence naming the key (in process: one case per rule)."""
    from trainer.command import precheck

    for k, v in (env or {}).items():
        monkeypatch.setenv(k, v)
    run_dir = tmp_path / "out" / "run"
    message = precheck(tiny_cli_args(run_dir, *_inputs(tmp_path, overrides)))
    assert message is not None and "\n" not in message, message
    for needle in needles:
        assert needle in message, (needle, message)
    assert not (tmp_path / "out").exists(), _written(tmp_path / "out")


# One rule of each kind through the real command line: exit 2, one `error:` line, nothing written.
CLI_SAMPLE = ("attention-kind-choice", "d-model-positive", "warmup-fraction", "parallel-needs-torchrun",
              "qat-int8-with-fsdp")


@pytest.mark.parametrize("overrides,needles,env", [r for r in RULES if r.id in CLI_SAMPLE]
                         + [r for r in RULES if r.id not in CLI_SAMPLE][1::12])
def test_the_command_line_exits_2_with_one_line_and_writes_nothing(tmp_path, overrides, needles, env):
    run_dir = tmp_path / "out" / "run"
    proc = run_cli(*tiny_cli_args(run_dir, *_inputs(tmp_path, overrides)), env=env, timeout=120)
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-2000:])
    lines = proc.stderr.rstrip("\n").split("\n")
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr[-2000:]
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "out").exists(), _written(tmp_path / "out")  # no run dir, no .hydra, nothing
