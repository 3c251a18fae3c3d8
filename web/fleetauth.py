"""How one appliance proves to another that it holds the fleet's secret, without sending it: each
request of the fleet channel carries `Authorization: Cello-Fleet t=<unix time>, sig=<hex>`, the
HMAC-SHA256 under the secret of "<METHOD> <path?query> <t>". A sniffer on the management network learns
no secret and cannot forge another request; a captured one replays only within SKEW_S, for the same
path, and what it is answered is sealed for that request's signature (web/fleetseal.py): useless
without the secret.
"""

from __future__ import annotations

import hashlib
import hmac
import re

SCHEME = "Cello-Fleet"
SKEW_S = 120  # the appliances' clocks may differ this much (and a request may take this long to arrive)
_HEADER = re.compile(rf"{SCHEME} t=(\d{{1,12}}), sig=([0-9a-f]{{64}})")


def _mac(secret: str, method: str, path_qs: str, t: int) -> str:
    return hmac.new(secret.encode(), f"{method.upper()} {path_qs} {t}".encode(), hashlib.sha256).hexdigest()


def sign(secret: str, method: str, path_qs: str, now: float) -> str:
    t = int(now)
    return f"{SCHEME} t={t}, sig={_mac(secret, method, path_qs, t)}"


def problem(secret: str, header: str, method: str, path_qs: str, now: float) -> str | None:
    """Why the header does not prove the secret (None: it does)."""
    found = _HEADER.fullmatch(header.strip())
    if found is None:
        return f"the fleet channel needs an `Authorization: {SCHEME} t=…, sig=…` header"
    t = int(found.group(1))
    if abs(now - t) > SKEW_S:
        return f"the request's time is {now - t:+.0f} s off this appliance's clock (more than {SKEW_S} s)"
    if not hmac.compare_digest(found.group(2), _mac(secret, method, path_qs, t)):
        return "the signature does not match the fleet's secret"
    return None
