"""`python -m trainer.generate run_dir=... prompt=...`: text from a trained decoder or encoder-decoder.

    python -m trainer.generate run_dir=outputs/<date>/<time> prompt="def main(" max_new_tokens=200 \\
        temperature=0.8 top_k=50 top_p=1.0 seed=0 num_samples=1 kv_cache=true [prompt_file=...] [quantize=...]

`temperature=0` is greedy. Sampling draws from a private, seeded `torch.Generator` (never the
global RNG), so a seed reproduces its samples. With `kv_cache=true` (the default) the prompt is
run once and then one token per step against cached keys/values (`models.transformer.KVCache`);
`kv_cache=false` recomputes the whole sequence each step (the reference the tests compare with).
"""
from __future__ import annotations

import os
import sys
import time

import torch
import torch.nn as nn

from trainer.errors import ConfigError
from trainer.data import EOS
from trainer.precision import autocast
from trainer.cli import apply_quantization
from trainer.distributed import resolve_device
from trainer.runs.artifacts import load_model
from trainer.cli import compose_tool
from trainer.cli import run_tool

def filter_logits(logits: torch.Tensor, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """Set every logit outside the kept set to -inf: (N, V) -> (N, V).

    top_k > 0 keeps exactly the k largest (ties broken by `topk`); top_p < 1 then keeps the
    smallest prefix of the remaining tokens, by decreasing probability, whose mass reaches top_p
    (the most likely token always stays).
    """
    if 0 < top_k < logits.shape[-1]:
        vals, idx = logits.topk(top_k, dim=-1)  # (N, k)
        logits = torch.full_like(logits, float("-inf")).scatter(-1, idx, vals)
    if top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)  # (N, V)
        probs = sorted_logits.softmax(dim=-1)
        before = probs.cumsum(dim=-1) - probs  # mass of the strictly more likely tokens
        drop = before >= top_p
        drop[..., 0] = False
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.empty_like(logits).scatter(-1, order, sorted_logits)
    return logits

def sample_next(logits: torch.Tensor, temperature: float, top_k: int = 0, top_p: float = 1.0,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """Next ids (N,) from last-position logits (N, V): argmax at temperature 0, else a draw from
    softmax(logits / temperature) restricted to the top-k / top-p set."""
    logits = logits.float()
    if temperature == 0:
        return logits.argmax(dim=-1)
    probs = filter_logits(logits / temperature, top_k, top_p).softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)

def max_positions(model: nn.Module) -> int | None:
    """Longest sequence the decoder can position (learned tables), or None when unlimited."""
    pos = getattr(model.decoder, "position", None)
    return getattr(pos, "max_len", None)

@torch.no_grad()
def generate(model: nn.Module, prompt: torch.Tensor, max_new_tokens: int, *, temperature: float = 0.0,
             top_k: int = 0, top_p: float = 1.0, generator: torch.Generator | None = None,
             kv_cache: bool = True, src: torch.Tensor | None = None, eos_id: int | None = EOS,
             precision: str = "fp32") -> torch.Tensor:
    """Continue `prompt` (B, T) by up to `max_new_tokens`; returns the new ids (B, N).

    Decoder: `prompt` is the context. Encoder-decoder: `src` (B, S) is encoded once and `prompt`
    starts the decoder (its start token). Generation stops when every row has emitted `eos_id`
    (later positions of a finished row repeat it) or at a learned position table's end.
    """
    model.eval()
    device = next(model.parameters()).device
    seq, src = prompt.to(device), None if src is None else src.to(device)
    limit = max_positions(model)
    if limit is not None and seq.shape[1] > limit:
        raise ConfigError(f"the prompt is {seq.shape[1]} tokens but position=learned has only {limit} positions.")
    done = torch.zeros(seq.shape[0], dtype=torch.bool, device=device)
    cache = model.new_cache() if kv_cache else None
    memory = None
    new: list[torch.Tensor] = []
    with autocast(precision, device):
        if cache is not None and src is not None:
            memory = model.encode(src)  # projected into each layer's cross-attention cache once
        for step in range(max_new_tokens):
            if limit is not None and seq.shape[1] > limit:
                break  # the next forward would need position `limit`, beyond the table
            if cache is None:
                logits = model(seq) if src is None else model(src, target=seq)  # (B, T, V)
            else:
                logits = model.decode(seq if step == 0 else seq[:, -1:], cache, memory=memory)
            nxt = sample_next(logits[:, -1], temperature, top_k, top_p, generator)  # (B,)
            if eos_id is not None:
                nxt = nxt.masked_fill(done, eos_id)
                done |= nxt == eos_id
            new.append(nxt)
            seq = torch.cat([seq, nxt[:, None]], dim=1)
            if eos_id is not None and bool(done.all()):
                break
    return torch.stack(new, dim=1) if new else seq.new_zeros(seq.shape[0], 0)

TOOL = "generate"  # conf/tools/generate.yaml: every key, its default and its help line

def _check(a) -> None:
    if not a.run_dir:
        raise ConfigError("run_dir=... is required: the directory of a finished training run.")
    for key, ok, valid in (("max_new_tokens", a.max_new_tokens >= 0, ">= 0"),
                           ("temperature", a.temperature >= 0, ">= 0 (0 is greedy)"),
                           ("top_k", a.top_k >= 0, ">= 0 (0 keeps every token)"),
                           ("top_p", 0 < a.top_p <= 1, "in (0, 1] (1 keeps every token)"),
                           ("num_samples", a.num_samples >= 1, ">= 1"),
                           ("precision", a.precision in (None, "fp32", "bf16", "fp16"), "fp32, bf16 or fp16")):
        if not ok:
            raise ConfigError(f"{key}={a[key]} is not valid; it must be {valid}.")
    if a.prompt is not None and a.prompt_file is not None:
        raise ConfigError("give prompt=... or prompt_file=..., not both.")
    if a.prompt_file is not None and not os.path.isfile(a.prompt_file):
        raise ConfigError(f"prompt_file={a.prompt_file}: no such file.")

def _prepare(a):
    """Load the run (and quantize it) and encode the prompt; returns what `main` samples with."""

    _check(a)
    device = resolve_device(a.device)
    model, tok, cfg = load_model(a.run_dir, device)
    if cfg.model.arch == "encoder":
        raise ConfigError(f"run_dir={a.run_dir} is an encoder (model=encoder), which has no decoder to "
                          f"generate with; use python -m trainer.evaluate for it, or a decoder/encoder_decoder run.")
    model = apply_quantization(model, cfg, a.quantize, device)
    text = a.prompt or ""
    if a.prompt_file is not None:
        with open(a.prompt_file, "rb") as f:
            text = f.read()
    src = None
    if cfg.model.arch == "encoder_decoder":  # the prompt is the source; decoding starts from BOS
        src = torch.tensor([tok.encode(text, eos=True)])
        if cfg.position.kind == "learned" and src.shape[1] > cfg.data.seq_len:
            raise ConfigError(f"the prompt is {src.shape[1]} tokens but position=learned has only "
                              f"{cfg.data.seq_len} positions; shorten it.")
        prompt = torch.tensor([[tok.bos_id]])
    else:
        prompt = torch.tensor([tok.encode(text, bos=True)])
    limit = max_positions(model)
    if limit is not None and prompt.shape[1] > limit:
        raise ConfigError(f"the prompt is {prompt.shape[1]} tokens (with BOS) but position=learned has only "
                          f"{limit} positions; shorten it.")
    if limit is not None and prompt.shape[1] + a.max_new_tokens > limit + 1:
        print(f"note: position=learned stops at {limit} positions, so at most {limit + 1 - prompt.shape[1]} "
              f"new tokens are generated.", file=sys.stderr)
    return model, tok, cfg, device, prompt, src

def run_generate(argv: list[str]) -> None:
    """Compose `conf/tools/generate.yaml` with `argv`, load the run and print the samples on stdout
    (tokens/s on stderr). Raises ConfigError on bad input, before any sample is printed."""
    from tqdm import tqdm

    a, _ = compose_tool(TOOL, argv)
    try:
        model, tok, cfg, device, prompt, src = _prepare(a)
    except ConfigError:
        raise
    except ValueError as e:  # e.g. a tokenizer refusing the prompt: bad input too
        raise ConfigError(str(e)) from e
    precision = a.precision or cfg.precision.dtype
    gen = torch.Generator(device=device).manual_seed(a.seed)
    text_prompt = tok.decode(prompt[0].tolist()) if src is None else ""
    n_tokens, t0 = 0, time.perf_counter()
    bar = tqdm(range(a.num_samples), desc="samples", file=sys.stderr, disable=a.num_samples == 1 or not a.progress)
    for i in bar:
        out = generate(model, prompt, a.max_new_tokens, temperature=a.temperature, top_k=a.top_k, top_p=a.top_p,
                       generator=gen, kv_cache=a.kv_cache, src=src, precision=precision, eos_id=tok.eos_id)
        ids = out[0].tolist()
        if tok.eos_id in ids:
            ids = ids[: ids.index(tok.eos_id)]
        n_tokens += len(ids)
        if a.num_samples > 1:
            bar.write(f"--- sample {i + 1} ---", file=sys.stdout)
        sys.stdout.write(text_prompt + tok.decode(ids, skip_special=src is None) + "\n")
        sys.stdout.flush()
    dt = time.perf_counter() - t0
    print(f"{n_tokens} tokens in {dt:.2f} s ({n_tokens / max(dt, 1e-9):.1f} tokens/s, kv_cache="
          f"{str(a.kv_cache).lower()}, {precision})", file=sys.stderr)

def main(argv: list[str]) -> int:
    """The CLI; returns the exit status (0; 2 on bad input, with one `error:` sentence on stderr;
    `--help` prints every key)."""

    return run_tool(TOOL, run_generate, argv)

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
