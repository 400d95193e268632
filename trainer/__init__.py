"""A configuration-driven training CLI for transformer models."""


def load_model(run_dir, device="cpu"):
    """`(model, tokenizer, config)` of a finished run; see `trainer.load.load_model`."""
    from trainer.runs.artifacts import load_model as _load

    return _load(run_dir, device)


__all__ = ["load_model"]
