from __future__ import annotations

import pytest

from tests.tools import require


@pytest.fixture
def tgt_installed() -> None:
    require("tgtd", "tgtadm", packages="tgt")
