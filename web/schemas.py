"""JSON schemas shared by the route table and the OpenAPI document (components/schemas)."""

from __future__ import annotations

from typing import Any

import naming
from domain.requests import MAX_DATA_GB, MAX_DATA_VOLUMES
from domain.states import ServerState

Schema = dict[str, Any]


def ref(name: str) -> Schema:
    return {"$ref": f"#/components/schemas/{name}"}


def array_of(name: str) -> Schema:
    return {"type": "array", "items": ref(name)}


# The API takes a UUID in either case (it stores it lowercase): the rule's pattern, both cases allowed.
UUID = {"type": "string", "pattern": naming.UUID.anchored.replace("a-f", "a-fA-F")}
NAME = {"type": "string", "pattern": naming.TEMPLATE.anchored}
SIZE_GB = {"type": "integer", "minimum": 1, "maximum": MAX_DATA_GB}

COMPONENTS: dict[str, Schema] = {
    "Error": {
        "type": "object",
        "required": ["error", "detail"],
        "properties": {"error": {"type": "string"}, "detail": {"type": "string"}},
    },
    "Volume": {
        "type": "object",
        "required": ["name", "server", "kind", "index", "size", "state"],
        "properties": {
            "name": {"type": "string"},
            "server": {"type": "string"},
            "kind": {"type": "string", "enum": ["os", "data"]},
            "index": {"type": "integer"},
            "size": {"type": "integer", "description": "bytes"},
            "size_gb": {"type": "number"},
            "state": {"type": "string"},
            "serial": {"type": "string"},
            "lun": {"type": ["integer", "null"], "description": "LUN number the export driver used"},
        },
    },
    "Target": {
        "type": "object",
        "required": ["iqn", "portal", "luns"],
        "properties": {
            "iqn": {"type": "string"},
            "portal": {"type": "string"},
            "initiator": {"type": "string"},
            "exported": {"type": "boolean"},
            "luns": {"type": "array", "items": {
                "type": "object",
                "properties": {"volume": {"type": "string"}, "index": {"type": "integer"},
                               "lun": {"type": ["integer", "null"]}},
            }},
            "chap": {"type": "string", "enum": ["on", "mutual", "off"],
                     "description": "the target's CHAP; its secrets are never shown"},
            "chap_user": {"type": "string"},
            "chap_mutual_user": {"type": "string"},
        },
    },
    "Server": {
        "type": "object",
        "required": ["uuid", "template", "state", "reason", "user", "volumes", "target"],
        "properties": {
            "uuid": {"type": "string"},
            "template": {"type": "string"},
            "version": {"type": "string"},
            "profile": {"type": "string"},
            "user": {"type": "string"},
            "state": {"type": "string", "enum": [state.value for state in ServerState]},
            "reason": {"type": "string"},
            "macs": {"type": "array", "items": {"type": "string"}},
            "hostname": {"type": "string"},
            "address": {"type": "string"},
            "created_at": {"type": "number"},
            "updated_at": {"type": "number"},
            "volumes": array_of("Volume"),
            "target": ref("Target"),
            "appliance": {"type": "string", "description": "the appliance that holds its volumes"},
            "placement": {"type": "object", "description": "a create's answer: where it went and why not elsewhere"},
        },
    },
    "CreateServer": {
        "type": "object",
        "required": ["uuid", "template"],
        "additionalProperties": False,
        "properties": {
            "uuid": UUID,
            "template": NAME,
            "profile": {"type": "string"},
            "macs": {"type": "array", "maxItems": 16,
                     "items": {"type": "string", "pattern": "^[0-9a-fA-F]{2}([:-][0-9a-fA-F]{2}){5}$"}},
            "user": {"type": "string", "description": "required for admin tokens; a user token may name only itself"},
            "data_volumes": {"type": "array", "maxItems": MAX_DATA_VOLUMES, "items": {
                "type": "object", "required": ["size_gb"], "additionalProperties": False,
                "properties": {"size_gb": SIZE_GB}}},
            "hostname": {"type": "string"},
            "address": {"type": "string"},
            "appliance": {"type": "string", "description": "pin to this appliance of the fleet"},
            "appliance_labels": {"type": "object", "additionalProperties": {"type": "string"}, "maxProperties": 16,
                                 "description": "labels the chosen appliance must carry"},
        },
    },
    "Appliance": {
        "type": "object",
        "required": ["name", "state", "api_url", "servers", "templates"],
        "properties": {
            "name": {"type": "string"}, "state": {"type": "string", "enum": ["up", "down", "disabled"]},
            "api_url": {"type": "string"}, "advertise": {"type": "string"},
            "labels": {"type": "object", "additionalProperties": {"type": "string"}},
            "capacity_bytes": {"type": "integer"}, "free_bytes": {"type": "integer"},
            "placed_bytes": {"type": "integer"}, "servers": {"type": "integer"},
            "disabled_reason": {"type": "string"}, "templates": {"type": "array", "items": {"type": "string"}},
            "copying": {"type": "array", "items": {"type": "string"}}, "version": {"type": "string"},
            "tls_fingerprint": {"type": "string", "description": "SHA-256 of its HTTPS certificate, which the "
                                "other appliances pin ('' = no HTTPS listener)"},
            "heartbeat_age_s": {"type": "number"},
        },
    },
    "AddVolume": {
        "type": "object", "required": ["size_gb"], "additionalProperties": False,
        "properties": {"size_gb": SIZE_GB},
    },
    "TemplateVersion": {
        "type": "object",
        "properties": {
            "version": {"type": "string"}, "source": {"type": "string"}, "size": {"type": "integer"},
            "kernel": {"type": "string"}, "initrd": {"type": "string"}, "created_at": {"type": "number"},
            "clones": {"type": "integer"},
        },
    },
    "Template": {
        "type": "object", "required": ["name", "versions"],
        "properties": {"name": {"type": "string"}, "versions": array_of("TemplateVersion")},
    },
    "Build": {
        "type": "object", "required": ["id", "template", "state"],
        "properties": {
            "id": {"type": "string"}, "template": {"type": "string"}, "source": {"type": "string"},
            "state": {"type": "string", "enum": ["running", "done", "failed"]},
            "progress": {"type": "array", "items": {"type": "string"}},
            "version": {"type": ["string", "null"]}, "error": {"type": ["string", "null"]},
        },
    },
    "StartBuild": {
        "type": "object", "required": ["source"], "additionalProperties": False,
        "properties": {"source": {"type": "string", "description": "tiny | debian[:SUITE] | tar:/path/rootfs.tar"}},
    },
    "User": {
        "type": "object", "required": ["name", "max_volumes", "max_data_gb"],
        "properties": {
            "name": {"type": "string"}, "max_volumes": {"type": "integer"}, "max_data_gb": {"type": "integer"},
            "used_volumes": {"type": "integer"}, "used_data_gb": {"type": "number"},
        },
    },
    "CreateUser": {
        "type": "object", "required": ["name"], "additionalProperties": False,
        "properties": {"name": NAME, "max_volumes": {"type": "integer", "minimum": 0, "maximum": 100000},
                       "max_data_gb": {"type": "integer", "minimum": 0, "maximum": 10000000}},
    },
    "Quota": {
        "type": "object", "additionalProperties": False,
        "properties": {"max_volumes": {"type": "integer", "minimum": 0, "maximum": 100000},
                       "max_data_gb": {"type": "integer", "minimum": 0, "maximum": 10000000}},
    },
    "NewToken": {
        "type": "object", "required": ["token", "user"],
        "properties": {"token": {"type": "string", "description": "shown once; only its hash is kept"},
                       "user": {"type": ["string", "null"], "description": "null for an admin token"},
                       "scope": {"type": "string", "enum": ["full", "read"]}},
    },
    "Token": {
        "type": "object", "required": ["user", "admin", "scope"],
        "properties": {"user": {"type": ["string", "null"], "description": "null for an admin token"},
                       "admin": {"type": "boolean"},
                       "scope": {"type": "string", "enum": ["full", "read"],
                                 "description": "read: GETs only, every write is 403"}},
    },
    "AuditEntry": {
        "type": "object", "required": ["id", "at", "who", "method", "path", "status", "detail"],
        "properties": {"id": {"type": "integer"}, "at": {"type": "number", "description": "Unix time"},
                       "who": {"type": "string", "description": "the token's user, admin, or - (no valid token)"},
                       "method": {"type": "string"}, "path": {"type": "string"}, "status": {"type": "integer"},
                       "detail": {"type": "string", "description": "operation, query, error code; never a body"}},
    },
    "CreateToken": {
        "type": "object", "additionalProperties": False,
        "properties": {"scope": {"type": "string", "enum": ["read", "full"],
                                 "description": "read: GETs only, every write is 403 (default full)"}},
    },
    "Service": {
        "type": "object", "required": ["name", "enabled"],
        "properties": {"name": {"type": "string"}, "enabled": {"type": "boolean"}, "state": {"type": "string"},
                       "detail": {"type": "string"}},
    },
    "SetService": {
        "type": "object", "required": ["enabled"], "additionalProperties": False,
        "properties": {"enabled": {"type": "boolean"}},
    },
    "Pool": {
        "type": "object", "required": ["name", "total", "used", "free"],
        "properties": {"name": {"type": "string"}, "total": {"type": "integer"}, "used": {"type": "integer"},
                       "free": {"type": "integer"}, "status": {"type": "object"}},
    },
    "Health": {
        "type": "object", "required": ["status", "version", "services"],
        "properties": {"status": {"type": "string", "enum": ["ok", "degraded"]}, "version": {"type": "string"},
                       "services": {"type": "object", "additionalProperties": {
                           "type": "object", "properties": {"state": {"type": "string"},
                                                            "detail": {"type": "string"}}}}},
    },
    "Reconcile": {
        "type": "object", "required": ["repaired", "problems"],
        "properties": {"repaired": {"type": "array", "items": {"type": "string"}},
                       "problems": {"type": "array", "items": {"type": "string"}}},
    },
    "SwapReport": {
        "type": "object", "required": ["server", "action", "before", "after"],
        "properties": {"server": {"type": "string"}, "action": {"type": "string"}, "before": {"type": "string"},
                       "after": {"type": "string"}, "restore_point": {"type": ["string", "null"]},
                       "powered": {"type": "array", "items": {"type": "string"}},
                       "problems": {"type": "array", "items": {"type": "string"}}},
    },
    "Snapshot": {
        "type": "object", "required": ["name", "volume", "created_at"],
        "properties": {"name": {"type": "string"}, "volume": {"type": "string"}, "created_at": {"type": "number"}},
    },
    "Upgrade": {
        "type": "object", "required": ["id", "state", "nodes"],
        "properties": {"id": {"type": "string"}, "state": {"type": "string", "enum": ["running", "done", "halted"]},
                       "to": {"type": ["string", "null"]}, "batch": {"type": "integer"},
                       "max_failures": {"type": "integer"}, "waves": {"type": "array"},
                       "nodes": {"type": "object", "additionalProperties": {"type": "object"}}},
    },
    "Event": {
        "type": "object", "required": ["id", "at", "kind"],
        "properties": {"id": {"type": "integer"}, "at": {"type": "number"}, "kind": {"type": "string"},
                       "server": {"type": ["string", "null"]}},
        "additionalProperties": True,
    },
}
