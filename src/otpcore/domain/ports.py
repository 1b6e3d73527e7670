"""The ports: what the domain needs from the outside world, as async Protocols.

Each port has an in-memory adapter in ``otpcore.adapters.memory`` and production adapters
elsewhere; one contract suite (tests/contract) runs against all of them.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from datetime import datetime
from typing import Protocol

import msgspec

from otpcore.domain.events import Event
from otpcore.domain.model import Role, User


class Limit(msgspec.Struct, frozen=True, kw_only=True):
    """At most ``requests`` accepted per ``subject`` in any interval of ``window`` seconds."""

    # Which limit ("otp", "global", "auth", "user", ...): also the metrics label.
    name: str
    # Whom it counts: a client IP or an E.164 number. Limits decided together in one call
    # share a subject, so a Redis Cluster keeps all their keys on one slot.
    subject: str
    requests: int
    window: float

    @property
    def key(self) -> str:
        return f"{self.name}:{self.subject}"


class RateDecision(msgspec.Struct, frozen=True, kw_only=True):
    allowed: bool
    limit: int
    remaining: int
    # Whole seconds until the oldest accepted request leaves the window (a slot frees up).
    reset_after: int
    name: str = ""


class CodeOutcome(enum.Enum):
    ACCEPTED = "accepted"  # matched; the code is gone
    WRONG = "wrong"  # mismatch, counted against the code and the number
    BURNED = "burned"  # the code used up its attempts
    LOCKED = "locked"  # the number used up its failure budget
    MISSING = "missing"  # never sent, expired or already used
    REFUSED = "refused"  # an admission limit refused: the code was not looked at


class CodeCheck(msgspec.Struct, frozen=True, kw_only=True):
    outcome: CodeOutcome
    attempts_remaining: int = 0
    retry_after: int = 0
    # The decisions of the admission limits given, in order.
    admission: list[RateDecision] = msgspec.field(default_factory=list)


class RateLimiter(Protocol):
    async def hit(self, limits: Sequence[Limit]) -> list[RateDecision]:
        """Count one request against every limit, all or nothing.

        The request is accepted (and recorded in every window) only if each limit has room;
        otherwise nothing is recorded. One decision per limit, in order.
        """
        ...

    async def ping(self) -> None: ...


class CodeStore(Protocol):
    async def issue(
        self,
        phone: str,
        digest: bytes,
        *,
        ttl: float,
        max_attempts: int,
        send_limit: Limit | None,
        event: Event | None = None,
        admission: Sequence[Limit] = (),
    ) -> list[RateDecision]:
        """Replace the number's code with ``digest`` if ``send_limit`` has room, atomically.

        ``admission`` are the caller's own limits (the RateLimiter's, on the same logs), decided
        first as ``RateLimiter.hit`` decides them, in the same step where the store can: if one
        refuses, nothing is recorded or written. Returns their decisions, then the send-limit
        decision if they allowed and a limit applies. When that is not allowed the previous code
        stays as it was; when it is, ``event`` is published with the code (by a store wired to an
        event bus; in the same step where the store can).
        """
        ...

    async def check(
        self, phone: str, digest: bytes, *, failure_budget: Limit, admission: Sequence[Limit] = ()
    ) -> CodeCheck:
        """Compare ``digest`` with the live code of ``phone``, atomically.

        A match deletes the code (single use). A mismatch counts one attempt against the code
        and one failure against the number's ``failure_budget``; past either the code cannot
        be used. ``admission`` are decided first, as in ``issue``: if one refuses, the outcome
        is REFUSED and nothing else is recorded or looked at.
        """
        ...

    async def ping(self) -> None: ...


class UserRepo(Protocol):
    async def get(self, user_id: int) -> User | None: ...

    async def get_by_phone(self, phone: str) -> User | None: ...

    async def get_or_create(self, phone: str, *, name: str, role: Role) -> tuple[User, bool]:
        """The user of ``phone``, created if absent; concurrent calls create exactly one."""
        ...

    async def update(
        self,
        user_id: int,
        *,
        name: str | None = None,
        role: Role | None = None,
        is_active: bool | None = None,
    ) -> User | None:
        """Change the given fields (and ``updated_at``); None when there is no such user."""
        ...

    async def search(
        self, query: str, *, offset: int, limit: int, after_id: int | None
    ) -> tuple[list[User], int]:
        """Users whose name contains ``query`` (case-insensitive) or whose phone contains it.

        The query is a literal substring: no wildcards. Ordered by id; with ``after_id`` only
        ids above it. Returns the page and the number of all matches.
        """
        ...

    async def ping(self) -> None: ...


class Session(msgspec.Struct, frozen=True, kw_only=True):
    id: str
    user_id: int
    created_at: datetime
    expires_at: datetime
    revoked: bool = False


class RotationOutcome(enum.Enum):
    ROTATED = "rotated"
    REUSED = "reused"  # an already-rotated token: the whole session is now revoked
    INVALID = "invalid"  # unknown, expired, or its session is revoked


class Rotation(msgspec.Struct, frozen=True, kw_only=True):
    outcome: RotationOutcome
    session: Session | None = None


class NewSession(msgspec.Struct, frozen=True, kw_only=True):
    """A session to open: its id, its first refresh token (hashed) and its lifetime."""

    id: str
    token_hash: bytes
    created_at: datetime
    expires_at: datetime


class SignIn(msgspec.Struct, frozen=True, kw_only=True):
    user: User
    created: bool
    # None when the user is inactive: no session is opened for them.
    session: Session | None


class SignInStore(Protocol):
    async def sign_in(self, phone: str, *, name: str, role: Role, session: NewSession) -> SignIn:
        """The user of ``phone``, created if absent (as ``UserRepo.get_or_create``), and
        ``session`` opened for them if they are active; in one step where the store can."""
        ...


class SessionStore(Protocol):
    """Refresh-token sessions. Tokens arrive already hashed; nothing here sees a raw token."""

    async def create(
        self,
        session_id: str,
        user_id: int,
        token_hash: bytes,
        *,
        now: datetime,
        expires_at: datetime,
    ) -> Session: ...

    async def rotate(
        self, token_hash: bytes, new_hash: bytes, *, now: datetime, expires_at: datetime
    ) -> Rotation:
        """Swap the session's current token for ``new_hash``, atomically.

        Presenting a token that was already rotated revokes the session (reuse detection).
        """
        ...

    async def find(self, token_hash: bytes) -> Session | None:
        """The session a token (current or rotated) belongs to."""
        ...

    async def get(self, session_id: str) -> Session | None: ...

    async def revoke(self, session_id: str) -> bool: ...

    async def ping(self) -> None: ...


class EventBus(Protocol):
    async def publish(self, *events: Event) -> None:
        """Append ``events`` (one round trip for all); returns once they are stored."""
        ...

    async def ping(self) -> None: ...


class Counters(Protocol):
    """Where the domain counts what operators alert on (codes sent/verified per country, ...)."""

    def add(self, name: str, /, **labels: str) -> None:
        """Count one occurrence of ``name`` with these labels."""
        ...


class CodeSender(Protocol):
    """Delivers codes. AuthService calls ``send`` off the request path and counts the outcome
    (``otp_deliveries``), unless the sender has ``counts_own_deliveries = True``: then ``send``
    only queues the delivery, is awaited in the request, and the sender's worker counts the
    provider's answer and emits ``otp:delivery_failed`` itself (a failed ``send`` is still
    counted and reported by AuthService).
    """

    async def send(self, phone: str, code: str, message: str) -> None:
        """Deliver ``message`` (which holds ``code``) to ``phone``; raise on failure."""
        ...
