"""schemathesis against the served OpenAPI document: no 5xx for any generated input.

The real stack (SQLite, file backend, tgtd on this area's control port 62) runs in its own event
loop on a thread, behind aiohttp's test server on a loopback port; schemathesis's pytest API
generates positive and negative cases for every operation (bounded: a dozen cases each).
"""

from __future__ import annotations

import asyncio
import threading
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from schemathesis.checks import not_a_server_error

from domain.services import SERVICES
from tests.integration.test_api_stack import PORTALS, TGT_CONTROL_PORTS, needs_tgt, open_stack, uuid_n
from web.app import routes
from web.openapi import document

pytestmark = needs_tgt

CONFIG = schemathesis.Config.from_dict({"generation": {"mode": "all", "max-examples": 12, "deterministic": True}})
schema = schemathesis.openapi.from_dict(document(routes(), "test"), config=CONFIG).exclude(
    operation_id="events")  # a followed stream never ends by design; tested in test_api_boot


class LiveStack:
    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.ready = threading.Event()
        self.loop = asyncio.new_event_loop()
        self.base_url = ""
        self.token = ""
        self.error: BaseException | None = None
        self._stop: asyncio.Event | None = None
        self.thread = threading.Thread(target=self._run, name="schemathesis-stack", daemon=True)

    def _run(self) -> None:
        try:
            self.loop.run_until_complete(self._main())
        except BaseException as e:  # reported to the test thread
            self.error = e
            self.ready.set()

    async def _main(self) -> None:
        self._stop = asyncio.Event()
        async with open_stack(self.tmp, control_port=TGT_CONTROL_PORTS[2], portal=PORTALS[2]) as s:
            await s.add_user("alice")
            await s.create(uuid_n(1), data_volumes=[{"size_gb": 1}])
            await s.wait_state(uuid_n(1))
            self.base_url = f"http://127.0.0.1:{s.client.port}"
            self.token = s.admin_token
            self.ready.set()
            await self._stop.wait()

    def start(self) -> None:
        self.thread.start()
        assert self.ready.wait(60), "the stack did not come up"
        if self.error is not None:
            raise self.error

    def stop(self) -> None:
        if self._stop is not None:
            self.loop.call_soon_threadsafe(self._stop.set)
        self.thread.join(30)


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveStack]:
    stack = LiveStack(tmp_path_factory.mktemp("schemathesis"))
    stack.start()
    try:
        yield stack
    finally:
        stack.stop()


def _services_on(live: LiveStack) -> None:
    """Every service enabled again: a generated PUT /api/v1/services/http-boot {"enabled": false} would
    make every later /boot case a 503 by design, whatever order the cases run in."""
    for name in SERVICES:
        req = urllib.request.Request(f"{live.base_url}/api/v1/services/{name}", data=b'{"enabled": true}',
                                     method="PUT", headers={"Authorization": f"Bearer {live.token}",
                                                            "Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=10) as resp:
            assert resp.status == 200


@schema.parametrize()
def test_no_server_errors(case: Any, live: LiveStack) -> None:
    _services_on(live)
    case.call_and_validate(base_url=live.base_url, headers={"Authorization": f"Bearer {live.token}"},
                           checks=[not_a_server_error], timeout=10)
