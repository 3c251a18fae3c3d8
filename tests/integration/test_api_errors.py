"""Bad input never gets a 5xx: malformed JSON, wrong content types, huge bodies, unknown routes and methods;
and the authorization matrix: a user cannot list, read, change or delete another user's objects."""

from __future__ import annotations

import pytest

from tests.integration.test_api_stack import Stack, api_stack_in_memory, uuid_n

# The in-process tier: input errors and authorization are the app's and the domain's, not tgtd's.
__all__ = ["api_stack_in_memory"]


async def raw(s: Stack, method: str, path: str, data: bytes | str | None = None, ctype: str | None = None,
              who: str | None = "admin") -> tuple[int, dict[str, object]]:
    headers = s.auth(who) if who else {}
    if ctype:
        headers["Content-Type"] = ctype
    async with s.client.request(method, path, data=data, headers=headers) as resp:
        assert resp.content_type == "application/json", await resp.text()
        body = await resp.json()
        assert set(body) == {"error", "detail"}, body
        return resp.status, body


@pytest.mark.parametrize("payload", [b"{", b"[1, 2", b"\xff\xfe", b"NaN", b'{"uuid": NaN}', b"[" * 100000,
                                     b'{"a": 1' + b"9" * 5000 + b"}", b""])
async def test_malformed_json_is_400(api_stack_in_memory: Stack, payload: bytes) -> None:
    status, body = await raw(api_stack_in_memory, "POST", "/api/v1/servers", payload, "application/json")
    assert status == 400 and body["error"] == "bad_request"


@pytest.mark.parametrize("payload", [b"[]", b"1", b'"x"', b"null"])
async def test_json_that_is_not_an_object_is_422(api_stack_in_memory: Stack, payload: bytes) -> None:
    status, _body = await raw(api_stack_in_memory, "POST", "/api/v1/servers", payload, "application/json")
    assert status == 422


@pytest.mark.parametrize("ctype", ["text/plain", "application/x-www-form-urlencoded", "multipart/form-data"])
async def test_wrong_content_type_is_415(api_stack_in_memory: Stack, ctype: str) -> None:
    status, body = await raw(api_stack_in_memory, "POST", "/api/v1/users", b'{"name": "x"}', ctype)
    assert status == 415 and body["error"] == "unsupported_media_type"


async def test_huge_body_is_413(api_stack_in_memory: Stack) -> None:
    big = b'{"name": "' + b"x" * (2 << 20) + b'"}'
    status, body = await raw(api_stack_in_memory, "POST", "/api/v1/users", big, "application/json")
    assert status == 413 and body["error"] == "too_large"


@pytest.mark.parametrize("body", [
    {"uuid": "nope", "template": "tiny", "user": "alice"},
    {"uuid": uuid_n(9), "template": "tiny", "user": "alice", "data_volumes": [{"size_gb": 0}]},
    {"uuid": uuid_n(9), "template": "tiny", "user": "alice", "data_volumes": [{"size_gb": True}]},
    {"uuid": uuid_n(9), "template": "tiny", "user": "alice", "macs": ["zz:zz"]},
    {"uuid": uuid_n(9), "template": "tiny", "user": "alice", "profile": "nope"},
    {"uuid": uuid_n(9), "template": "tiny", "user": "alice", "colour": "red"},
    {"uuid": uuid_n(9), "template": "tiny", "user": "nobody"},
    {"uuid": uuid_n(9), "template": "tiny"},  # an admin must name the user
    {"uuid": uuid_n(9), "template": "tiny", "user": 7},
    {"uuid": "00000000-0000-0000-0000-000000000000", "template": "tiny", "user": "alice"},
])
async def test_invalid_server_fields_are_422(api_stack_in_memory: Stack, body: dict[str, object]) -> None:
    status, answer = await api_stack_in_memory.req("POST", "/api/v1/servers", json=body)
    assert status == 422 and answer["error"] == "invalid", answer


async def test_tokens_401_and_admin_routes_403(api_stack_in_memory: Stack) -> None:
    s = api_stack_in_memory
    for headers in ({}, {"Authorization": "Bearer nope"}, {"Authorization": "Basic eDp5"},
                    {"Authorization": "Bearer " + "a" * 5000}, {"Authorization": "Bearer"}):
        async with s.client.get("/api/v1/servers", headers=headers) as resp:
            assert resp.status == 401 and (await resp.json())["error"] == "unauthorized"
            assert resp.headers["WWW-Authenticate"].startswith("Bearer")
    for method, path in (("GET", "/api/v1/users"), ("POST", "/api/v1/users/alice/tokens"),
                         ("GET", "/api/v1/pools"), ("POST", "/api/v1/reconcile"),
                         ("DELETE", "/api/v1/users/bob"), ("PUT", "/api/v1/users/alice/quota")):
        status, body = await raw(s, method, path, b"{}", "application/json", who="alice")
        assert status == 403 and body["error"] == "forbidden", (method, path)
    # tokens are stored hashed
    rows = s.store.sync._all("SELECT hash FROM tokens")
    assert s.tokens["alice"] not in {r[0] for r in rows} and len(rows) == 3


async def test_unknown_route_and_method(api_stack_in_memory: Stack) -> None:
    status, body = await raw(api_stack_in_memory, "GET", "/api/v1/nothing-here")
    assert status == 404 and body["error"] == "not_found"
    status, body = await raw(api_stack_in_memory, "PATCH", "/api/v1/servers")
    assert status == 405 and body["error"] == "method_not_allowed"


async def test_authorization_matrix(api_stack_in_memory: Stack) -> None:
    """alice's server is invisible and untouchable for bob; bob cannot create for alice."""
    s = api_stack_in_memory
    uuid = uuid_n(10)
    status, _ = await s.create(uuid, who="alice")
    assert status == 202
    server = await s.wait_state(uuid)
    assert server["user"] == "alice"
    status, body = await s.create(uuid_n(11), who="bob", user="alice")
    assert status == 403
    status, body = await s.create(uuid_n(11), who="bob", user="bob")
    assert status == 202 and body["user"] == "bob"
    await s.wait_state(uuid_n(11))
    vol = server["volumes"][0]["name"]
    for method, path, kw in (
        ("GET", f"/api/v1/servers/{uuid}", {}),
        ("GET", f"/api/v1/servers/{uuid.upper()}", {}),
        ("DELETE", f"/api/v1/servers/{uuid}", {}),
        ("GET", f"/api/v1/servers/{uuid}/volumes", {}),
        ("GET", f"/api/v1/servers/{uuid}/events", {}),
        ("POST", f"/api/v1/servers/{uuid}/volumes", {"json": {"size_gb": 1}}),
        ("DELETE", f"/api/v1/servers/{uuid}/volumes/{vol}", {}),
        ("GET", "/api/v1/users/alice", {}),
    ):
        status, body = await s.req(method, path, "bob", **kw)
        assert status == 404, (method, path, status, body)
    status, listed = await s.req("GET", "/api/v1/servers?user=alice", "bob")
    assert [x["uuid"] for x in listed] == [uuid_n(11)]  # the filter is for admins; bob sees his own
    status, vols = await s.req("GET", "/api/v1/volumes?user=alice", "bob")
    assert {v["server"] for v in vols} == {uuid_n(11)}
    status, listed = await s.req("GET", "/api/v1/servers?user=alice")
    assert [x["uuid"] for x in listed] == [uuid]
    # nothing of alice's changed
    again = await s.wait_state(uuid)
    assert again["state"] == "available" and len(again["volumes"]) == 1
    # bob's event stream carries nothing of alice's server
    async with s.client.get("/api/v1/events?since=0&follow=false", headers=s.auth("bob")) as resp:
        text = await resp.text()
    assert uuid_n(11) in text and uuid not in text
    async with s.client.get("/api/v1/events?since=0&follow=false", headers=s.auth("alice")) as resp:
        text = await resp.text()
    assert uuid in text and uuid_n(11) not in text
    await s.assert_clean()
