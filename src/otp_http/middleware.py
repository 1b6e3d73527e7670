"""The outer ASGI layer: client IP, request id, CORS, per-IP rate limits and their headers, and
the HTTP metrics of every response.

It wraps the whole Litestar app (not app-level middleware) so that every response, router
404/405s included, carries the request id and the rate-limit headers and is counted. It is one
layer with one wrapped ``send`` because each layer costs every request a call and a closure.
"""

from __future__ import annotations

import contextlib
import ipaddress
import re
import time
from collections.abc import Awaitable, Callable, Iterable
from typing import TYPE_CHECKING, NamedTuple, cast

import msgspec
from litestar.types import ASGIApp, HTTPResponseStartEvent, HTTPScope, Message, Receive, Scope, Send

from otp_http.errors import log_internal_error
from otp_http.logs import request_id_var
from otp_http.metrics import record_response
from otpcore.domain.errors import ServiceUnavailable
from otpcore.domain.events import AUTH_RATE_LIMITED, Event
from otpcore.domain.ids import unique_id
from otpcore.domain.ports import EventBus, Limit, RateDecision, RateLimiter
from otpcore.settings import Settings
from otpcore.telemetry import Telemetry

if TYPE_CHECKING:
    from otp_http.fastlane import FastLane

# Handlers append decisions (e.g. send-otp's per-number limit) here, in scope["state"].
DECISIONS = "rate_decisions"
CLIENT_IP = "client_ip"
# Per-IP limits a fast-lane handler decides in its own step, with how to answer them.
ADMISSION = "admission"
# The name of the limit that refused the request, for the rate_limit_exceeded metric.
RATE_LIMITED = "rate_limited"
# An edge refusal (status, error code, message), for the app that answers it through CORS.
_REFUSAL = "edge_refusal"
_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")
_UNLIMITED_PREFIXES = ("/health",)
# Path prefix -> the per-IP limit (RATE_LIMIT_<NAME>_*) applied on top of the global one.
_PATH_LIMITS = (("/api/v1/auth/", "auth"), ("/api/v1/users/", "user"))


class Admission(NamedTuple):
    limits: list[Limit]
    # Decide them apart, as the edge does (for a request refused before the handler's step);
    # False once the refusal has been sent.
    admit: Callable[[], Awaitable[bool]]
    # Send the 429 of a refusal already decided (its decisions are in the state).
    refuse: Callable[[], Awaitable[None]]


class ClientIp:
    """The socket peer, or the first untrusted hop of X-Forwarded-For behind trusted proxies."""

    def __init__(self, trusted: Iterable[str]) -> None:
        self.trusted = [ipaddress.ip_network(net, strict=False) for net in trusted]

    def _is_trusted(self, address: str) -> bool:
        try:
            ip = ipaddress.ip_address(address)
        except ValueError:
            return False
        return any(ip in net for net in self.trusted)

    def __call__(self, scope: Scope) -> str:
        client = scope.get("client")
        peer = client[0] if client else "unknown"
        if not self.trusted or not self._is_trusted(peer):
            return peer
        forwarded = [
            value.decode("latin-1") for name, value in scope.get("headers", ()) if name == b"x-forwarded-for"
        ]
        hops = [h.strip() for h in ",".join(forwarded).split(",") if h.strip()]
        for hop in reversed(hops):
            if not self._is_trusted(hop):
                return hop if _is_ip(hop) else peer
        return hops[0] if hops and _is_ip(hops[0]) else peer


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


class EdgeMiddleware:
    """``cors`` wraps an app in CORS handling. The wrapped ``app`` is called instead of ``app``
    when the request carries an Origin header (CORS has nothing to do without one, so other
    requests skip it), and the edge's own refusals of such requests go through it too."""

    def __init__(
        self,
        app: ASGIApp,
        *,
        cors: Callable[[ASGIApp], ASGIApp],
        limiter: RateLimiter,
        events: EventBus,
        settings: Settings,
        metrics_path: str,
        telemetry: Telemetry,
        fast_lane: FastLane | None = None,
    ) -> None:
        self.app = app
        self.cors = cors(app)
        self.cors_refusal = cors(_send_refusal)
        self.fast_lane = fast_lane
        self.limiter = limiter
        self.events = events
        self.telemetry = telemetry
        self.client_ip = ClientIp(settings.trusted_proxy_networks)
        self.exempt = (*_UNLIMITED_PREFIXES, metrics_path)
        # (name, requests, window) of each per-IP limit, read from the settings once.
        self.global_limit = _limit_of(settings, "global")
        self.path_limits = tuple((prefix, _limit_of(settings, name)) for prefix, name in _PATH_LIMITS)

    def limits_for(self, path: str, ip: str) -> list[Limit]:
        """The per-IP limits of a path: global for all, plus auth or user by prefix."""
        if path.startswith(self.exempt):
            return []
        found = [self.global_limit, *(limit for prefix, limit in self.path_limits if path.startswith(prefix))]
        return [
            Limit(name=name, subject=ip, requests=requests, window=window) for name, requests, window in found
        ]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        incoming_id, has_origin = _read_headers(scope)
        request_id = incoming_id or unique_id()
        token = request_id_var.set(request_id)
        state = scope.setdefault("state", {})
        ip = self.client_ip(scope)
        state[CLIENT_IP] = ip
        decisions: list[RateDecision] = state.setdefault(DECISIONS, [])
        status = 500

        async def send_with_headers(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                _set_headers(message, _edge_headers(request_id, decisions))
            await send(message)

        try:
            fast = None
            if not has_origin and self.fast_lane is not None:
                fast = self.fast_lane.route(cast("HTTPScope", scope))
            limits = self.limits_for(scope["path"], ip)
            if limits and fast is not None and self.fast_lane and self.fast_lane.admits(scope):
                # The handler decides them in its own step (send-otp, verify-otp: in the code
                # store's script).
                state[ADMISSION] = Admission(
                    limits,
                    admit=lambda: self._admit(scope, receive, limits, send_with_headers),
                    refuse=lambda: self._refuse(scope, receive, send_with_headers),
                )
            elif limits and not await self._admit(scope, receive, limits, send_with_headers):
                return
            if has_origin:
                await self.cors(scope, receive, send_with_headers)
            else:
                await (fast or self.app)(scope, receive, send_with_headers)
        finally:
            # The Admission's callbacks hold the scope that holds them: without this the
            # request's objects would wait for the cycle collector, whose passes then cost
            # tens of microseconds per request.
            state.pop(ADMISSION, None)
            request_id_var.reset(token)
            elapsed = time.perf_counter() - started
            record_response(
                self.telemetry,
                cast("HTTPScope", scope)["method"],
                scope.get("path_template"),
                status,
                elapsed,
                state.get(RATE_LIMITED),
            )

    async def _admit(self, scope: Scope, receive: Receive, limits: list[Limit], send: Send) -> bool:
        """Decide the per-IP limits; False once the refusal (429, 503, 500) has been sent."""
        state = scope["state"]
        try:
            state[DECISIONS].extend(await self.limiter.hit(limits))
        except ServiceUnavailable:
            await self._deny(scope, receive, send, (503, "service_unavailable", "rate limiter unavailable"))
            return False
        except Exception as exc:  # a reply no one foresaw: still the JSON error body
            log_internal_error(cast("HTTPScope", scope)["method"], scope["path"], exc)
            await self._deny(scope, receive, send, (500, "internal_error", "internal server error"))
            return False
        if not state[DECISIONS][-1].allowed:
            await self._refuse(scope, receive, send)
            return False
        return True

    async def _refuse(self, scope: Scope, receive: Receive, send: Send) -> None:
        """The 429 of a per-IP limit, described by the decisions made."""
        state = scope["state"]
        full = _shown(state[DECISIONS])
        state[RATE_LIMITED] = full.name
        if full.name == "auth":
            await self._publish_rate_limited(state[CLIENT_IP], full)
        message = (
            f"too many requests. Limit: {full.limit} per {full.name} window. "
            f"Try again in {full.reset_after}s."
        )
        await self._deny(scope, receive, send, (429, "rate_limit_exceeded", message))

    async def _deny(self, scope: Scope, receive: Receive, send: Send, refusal: tuple[int, str, str]) -> None:
        """Send an edge refusal; a cross-origin request's goes through CORS, so that a browser
        lets the page read it. A preflight's does not: CORS would answer the preflight itself."""
        if cast("HTTPScope", scope)["method"] != "OPTIONS" and _read_headers(scope)[1]:
            scope["state"][_REFUSAL] = refusal
            await self.cors_refusal(scope, receive, send)
        else:
            await _reply(send, *refusal)

    async def _publish_rate_limited(self, ip: str, decision: RateDecision) -> None:
        event = Event(event_type=AUTH_RATE_LIMITED, data={"client_ip": ip, "limit": decision.name})
        with contextlib.suppress(ServiceUnavailable):
            # The 429 stands even if the event cannot be written.
            await self.events.publish(event)


def _limit_of(settings: Settings, name: str) -> tuple[str, int, int]:
    return (
        name,
        getattr(settings, f"rate_limit_{name}_requests"),
        getattr(settings, f"rate_limit_{name}_duration"),
    )


def _read_headers(scope: Scope) -> tuple[str | None, bool]:
    """The incoming request id if it is safe to echo, and whether an Origin header came (one pass)."""
    request_id: str | None = None
    seen_id = has_origin = False
    for name, value in scope["headers"]:
        if name == b"x-request-id" and not seen_id:
            # Only the first one counts: an unsafe first id is replaced, not a later one taken.
            seen_id = True
            text = value.decode("latin-1")
            request_id = text if _REQUEST_ID.fullmatch(text) else None
        elif name == b"origin":
            has_origin = True
    return request_id, has_origin


def _shown(decisions: list[RateDecision]) -> RateDecision:
    """The limit the headers describe: a refusing one if any, else the fewest remaining."""
    refused = [d for d in decisions if not d.allowed]
    return min(refused or decisions, key=lambda d: (d.remaining, -d.reset_after))


def _edge_headers(request_id: str, decisions: list[RateDecision]) -> list[tuple[bytes, bytes]]:
    """X-Request-ID, and the rate-limit headers when limits were decided."""
    headers = [(b"x-request-id", request_id.encode("latin-1"))]
    if not decisions:
        return headers
    shown = _shown(decisions)
    refused = not shown.allowed
    headers += [
        (b"x-ratelimit-limit", b"%d" % shown.limit),
        (b"x-ratelimit-remaining", b"%d" % (0 if refused else shown.remaining)),
        (b"x-ratelimit-reset", b"%d" % shown.reset_after),
    ]
    if refused:
        headers += [(b"retry-after", b"%d" % max(1, shown.reset_after)), (b"x-ratelimit-exceeded", b"true")]
    return headers


def _set_headers(message: HTTPResponseStartEvent, headers: list[tuple[bytes, bytes]]) -> None:
    """Put ``headers`` on a response, replacing any the app set under the same names."""
    names = {name for name, _ in headers}
    kept = [header for header in message.get("headers", ()) if header[0].lower() not in names]
    message["headers"] = kept + headers


_encode = msgspec.json.encode


async def _send_refusal(scope: Scope, receive: Receive, send: Send) -> None:
    await _reply(send, *scope["state"][_REFUSAL])


async def _reply(send: Send, status: int, code: str, message: str) -> None:
    body = _encode({"error": code, "message": message})
    start: HTTPResponseStartEvent = {
        "type": "http.response.start",
        "status": status,
        "headers": [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
        ],
    }
    await send(start)
    await send({"type": "http.response.body", "body": body, "more_body": False})
