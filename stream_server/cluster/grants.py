"""Grant tokens: what a client carries to the node whose slot it was granted.

``grant.<payload>.<mac>``: the payload names the single-use handoff id the store keeps, the node
and the expiry; the MAC (HMAC-SHA256 with the nodes' shared auth secret) makes it unforgeable. The
store consumes the handoff on first use, so a token works once, on its node, before it expires.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
from dataclasses import dataclass

PREFIX = "grant."


@dataclass(frozen=True)
class GrantClaim:
    handoff: str
    node: str
    expires_at: float


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def is_grant_token(token: str) -> bool:
    return token.startswith(PREFIX)


class GrantTokens:
    def __init__(self, secret: str) -> None:
        self._key = hashlib.sha256(f"grant:{secret}".encode()).digest()

    def _mac(self, payload: str) -> str:
        return _b64(hmac.new(self._key, payload.encode(), hashlib.sha256).digest()[:18])

    def sign(self, claim: GrantClaim) -> str:
        payload = _b64(json.dumps([claim.handoff, claim.node, claim.expires_at]).encode())
        return f"{PREFIX}{payload}.{self._mac(payload)}"

    def verify(self, token: str, now: float) -> GrantClaim | None:
        """The claim of a genuine token that has not expired; ``None`` otherwise."""
        if not is_grant_token(token):
            return None
        payload, _, mac = token[len(PREFIX) :].partition(".")
        if not mac or not hmac.compare_digest(self._mac(payload), mac):
            return None
        try:
            handoff, node, expires_at = json.loads(_unb64(payload))
        except ValueError:
            return None
        claim = GrantClaim(str(handoff), str(node), float(expires_at))
        return claim if claim.expires_at > now else None
