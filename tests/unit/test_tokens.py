"""TokenService: access JWTs and refresh tokens (SPEC §4 Tokens)."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
from datetime import UTC, datetime
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from joserfc import jwt
from joserfc.jwk import OctKey

from otpcore.domain import tokens as tokens_module
from otpcore.domain.errors import InvalidToken
from otpcore.domain.model import Role, User
from otpcore.domain.tokens import CLOCK_SKEW_LEEWAY, TokenKeys, TokenService

SECRET = "s" * 40
NOW = datetime.now(UTC)
USER = User(
    id=42,
    phone_number="+14155550123",
    name="Ada",
    role=Role.ADMIN,
    is_active=True,
    created_at=NOW,
    updated_at=NOW,
)


def service(keys: TokenKeys | None = None, **kw: Any) -> TokenService:
    params: dict[str, Any] = {
        "issuer": "otp-server",
        "audience": "otp-server",
        "access_ttl": 900,
        "refresh_ttl": 30 * 86400,
    }
    params.update(kw)
    return TokenService(keys or TokenKeys("HS256", secret=SECRET), **params)


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def parts(token: str) -> tuple[dict[str, Any], dict[str, Any]]:
    header, payload, _ = token.split(".")
    return json.loads(unb64(header)), json.loads(unb64(payload))


def hs256(header: dict[str, Any], claims: dict[str, Any], key: bytes) -> str:
    signing_input = f"{b64(json.dumps(header).encode())}.{b64(json.dumps(claims).encode())}"
    sig = hmac.new(key, signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{b64(sig)}"


def good_claims(now: int | None = None) -> dict[str, Any]:
    now = int(time.time()) if now is None else now
    return {
        "iss": "otp-server",
        "aud": "otp-server",
        "sub": "42",
        "role": "admin",
        "sid": "session-1",
        "iat": now,
        "exp": now + 900,
        "jti": "j1",
    }


def now() -> int:
    return int(time.time())


def test_header_is_at_jwt_with_the_configured_algorithm() -> None:
    token = service().issue_access(USER, "sid-1", now())
    header, _ = parts(token)
    assert header["typ"] == "at+jwt"
    assert header["alg"] == "HS256"
    assert "kid" not in header


def test_claims() -> None:
    t = now()
    token = service(issuer="iss-x", audience="aud-y", access_ttl=600).issue_access(USER, "sid-1", t)
    _, claims = parts(token)
    assert claims["iss"] == "iss-x"
    assert claims["aud"] == "aud-y"
    assert claims["sub"] == "42"
    assert claims["role"] == "admin"
    assert claims["sid"] == "sid-1"
    assert claims["iat"] == t
    assert claims["exp"] == t + 600
    assert isinstance(claims["jti"], str) and claims["jti"]
    # No personal data in the token.
    assert "+14155550123" not in json.dumps(claims)


def test_jti_is_unique_per_token() -> None:
    svc = service()
    t = now()
    jtis = {parts(svc.issue_access(USER, "sid", t))[1]["jti"] for _ in range(50)}
    assert len(jtis) == 50


def test_round_trip() -> None:
    svc = service(issuer="iss-x", audience="aud-y")
    t = now()
    claims = svc.decode_access(svc.issue_access(USER, "sid-1", t))
    assert claims.user_id == 42
    assert claims.role is Role.ADMIN
    assert claims.sid == "sid-1"
    assert (claims.iss, claims.aud) == ("iss-x", "aud-y")
    assert claims.exp == t + 900


def test_hs256_tokens_verify_with_joserfc_alone() -> None:
    # The service signs HS256 itself: joserfc, on its own, must accept the result as signed by
    # the secret, and refuse it under any other.
    token = service().issue_access(USER, "sid-1", now())
    decoded = jwt.decode(token, OctKey.import_key(SECRET.encode()), algorithms=["HS256"])
    assert decoded.header == {"alg": "HS256", "typ": "at+jwt"}
    assert (decoded.claims["sub"], decoded.claims["sid"]) == ("42", "sid-1")
    with pytest.raises(Exception, match="signature"):
        jwt.decode(token, OctKey.import_key(b"t" * 40), algorithms=["HS256"])


def test_the_hand_rolled_hs256_helper_matches_the_service() -> None:
    # Sanity check for the forgeries below: a correct token made by hand is accepted.
    token = hs256({"alg": "HS256", "typ": "at+jwt"}, good_claims(), SECRET.encode())
    assert service().decode_access(token).sid == "session-1"


def refuse(svc: TokenService, token: Any) -> None:
    with pytest.raises(InvalidToken) as info:
        svc.decode_access(token)
    assert info.value.code == "invalid_token"


def test_alg_none_is_refused() -> None:
    header = b64(json.dumps({"alg": "none", "typ": "at+jwt"}).encode())
    payload = b64(json.dumps(good_claims()).encode())
    refuse(service(), f"{header}.{payload}.")
    refuse(service(), f"{header}.{payload}")
    header_caps = b64(json.dumps({"alg": "None", "typ": "at+jwt"}).encode())
    refuse(service(), f"{header_caps}.{payload}.")


def test_another_secret_is_refused() -> None:
    token = service(TokenKeys("HS256", secret="o" * 40)).issue_access(USER, "sid", now())
    refuse(service(), token)


def test_wrong_issuer_is_refused() -> None:
    token = service(issuer="someone-else").issue_access(USER, "sid", now())
    refuse(service(), token)


def test_wrong_audience_is_refused() -> None:
    token = service(audience="another-app").issue_access(USER, "sid", now())
    refuse(service(), token)


def test_expired_is_refused() -> None:
    svc = service(access_ttl=900)
    # Past the expiry by more than the clock-skew leeway servers of one deployment are allowed.
    refuse(svc, svc.issue_access(USER, "sid", now() - 900 - CLOCK_SKEW_LEEWAY - 1))
    refuse(svc, svc.issue_access(USER, "sid", now() - 86400))


def test_not_yet_expired_is_accepted() -> None:
    svc = service(access_ttl=900)
    assert svc.decode_access(svc.issue_access(USER, "sid", now() - 800)).sid == "sid"


@pytest.mark.parametrize("typ", ["JWT", "jwt", "rt+jwt", None])
def test_wrong_typ_header_is_refused(typ: str | None) -> None:
    header: dict[str, Any] = {"alg": "HS256"}
    if typ is not None:
        header["typ"] = typ
    refuse(service(), hs256(header, good_claims(), SECRET.encode()))


@pytest.mark.parametrize("missing", ["iss", "aud", "exp", "sub", "sid"])
def test_missing_essential_claim_is_refused(missing: str) -> None:
    claims = good_claims()
    del claims[missing]
    refuse(service(), hs256({"alg": "HS256", "typ": "at+jwt"}, claims, SECRET.encode()))


def test_unknown_role_is_refused() -> None:
    claims = {**good_claims(), "role": "root"}
    refuse(service(), hs256({"alg": "HS256", "typ": "at+jwt"}, claims, SECRET.encode()))


def test_tampered_payload_is_refused() -> None:
    regular = User(**{**{f: getattr(USER, f) for f in USER.__struct_fields__}, "role": Role.USER})
    token = service().issue_access(regular, "sid", now())
    header, payload, sig = token.split(".")
    claims = json.loads(unb64(payload))
    claims["role"] = "admin"
    refuse(service(), f"{header}.{b64(json.dumps(claims).encode())}.{sig}")
    claims["role"] = "user"
    claims["sub"] = "1"
    refuse(service(), f"{header}.{b64(json.dumps(claims).encode())}.{sig}")


def test_tampered_signature_is_refused() -> None:
    token = service().issue_access(USER, "sid", now())
    header, payload, sig = token.split(".")
    flipped = sig[:-2] + ("A" if sig[-2] != "A" else "B") + sig[-1]
    refuse(service(), f"{header}.{payload}.{flipped}")
    refuse(service(), f"{header}.{payload}.")


@pytest.mark.parametrize(
    "garbage",
    [
        "",
        "garbage",
        "a.b.c",
        "a.b",
        "....",
        "e30.e30.e30",
        "é.é.é",
        "x" * 10_000,
        "Bearer abc",
        "eyJhbGciOiJIUzI1NiJ9.!!!.???",
    ],
)
def test_garbage_is_refused(garbage: str) -> None:
    refuse(service(), garbage)


def test_refresh_tokens_are_256_bit_urlsafe_and_unique() -> None:
    tokens = {TokenService.new_refresh_token() for _ in range(100)}
    assert len(tokens) == 100
    for token in tokens:
        assert set(token) <= set("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_")
        assert len(unb64(token)) == 32


def test_refresh_token_hash_is_sha256() -> None:
    token = TokenService.new_refresh_token()
    digest = TokenService.hash_refresh_token(token)
    assert digest == hashlib.sha256(token.encode()).digest()
    assert token.encode() not in digest


def test_hs256_needs_a_secret_and_unknown_algorithms_are_refused() -> None:
    with pytest.raises(ValueError):
        TokenKeys("HS256", secret="")
    with pytest.raises(ValueError):
        TokenKeys("none", secret=SECRET)
    with pytest.raises(ValueError):
        TokenKeys("HS512", secret=SECRET)
    with pytest.raises(ValueError):
        TokenKeys("EdDSA")
    assert TokenKeys("HS256", secret=SECRET).jwks() == {"keys": []}


# --- asymmetric keys -------------------------------------------------------------------------


def pem(private_key: Any) -> bytes:
    return private_key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def public_pem(private_key: Any) -> bytes:
    return private_key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


KEYS = {
    "EdDSA": ed25519.Ed25519PrivateKey.generate,
    "ES256": lambda: ec.generate_private_key(ec.SECP256R1()),
}


@pytest.fixture(params=sorted(KEYS))
def asymmetric(request: pytest.FixtureRequest) -> tuple[str, Any]:
    return request.param, KEYS[request.param]()


def test_asymmetric_tokens_carry_kid_and_verify(asymmetric: tuple[str, Any]) -> None:
    alg, private = asymmetric
    keys = TokenKeys(alg, private_key_pem=pem(private))
    svc = service(keys)
    token = svc.issue_access(USER, "sid-1", now())
    header, _ = parts(token)
    assert header["alg"] == alg
    assert header["typ"] == "at+jwt"
    assert header["kid"] == keys.kid and keys.kid
    assert svc.decode_access(token).sid == "sid-1"


def test_jwks_exposes_the_public_key_only(asymmetric: tuple[str, Any]) -> None:
    alg, private = asymmetric
    keys = TokenKeys(alg, private_key_pem=pem(private))
    jwks = keys.jwks()
    assert len(jwks["keys"]) == 1
    jwk = jwks["keys"][0]
    assert "d" not in jwk
    assert not {"p", "q", "dp", "dq", "qi", "k"} & set(jwk)
    assert jwk["kid"] == keys.kid
    assert jwk["alg"] == alg
    assert jwk["use"] == "sig"
    assert jwk["kty"] == ("OKP" if alg == "EdDSA" else "EC")
    # The published key verifies tokens (what a resource server would do).
    token = service(keys).issue_access(USER, "sid", now())
    from joserfc.jwk import import_key

    public = import_key(jwk)
    assert jwt.decode(token, public, algorithms=[alg]).claims["sid"] == "sid"


def test_hs256_signed_with_the_public_key_is_refused(asymmetric: tuple[str, Any]) -> None:
    alg, private = asymmetric
    svc = service(TokenKeys(alg, private_key_pem=pem(private)))
    header = {"alg": "HS256", "typ": "at+jwt", "kid": svc.keys.kid}
    refuse(svc, hs256(header, good_claims(), public_pem(private)))
    jwk_json = json.dumps(svc.keys.jwks()["keys"][0]).encode()
    refuse(svc, hs256(header, good_claims(), jwk_json))


def test_token_of_another_key_pair_is_refused(asymmetric: tuple[str, Any]) -> None:
    alg, private = asymmetric
    mine = service(TokenKeys(alg, private_key_pem=pem(private)))
    theirs = service(TokenKeys(alg, private_key_pem=pem(KEYS[alg]())))
    refuse(mine, theirs.issue_access(USER, "sid", now()))


def test_hs256_service_refuses_asymmetric_tokens(asymmetric: tuple[str, Any]) -> None:
    alg, private = asymmetric
    token = service(TokenKeys(alg, private_key_pem=pem(private))).issue_access(USER, "s", now())
    refuse(service(), token)


def test_octkey_of_other_secret_cannot_forge() -> None:
    # Forging with joserfc directly and a different key: refused.
    token = jwt.encode({"alg": "HS256", "typ": "at+jwt"}, good_claims(), OctKey.import_key(b"x" * 40))
    refuse(service(), token)


def test_small_clock_skew_between_servers_is_tolerated() -> None:
    svc = service()
    token = svc.issue_access(USER, "sid-1", now() + 5)  # issuer's clock 5 s ahead
    assert svc.decode_access(token).sid == "sid-1"


class _Clock:
    def __init__(self, t: float) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def test_a_token_verified_before_still_expires() -> None:
    clock = _Clock(now())
    svc = service(access_ttl=900, clock=clock)
    token = svc.issue_access(USER, "sid", int(clock.t))
    assert svc.decode_access(token).sid == "sid"  # verified, then kept
    clock.t += 900 + CLOCK_SKEW_LEEWAY
    assert svc.decode_access(token).sid == "sid"  # within the leeway
    clock.t += 1
    refuse(svc, token)
    refuse(svc, token)  # and again, now that it is no longer kept


def test_a_kept_token_does_not_vouch_for_an_altered_one() -> None:
    svc = service()
    token = svc.issue_access(USER, "sid", now())
    svc.decode_access(token)
    header, payload, signature = token.split(".")
    claims = json.loads(unb64(payload))
    claims["role"] = "admin" if claims["role"] == "user" else "user"
    refuse(svc, f"{header}.{b64(json.dumps(claims).encode())}.{signature}")
    refuse(svc, f"{header}.{payload}.{signature[:-2]}AA")


def test_the_kept_tokens_are_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tokens_module, "VERIFIED_TOKENS_KEPT", 3)
    svc = service()
    issued = [svc.issue_access(USER, f"sid-{i}", now()) for i in range(5)]
    for token in issued:
        svc.decode_access(token)
    assert len(svc._verified) == 3
    assert all(svc.decode_access(token).sid == f"sid-{i}" for i, token in enumerate(issued))
