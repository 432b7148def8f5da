"""Tiers come only from verified tokens: HS256 with the secret, RS256/ES256 with a public key."""

from __future__ import annotations

import time
from pathlib import Path

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from stream_server.auth import Authenticator
from stream_server.protocol import CloseCode, ErrorCode, ProtocolError
from stream_server.settings import AuthSettings

SECRET = "unit-test-secret-0123456789-0123456789-0123456789-0123456789"


def public_pem(key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey, path: Path) -> Path:
    path.write_bytes(
        key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    return path


def claims(**extra: object) -> dict[str, object]:
    return {"sub": "alice", "tier": "vip", "exp": int(time.time()) + 60, **extra}


@pytest.mark.parametrize(
    ("algorithm", "make_key"),
    [
        ("RS256", lambda: rsa.generate_private_key(65537, 2048)),
        ("ES256", lambda: ec.generate_private_key(ec.SECP256R1())),
    ],
)
def test_public_key_tokens_verify_and_forgeries_do_not(tmp_path: Path, algorithm: str, make_key) -> None:
    key, other = make_key(), make_key()
    auth = Authenticator(AuthSettings(hs256_secret=SECRET, public_key_file=str(public_pem(key, tmp_path / "k.pem"))))
    identity = auth.identify(jwt.encode(claims(tier="normal"), key, algorithm=algorithm), "10.0.0.1")
    assert (identity.sub, identity.tier, identity.guest) == ("alice", "normal", False)
    with pytest.raises(ProtocolError) as forged:
        auth.identify(jwt.encode(claims(), other, algorithm=algorithm), "10.0.0.1")
    assert forged.value.code is ErrorCode.INVALID_TOKEN and forged.value.close is CloseCode.INVALID_TOKEN


def test_hs256_tokens_and_their_failures() -> None:
    auth = Authenticator(AuthSettings(hs256_secret=SECRET))
    assert auth.identify(auth.mint("bob", "low"), "x").tier == "low"
    assert auth.identify(None, "192.0.2.7") == auth.identify("", "192.0.2.7")
    guest = auth.identify(None, "192.0.2.7")
    assert guest.tier == "low" and guest.guest and guest.key == "guest:192.0.2.7"
    bad = [
        jwt.encode(claims(exp=int(time.time()) - 3600), SECRET, algorithm="HS256"),
        jwt.encode(claims(tier="platinum"), SECRET, algorithm="HS256"),
        jwt.encode({"tier": "vip", "exp": int(time.time()) + 60}, SECRET, algorithm="HS256"),
        jwt.encode(claims(), SECRET + "x", algorithm="HS256"),
        jwt.encode(claims(), SECRET, algorithm="HS384"),
        "not.a.token",
    ]
    for token in bad:
        with pytest.raises(ProtocolError) as refused:
            auth.identify(token, "x")
        assert refused.value.code is ErrorCode.INVALID_TOKEN


def test_a_public_key_token_is_refused_when_no_key_is_configured() -> None:
    key = rsa.generate_private_key(65537, 2048)
    auth = Authenticator(AuthSettings(hs256_secret=SECRET))
    with pytest.raises(ProtocolError, match="no key"):
        auth.identify(jwt.encode(claims(), key, algorithm="RS256"), "x")


def test_the_none_algorithm_never_verifies() -> None:
    auth = Authenticator(AuthSettings(hs256_secret=SECRET, algorithms=["HS256", "none"]))
    with pytest.raises(ProtocolError):
        auth.identify(jwt.encode(claims(), None, algorithm="none"), "x")


def test_admin_role_and_resume_tokens() -> None:
    auth = Authenticator(AuthSettings(hs256_secret=SECRET))
    assert auth.identify(auth.mint("root", "vip", roles=["admin"]), "x").is_admin
    assert not auth.identify(auth.mint("eve", "vip"), "x").is_admin
    token = auth.resume_token("session-1")
    assert auth.session_from_resume(token) == "session-1"
    assert auth.session_from_resume(token[:-1] + ("A" if token[-1] != "A" else "B")) is None
    assert auth.session_from_resume("session-2." + token.split(".")[1]) is None
    other = Authenticator(AuthSettings(hs256_secret=SECRET + "-other-node"))
    assert other.session_from_resume(token) is None


def test_the_local_secret_is_shared_by_the_token_command_and_the_server(tmp_path: Path) -> None:
    first = Authenticator(AuthSettings(), tmp_path / "secret")
    second = Authenticator(AuthSettings(), tmp_path / "secret")
    assert second.identify(first.mint("carol", "normal"), "x").tier == "normal"
    assert (tmp_path / "secret").stat().st_mode & 0o077 == 0
