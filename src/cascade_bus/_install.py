"""The ``pip install`` command to print in a hint, for how cascade-bus itself was installed.

The adapters are not on a package index yet: from a source checkout (an editable install, as
``./scripts/demo`` and ``./scripts/test`` make) the command that works is ``pip install -e
adapters/mqtt``, and a venv that is not activated needs its own pip. Packaging metadata says
which case applies (PEP 610 ``direct_url.json``).
"""

from __future__ import annotations

import json
import os
import shlex
import sys
from functools import lru_cache
from importlib.metadata import PackageNotFoundError, distribution
from pathlib import Path
from urllib.parse import unquote, urlsplit

__all__ = ["checkout_root", "install_command"]

CORE = "cascade-bus"


@lru_cache(maxsize=1)
def checkout_root() -> Path | None:
    """The source checkout cascade-bus was installed from (``pip install -e``), else None."""
    try:
        text = distribution(CORE).read_text("direct_url.json")
    except PackageNotFoundError:
        return None
    if not text:
        return None
    try:
        info = json.loads(text)
    except ValueError:
        return None
    url = info.get("url", "") if isinstance(info, dict) else ""
    parts = urlsplit(url)
    if parts.scheme != "file" or "dir_info" not in info:
        return None
    root = Path(unquote(parts.path))
    return root if (root / "pyproject.toml").is_file() else None


def _shown(path: Path) -> str:
    """``path`` relative to the working directory when it is below it, else absolute."""
    try:
        relative = path.relative_to(Path.cwd())
    except ValueError:
        return str(path)
    return str(relative) if str(relative) != "." else "."


def _pip() -> str:
    """``pip``, or this interpreter's ``python -m pip`` when its venv is not activated."""
    in_venv = sys.prefix != sys.base_prefix
    active = os.environ.get("VIRTUAL_ENV")
    if in_venv and (active is None or Path(active).resolve() != Path(sys.prefix).resolve()):
        return f"{_shown(Path(sys.executable))} -m pip"
    return "pip"


def install_command(package: str) -> str:
    """The command that installs ``package`` (``cascade-bus-redis[cluster]``) here.

    From a checkout, a first-party package is installed editable from its directory
    (``pip install -e adapters/mqtt``); otherwise by name from the package index.
    """
    name, bracket, extra = package.partition("[")
    root = checkout_root()
    if root is not None and (name == CORE or name.startswith(f"{CORE}-")):
        source = root if name == CORE else root / "adapters" / name.removeprefix(f"{CORE}-")
        if (source / "pyproject.toml").is_file():
            return f"{_pip()} install -e {shlex.quote(_shown(source) + bracket + extra)}"
    return f"{_pip()} install {shlex.quote(package)}"
