"""Access tokens (JWT, ``typ: at+jwt``) and opaque refresh tokens.

JWTs go through joserfc, authlib's JOSE implementation (``authlib.jose`` is deprecated in
its favour). Decoding pins the one configured algorithm and checks iss, aud and exp. HS256
tokens are signed here instead: one HMAC over a constant header and the encoded claims, a
fifth of joserfc's cost on the sign-in path; joserfc still verifies them.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
import time
from collections.abc import Callable
from typing import Annotated, Any

import msgspec
from joserfc import jwt
from joserfc.errors import JoseError
from joserfc.jwk import ECKey, Key, OctKey, OKPKey, RSAKey

from otpcore.domain.errors import InvalidToken
from otpcore.domain.model import Role, User

# Servers of one deployment may disagree on the time by a few seconds.
CLOCK_SKEW_LEEWAY = 30
ACCESS_TOKEN_TYPE = "at+jwt"  # noqa: S105 - a JWT type, not a secret
# Access tokens verified, kept by their exact text (about 1 MiB per 1000 entries at most).
VERIFIED_TOKENS_KEPT = 10_000
_ASYMMETRIC: dict[str, type[Key]] = {"EdDSA": OKPKey, "ES256": ECKey, "RS256": RSAKey}
SUPPORTED_ALGORITHMS = ("HS256", *_ASYMMETRIC)


def _b64(data: bytes) -> bytes:
    return base64.urlsafe_b64encode(data).rstrip(b"=")


_HS256_HEADER = _b64(msgspec.json.encode({"alg": "HS256", "typ": ACCESS_TOKEN_TYPE}))


class AccessClaims(msgspec.Struct, frozen=True, kw_only=True):
    sub: Annotated[str, msgspec.Meta(pattern=r"^[1-9][0-9]{0,18}$")]
    role: Role
    sid: str
    jti: str
    iat: int
    exp: int
    iss: str
    aud: str

    @property
    def user_id(self) -> int:
        return int(self.sub)


class TokenKeys:
    """The signing key of one algorithm, and its public half for the JWKS document."""

    def __init__(self, algorithm: str, *, secret: str = "", private_key_pem: bytes = b"") -> None:
        if algorithm not in SUPPORTED_ALGORITHMS:
            raise ValueError(f"JWT_ALGORITHM must be one of {', '.join(SUPPORTED_ALGORITHMS)}")
        self.algorithm = algorithm
        self.secret = secret.encode()
        self.key: Key
        if algorithm == "HS256":
            if not secret:
                raise ValueError("JWT_SECRET is required with HS256")
            self.key = OctKey.import_key(self.secret)
        else:
            if not private_key_pem:
                raise ValueError(f"JWT_PRIVATE_KEY_FILE is required with {algorithm}")
            key = _ASYMMETRIC[algorithm].import_key(private_key_pem)
            key.ensure_kid()
            self.key = key

    @property
    def kid(self) -> str | None:
        return None if self.algorithm == "HS256" else self.key.kid

    def jwks(self) -> dict[str, Any]:
        if self.algorithm == "HS256":
            return {"keys": []}
        public = self.key.as_dict(private=False)
        public.update({"use": "sig", "alg": self.algorithm})
        return {"keys": [public]}


class TokenService:
    def __init__(
        self,
        keys: TokenKeys,
        *,
        issuer: str,
        audience: str,
        access_ttl: int,
        refresh_ttl: int,
        clock: Callable[[], float] = time.time,
        leeway: int = CLOCK_SKEW_LEEWAY,
    ) -> None:
        self.keys = keys
        self.issuer = issuer
        self.audience = audience
        self.access_ttl = access_ttl
        self.refresh_ttl = refresh_ttl
        self.clock = clock
        self.leeway = leeway
        # A client presents one token on every request for its whole lifetime: the signature
        # and claims of a text verified once need no second check (about 60 µs each), only the
        # expiry, the one verdict that changes with time. Insertion order evicts the oldest.
        self._verified: dict[str, AccessClaims] = {}
        self._registry = jwt.JWTClaimsRegistry(
            now=lambda: int(clock()),
            leeway=leeway,
            iss={"essential": True, "value": issuer},
            aud={"essential": True, "value": audience},
            exp={"essential": True},
            sub={"essential": True},
            sid={"essential": True},
        )

    def issue_access(self, user: User, session_id: str, now: int) -> str:
        claims = {
            "iss": self.issuer,
            "aud": self.audience,
            "sub": str(user.id),
            "role": user.role.value,
            "sid": session_id,
            "iat": now,
            "exp": now + self.access_ttl,
            "jti": secrets.token_hex(16),
        }
        if self.keys.algorithm == "HS256":
            signing_input = _HS256_HEADER + b"." + _b64(msgspec.json.encode(claims))
            signature = hmac.digest(self.keys.secret, signing_input, "sha256")
            return (signing_input + b"." + _b64(signature)).decode()
        header = {"alg": self.keys.algorithm, "typ": ACCESS_TOKEN_TYPE, "kid": self.keys.kid}
        return jwt.encode(header, claims, self.keys.key, algorithms=[self.keys.algorithm])

    def decode_access(self, token: str) -> AccessClaims:
        claims = self._verified.get(token)
        if claims is None:
            claims = self._verify(token)
            if len(self._verified) >= VERIFIED_TOKENS_KEPT:
                del self._verified[next(iter(self._verified))]
            self._verified[token] = claims
        elif claims.exp < int(self.clock()) - self.leeway:  # the rule joserfc applies
            del self._verified[token]
            raise InvalidToken()  # as a token never seen: the answer shows nothing of this cache
        return claims

    def _verify(self, token: str) -> AccessClaims:
        try:
            decoded = jwt.decode(token, self.keys.key, algorithms=[self.keys.algorithm])
            if decoded.header.get("typ") != ACCESS_TOKEN_TYPE:
                raise InvalidToken("token is not an access token")
            self._registry.validate(decoded.claims)
            return msgspec.convert(decoded.claims, AccessClaims)
        except (JoseError, ValueError, TypeError, msgspec.ValidationError) as exc:
            raise InvalidToken() from exc

    @staticmethod
    def new_refresh_token() -> str:
        return secrets.token_urlsafe(32)  # 256 bits

    @staticmethod
    def hash_refresh_token(token: str) -> bytes:
        # The token is 256 random bits: a plain hash cannot be reversed or guessed.
        return hashlib.sha256(token.encode()).digest()
