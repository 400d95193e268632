"""`python -m trainer.export run_dir=<run> output=<dir>`: a run as a Hugging Face folder.

`transformers.AutoModel` (`AutoModelForCausalLM` for a decoder) and, for an encoder,
`sentence_transformers.SentenceTransformer` load the folder with no code of this trainer and give
the run's hidden states, logits and embeddings (`trainer.pretrained.export`). A run whose
architecture has no Hugging Face counterpart is refused in one sentence naming the feature.
Every key, its default and its help: `conf/tools/export.yaml`, or `python -m trainer.export --help`.
"""
from __future__ import annotations

import os
import sys

from trainer.errors import ConfigError
from trainer.cli import compose_tool
from trainer.pretrained.export import check_output, export_model
from trainer.runs.artifacts import load_model
from trainer.cli import run_tool

TOOL = "export"  # conf/tools/export.yaml: every key, its default and its help line

def run_export(argv: list[str]) -> dict:
    """Compose `conf/tools/export.yaml` with `argv`, load the run and write the folder; returns
    what the folder's export.json records.

    Raises:
        ConfigError: a missing key, an output that is a non-empty folder other than a previous
            export, a run that cannot be loaded, or a feature with no Hugging Face counterpart;
            nothing is written then.
    """

    a, _ = compose_tool(TOOL, argv)
    if not a.run_dir or not a.output:
        raise ConfigError("run_dir=... and output=... are both required: python -m trainer.export "
                          "run_dir=<run dir> output=<dir>.")
    run_dir = os.path.abspath(os.path.expanduser(a.run_dir))
    output = os.path.abspath(os.path.expanduser(a.output))
    if output == run_dir:
        raise ConfigError(f"output={a.output} is the run_dir itself; a run or model folder is never written into.")
    check_output(output)  # before the (slow) load
    model, tokenizer, cfg = load_model(run_dir, "cpu")
    info = export_model(model, tokenizer, cfg, output, source=run_dir)
    loader = "AutoModel / SentenceTransformer" if cfg.model.arch == "encoder" else "AutoModelForCausalLM"
    print(f"{run_dir} -> {output}: {info['family']} ({info['parameters']:,} parameters, vocabulary "
          f"{info['vocab_size']}); load it with transformers' {loader}.")
    return info

def main(argv: list[str]) -> int:
    """The command line; returns the exit status (2 on bad input, with one `error:` sentence;
    `--help` prints every key)."""

    return run_tool(TOOL, run_export, argv)

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
