"""In-process adapters for every port: the embedded default and the tests' first-class fakes.

Each decision runs without an ``await`` between its check and its write, so on one event loop
it is atomic, exactly as the Redis scripts are across processes.
"""

from __future__ import annotations

import hmac
import math
import time
from collections import deque
from collections.abc import Callable, Sequence
from datetime import UTC, datetime

import msgspec

from otpcore.domain.events import Event
from otpcore.domain.model import Role, User
from otpcore.domain.ports import (
    CodeCheck,
    CodeOutcome,
    Limit,
    RateDecision,
    Rotation,
    RotationOutcome,
    Session,
)

Clock = Callable[[], float]


class SlidingLog:
    """Exact sliding windows: the times of accepted requests, per key."""

    SWEEP_EVERY = 4096

    def __init__(self, clock: Clock) -> None:
        self.clock = clock
        self._hits: dict[str, tuple[deque[float], float]] = {}
        self._calls = 0

    def _live(self, limit: Limit, now: float) -> deque[float]:
        hits = self._hits.setdefault(limit.key, (deque(), limit.window))[0]
        while hits and hits[0] <= now - limit.window:
            hits.popleft()
        return hits

    def decide(self, limits: Sequence[Limit], *, record: bool = True) -> list[RateDecision]:
        now = self.clock()
        self._sweep(now)
        logs = [self._live(limit, now) for limit in limits]
        allowed = all(len(log) < limit.requests for log, limit in zip(logs, limits, strict=True))
        if allowed and record:
            for log in logs:
                log.append(now)
        return [self._decision(limit, log, now, allowed) for limit, log in zip(limits, logs, strict=True)]

    @staticmethod
    def _decision(limit: Limit, log: deque[float], now: float, allowed: bool) -> RateDecision:
        reset = math.ceil(log[0] + limit.window - now) if log else 0
        return RateDecision(
            allowed=allowed,
            limit=limit.requests,
            remaining=max(0, limit.requests - len(log)),
            reset_after=max(reset, 0),
            name=limit.name,
        )

    def _sweep(self, now: float) -> None:
        # Keys of one-off callers would otherwise pile up for the life of the process.
        self._calls += 1
        if self._calls % self.SWEEP_EVERY:
            return
        stale = [k for k, (log, window) in self._hits.items() if not log or log[-1] <= now - window]
        for key in stale:
            del self._hits[key]


class MemoryRateLimiter:
    def __init__(self, clock: Clock = time.time) -> None:
        self.log = SlidingLog(clock)

    async def hit(self, limits: Sequence[Limit]) -> list[RateDecision]:
        return self.log.decide(limits)

    async def ping(self) -> None:
        return None


class _Code(msgspec.Struct):
    digest: bytes
    expires_at: float
    attempts_left: int


class MemoryCodeStore:
    SWEEP_AT = 10_000

    def __init__(
        self,
        clock: Clock = time.time,
        *,
        events: MemoryEventBus | None = None,
        limiter: MemoryRateLimiter | None = None,
    ) -> None:
        self.clock = clock
        self.events = events
        # Admission limits are the limiter's: decided on its log, they count as its hits do.
        self.limiter = limiter
        self.log = SlidingLog(clock)
        self._codes: dict[str, _Code] = {}
        self._sweep_at = self.SWEEP_AT

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
        if event is not None and self.events is None:
            raise ValueError("this code store has no event bus to publish the send's event to")
        decisions = self._admit(admission)
        if decisions and not decisions[0].allowed:
            return decisions
        decision = self.log.decide([send_limit])[0] if send_limit else None
        if decision is not None:
            decisions.append(decision)
        if decision is None or decision.allowed:
            now = self.clock()
            if len(self._codes) >= self._sweep_at:
                self._codes = {p: c for p, c in self._codes.items() if c.expires_at > now}
                self._sweep_at = max(self.SWEEP_AT, 2 * len(self._codes))
            self._codes[phone] = _Code(digest, now + ttl, max_attempts)
            if event is not None and self.events is not None:
                self.events.events.append(event)
        return decisions

    async def check(
        self, phone: str, digest: bytes, *, failure_budget: Limit, admission: Sequence[Limit] = ()
    ) -> CodeCheck:
        decisions = self._admit(admission)
        if decisions and not decisions[0].allowed:
            return CodeCheck(outcome=CodeOutcome.REFUSED, admission=decisions)
        return msgspec.structs.replace(self._check(phone, digest, failure_budget), admission=decisions)

    def _admit(self, admission: Sequence[Limit]) -> list[RateDecision]:
        """The caller's limits, decided on the limiter's log."""
        if not admission:
            return []
        if self.limiter is None:
            raise ValueError("this code store has no rate limiter to admit with")
        return self.limiter.log.decide(admission)

    def _check(self, phone: str, digest: bytes, failure_budget: Limit) -> CodeCheck:
        budget = self.log.decide([failure_budget], record=False)[0]
        if not budget.allowed:
            return CodeCheck(outcome=CodeOutcome.LOCKED, retry_after=budget.reset_after)
        code = self._codes.get(phone)
        if code is None or code.expires_at <= self.clock():
            self._codes.pop(phone, None)
            return CodeCheck(outcome=CodeOutcome.MISSING)
        if code.attempts_left <= 0:
            return CodeCheck(outcome=CodeOutcome.BURNED)
        if hmac.compare_digest(code.digest, digest):
            del self._codes[phone]
            return CodeCheck(outcome=CodeOutcome.ACCEPTED)
        code.attempts_left -= 1
        budget = self.log.decide([failure_budget])[0]
        if budget.remaining == 0:
            return CodeCheck(outcome=CodeOutcome.LOCKED, retry_after=budget.reset_after)
        if code.attempts_left == 0:
            return CodeCheck(outcome=CodeOutcome.BURNED)
        # What is left is whichever runs out first: this code's attempts or the number's budget.
        remaining = min(code.attempts_left, budget.remaining)
        return CodeCheck(outcome=CodeOutcome.WRONG, attempts_remaining=remaining)

    async def ping(self) -> None:
        return None


class MemoryUserRepo:
    def __init__(self, clock: Clock = time.time) -> None:
        self.clock = clock
        self._by_id: dict[int, User] = {}
        self._by_phone: dict[str, int] = {}

    def _now(self) -> datetime:
        return datetime.fromtimestamp(self.clock(), UTC)

    async def get(self, user_id: int) -> User | None:
        return self._by_id.get(user_id)

    async def get_by_phone(self, phone: str) -> User | None:
        user_id = self._by_phone.get(phone)
        return None if user_id is None else self._by_id[user_id]

    async def get_or_create(self, phone: str, *, name: str, role: Role) -> tuple[User, bool]:
        existing = await self.get_by_phone(phone)
        if existing is not None:
            return existing, False
        now = self._now()
        user = User(
            id=len(self._by_id) + 1,
            phone_number=phone,
            name=name,
            role=role,
            is_active=True,
            created_at=now,
            updated_at=now,
        )
        self._by_id[user.id] = user
        self._by_phone[phone] = user.id
        return user, True

    async def update(
        self,
        user_id: int,
        *,
        name: str | None = None,
        role: Role | None = None,
        is_active: bool | None = None,
    ) -> User | None:
        user = self._by_id.get(user_id)
        if user is None:
            return None
        changes = {"name": name, "role": role, "is_active": is_active}
        user = msgspec.structs.replace(
            user, updated_at=self._now(), **{k: v for k, v in changes.items() if v is not None}
        )
        self._by_id[user_id] = user
        return user

    async def search(
        self, query: str, *, offset: int, limit: int, after_id: int | None
    ) -> tuple[list[User], int]:
        folded = query.casefold()
        matches = [
            u
            for u in self._by_id.values()  # ids are issued in order, so this is ordered by id
            if folded in u.name.casefold() or query in u.phone_number
        ]
        start = [u for u in matches if after_id is None or u.id > after_id]
        return start[offset : offset + limit], len(matches)

    async def ping(self) -> None:
        return None


class MemorySessionStore:
    def __init__(self) -> None:
        self._sessions: dict[str, Session] = {}
        # token hash -> (session id, is the session's current token)
        self._tokens: dict[bytes, tuple[str, bool]] = {}

    async def create(
        self,
        session_id: str,
        user_id: int,
        token_hash: bytes,
        *,
        now: datetime,
        expires_at: datetime,
    ) -> Session:
        session = Session(id=session_id, user_id=user_id, created_at=now, expires_at=expires_at)
        self._sessions[session_id] = session
        self._tokens[token_hash] = (session_id, True)
        return session

    async def rotate(
        self, token_hash: bytes, new_hash: bytes, *, now: datetime, expires_at: datetime
    ) -> Rotation:
        entry = self._tokens.get(token_hash)
        if entry is None:
            return Rotation(outcome=RotationOutcome.INVALID)
        session_id, current = entry
        session = self._sessions[session_id]
        if session.revoked or session.expires_at <= now:
            return Rotation(outcome=RotationOutcome.INVALID)
        if not current:
            session = self._revoke(session_id)
            return Rotation(outcome=RotationOutcome.REUSED, session=session)
        self._tokens[token_hash] = (session_id, False)
        self._tokens[new_hash] = (session_id, True)
        session = msgspec.structs.replace(session, expires_at=expires_at)
        self._sessions[session_id] = session
        return Rotation(outcome=RotationOutcome.ROTATED, session=session)

    async def find(self, token_hash: bytes) -> Session | None:
        entry = self._tokens.get(token_hash)
        return None if entry is None else self._sessions.get(entry[0])

    async def get(self, session_id: str) -> Session | None:
        return self._sessions.get(session_id)

    async def revoke(self, session_id: str) -> bool:
        session = self._sessions.get(session_id)
        if session is None or session.revoked:
            return False
        self._revoke(session_id)
        return True

    def _revoke(self, session_id: str) -> Session:
        session = msgspec.structs.replace(self._sessions[session_id], revoked=True)
        self._sessions[session_id] = session
        return session

    async def ping(self) -> None:
        return None


class MemoryEventBus:
    """Keeps the latest events (bounded) for readers in the same process."""

    def __init__(self, max_events: int = 10_000) -> None:
        self.events: deque[Event] = deque(maxlen=max_events)

    async def publish(self, *events: Event) -> None:
        self.events.extend(events)

    async def ping(self) -> None:
        return None


class MemoryCodeSender:
    """Keeps what it was asked to send, so an embedding service's tests can read codes back."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, str, str]] = []

    async def send(self, phone: str, code: str, message: str) -> None:
        self.sent.append((phone, code, message))

    def last_code(self, phone: str) -> str:
        return next(code for to, code, _ in reversed(self.sent) if to == phone)


class MemoryCounters:
    """Counts by name and labels in a dict; the default when no telemetry is wired."""

    def __init__(self) -> None:
        self.counts: dict[tuple[str, tuple[tuple[str, str], ...]], int] = {}

    def add(self, name: str, /, **labels: str) -> None:
        key = (name, tuple(sorted(labels.items())))
        self.counts[key] = self.counts.get(key, 0) + 1

    def total(self, name: str, **labels: str) -> int:
        """The sum over every series of ``name`` whose labels include ``labels``."""
        wanted = set(labels.items())
        return sum(
            n for (metric, series), n in self.counts.items() if metric == name and wanted <= set(series)
        )
