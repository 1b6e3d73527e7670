"""The service layer: sign-in by one-time code, sessions, and user administration.

Services take ports as keyword-only arguments, return domain types and raise domain errors.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime, timedelta

import msgspec

from otpcore.domain import events as ev
from otpcore.domain.codes import CodePolicy
from otpcore.domain.errors import (
    AdmissionRefused,
    Forbidden,
    InvalidOtp,
    InvalidToken,
    NotFound,
    OtpExpired,
    RateLimitExceeded,
    TooManyAttempts,
    UserInactive,
    ValidationError,
)
from otpcore.domain.events import Event
from otpcore.domain.model import PhonePolicy, Role, User, UserPage, clean_name
from otpcore.domain.ports import (
    CodeOutcome,
    CodeSender,
    CodeStore,
    Counters,
    EventBus,
    Limit,
    NewSession,
    RateDecision,
    RateLimiter,
    RotationOutcome,
    SessionStore,
    SignIn,
    SignInStore,
    UserRepo,
)
from otpcore.domain.tokens import AccessClaims, TokenService

log = logging.getLogger("otpcore.auth")

SEARCH_LIMIT_MAX = 100
SEARCH_OFFSET_MAX = 1_000_000_000
# Ids are 64-bit signed in every store; larger numbers name no user.
MAX_USER_ID = 2**63 - 1
CODE_INPUT_MAX = 64


class SendResult(msgspec.Struct, frozen=True, kw_only=True):
    phone_number: str
    expires_in: int
    # The per-number send limit after this send; None for test numbers (no limit applies).
    decision: RateDecision | None
    test_number: bool = False


class AuthResult(msgspec.Struct, frozen=True, kw_only=True):
    user: User
    access_token: str
    refresh_token: str
    expires_in: int
    token_type: str = "Bearer"  # noqa: S105 - the scheme name
    created: bool = False


class Principal(msgspec.Struct, frozen=True, kw_only=True):
    """Who a request acts for: the current user record and the token's claims."""

    user: User
    claims: AccessClaims


class StepwiseSignIn:
    """A ``SignInStore`` of two steps: the user from a ``UserRepo``, then the session from a
    ``SessionStore`` (for stores that cannot do both in one)."""

    def __init__(self, *, users: UserRepo, sessions: SessionStore) -> None:
        self.users = users
        self.sessions = sessions

    async def sign_in(self, phone: str, *, name: str, role: Role, session: NewSession) -> SignIn:
        user, created = await self.users.get_or_create(phone, name=name, role=role)
        if not user.is_active:
            return SignIn(user=user, created=created, session=None)
        opened = await self.sessions.create(
            session.id,
            user.id,
            session.token_hash,
            now=session.created_at,
            expires_at=session.expires_at,
        )
        return SignIn(user=user, created=created, session=opened)


class AuthService:
    def __init__(
        self,
        *,
        users: UserRepo,
        codes: CodeStore,
        sessions: SessionStore,
        events: EventBus,
        sender: CodeSender,
        tokens: TokenService,
        phones: PhonePolicy,
        policy: CodePolicy,
        sign_ins: SignInStore | None = None,
        admin_numbers: frozenset[str] = frozenset(),
        clock: Callable[[], float] = time.time,
        counters: Counters | None = None,
        limiter: RateLimiter | None = None,
        country_hourly_limit: int = 0,
    ) -> None:
        self.users = users
        self.sign_ins = sign_ins or StepwiseSignIn(users=users, sessions=sessions)
        self.codes = codes
        self.sessions = sessions
        self.events = events
        self.sender = sender
        self.tokens = tokens
        self.phones = phones
        self.policy = policy
        self.admin_numbers = admin_numbers
        self.clock = clock
        self.counters = counters
        # SMS-pumping defence: at most this many sends per destination country per hour.
        self.limiter = limiter if country_hourly_limit > 0 else None
        self.country_hourly_limit = country_hourly_limit
        self._deliveries: set[asyncio.Task[None]] = set()

    async def send_code(
        self,
        phone_number: str,
        *,
        admission: Sequence[Limit] = (),
        decided: list[RateDecision] | None = None,
    ) -> SendResult:
        """Send a code to ``phone_number``.

        ``admission``: the caller's own limits (per client IP, say), decided with the send limit
        in one step where the code store can (one Redis script), as ``RateLimiter.hit`` decides
        them; if one refuses, AdmissionRefused. A number refused before that step leaves them
        undecided, for the caller to decide. Every decision made is appended to ``decided``.
        """
        decided = [] if decided is None else decided
        test_codes = self.policy.active_test_codes(self.clock())
        phone, country = self.phones.parse(phone_number, test_numbers=test_codes)
        test_code = test_codes.get(phone)
        if test_code is None:
            await self._check_country_budget(phone, country)
        code = test_code or self.policy.generate()
        expires_at = datetime.fromtimestamp(self.clock(), UTC) + timedelta(seconds=self.policy.ttl)
        generated = Event(
            event_type=ev.OTP_GENERATED,
            data={
                "phone_number": phone,
                "country": country,
                "expires_at": expires_at.isoformat(),
                "test_number": test_code is not None,
            },
        )
        # The store writes the event with the code: one round trip where it can.
        send_limit = None if test_code else self.policy.send_limit(phone)
        decisions = await self.codes.issue(
            phone,
            self.policy.digest(phone, code),
            ttl=self.policy.ttl,
            max_attempts=self.policy.max_attempts,
            send_limit=send_limit,
            event=generated,
            admission=admission,
        )
        decided.extend(decisions)
        admitted = decisions[: len(admission)]
        if admitted and not admitted[0].allowed:
            raise AdmissionRefused(admitted[0])
        decision = decisions[len(admission)] if send_limit else None
        if decision is not None and not decision.allowed:
            await self._publish(ev.AUTH_RATE_LIMITED, phone_number=phone, limit="otp")
            raise RateLimitExceeded(
                decision,
                f"too many codes requested for this number. Limit: {decision.limit} "
                f"per {self.policy.send_window}s. Try again in {decision.reset_after}s.",
            )
        self._count("otp_sent", country=country, test_number=str(test_code is not None).lower())
        if test_code is None:
            if getattr(self.sender, "counts_own_deliveries", False):
                # A queueing sender: ``send`` stores a job (awaited, so the response acknowledges
                # a durable delivery); its worker counts and reports what the provider answered.
                await self._deliver(phone, code, country, queued=True)
            else:
                self._deliver_later(phone, code, country)
        return SendResult(
            phone_number=phone,
            expires_in=self.policy.ttl,
            decision=decision,
            test_number=test_code is not None,
        )

    async def _check_country_budget(self, phone: str, country: str) -> None:
        if self.limiter is None:
            return
        budget = Limit(name="otp_country", subject=country, requests=self.country_hourly_limit, window=3600)
        [decision] = await self.limiter.hit([budget])
        if not decision.allowed:
            await self._publish(
                ev.AUTH_RATE_LIMITED, phone_number=phone, limit="otp_country", country=country
            )
            raise RateLimitExceeded(
                decision, f"too many codes sent to this country; try again in {decision.reset_after}s"
            )

    def _count(self, name: str, **labels: str) -> None:
        if self.counters is not None:
            self.counters.add(name, **labels)

    def _deliver_later(self, phone: str, code: str, country: str) -> None:
        # The response does not wait on the provider; failures become events.
        task = asyncio.create_task(self._deliver(phone, code, country))
        self._deliveries.add(task)
        task.add_done_callback(self._deliveries.discard)

    async def _deliver(self, phone: str, code: str, country: str, *, queued: bool = False) -> None:
        try:
            await self.sender.send(phone, code, self.policy.message(code))
            if not queued:
                self._count("otp_deliveries", result="delivered", country=country)
        except Exception as exc:
            log.warning("code delivery to %s failed: %s", phone, type(exc).__name__)
            self._count("otp_deliveries", result="failed", country=country)
            await self.events.publish(
                Event(
                    event_type=ev.OTP_DELIVERY_FAILED,
                    data={"phone_number": phone, "reason": type(exc).__name__},
                )
            )

    async def drain(self) -> None:
        """Wait for deliveries still in flight (on shutdown)."""
        if self._deliveries:
            await asyncio.gather(*self._deliveries, return_exceptions=True)

    async def verify_code(
        self,
        phone_number: str,
        code: str,
        name: str | None = None,
        *,
        admission: Sequence[Limit] = (),
        decided: list[RateDecision] | None = None,
    ) -> AuthResult:
        """Sign in with a code: the user (created on the first success) and a new session.

        ``admission`` and ``decided``: as for ``send_code``, decided with the code check.
        """
        phone, country = self.phones.parse(
            phone_number, test_numbers=self.policy.active_test_codes(self.clock())
        )
        candidate = code.strip() if isinstance(code, str) else ""
        if not candidate or len(candidate) > CODE_INPUT_MAX:
            raise ValidationError(f"otp_code: must be 1 to {CODE_INPUT_MAX} characters")
        display_name = clean_name(name, required=False)
        check = await self.codes.check(
            phone,
            self.policy.digest(phone, candidate),
            failure_budget=self.policy.failure_budget(phone),
            admission=admission,
        )
        if decided is not None:
            decided.extend(check.admission)
        if check.outcome is CodeOutcome.REFUSED:
            raise AdmissionRefused(check.admission[0])
        if check.outcome is not CodeOutcome.ACCEPTED:
            await self._refuse(phone, check.outcome, check.attempts_remaining, check.retry_after)
        role = Role.ADMIN if phone in self.admin_numbers else Role.USER
        now = self.clock()
        refresh = self.tokens.new_refresh_token()
        session = NewSession(
            id=secrets.token_hex(16),
            token_hash=self.tokens.hash_refresh_token(refresh),
            created_at=datetime.fromtimestamp(now, UTC),
            expires_at=datetime.fromtimestamp(now + self.tokens.refresh_ttl, UTC),
        )
        # The user and the session in one step (one statement in Postgres).
        signed = await self.sign_ins.sign_in(phone, name=display_name, role=role, session=session)
        user, created = signed.user, signed.created
        if role is Role.ADMIN and user.role is not Role.ADMIN:
            user = await self.users.update(user.id, role=Role.ADMIN) or user
        if signed.session is None:
            await self._publish(ev.AUTH_FAILED, phone_number=phone, reason="user_inactive")
            raise UserInactive()
        events = [
            Event(
                event_type=ev.OTP_VERIFIED,
                data={"phone_number": phone, "user_id": user.id, "country": country},
            )
        ]
        if created:
            events.append(
                Event(
                    event_type=ev.USER_CREATED,
                    data={"user_id": user.id, "phone_number": phone, "role": user.role.value},
                )
            )
        events.append(
            Event(event_type=ev.USER_AUTHENTICATED, data={"user_id": user.id, "phone_number": phone})
        )
        # All of a sign-in's events in one append, before the response acknowledges it.
        await self.events.publish(*events)
        self._count("otp_verified", country=country)
        return AuthResult(
            user=user,
            access_token=self.tokens.issue_access(user, session.id, int(now)),
            refresh_token=refresh,
            expires_in=self.tokens.access_ttl,
            created=created,
        )

    async def _refuse(self, phone: str, outcome: CodeOutcome, remaining: int, retry_after: int) -> None:
        if outcome is CodeOutcome.MISSING:
            await self._publish(ev.OTP_EXPIRED, phone_number=phone)
            raise OtpExpired()
        await self._publish(ev.AUTH_FAILED, phone_number=phone, reason=outcome.value)
        if outcome is CodeOutcome.WRONG:
            raise InvalidOtp(attempts_remaining=remaining)
        if outcome is CodeOutcome.LOCKED:
            raise TooManyAttempts(
                f"too many failed attempts for this number; try again in {retry_after}s",
                retry_after=retry_after,
            )
        raise TooManyAttempts("too many wrong guesses; this code is burned, request a new one")

    async def refresh(self, refresh_token: str) -> AuthResult:
        now = self.clock()
        new_token = self.tokens.new_refresh_token()
        rotation = await self.sessions.rotate(
            self.tokens.hash_refresh_token(refresh_token),
            self.tokens.hash_refresh_token(new_token),
            now=datetime.fromtimestamp(now, UTC),
            expires_at=datetime.fromtimestamp(now + self.tokens.refresh_ttl, UTC),
        )
        if rotation.outcome is RotationOutcome.REUSED and rotation.session is not None:
            await self._publish(
                ev.SESSION_REVOKED,
                session_id=rotation.session.id,
                user_id=rotation.session.user_id,
                reason="refresh_token_reuse",
            )
            raise InvalidToken("refresh token was already used; the session is revoked")
        if rotation.outcome is not RotationOutcome.ROTATED or rotation.session is None:
            raise InvalidToken("invalid or expired refresh token")
        session = rotation.session
        user = await self.users.get(session.user_id)
        if user is None or not user.is_active:
            await self.sessions.revoke(session.id)
            raise UserInactive()
        return AuthResult(
            user=user,
            access_token=self.tokens.issue_access(user, session.id, int(now)),
            refresh_token=new_token,
            expires_in=self.tokens.access_ttl,
        )

    async def authenticate(self, access_token: str) -> Principal:
        """The principal of a bearer token: valid signature and claims, live session, active user."""
        claims = self.tokens.decode_access(access_token)
        session = await self.sessions.get(claims.sid)
        if (
            session is None
            or session.revoked
            or session.user_id != claims.user_id
            or session.expires_at.timestamp() <= self.clock()
        ):
            raise InvalidToken("the session of this token is revoked or expired")
        user = await self.users.get(claims.user_id)
        if user is None:
            raise InvalidToken()
        if not user.is_active:
            raise UserInactive()
        return Principal(user=user, claims=claims)

    async def logout(self, principal: Principal, refresh_token: str | None = None) -> None:
        revoked = [principal.claims.sid]
        if refresh_token:
            other = await self.sessions.find(self.tokens.hash_refresh_token(refresh_token))
            if other is not None and other.user_id == principal.user.id and other.id not in revoked:
                revoked.append(other.id)
        for session_id in revoked:
            if await self.sessions.revoke(session_id):
                await self._publish(
                    ev.SESSION_REVOKED,
                    session_id=session_id,
                    user_id=principal.user.id,
                    reason="logout",
                )

    async def _publish(self, event_type: str, **data: object) -> None:
        await self.events.publish(Event(event_type=event_type, data=data))


class UserService:
    def __init__(self, *, users: UserRepo, events: EventBus, phones: PhonePolicy) -> None:
        self.users = users
        self.events = events
        self.phones = phones

    async def get(self, user_id: int) -> User:
        user = await self.users.get(user_id) if 0 < user_id <= MAX_USER_ID else None
        if user is None:
            raise NotFound("no such user")
        return user

    async def rename(self, user_id: int, name: str) -> User:
        return await self._update(user_id, name=clean_name(name, required=True))

    async def administer(
        self,
        acting: User,
        user_id: int,
        *,
        role: Role | None = None,
        is_active: bool | None = None,
        name: str | None = None,
    ) -> User:
        if acting.role is not Role.ADMIN:
            raise Forbidden("admin role required")
        return await self._update(
            user_id,
            role=role,
            is_active=is_active,
            name=None if name is None else clean_name(name, required=True),
        )

    async def search(
        self,
        acting: User,
        query: str = "",
        *,
        offset: int = 0,
        limit: int = 10,
        after_id: int | None = None,
    ) -> UserPage:
        if acting.role is not Role.ADMIN:
            raise Forbidden("admin role required")
        if not 0 <= offset <= SEARCH_OFFSET_MAX:
            raise ValidationError(f"offset: must be between 0 and {SEARCH_OFFSET_MAX}")
        if not 1 <= limit <= SEARCH_LIMIT_MAX:
            raise ValidationError(f"limit: must be between 1 and {SEARCH_LIMIT_MAX}")
        if after_id is not None and not 0 <= after_id <= MAX_USER_ID:
            raise ValidationError("after_id: must be a user id or 0")
        query = query.strip()
        if len(query) > 100:
            raise ValidationError("query: must be at most 100 characters")
        users, total = await self.users.search(query, offset=offset, limit=limit, after_id=after_id)
        next_after_id = users[-1].id if len(users) == limit else None
        return UserPage(users=users, total=total, offset=offset, limit=limit, next_after_id=next_after_id)

    async def set_role(self, phone_number: str, role: Role) -> User:
        """Grant a role by phone number (the CLI); creates the user if it never signed in."""
        phone = self.phones.normalize(phone_number)
        user, _ = await self.users.get_or_create(phone, name="", role=role)
        if user.role is role:
            return user
        return await self._update(user.id, role=role)

    async def _update(self, user_id: int, **changes: object) -> User:
        if not 0 < user_id <= MAX_USER_ID:
            raise NotFound("no such user")
        user = await self.users.update(user_id, **changes)  # type: ignore[arg-type]
        if user is None:
            raise NotFound("no such user")
        fields = sorted(k for k, v in changes.items() if v is not None)
        await self.events.publish(
            Event(event_type=ev.USER_UPDATED, data={"user_id": user.id, "fields": fields})
        )
        return user
