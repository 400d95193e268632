"""`key=value` command lines for the small tools (generate, evaluate): typed, and one sentence on error."""
from __future__ import annotations

import sys
from typing import Any, Callable

from trainer.errors import ConfigError


def _parse(key: str, text: str, kind: type) -> Any:
    if kind is bool:
        if text.lower() in ("true", "1", "yes", "on"):
            return True
        if text.lower() in ("false", "0", "no", "off"):
            return False
        raise ConfigError(f"{key}={text} is not a boolean; use {key}=true or {key}=false.")
    try:
        return kind(text)
    except ValueError:
        raise ConfigError(f"{key}={text} is not {'an integer' if kind is int else 'a number'}.") from None


def parse_args(argv: list[str], spec: dict[str, tuple[type, Any]], tool: str,
               passthrough: tuple[str, ...] = ()) -> tuple[dict[str, Any], list[str]]:
    """Parse `key=value` arguments against `spec` ({key: (type, default)}).

    Keys starting with one of `passthrough` (e.g. "data") are returned as raw overrides.
    Raises ConfigError naming an unknown key, a malformed argument or a badly typed value.
    """
    values = {k: default for k, (_, default) in spec.items()}
    raw: list[str] = []
    for arg in argv:
        key, sep, text = arg.partition("=")
        if not sep or not key:
            raise ConfigError(f"argument {arg!r} is not key=value; {tool} takes "
                              f"{', '.join(k + '=' for k in spec)}.")
        if key.split(".")[0] in passthrough:
            raw.append(arg)
        elif key in spec:
            values[key] = _parse(key, text, spec[key][0])
        else:
            valid = ", ".join(list(spec) + [p + "..." for p in passthrough])
            raise ConfigError(f"{key} is not a key of {tool}; valid keys: {valid}.")
    return values, raw


def run_tool(fn: Callable[[list[str]], Any], argv: list[str]) -> int:
    """Run a tool's `fn(argv)`; bad input (ConfigError) is one `error:` sentence on stderr and exit 2."""
    try:
        fn(argv)
    except ConfigError as e:
        print(f"error: {str(e).rstrip('.')}.", file=sys.stderr)
        return 2
    return 0
