"""What a test needs from the host. Missing means a broken set-up, so the test fails and names the
fix; it never skips (`scripts/setup.sh`, run by `make test`, installs all of these)."""

from __future__ import annotations

import os
import shutil

import pytest


def require(*tools: str, root: bool = False, packages: str = "") -> None:
    if root and os.geteuid() != 0:
        pytest.fail("this test needs root (CI runs as root)", pytrace=False)
    missing = [t for t in tools if shutil.which(t) is None and shutil.which(t, path="/usr/sbin:/sbin") is None]
    if missing:
        fix = f"apt-get install {packages or ' '.join(missing)}"
        pytest.fail(f"{', '.join(missing)} not installed: run scripts/setup.sh ({fix})", pytrace=False)
