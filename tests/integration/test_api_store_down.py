"""The API while a PostgreSQL store is down: 503 with the reason (the appliance itself runs on, its nodes
keep their exported roots), and back to normal once the database is, without a restart."""

from __future__ import annotations

from pathlib import Path

from tests.integration.test_api_stack import open_stack
from tests.pgserver import PgServer


async def test_the_api_answers_503_while_the_store_is_down_and_recovers(tmp_path: Path) -> None:
    pg = PgServer.start()  # its own cluster, not the session's: this test takes it down
    try:
        url = pg.create_database("cello")
        sections = {"store": f'url = "{url}"', "fleet": 'name = "a"'}
        async with open_stack(tmp_path, exports="memory", sections=sections) as s:
            await s.add_user("alice")
            status, body = await s.req("GET", "/api/v1/servers")
            assert status == 200, body
            pg.halt()
            for who in ("admin", "alice"):
                async with s.client.get("/api/v1/servers", headers=s.auth(who)) as resp:
                    body = await resp.json()
                    assert resp.status == 503, body
                    assert body["error"] == "store_unavailable" and "store unreachable" in body["detail"]
                    assert resp.headers["Retry-After"] == "5"
            pg.resume()
            status, body = await s.req("GET", "/api/v1/servers", "alice")
            assert (status, body) == (200, []), body
    finally:
        pg.stop()
