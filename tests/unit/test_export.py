"""Export: a model of this trainer out as a Hugging Face folder, checked against the reference
libraries. `transformers.AutoModel` / `AutoModelForCausalLM` must give our hidden states and logits
(fp32, right-padded batches, within 1e-4) for an imported tiny model of each family (made by
`transformers`, perturbed away from its init), and `sentence_transformers.SentenceTransformer` our
embeddings (cosine 0.9999) for an encoder trained from scratch with the byte tokenizer; a run
whose architecture has no Hugging Face counterpart is refused in one sentence (exit 2), and the
output folder is only ever replaced whole."""
from __future__ import annotations

import json
import os
import re

import pytest
import torch
from omegaconf import OmegaConf

transformers = pytest.importorskip("transformers")

from tests.conftest import compose_cfg, run_cli, tiny_cli_args  # noqa: E402
from tests.unit.test_pretrained import V, _batch, make_folder  # noqa: E402
from trainer.data.pairs import encode_rows  # noqa: E402
from trainer.data.tokenizer import ByteTokenizer, HFTokenizer  # noqa: E402
from trainer.errors import ConfigError  # noqa: E402
from trainer.pretrained.export import MARKER, export_model  # noqa: E402
from trainer.pretrained.load import load_pretrained_model  # noqa: E402
from trainer.runs.artifacts import load_model, save_weights  # noqa: E402
from trainer.runs.model import build_run_model  # noqa: E402

TOL = 1e-4  # fp32, sums over at most d_ff = 64 terms per layer: rounding stays far below this
TEXTS = ["def add(a, b):\n    return a + b", "Return the sum of two numbers.", "héllo wörld " * 6, "x", "</s> <pad>"]


def _auto(folder, arch: str):
    cls = transformers.AutoModel if arch == "encoder" else transformers.AutoModelForCausalLM
    return cls.from_pretrained(str(folder)).eval()


def _outputs(model, auto, tokens, mask, arch: str):
    """(ours, theirs): final hidden states and (decoders) logits over the real vocabulary."""
    with torch.no_grad():
        hidden = model(tokens, mask=mask, head=False)
        ref = auto(input_ids=tokens, attention_mask=mask.long(), output_hidden_states=True)
        ours = [hidden] + ([] if arch == "encoder" else [model.logits(hidden)[..., :V]])
        theirs = [ref.hidden_states[-1]] + ([] if arch == "encoder" else [ref.logits[..., :V]])
    return ours, theirs


@pytest.mark.parametrize("family", ["bert", "roberta", "gpt2", "llama", "qwen2", "qwen3"])
def test_imported_model_round_trips_through_automodel(family, tmp_path_factory):
    """Import a tiny transformers model, export it: transformers' Auto class on the export gives
    the original reference model's outputs and ours, and re-importing the export gives ours."""
    folder, hf = make_folder(tmp_path_factory, family)
    model, tok, cfg = load_pretrained_model(str(folder), overrides=["attention.kind=standard"])
    out = tmp_path_factory.mktemp(f"{family}_export") / "hf"
    info = export_model(model, tok, cfg, str(out))
    assert info["family"] == family and json.loads((out / "config.json").read_text())["model_type"] == family
    tokens, mask = _batch(family)
    auto = _auto(out, cfg.model.arch)
    ours, theirs = _outputs(model, auto, tokens, mask, cfg.model.arch)
    _, original = _outputs(model, hf, tokens, mask, cfg.model.arch)
    for a, b, c in zip(ours, theirs, original):
        assert (a - b)[mask].abs().max() < TOL
        assert (b - c)[mask].abs().max() < TOL
    again, _, _ = load_pretrained_model(str(out), overrides=["attention.kind=standard"])
    with torch.no_grad():
        assert (again(tokens, mask=mask, head=False) - ours[0])[mask].abs().max() < TOL


def _scratch(tmp_path, *overrides: str):
    """(model, tokenizer, cfg) built from the real config with `overrides`, every parameter random
    (norm weights off one, biases off zero) so a mis-mapped tensor shows."""
    cfg = compose_cfg(*overrides, "trainer.device=cpu")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = build_run_model(cfg, 384).eval()
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn(p.shape) * 0.05)
    return model, ByteTokenizer(), cfg


@pytest.mark.parametrize("overrides", [
    ("model=encoder", "position=sinusoidal", "norm.placement=post", "model.embed_norm=true", "model.bias=false",
     "model.activation=gelu_tanh"),
    ("model=decoder", "position=none", "model.activation=relu", "model.tie_embeddings=false"),
    ("model=decoder", "position=rope", "norm=rmsnorm", "model.activation=swiglu", "model.num_kv_heads=2",
     "model.qk_norm=true", "model.qkv_bias=true", "position.rope_base=5000"),
], ids=["bert-sinusoidal-nobias", "gpt2-nopositions-untied", "qwen3-gqa-qkvbias"])
def test_exact_conversions_give_the_same_outputs(tmp_path, overrides):
    """What a family has and the run lacks is written exactly: sinusoidal or absent positions as
    a table, missing biases and token types as zeros, Qwen3's output bias as zeros."""
    model, tok, cfg = _scratch(tmp_path, *overrides, "attention=standard")
    export_model(model, tok, cfg, str(tmp_path / "hf"))
    tokens = torch.randint(0, 256, (3, 20), generator=torch.Generator().manual_seed(3))
    mask = torch.arange(20)[None, :] < torch.tensor([20, 11, 4])[:, None]
    tokens = tokens.masked_fill(~mask, tok.pad_id)
    ours, theirs = _outputs(model, _auto(tmp_path / "hf", cfg.model.arch), tokens, mask, cfg.model.arch)
    for a, b in zip(ours, theirs):
        assert (a - b)[mask].abs().max() < TOL


def test_byte_tokenizer_file_encodes_as_the_byte_tokenizer(tmp_path):
    """The exported tokenizer.json (a byte-level `tokenizers` model) gives ByteTokenizer's ids for
    any text, decodes back to it, and every special id sits where the trainer puts it."""
    from tokenizers import Tokenizer

    model, tok, cfg = _scratch(tmp_path, "model=encoder", "position=learned", "norm.placement=post",
                               "model.embed_norm=true")
    export_model(model, tok, cfg, str(tmp_path / "hf"))
    hf_tok = Tokenizer.from_file(str(tmp_path / "hf" / "tokenizer.json"))
    for text in TEXTS[:4] + ["\x00\x7f\t\r\n", "日本語 ✓ 🙂"]:
        ids = hf_tok.encode(text).ids
        assert ids == tok.encode(text, bos=True, eos=True)  # post-processor: BOS + text + EOS
        assert hf_tok.decode(ids) == text
    ours = HFTokenizer(hf_tok, "pretrained")
    assert (ours.pad_id, ours.bos_id, ours.eos_id, ours.mask_id, ours.vocab_size) == (256, 257, 258, 259, 384)
    assert [ours.sentinel(i) for i in (0, 1, 123)] == [tok.sentinel(i) for i in (0, 1, 123)]


@pytest.fixture(scope="module")
def trained_runs(tmp_path_factory):
    """Two tiny runs trained from scratch through the CLI: a BERT-shaped encoder (learned
    positions, layernorm post-norm, embedding norm, biases, gelu) and a Llama-shaped decoder
    (rope, rmsnorm, swiglu, grouped-query attention)."""
    root = tmp_path_factory.mktemp("runs")
    runs = {"encoder": ("model=encoder", "position=learned", "norm.placement=post", "model.embed_norm=true",
                        "model.bias=true", "model.activation=gelu"),
            "decoder": ("model=decoder", "position=rope", "norm=rmsnorm", "model.activation=swiglu",
                        "model.num_kv_heads=2")}
    for name, extra in runs.items():
        r = run_cli(*tiny_cli_args(root / name, *extra, "trainer.max_steps=3", "trainer.eval_every=3",
                                   "trainer.eval_batches=1"))
        assert r.returncode == 0, r.stderr[-2000:]
    return root


@pytest.mark.parametrize("arch", ["encoder", "decoder"])
def test_trained_run_exports_through_the_cli(trained_runs, tmp_path, arch):
    """`python -m trainer.export` on a run trained from scratch: AutoModel gives its hidden states
    (and logits) within 1e-4; for the encoder, SentenceTransformer gives `trainer.embed`'s vectors
    (cosine >= 0.9999, the run's pooling, BOS/EOS and max_seq_length)."""
    run, out = trained_runs / arch, tmp_path / "hf"
    r = run_cli(f"run_dir={run}", f"output={out}", module="trainer.export")
    assert r.returncode == 0, r.stderr[-2000:]
    expected = "bert" if arch == "encoder" else "llama"
    assert json.loads((out / "config.json").read_text())["model_type"] == expected
    model, tok, cfg = load_model(str(run))
    model.eval()
    tokens = encode_rows([t.encode() for t in TEXTS[:3]], tok, 20)  # (3, 20): BOS + text + EOS, padded
    mask = tokens != tok.pad_id
    ours, theirs = _outputs(model, _auto(out, arch), tokens, mask, arch)
    for a, b in zip(ours, theirs):
        assert (a - b)[mask].abs().max() < TOL
    if arch == "encoder":
        st = pytest.importorskip("sentence_transformers")
        from trainer.embed import embed_texts

        vectors = embed_texts(model, tok, [t.encode() for t in TEXTS], cfg.data.seq_len, cfg.objective.pooling)
        theirs = st.SentenceTransformer(str(out), device="cpu").encode(TEXTS[:4], convert_to_tensor=True)
        cosine = torch.nn.functional.cosine_similarity(torch.from_numpy(vectors[:4]), theirs.float(), dim=-1)
        assert cosine.min() > 0.9999


def _fake_run(tmp_path, *overrides: str):
    """A run dir holding model.safetensors (config in its header) for `overrides`, no training."""
    model, _, cfg = _scratch(tmp_path, *overrides)
    run = tmp_path / "run"
    run.mkdir()
    save_weights(model.state_dict(), str(run / "model.safetensors"), OmegaConf.to_container(cfg, resolve=True))
    return run


@pytest.mark.parametrize("overrides, feature", [
    (("model=decoder", "position=alibi"), "position=alibi"),
    (("model=encoder", "norm=batchnorm"), "norm=batchnorm"),
    (("model=encoder", "position=learned", "norm.placement=pre", "model.embed_norm=true"), "norm.placement=pre"),
    (("model=decoder", "position=rope", "norm=rmsnorm", "model.activation=gelu"), "model.activation=gelu"),
    (("model=encoder_decoder", "position=relative"), "model=encoder_decoder"),
])
def test_unmappable_architecture_is_refused_naming_the_feature(tmp_path, overrides, feature):
    model, tok, cfg = _scratch(tmp_path, *overrides)
    with pytest.raises(ConfigError, match=f"^{re.escape(feature)}( with [^ ]+)? has no counterpart"):
        export_model(model, tok, cfg, str(tmp_path / "hf"))
    assert not (tmp_path / "hf").exists()


def test_cli_refuses_an_unmappable_run_in_one_sentence(tmp_path):
    run, out = _fake_run(tmp_path, "model=decoder", "position=alibi"), tmp_path / "hf"
    r = run_cli(f"run_dir={run}", f"output={out}", module="trainer.export")
    assert r.returncode == 2
    lines = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and "position=alibi has no counterpart" in lines[0], r.stderr[-1000:]
    assert "Traceback" not in r.stderr and not out.exists()


def test_output_folder_is_replaced_only_whole(tmp_path):
    """A non-empty folder that is not an export is refused and left as is; a previous export is
    replaced by the new one, with no temporary folder left beside it."""
    model, tok, cfg = _scratch(tmp_path, "model=decoder", "position=learned")
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match="not a previous export"):
        export_model(model, tok, cfg, str(taken))
    assert os.listdir(taken) == ["notes.txt"]
    out = tmp_path / "hf"
    export_model(model, tok, cfg, str(out))
    (out / "stale.txt").write_text("from before")
    with torch.no_grad():
        model.embed.weight.add_(1.0)
    export_model(model, tok, cfg, str(out))
    assert (out / MARKER).is_file() and not (out / "stale.txt").exists()
    from safetensors.torch import load_file

    wte = load_file(str(out / "model.safetensors"))["transformer.wte.weight"]
    assert torch.equal(wte, model.embed.weight[:tok.vocab_size])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf", "taken"]


def test_cli_help_and_missing_output(tmp_path):
    """`--help` lists both keys (exit 0); a missing output= is one sentence, exit 2."""
    r = run_cli("--help", module="trainer.export")
    assert r.returncode == 0 and "run_dir=null" in r.stdout and "output=null" in r.stdout
    r = run_cli(f"run_dir={tmp_path}", module="trainer.export")
    assert r.returncode == 2 and r.stderr.count("error:") == 1 and "output=" in r.stderr
