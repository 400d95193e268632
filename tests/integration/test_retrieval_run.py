"""End to end: a contrastive retrieval encoder trained through the CLI on the embedded
(docstring -> code) task and on the user's own pairs; its retrieval numbers against a random-init
encoder, BM25 and an independent recomputation; learned temperature; init_from an MLM run; the
quantization report's retrieval rows; and bad input."""
from __future__ import annotations

import json
import math
import re

import pytest
import torch

from conftest import run_cli, tiny_cli_args
from tb import read_scalars

RETRIEVAL = ("recall@1", "recall@10", "mrr@10", "ndcg@10")
# The embedded task with 147 held-out pairs (data.max_files=200), searched against each other.
PAIRS = ["model=encoder", "objective=contrastive", "data=pairs", "data.max_files=200", "data.seq_len=48",
         "trainer.batch_size=32", "model.dropout=0.0", "schedule.warmup_steps=5", "trainer.log_every=10"]
TRAIN_STEPS = 60
TRAINED = [*PAIRS, f"trainer.max_steps={TRAIN_STEPS}", f"trainer.eval_every={TRAIN_STEPS}",
           f"trainer.checkpoint_every={TRAIN_STEPS}", "optim.lr=2e-3", "quantize=dynamic_int8", "quantize.compile=false"]
# One step at an lr of 1e-37 (1e-30 x 1/1000 warmup) leaves every fp32 weight bit-identical:
# the step-1 evaluation and model.pt are the initial weights, through the run's own code path.
FROZEN = ["trainer.max_steps=1", "trainer.eval_every=1", "trainer.checkpoint_every=1", "optim.lr=1e-30",
          "schedule.warmup_steps=1000"]


def _ok(proc):
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def _summary(run_dir) -> dict:
    return json.loads((run_dir / "summary.json").read_text())


def _one_sentence_error(proc, *named: str) -> str:
    """The single `error:` line of a failed CLI call (no traceback), which names `named`."""
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr + proc.stdout, proc.stderr[-3000:]
    errors = [ln for ln in (proc.stderr + proc.stdout).splitlines() if ln.startswith("error:")]
    assert len(errors) == 1, proc.stderr[-3000:]
    for n in named:
        assert n in errors[0], errors[0]
    return errors[0]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """The trained run (quantized with dynamic_int8 at the end) and the same config evaluated at
    its initial weights, each run once."""
    base = tmp_path_factory.mktemp("retrieval")
    _ok(run_cli(*tiny_cli_args(base / "trained", *TRAINED)))
    _ok(run_cli(*tiny_cli_args(base / "init", *PAIRS, *FROZEN)))
    return base / "trained", base / "init"


def test_trained_encoder_beats_random_init_and_reports_bm25(trained):
    """summary.json and TensorBoard carry eval recall@1/@10, MRR@10, nDCG@10 and the BM25
    baseline on the same search; training lifts recall@10 and MRR@10 clearly above the
    random-init encoder of the same config, which already matches bytes (measured: 0.29 vs
    0.22 recall@10, 0.11 vs 0.07 MRR@10 on 147 queries; a random ranking gives 10/147 = 0.07)."""
    run_dir, init_dir = trained
    s, s0 = _summary(run_dir), _summary(init_dir)
    for k in RETRIEVAL:
        assert 0.0 <= s[f"eval/{k}"] <= 1.0 and 0.0 <= s[f"bm25/{k}"] <= 1.0
        assert s[f"bm25/{k}"] == s0[f"bm25/{k}"]  # BM25 sees the same held-out search in both runs
    assert s["eval/recall@1"] <= s["eval/recall@10"] and s["bm25/recall@1"] <= s["bm25/recall@10"]
    assert s["eval_step"] == TRAIN_STEPS
    assert s["eval/recall@10"] >= s0["eval/recall@10"] + 0.04, (s["eval/recall@10"], s0["eval/recall@10"])
    assert s["eval/mrr@10"] >= s0["eval/mrr@10"] + 0.02, (s["eval/mrr@10"], s0["eval/mrr@10"])
    assert s["bm25/recall@10"] > 0.5  # the lexical baseline is strong on docstring -> code
    tb = read_scalars(str(run_dir))
    for k in RETRIEVAL:
        assert tb[f"eval/{k}"][TRAIN_STEPS] == pytest.approx(s[f"eval/{k}"], abs=1e-6)
        assert tb[f"bm25/{k}"][0] == pytest.approx(s[f"bm25/{k}"], abs=1e-6)


def _held_out_search(cfg):
    """The held-out queries and the documents they are searched against, straight from the pairs."""
    from trainer.data.code_pairs import build_pairs

    pairs = build_pairs(cfg.data, cfg.seed)
    return pairs.val.queries, pairs.val.documents + pairs.extra_documents


def _embed_one_by_one(model, tok, texts: list[bytes], seq_len: int, pooling: str) -> torch.Tensor:
    from trainer.retrieval.embedding import embed

    out = []
    with torch.no_grad():
        for t in texts:
            ids = tok.encode(t, bos=True, eos=True)
            if len(ids) > seq_len:
                ids = ids[:seq_len - 1] + [tok.eos_id]
            out.append(embed(model, torch.tensor([ids]), None, pooling)[0])
    return torch.stack(out)


def _hand_metrics(q: torch.Tensor, d: torch.Tensor) -> dict[str, float]:
    """recall@1/@10 and MRR@10 with query i's positive = document i; a tie counts against."""
    hits1 = hits10 = rr = 0.0
    for i in range(len(q)):
        scores = [float(q[i] @ d[j]) for j in range(len(d))]
        rank = sum(1 for j, x in enumerate(scores) if j != i and x >= scores[i])
        hits1 += rank < 1
        hits10 += rank < 10
        rr += 1.0 / (rank + 1) if rank < 10 else 0.0
    n = len(q)
    return {"recall@1": hits1 / n, "recall@10": hits10 / n, "mrr@10": rr / n}


def test_eval_metrics_equal_an_independent_computation(trained):
    """The final eval recall@1/@10 and MRR@10 equal those of the final weights, each held-out
    query and document embedded on its own (no batching, no padding) and ranked by hand."""
    from trainer.runs.artifacts import load_model

    run_dir, _ = trained
    model, tok, cfg = load_model(str(run_dir))
    queries, documents = _held_out_search(cfg)
    assert len(queries) == 147 and len(documents) == 147
    q = _embed_one_by_one(model, tok, queries, cfg.data.seq_len, cfg.objective.pooling)
    d = _embed_one_by_one(model, tok, documents, cfg.data.seq_len, cfg.objective.pooling)
    mine, s = _hand_metrics(q, d), _summary(run_dir)
    assert s["eval/recall@1"] == mine["recall@1"]
    assert s["eval/recall@10"] == mine["recall@10"]
    assert s["eval/mrr@10"] == pytest.approx(mine["mrr@10"], abs=1e-6)


@pytest.fixture(scope="module")
def learned(tmp_path_factory):
    """A short contrastive run at the tiny sizes that learns its temperature."""
    run_dir = tmp_path_factory.mktemp("learned") / "run"
    _ok(run_cli(*tiny_cli_args(run_dir, "model=encoder", "objective=contrastive", "data=pairs",
                               "objective.learn_temperature=true", "objective.temperature=0.05",
                               "trainer.max_steps=4", "trainer.eval_every=4", "trainer.checkpoint_every=4",
                               "optim.lr=1e-2")))
    return run_dir


def test_learned_temperature_trains_and_is_saved(learned):
    """objective.learn_temperature=true: model.safetensors holds a scalar `logit_scale` that
    training moved away from its start, log(1 / 0.05)."""
    from safetensors.torch import load_file

    weights = load_file(str(learned / "model.safetensors"))
    assert weights["logit_scale"].shape == ()
    assert abs(float(weights["logit_scale"]) - math.log(1 / 0.05)) > 1e-3
    assert _summary(learned)["complete"]


def test_learned_temperature_run_loads_for_embed_and_evaluate(learned, tmp_path):
    """load_model, `python -m trainer.embed` and `python -m trainer.evaluate` accept a
    learned-temperature run (the scale only shaped the training loss)."""
    from trainer.runs.artifacts import load_model

    model, _, _ = load_model(str(learned))
    assert not hasattr(model, "logit_scale") or model.logit_scale.shape == ()
    inp = tmp_path / "t.txt"
    inp.write_text("one\ntwo\n")
    _ok(run_cli(f"run_dir={learned}", f"input={inp}", f"output={tmp_path / 'v.npy'}", "progress=false",
                module="trainer.embed"))
    _ok(run_cli(f"run_dir={learned}", module="trainer.evaluate"))


@pytest.fixture(scope="module")
def mlm_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("mlm") / "run"
    _ok(run_cli(*tiny_cli_args(run_dir, "model=encoder", "trainer.max_steps=3", "trainer.eval_every=3")))
    return run_dir


def test_init_from_an_mlm_run_starts_from_its_final_weights(mlm_run, learned, tmp_path):
    """A contrastive run with model.init_from=<mlm run> starts from the MLM run's final weights:
    after one step at a vanishing lr every tensor equals the MLM run's bit for bit, while a
    contrastive run of the same sizes without init_from holds other weights."""
    from safetensors.torch import load_file

    pairs = ["model=encoder", "objective=contrastive", "data=pairs", *FROZEN]
    _ok(run_cli(*tiny_cli_args(tmp_path / "from_mlm", *pairs, f"model.init_from={mlm_run}")))
    source = load_file(str(mlm_run / "model.safetensors"))
    started = load_file(str(tmp_path / "from_mlm" / "model.safetensors"))
    fresh = load_file(str(learned / "model.safetensors"))
    assert set(started) <= set(source) and "embed.weight" in started
    for k, v in started.items():
        assert torch.equal(v, source[k]), k
    assert any(not torch.equal(v, source[k]) for k, v in fresh.items() if k in source)
    assert _summary(tmp_path / "from_mlm")["components"]["objective"] == "contrastive"


def test_init_from_a_run_of_another_size_is_refused(mlm_run, tmp_path):
    """model.init_from with different sizes exits 2 with one sentence naming init_from and the
    mismatched size, and writes no weights, checkpoint or summary."""
    run_dir = tmp_path / "bad"
    proc = run_cli(*tiny_cli_args(run_dir, "model=encoder", "objective=contrastive", "data=pairs",
                                  "model.d_model=64", f"model.init_from={mlm_run}"))
    assert proc.returncode == 2
    _one_sentence_error(proc, "model.init_from", "shapes differ")
    for made in ("model.pt", "model.safetensors", "summary.json", "checkpoints"):
        assert not (run_dir / made).exists(), made


def test_init_from_a_run_of_another_size_is_refused_before_a_run_dir_exists(mlm_run, tmp_path):
    """A refused model.init_from leaves no run dir behind, as every other refused setting."""
    run_dir = tmp_path / "bad"
    proc = run_cli(*tiny_cli_args(run_dir, "model=encoder", "objective=contrastive", "data=pairs",
                                  "model.d_model=64", f"model.init_from={mlm_run}"))
    assert proc.returncode == 2
    assert not run_dir.exists()


def _bad_jsonl(tmp_path):
    path = tmp_path / "pairs.jsonl"
    path.write_text('{"query": "a question here", "document": "an answer here"}\n'
                    '{"question": "no query field", "document": "x"}\n')
    return path


@pytest.mark.parametrize("case", ["pairs_with_mlm", "missing_jsonl", "jsonl_without_query", "pooling_max",
                                  "learned_temperature_fsdp"])
def test_bad_input_is_one_sentence(tmp_path, case):
    """Each bad retrieval setting fails with one sentence naming the key or file, a non-zero
    exit and no traceback."""
    base = ["model=encoder", "objective=contrastive", "data=pairs"]
    args, named = {
        "pairs_with_mlm": (["model=encoder", "objective=mlm", "data=pairs"], ["data=pairs", "objective=mlm"]),
        "missing_jsonl": ([*base, f"data.files=[{tmp_path / 'nope.jsonl'}]"], ["data.files", "nope.jsonl"]),
        "jsonl_without_query": ([*base, f"data.files=[{_bad_jsonl(tmp_path)}]"], ["pairs.jsonl", "line 2", "'query'"]),
        "pooling_max": ([*base, "objective.pooling=max"], ["objective.pooling", "max"]),
        "learned_temperature_fsdp": ([*base, "objective.learn_temperature=true", "parallel=fsdp"],
                                     ["objective.learn_temperature", "parallel=fsdp"]),
    }[case]
    proc = run_cli(*tiny_cli_args(tmp_path / "run", *args))
    _one_sentence_error(proc, *named)


def test_dynamic_int8_report_has_retrieval_rows(trained):
    """quantize=dynamic_int8 on a contrastive pairs run: summary.json's quantize.retrieval holds
    fp32, bf16 autocast, bf16 weights and dynamic_int8 rows with size, throughput, the four
    metrics and deltas; the fp32 row is the run's own final evaluation; quantize.md shows it."""
    run_dir, _ = trained
    s = _summary(run_dir)
    rows = s["quantize"]["retrieval"]
    assert sorted(rows) == sorted(["fp32", "bf16 autocast", "bf16 weights", "dynamic_int8"])
    for name, row in rows.items():
        for k in ("size_mb", "docs_per_s", *RETRIEVAL, *(f"{m}_delta" for m in RETRIEVAL)):
            assert isinstance(row[k], float) and math.isfinite(row[k]), (name, k)
        assert row["size_mb"] > 0 and row["docs_per_s"] > 0
        for m in RETRIEVAL:
            assert row[f"{m}_delta"] == pytest.approx(row[m] - rows["fp32"][m], abs=1e-12)
    for m in RETRIEVAL:
        assert rows["fp32"][m] == pytest.approx(s[f"eval/{m}"], abs=1e-9), m
    assert rows["dynamic_int8"]["size_mb"] < rows["fp32"]["size_mb"]
    assert rows["bf16 weights"]["size_mb"] < rows["fp32"]["size_mb"]
    md = (run_dir / "quantize.md").read_text()
    assert "Retrieval on the held-out search" in md and "147 queries x 147 documents" in md
    for name in rows:
        assert f"| {name} |" in md
    assert f"{rows['fp32']['recall@10']:.3f}" in md


def test_user_pairs_with_custom_fields_and_extra_corpus(tmp_path):
    """A .jsonl of {q, d} records (data.query_field=q data.document_field=d) plus
    data.corpus_files trains and evaluates; the held-out search covers the held-out documents
    and every corpus document."""
    from trainer.data.heldout import held_out_documents

    words = ["alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel", "india", "juliet"]
    pairs = tmp_path / "mine.jsonl"
    pairs.write_text("".join(json.dumps({"q": f"find the {w} {i} record", "d": f"record {i}: {w} data {i * 7}",
                                         "extra": i}) + "\n"
                             for i, w in enumerate(words * 4)))
    corpus_txt, corpus_jsonl = tmp_path / "more.txt", tmp_path / "more.jsonl"
    corpus_txt.write_text("distractor one\n\ndistractor two\ndistractor three\n")  # blank lines are skipped
    corpus_jsonl.write_text("".join(json.dumps({"d": f"other document {i}"}) + "\n" for i in range(4)))
    run_dir = tmp_path / "run"
    proc = _ok(run_cli(*tiny_cli_args(run_dir, "model=encoder", "objective=contrastive", "data=pairs",
                                      f"data.files=[{pairs}]", "data.query_field=q", "data.document_field=d",
                                      f"data.corpus_files=[{corpus_txt},{corpus_jsonl}]", "data.val_fraction=0.25",
                                      "trainer.max_steps=4", "trainer.eval_every=2")))
    n_val = len(held_out_documents(40, 0.25, 0)[1])
    assert n_val == 10
    m = re.search(r"BM25 baseline on the (\d+) held-out queries x (\d+) documents", proc.stderr)
    assert m, proc.stderr[-2000:]
    assert (int(m.group(1)), int(m.group(2))) == (n_val, n_val + 3 + 4)
    s = _summary(run_dir)
    assert s["complete"] and all(0.0 <= s[f"eval/{k}"] <= 1.0 for k in RETRIEVAL)
    tb = read_scalars(str(run_dir))
    assert sorted(tb["eval/recall@10"]) == [2, 4]
