"""The one place Cello's version is read from: the installed package's metadata (pyproject.toml).

Stdlib only and cheap to import: `cello --version` and the API client commands must not load aiohttp.
"""

from __future__ import annotations

import tomllib
from importlib import metadata
from pathlib import Path


def _version() -> str:
    try:
        return metadata.version("cello")
    except metadata.PackageNotFoundError:  # run from a checkout that was never installed
        pyproject = Path(__file__).resolve().parents[1] / "pyproject.toml"
        with open(pyproject, "rb") as f:
            return str(tomllib.load(f)["project"]["version"])


VERSION = _version()
