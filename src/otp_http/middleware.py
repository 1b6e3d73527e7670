"""The outer ASGI layer: client IP, request id, per-IP rate limits and their headers.

It wraps the whole Litestar app (not app-level middleware) so that every response, router
404/405s included, carries the request id and the rate-limit headers.
"""

from __future__ import annotations

import contextlib
import ipaddress
import re
import uuid
from collections.abc import Iterable

import msgspec
from litestar.datastructures import MutableScopeHeaders
from litestar.types import ASGIApp, HTTPResponseStartEvent, Message, Receive, Scope, Send

from otp_http.logs import request_id_var
from otpcore.domain.errors import ServiceUnavailable
from otpcore.domain.events import AUTH_RATE_LIMITED, Event
from otpcore.domain.ports import EventBus, Limit, RateDecision, RateLimiter
from otpcore.settings import Settings

# Handlers append decisions (e.g. send-otp's per-number limit) here, in scope["state"].
DECISIONS = "rate_decisions"
CLIENT_IP = "client_ip"
# The name of the limit that refused the request, for the rate_limit_exceeded metric.
RATE_LIMITED = "rate_limited"
_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")
_UNLIMITED_PREFIXES = ("/health",)
# Path prefix -> the per-IP limit (RATE_LIMIT_<NAME>_*) applied on top of the global one.
_PATH_LIMITS = (("/api/v1/auth/", "auth"), ("/api/v1/users/", "user"))


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
    def __init__(
        self,
        app: ASGIApp,
        *,
        limiter: RateLimiter,
        events: EventBus,
        settings: Settings,
        metrics_path: str,
    ) -> None:
        self.app = app
        self.limiter = limiter
        self.events = events
        self.settings = settings
        self.client_ip = ClientIp(settings.trusted_proxy_networks)
        self.exempt = (*_UNLIMITED_PREFIXES, metrics_path)

    def limits_for(self, path: str, ip: str) -> list[Limit]:
        """The per-IP limits of a path: global for all, plus auth or user by prefix."""
        if path.startswith(self.exempt):
            return []
        names = ["global"] + [name for prefix, name in _PATH_LIMITS if path.startswith(prefix)]
        return [
            Limit(
                name=name,
                subject=ip,
                requests=getattr(self.settings, f"rate_limit_{name}_requests"),
                window=getattr(self.settings, f"rate_limit_{name}_duration"),
            )
            for name in names
        ]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = _incoming_request_id(scope) or uuid.uuid4().hex
        token = request_id_var.set(request_id)
        state = scope.setdefault("state", {})
        ip = self.client_ip(scope)
        state[CLIENT_IP] = ip
        decisions: list[RateDecision] = state.setdefault(DECISIONS, [])

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = MutableScopeHeaders.from_message(message)
                headers["X-Request-ID"] = request_id
                _rate_headers(headers, decisions)
            await send(message)

        try:
            limits = self.limits_for(scope["path"], ip)
            if limits:
                try:
                    decisions.extend(await self.limiter.hit(limits))
                except ServiceUnavailable:
                    await _reply(send_with_headers, 503, "service_unavailable", "rate limiter unavailable")
                    return
                if not decisions[-1].allowed:
                    full = _shown(decisions)
                    state[RATE_LIMITED] = full.name
                    if full.name == "auth":
                        await self._publish_rate_limited(ip, full)
                    await _reply(
                        send_with_headers,
                        429,
                        "rate_limit_exceeded",
                        f"too many requests. Limit: {full.limit} per {full.name} window. "
                        f"Try again in {full.reset_after}s.",
                    )
                    return
            await self.app(scope, receive, send_with_headers)
        finally:
            request_id_var.reset(token)

    async def _publish_rate_limited(self, ip: str, decision: RateDecision) -> None:
        event = Event(event_type=AUTH_RATE_LIMITED, data={"client_ip": ip, "limit": decision.name})
        with contextlib.suppress(ServiceUnavailable):
            # The 429 stands even if the event cannot be written.
            await self.events.publish(event)


def _incoming_request_id(scope: Scope) -> str | None:
    for name, value in scope.get("headers", ()):
        if name == b"x-request-id":
            text = value.decode("latin-1")
            return text if _REQUEST_ID.fullmatch(text) else None
    return None


def _shown(decisions: list[RateDecision]) -> RateDecision:
    """The limit the headers describe: a refusing one if any, else the fewest remaining."""
    refused = [d for d in decisions if not d.allowed]
    return min(refused or decisions, key=lambda d: (d.remaining, -d.reset_after))


def _rate_headers(headers: MutableScopeHeaders, decisions: list[RateDecision]) -> None:
    if not decisions:
        return
    shown = _shown(decisions)
    refused = not shown.allowed
    headers["X-RateLimit-Limit"] = str(shown.limit)
    headers["X-RateLimit-Remaining"] = str(0 if refused else shown.remaining)
    headers["X-RateLimit-Reset"] = str(shown.reset_after)
    if refused:
        headers["Retry-After"] = str(max(1, shown.reset_after))
        headers["X-RateLimit-Exceeded"] = "true"


_encode = msgspec.json.encode


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
