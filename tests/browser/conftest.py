"""The browser tests' fixtures: a headless Chromium (`page`), one live appliance (`live`), PostgreSQL."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.browser.chromium import Page, chromium
from tests.browser.live import LiveStack
from tests.pgserver import pg_server

__all__ = ["pg_server"]  # the session fixture, used by name (the fleet's test)


@pytest.fixture
def page(tmp_path: Path) -> Iterator[Page]:
    logs = tmp_path / "logs"
    logs.mkdir()
    print(f"browser test logs: {logs}")
    with chromium(tmp_path / "chromium-profile") as driver:
        yield Page(driver, logs)


@pytest.fixture
def live(tmp_path: Path) -> Iterator[LiveStack]:
    stack = LiveStack(tmp_path / "stack")
    stack.start()
    try:
        yield stack
    finally:
        stack.stop()
