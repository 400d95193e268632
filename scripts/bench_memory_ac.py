"""Activation memory with and without activation checkpointing (trainer.activation_checkpointing).

One forward + backward of the composed model (random byte blocks) per mode, each in a fresh model
built the same way; reported per mode:
- saved for backward: the bytes of every tensor autograd keeps from the forward for the backward
  (counted with `torch.autograd.graph.saved_tensors_hooks`, so it is what AC removes; storage shared
  by several saved tensors is counted once), measured on any device;
- peak (CUDA only): `torch.cuda.max_memory_allocated` above the bytes held before the forward.

    python scripts/bench_memory_ac.py                                   # T=1024, 4 layers, d_model 256
    python scripts/bench_memory_ac.py --overrides data.seq_len=1024 model.num_layers=12 trainer.device=cuda
"""
from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from hydra import compose, initialize_config_dir  # noqa: E402

from models.build import build_model  # noqa: E402
from trainer.config.schema import CONF_DIR, register_configs  # noqa: E402
from trainer.data import VOCAB_SIZE  # noqa: E402
from trainer.transforms.checkpointing import AC_MODES, apply_activation_checkpointing  # noqa: E402

DEFAULTS = ["data.seq_len=1024", "trainer.batch_size=2", "model.d_model=256", "model.num_layers=4",
            "model.num_heads=4", "model.d_ff=1024", "trainer.device=cpu"]


def measure(cfg, mode: str, every: int, device: torch.device) -> dict:
    """Bytes saved for backward (and the CUDA peak) of one training forward + backward under `mode`."""
    torch.manual_seed(0)
    model = build_model(cfg.model, cfg.attention, cfg.position, cfg.norm, vocab_size=VOCAB_SIZE,
                        max_len=cfg.data.seq_len).to(device).train()
    model = apply_activation_checkpointing(model, mode, every)
    tokens = torch.randint(0, 256, (cfg.trainer.batch_size, cfg.data.seq_len + 1),
                           generator=torch.Generator().manual_seed(1)).to(device)
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor):
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        start = torch.cuda.memory_allocated()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        logits = model(tokens[:, :-1])
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1))
    loss.backward()
    out = {"mode": mode, "saved_mb": sum(seen.values()) / 2 ** 20, "loss": loss.item()}
    if device.type == "cuda":
        torch.cuda.synchronize()
        out["peak_mb"] = (torch.cuda.max_memory_allocated() - start) / 2 ** 20
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--overrides", nargs="*", default=[], help="config overrides after the defaults")
    p.add_argument("--every", type=int, default=2, help="trainer.ac_every for selective")
    a = p.parse_args()
    register_configs()
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose(config_name="config", overrides=[*DEFAULTS, *a.overrides])
    device = torch.device("cuda" if cfg.trainer.device == "cuda" else "cpu")
    print(f"T={cfg.data.seq_len} B={cfg.trainer.batch_size} layers={cfg.model.num_layers} "
          f"d_model={cfg.model.d_model} device={device}")
    base = None
    for mode in AC_MODES:
        r = measure(cfg, mode, a.every, device)
        base = base or r["saved_mb"]
        peak = f"  peak {r['peak_mb']:.1f} MB" if "peak_mb" in r else ""
        print(f"{mode:<10} saved for backward {r['saved_mb']:8.1f} MB ({r['saved_mb'] / base:.2f}x)"
              f"{peak}  loss {r['loss']:.6f}")


if __name__ == "__main__":
    main()
