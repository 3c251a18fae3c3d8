"""The name rules every layer shares, each written once: server UUID, MAC address, template (OS) and user
names, template version, OS-volume snapshot name, host name, IPv4 address, IQN and IQN prefix.

A rule is a pattern, a length bound and the sentence that explains it. Each layer raises its own error
type with that sentence (`rule.check(value, error=...)`): the domain's InvalidRequest, iscsi's
NameError_, the renderer's RenderError. Patterns also exist as unanchored text (`rule.text`) for the
places that compose them (a TFTP file name, an OpenAPI document).

Stdlib only, importing nothing of Cello's: every package may import it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

MAX_IQN = 223  # bytes (RFC 3720 §3.2.6.1)
# The longest IQN Cello builds from a prefix is the initiator `<prefix>:node-<uuid>` (42 more chars).
MAX_IQN_PREFIX = MAX_IQN - len(":node-") - 36


class NameRuleError(ValueError):
    """A value broke a name rule (the default error of `Rule.check`)."""


@dataclass(frozen=True)
class Rule:
    what: str  # "server UUID"
    text: str  # the pattern, unanchored
    explain: str  # "must be ...": the end of the error message
    max_len: int = 255
    _compiled: re.Pattern[str] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_compiled", re.compile(self.text))

    def ok(self, value: object) -> bool:
        return isinstance(value, str) and len(value) <= self.max_len and self._compiled.fullmatch(value) is not None

    def check(self, value: object, error: type[Exception] = NameRuleError, what: str | None = None) -> str:
        """`value` if it follows the rule; else `error("invalid <what> <value>: <explain>")`."""
        if not self.ok(value):
            shown = repr(value)
            if len(shown) > 80:
                shown = shown[:77] + "…'"
            raise error(f"invalid {what or self.what} {shown}: {self.explain}")
        assert isinstance(value, str)
        return value

    @property
    def anchored(self) -> str:
        """For JSON Schema `pattern` (which searches unless anchored)."""
        return f"^{self.text}$"


UUID = Rule("server UUID", r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}",
            "must be a lowercase UUID like 3f1c2b4e-0000-4000-8000-000000000001")
MAC = Rule("MAC address", r"[0-9a-f]{2}(?::[0-9a-f]{2}){5}", "must be six lowercase hex pairs like 52:54:00:77:00:10")
# Templates (hcc-cello's "os") and users share one shape: it ends up in volume names and file paths.
NAME_TEXT = r"[a-z0-9][a-z0-9_.-]{0,62}"
TEMPLATE = Rule("template name", NAME_TEXT, "must be [a-z0-9][a-z0-9_.-]*, up to 63 chars")
USER = Rule("user name", NAME_TEXT, "must be [a-z0-9][a-z0-9_.-]*, up to 63 chars")
VERSION = Rule("template version", r"v[1-9][0-9]{0,8}", "must be v1, v2, …")
# A snapshot of a server's OS volume (`<volume>@<snap>`): an operator's label, so no version shape.
SNAPSHOT = Rule("snapshot name", r"[a-z0-9][a-z0-9_.-]{0,31}", "must be [a-z0-9][a-z0-9_.-]*, up to 32 chars", 32)
HOSTNAME = Rule("host name", r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?", "must be a DNS label (a-z, 0-9, '-')")
IPV4 = Rule("IPv4 address", r"(?:(?:25[0-5]|2[0-4][0-9]|1?[0-9]?[0-9])\.){3}(?:25[0-5]|2[0-4][0-9]|1?[0-9]?[0-9])",
            "must be an IPv4 address like 10.77.0.101")
# iSCSI qualified names, lowercase (RFC 3720 §3.2.6.3.1), and the eui./naa. forms.
IQN = Rule("IQN", r"(?:iqn\.[0-9]{4}-[0-9]{2}\.[a-z0-9][a-z0-9.-]*(?::[a-z0-9][a-z0-9.:-]*)?"
           r"|eui\.[0-9a-f]{16}|naa\.[0-9a-f]{16}(?:[0-9a-f]{16})?)",
           f"must be a lowercase iqn./eui./naa. name of at most {MAX_IQN} chars", MAX_IQN)
IQN_PREFIX = Rule("IQN prefix", r"iqn\.[0-9]{4}-[0-9]{2}\.[a-z0-9][a-z0-9.-]*[a-z0-9](?::[a-z0-9][a-z0-9.-]*)?",
                  f"must look like iqn.YYYY-MM.reversed.domain[:name], at most {MAX_IQN_PREFIX} chars "
                  "(the node's initiator name <prefix>:node-<uuid> must stay a valid IQN)", MAX_IQN_PREFIX)

# A server label's name or value (rack=3, role=compute): what a selector can name.
# An appliance of a fleet: a DNS label, so a host name serves as the default
APPLIANCE = Rule("appliance name", r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?", "must be a DNS label (a-z, 0-9, '-')")
LABEL = Rule("label", r"[A-Za-z0-9][A-Za-z0-9_.-]{0,62}", "must be [A-Za-z0-9][A-Za-z0-9_.-]*, up to 63 chars")

# The SMBIOS UUIDs broken boards report: never a server's identity (give the MAC instead).
BROKEN_UUIDS = frozenset({"00000000-0000-0000-0000-000000000000", "ffffffff-ffff-ffff-ffff-ffffffffffff"})


def normalize_mac(value: str) -> str:
    """52-54-00-77-00-10 or 52:54:00:77:00:10 in any case → 52:54:00:77:00:10 (not checked)."""
    return value.lower().replace("-", ":")


def version_number(version: str) -> int:
    """v12 → 12, for ordering (the version must follow VERSION)."""
    return int(VERSION.check(version)[1:])
