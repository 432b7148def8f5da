"""Identity: tiers from verified JWTs only, and signed resume tokens.

A token that does not verify is an error, never a downgrade. No token means a guest of tier
``low`` whose identity is its address. Resume tokens are HMAC-signed by the server, so a client
can only resume a ticket it was given.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import secrets
import time
from dataclasses import dataclass, field
from pathlib import Path

import jwt

from stream_server.protocol import CloseCode, ErrorCode, ProtocolError
from stream_server.settings import TIER_NAMES, AuthSettings


@dataclass(frozen=True)
class Identity:
    sub: str
    tier: str
    guest: bool
    roles: frozenset[str] = frozenset()
    expires_at: float | None = field(default=None, compare=False)
    """The token's ``exp`` (Unix seconds); ``None`` for guests and tokens without one. Not part of
    equality: the same user resuming with a fresh token is the same identity."""

    def expired(self, now: float, grace_s: float) -> bool:
        """True once the token is more than ``grace_s`` past its ``exp``."""
        return self.expires_at is not None and now > self.expires_at + grace_s

    @property
    def key(self) -> str:
        """What the per-identity cap counts by."""
        return f"guest:{self.sub}" if self.guest else f"user:{self.sub}"

    @property
    def is_admin(self) -> bool:
        return "admin" in self.roles


def _local_secret(path: Path | None) -> str:
    """The node's own HS256 secret when none is configured, kept in the data folder so that
    ``musetalk-stream token`` and the server agree (one node only: configure it for a cluster)."""
    if path is None:
        return secrets.token_urlsafe(32)
    if path.is_file():
        return path.read_text().strip()
    path.parent.mkdir(parents=True, exist_ok=True)
    secret = secrets.token_urlsafe(32)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(secret)
    return secret


class Authenticator:
    def __init__(self, settings: AuthSettings, secret_file: Path | None = None) -> None:
        self.secret = settings.hs256_secret or _local_secret(secret_file)
        self.public_key = (
            Path(settings.public_key_file).read_text() if settings.public_key_file else None
        )
        self.algorithms = list(settings.algorithms)
        self.leeway = settings.leeway_s
        self.exp_grace_s = settings.exp_grace_s
        resume_key = settings.resume_secret or f"resume:{self.secret}"
        self._resume_key = hashlib.sha256(resume_key.encode()).digest()

    def identify(self, token: str | None, address: str) -> Identity:
        if not token:
            return Identity(sub=address, tier="low", guest=True)
        if not token.isascii():
            # A JWT is base64url and dots; anything else (a lone surrogate, say) cannot even be
            # encoded to bytes for the signature check.
            raise ProtocolError(
                ErrorCode.INVALID_TOKEN, "token rejected: a JWT is ASCII", close=CloseCode.INVALID_TOKEN
            )
        try:
            header = jwt.get_unverified_header(token)
            alg = header.get("alg")
            if alg not in self.algorithms:
                raise jwt.InvalidAlgorithmError(f"algorithm {alg!r} is not accepted")
            key = self.secret if alg == "HS256" else self.public_key
            if key is None:
                raise jwt.InvalidKeyError(f"no key is configured for {alg}")
            claims = jwt.decode(
                token,
                key,
                algorithms=[alg],
                leeway=self.leeway,
                options={"require": ["sub", "tier"]},
            )
        except jwt.PyJWTError as exc:
            raise ProtocolError(
                ErrorCode.INVALID_TOKEN, f"token rejected: {exc}", close=CloseCode.INVALID_TOKEN
            ) from None
        tier = claims["tier"]
        if tier not in TIER_NAMES:
            raise ProtocolError(
                ErrorCode.INVALID_TOKEN, f"unknown tier {tier!r}", close=CloseCode.INVALID_TOKEN
            )
        roles = claims.get("roles", [])
        exp = claims.get("exp")
        return Identity(
            sub=str(claims["sub"]),
            tier=tier,
            guest=False,
            roles=frozenset(r for r in roles if isinstance(r, str)) if isinstance(roles, list) else frozenset(),
            expires_at=float(exp) if isinstance(exp, int | float) else None,
        )

    def ensure_current(self, identity: Identity, now: float | None = None) -> None:
        """Tokens are honoured for the whole session, not only at ``hello``: past ``exp`` plus
        ``auth.exp_grace_s`` the session's tier is gone and the socket closes with 4401."""
        if identity.expired(time.time() if now is None else now, self.exp_grace_s):
            raise ProtocolError(
                ErrorCode.INVALID_TOKEN,
                "the token has expired; reconnect with a fresh token",
                close=CloseCode.INVALID_TOKEN,
            )

    def mint(
        self, sub: str, tier: str, *, ttl_s: float = 86_400, roles: list[str] | None = None
    ) -> str:
        """An HS256 token for ``sub`` at ``tier`` (the admin command ``musetalk-stream token``)."""
        if tier not in TIER_NAMES:
            raise ValueError(f"tier must be one of {', '.join(TIER_NAMES)}")
        now = int(time.time())
        claims: dict[str, object] = {"sub": sub, "tier": tier, "iat": now, "exp": now + int(ttl_s)}
        if roles:
            claims["roles"] = roles
        return jwt.encode(claims, self.secret, algorithm="HS256")

    # ----- resume tokens -----

    def resume_token(self, session_id: str) -> str:
        mac = hmac.new(self._resume_key, session_id.encode(), hashlib.sha256).digest()[:16]
        return f"{session_id}.{base64.urlsafe_b64encode(mac).decode().rstrip('=')}"

    def session_from_resume(self, token: str) -> str | None:
        """The session id a resume token was issued for, or ``None`` if it is forged."""
        session_id, _, _ = token.rpartition(".")
        if not session_id or not token.isascii():
            return None
        return session_id if hmac.compare_digest(self.resume_token(session_id), token) else None
