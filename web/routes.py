"""One table of routes: the app registers it and the OpenAPI document is generated from it, so the
document cannot drift from what the router serves (a test compares the two)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from web.errors import Handler

# user = any valid token; admin = an admin token; peer = another appliance of the fleet (the fleet's secret)
Access = Literal["public", "user", "admin", "peer"]
Schema = dict[str, Any]


@dataclass(frozen=True)
class Param:
    name: str
    schema: Schema
    description: str = ""
    where: Literal["query", "header"] = "query"


@dataclass(frozen=True)
class Route:
    method: str
    path: str  # aiohttp form; `{name:regex}` is documented as `{name}`
    handler: Handler
    summary: str
    access: Access
    tag: str
    body: Schema | None = None  # JSON request body schema
    params: tuple[Param, ...] = ()
    path_params: dict[str, Schema] = field(default_factory=dict)
    responses: dict[int, tuple[str, Schema | None]] = field(default_factory=dict)  # status -> (text, schema)
    content: str = "application/json"  # of the success responses
    name: str = ""  # operationId

    @property
    def operation_id(self) -> str:
        return self.name or self.handler.__name__
