"""The one tool mechanism behind `python -m trainer.<tool> key=value ...` (embed, evaluate, generate,
quantize, ...): compose the tool's config, print its help, pick the device, quantize a loaded model,
and turn bad input into one `error:` sentence with exit status 2.

A tool is a YAML file and a function. `conf/tools/<tool>.yaml` holds every key with its default
and a `# comment` that describes it (the help text); its header comments give the description,
`usage:` and `example:` lines; a defaults-list entry `- /<group>: null` lets the tool take a
training config group (`data=<option>` and `data.<key>=<value>`, composed by Hydra's compose API
the way the training CLI composes it). The function takes the argument list, calls
`compose_tool(tool, argv)` and does its work; `main` is `run_tool(tool, function, argv)`.
"""
from __future__ import annotations

import dataclasses
import difflib
import os
import re
import sys
import textwrap
from dataclasses import dataclass, field
from typing import Any, Callable

import yaml
from omegaconf import DictConfig, OmegaConf

from trainer.config.schema import CONF_DIR, Config
from trainer.errors import EXIT_BAD_INPUT, ConfigError
from trainer.quantize import PTQ_METHODS, apply_ptq, load_quantized

TOOLS_DIR = os.path.join(CONF_DIR, "tools")
TYPES = {"int": int, "float": float, "bool": bool, "str": str}
_KEY = re.compile(r"^(?P<indent> *)(?P<key>[A-Za-z_]\w*):(?P<value>[^#]*?)\s*(?:#\s?(?P<doc>.*))?$")
_GROUP = re.compile(r"^\s*-\s*/(?P<group>\w+):\s*null\s*(?:#\s?(?P<doc>.*))?$")
_TAG = re.compile(r"^\[(?P<type>int|float|bool|str)\]\s*")

@dataclass(frozen=True)
class Key:
    """One `key=value` of a tool: its dotted name, YAML default, value type and help line."""

    name: str
    default: Any
    kind: type
    doc: str

@dataclass
class ToolSpec:
    """A tool as its YAML describes it: keys, training config groups it takes, and help text."""

    name: str
    description: str = ""
    usage: str = ""
    examples: list[str] = field(default_factory=list)
    keys: dict[str, Key] = field(default_factory=dict)
    groups: dict[str, str] = field(default_factory=dict)  # group -> help line

    @property
    def command(self) -> str:
        return f"python -m trainer.{self.name}"

def load_spec(tool: str) -> ToolSpec:
    """Read `conf/tools/<tool>.yaml` into a ToolSpec (keys in file order).

    A key's type is `[int]`/`[float]`/`[bool]`/`[str]` at the start of its comment, else the
    type of its default (a null default is text).
    """
    spec, stack, header = ToolSpec(tool), [], True
    with open(os.path.join(TOOLS_DIR, f"{tool}.yaml")) as f:
        lines = f.read().splitlines()
    for line in lines:
        text = line.strip()
        if header and text.startswith("#"):
            body = text.lstrip("#").strip()
            if body.startswith("@package"):
                continue
            if body.startswith("usage:"):
                spec.usage = body.removeprefix("usage:").strip()
            elif body.startswith("example:"):
                spec.examples.append(body.removeprefix("example:").strip())
            elif body:
                spec.description = f"{spec.description} {body}".strip()
            continue
        header = header and not text
        group = _GROUP.match(line)
        if group:
            spec.groups[group["group"]] = group["doc"] or ""
            continue
        m = _KEY.match(line)
        if not m or m["key"] == "defaults":
            continue
        depth = len(m["indent"]) // 2
        stack[depth:] = [m["key"]]
        if not m["value"].strip():  # a section: its keys follow, indented
            continue
        doc, kind = m["doc"] or "", None
        tag = _TAG.match(doc)
        if tag:
            kind, doc = TYPES[tag["type"]], doc[tag.end():]
        default = yaml.safe_load(m["value"])
        name = ".".join(stack)
        spec.keys[name] = Key(name, default, kind or (type(default) if default is not None else str), doc)
    return spec

def _group_schema(group: str) -> list[str]:
    """The keys of a training config group (`data` -> DataConfig's fields)."""
    node = Config.__dataclass_fields__[group]
    kind = node.default_factory() if node.default_factory is not dataclasses.MISSING else node.default
    return [f.name for f in dataclasses.fields(kind)]

def _parse(key: str, text: str, kind: type, default: Any) -> Any:
    """`text` as `kind`, taken literally (a prompt or a path may hold any character)."""
    if default is None and text in ("null", "None") and kind is not str:
        return None
    if kind is bool:
        if text.lower() in ("true", "1", "yes", "on"):
            return True
        if text.lower() in ("false", "0", "no", "off"):
            return False
        raise ConfigError(f"{key}={text} is not a boolean; use {key}=true or {key}=false.")
    if kind is str:
        return text
    try:
        return kind(text)
    except ValueError:
        raise ConfigError(f"{key}={text} is not {'an integer' if kind is int else 'a number'}.") from None

def did_you_mean(key: str, valid: list[str]) -> str:
    """" (did you mean <nearest>?)" for a misspelt `key`, or "" when nothing valid is close."""
    close = difflib.get_close_matches(key, valid, n=1, cutoff=0.6)
    if not close and "." in key:  # a misspelt last part: match it within its section
        head, _, tail = key.rpartition(".")
        same = [v.rpartition(".")[2] for v in valid if v.startswith(head + ".")]
        close = [f"{head}.{c}" for c in difflib.get_close_matches(tail, same, n=1, cutoff=0.6)]
    return f" (did you mean {close[0]}?)" if close else ""

def _unknown(spec: ToolSpec, key: str, arg: str) -> ConfigError:
    valid = list(spec.keys) + list(spec.groups) + [f"{g}.{k}" for g in spec.groups for k in _group_schema(g)]
    hint = did_you_mean(key, valid)
    return ConfigError(f"{arg} is not understood: {key} is not a key of {spec.command}{hint}; "
                       f"{spec.command} --help lists every key.")

def compose_tool(tool: str, argv: list[str]) -> tuple[DictConfig, frozenset[str]]:
    """The tool's config, composed from `conf/tools/<tool>.yaml` with `argv` (`key=value` strings).

    The tool's own keys are taken literally (`prompt=def main(` is that text) and typed by the
    YAML; a group the tool takes is chosen with `<group>=<option>` and changed with
    `<group>.<key>=<value>` in Hydra's override grammar (`'data.files=[a.txt,b.txt]'`).
    Returns (config, the keys and groups the command line set).

    Raises:
        ConfigError: an argument that is not key=value, an unknown key (with the nearest valid
            one), a badly typed value, or an unknown group option (with the options).
    """
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.errors import HydraException

    spec = load_spec(tool)
    values: dict[str, Any] = {}
    overrides: list[str] = []
    for arg in argv:
        key, sep, text = arg.partition("=")
        key = key.lstrip("+")
        if not sep or not key:
            raise ConfigError(f"argument {arg!r} is not key=value; {spec.command} takes "
                              f"{', '.join(k + '=' for k in spec.keys)} (see {spec.command} --help).")
        group = key.split(".")[0]
        if key in spec.keys:
            values[key] = _parse(key, text, spec.keys[key].kind, spec.keys[key].default)
        elif key in spec.groups:
            overrides.append(f"{key}={text}")
        elif group in spec.groups and key.partition(".")[2] in _group_schema(group):
            overrides.append(f"++{key}={text}")  # adds the key when no option was chosen
        else:
            raise _unknown(spec, key, arg)
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        try:
            cfg = compose(config_name=f"tools/{tool}", overrides=overrides)
        except HydraException as e:
            for o in overrides:
                group, _, option = o.partition("=")
                options = GlobalHydra.instance().config_loader().get_group_options(group)
                if group in spec.groups and option not in options:
                    hint = did_you_mean(option, options)
                    raise ConfigError(f"{group}={option} is not a {group} option{hint}; choose one of: "
                                      f"{', '.join(options)}.") from None
            raise ConfigError(f"bad override in {' '.join(overrides)}: {str(e).splitlines()[0]}") from None
    OmegaConf.set_struct(cfg, False)
    for key, value in values.items():
        OmegaConf.update(cfg, key, value, merge=False)
    given = frozenset(k.lstrip("+").split("=")[0] for k in overrides) | frozenset(values)
    return cfg, given

def help_text(tool: str) -> str:
    """The tool's usage, every key with its default and description, and an example command."""
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    spec = load_spec(tool)
    rows = [(f"{k.name}={'null' if k.default is None else str(k.default).lower() if k.kind is bool else k.default}",
             k.doc) for k in spec.keys.values()]
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        loader = GlobalHydra.instance().config_loader()
        for group, doc in spec.groups.items():
            options = "|".join(loader.get_group_options(group))
            rows.append((f"{group}=<{options}>", doc))
            rows.append((f"{group}.<key>=<value>", f"any {group} key: {', '.join(_group_schema(group))}"))
    width = min(max(len(r[0]) for r in rows) + 2, 34)
    lines = [f"usage: {spec.usage or spec.command + ' key=value ...'}", "", textwrap.fill(spec.description, 100), "",
             "keys (key=default):"]
    for name, doc in rows:
        pad = " " * (width - len(name)) if len(name) < width else "\n" + " " * (width + 2)
        doc = textwrap.fill(doc, 100, initial_indent=" " * (width + 2), subsequent_indent=" " * (width + 2)).lstrip()
        lines.append(f"  {name}{pad}{doc}")
    lines += ["", "example:" if len(spec.examples) == 1 else "examples:", *(f"  {e}" for e in spec.examples)]
    return "\n".join(lines)

def apply_quantization(model, cfg: DictConfig, method: str, device, saved: str | None = None):
    """`model` (the run's float model, config `cfg`) quantized with torchao's post-training `method`
    (`trainer.quantize.apply_ptq`, on the CPU, then moved to `device`), or the report's `saved`
    model_<method>.pt when that file exists. `method="none"` returns `model` unchanged.

    Raises:
        ConfigError: the method cannot be applied to this model or here (the reason in one sentence).
    """
    if method == "none":
        return model

    if method not in PTQ_METHODS:
        raise ConfigError(f"quantize={method} is not valid here; choose one of: none, {', '.join(PTQ_METHODS)}.")
    try:
        if saved is not None and os.path.isfile(saved):
            return load_quantized(saved, cfg, method).to(device).eval()
        return apply_ptq(model.cpu(), method, cfg.quantize.group_size,
                         embeddings=cfg.quantize.get("embeddings")).to(device).eval()
    except ConfigError:
        raise
    except Exception as e:  # noqa: BLE001 - any failure is one sentence
        raise ConfigError(f"quantize={method} could not be applied to this model: "
                          f"{str(e).splitlines()[0].rstrip('.')}.") from e

def run_tool(tool: str, fn: Callable[[list[str]], Any], argv: list[str]) -> int:
    """Run `fn(argv)` as the command line of `tool`; returns the exit status.

    `-h`/`--help` anywhere prints the tool's help (exit 0); bad input (ConfigError) is one
    `error:` sentence on stderr and exit 2, before anything is written.
    """
    if any(a in ("-h", "--help") for a in argv):
        print(help_text(tool))
        return 0
    try:
        fn(argv)
    except ConfigError as e:
        print(f"error: {str(e).rstrip('.')}.", file=sys.stderr)
        return EXIT_BAD_INPUT
    return 0
