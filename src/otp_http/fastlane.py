"""The three routes every sign-in and every app start take, answered without Litestar's pipeline.

send-otp, verify-otp and GET profile are most of the traffic. Through Litestar each pays about
150-250 µs of framework work here (handler copies for guards, signature models, dependency
resolution, response objects) for what is one decode, one service call and one encode. On the
paths below, EdgeMiddleware hands requests without an Origin header to ``FastLane`` instead; it
calls the same service code (``send_otp`` is the controller's own function), encodes the same
msgspec structs and maps failures through the same table (errors.py). Whatever it does not
decode cleanly -- bad JSON, a wrong type, an oversized or interrupted body -- it gives to
Litestar with the body replayed, so every error answer is Litestar's own. The controllers stay
the routes' definition (OpenAPI, CORS requests, and the fallback); tests compare both paths.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import msgspec
from litestar.types import ASGIApp, HTTPResponseStartEvent, HTTPScope, Receive, ReceiveMessage, Scope, Send

from otp_http.controllers.auth import send_otp
from otp_http.errors import error_headers, log_internal_error, status_of
from otp_http.guards import bearer_token
from otp_http.middleware import ADMISSION, DECISIONS, Admission
from otp_http.schemas import ErrorBody, SendOtpRequest, TokenResponse, UserOut, VerifyOtpRequest
from otpcore import Core
from otpcore.domain.errors import AdmissionRefused, OtpError
from otpcore.domain.ports import Limit

SEND_OTP = "/api/v1/auth/send-otp"
VERIFY_OTP = "/api/v1/auth/verify-otp"
PROFILE = "/api/v1/users/profile"

Handler = Callable[[Scope, Receive, Send], Awaitable[None]]


# Litestar decodes a whole body before it converts it, refusing bad JSON even in a field it then
# ignores; a typed decoder skips unknown fields unread. Bodies with one go to Litestar instead.
class _SendOtpExactly(SendOtpRequest, forbid_unknown_fields=True):
    pass


class _VerifyOtpExactly(VerifyOtpRequest, forbid_unknown_fields=True):
    pass


_JSON = (b"content-type", b"application/json")


class FastLane:
    def __init__(self, core: Core, fallback: ASGIApp, *, max_body: int) -> None:
        self.core = core
        self.fallback = fallback
        self.max_body = max_body
        self._send_otp = msgspec.json.Decoder(_SendOtpExactly)
        self._verify_otp = msgspec.json.Decoder(_VerifyOtpExactly)
        self.routes: dict[tuple[str, str], Handler] = {
            ("POST", SEND_OTP): self.send_otp,
            ("POST", VERIFY_OTP): self.verify_otp,
            ("GET", PROFILE): self.profile,
        }

    def route(self, scope: HTTPScope) -> Handler | None:
        """The handler of this request's route, if the lane has one; it sets the route template
        (each path here is its own) for the metrics, as Litestar's router does."""
        handler = self.routes.get((scope["method"], scope["path"]))
        if handler is not None:
            scope["path_template"] = scope["path"]
        return handler

    def admits(self, scope: Scope) -> bool:
        """Whether this request's handler decides the per-IP limits itself: send-otp and
        verify-otp do, in the code store's own script (see ``AuthService.send_code``)."""
        return scope["path"] in (SEND_OTP, VERIFY_OTP)

    async def send_otp(self, scope: Scope, receive: Receive, send: Send) -> None:
        state = scope["state"]
        admission: Admission | None = state.get(ADMISSION)
        data = await self._decode(self._send_otp, scope, receive, send, admission)
        if data is not None:
            await _admitted(scope, send, admission, lambda limits: send_otp(self.core, state, data, limits))

    async def verify_otp(self, scope: Scope, receive: Receive, send: Send) -> None:
        state = scope["state"]
        admission: Admission | None = state.get(ADMISSION)
        data = await self._decode(self._verify_otp, scope, receive, send, admission)
        if data is not None:
            await _admitted(scope, send, admission, lambda limits: self._sign_in(state, data, limits))

    async def _sign_in(
        self, state: dict[str, Any], data: VerifyOtpRequest, admission: Sequence[Limit]
    ) -> TokenResponse:
        result = await self.core.auth.verify_code(
            data.phone_number,
            data.otp_code,
            name=data.name,
            admission=admission,
            decided=state[DECISIONS],
        )
        return TokenResponse.of(result)

    async def profile(self, scope: Scope, receive: Receive, send: Send) -> None:
        authorization = next(
            (value.decode("latin-1") for name, value in scope["headers"] if name == b"authorization"), ""
        )
        await _answer(scope, send, lambda: self._profile_of(authorization))

    async def _profile_of(self, authorization: str) -> UserOut:
        principal = await self.core.auth.authenticate(bearer_token(authorization))
        return UserOut.of(principal.user)

    async def _decode(
        self,
        decoder: msgspec.json.Decoder[Any],
        scope: Scope,
        receive: Receive,
        send: Send,
        admission: Admission | None = None,
    ) -> Any:
        """The body decoded, or None once Litestar (or a per-IP refusal) has answered a body it
        could not be; ``admission``: per-IP limits to decide before Litestar sees it."""
        if not self._fits(scope):
            if admission is None or await admission.admit():
                await self.fallback(scope, receive, send)  # Litestar refuses it before reading
            return None
        messages: list[ReceiveMessage] = []
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            messages.append(message)
            if message["type"] != "http.request":
                break  # the client left: Litestar says what that is
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body:
                break
            chunks.append(chunk)
            if not message.get("more_body", False):
                try:
                    return decoder.decode(b"".join(chunks))
                except Exception:  # any failure: Litestar decodes it again and answers
                    break
        if admission is None or await admission.admit():
            await self.fallback(scope, _replay(messages, receive), send)
        return None

    def _fits(self, scope: Scope) -> bool:
        """Whether an announced Content-Length (if any) is a number within the limit."""
        for name, value in scope["headers"]:
            if name == b"content-length":
                return value.isdigit() and int(value) <= self.max_body
        return True


def _replay(messages: list[ReceiveMessage], receive: Receive) -> Receive:
    """``receive`` with ``messages`` (already read) given back first."""
    pending = list(messages)

    async def replayed() -> ReceiveMessage:
        return pending.pop(0) if pending else await receive()

    return replayed


async def _admitted(
    scope: Scope,
    send: Send,
    admission: Admission | None,
    call: Callable[[Sequence[Limit]], Awaitable[msgspec.Struct]],
) -> None:
    """``_answer`` for a handler that decides the per-IP ``admission`` limits in its own step."""
    if admission is None:
        await _answer(scope, send, lambda: call(()))
        return
    state = scope["state"]
    names = {limit.name for limit in admission.limits}

    async def settle() -> bool:
        # A request refused before that step leaves the per-IP limits undecided: decide them
        # now, before the answer, as the edge would have before the request.
        if any(decision.name in names for decision in state[DECISIONS]):
            return True
        return await admission.admit()

    try:
        await _answer(scope, send, lambda: call(admission.limits), settle)
    except AdmissionRefused:
        await admission.refuse()


async def _answer(
    scope: Scope,
    send: Send,
    call: Callable[[], Awaitable[msgspec.Struct]],
    settle: Callable[[], Awaitable[bool]] | None = None,
) -> None:
    """Run ``call`` and send its result as JSON, or the error body of what it raised; before an
    error, ``settle`` may answer instead (it returns False once it has)."""
    headers: dict[str, str] | None = None
    try:
        status, body = 200, msgspec.json.encode(await call())
    except AdmissionRefused:
        raise  # the edge answers its own limits
    except OtpError as exc:
        status = status_of(exc)
        if status == 500:
            status, body = _internal(scope, exc)
        else:
            error = ErrorBody(error=exc.code, message=exc.message, **exc.details)  # type: ignore[arg-type]
            body, headers = msgspec.json.encode(error), error_headers(error)
    except Exception as exc:  # the 500 of errors.internal_error
        status, body = _internal(scope, exc)
    if status != 200 and settle is not None and not await settle():
        return
    raw_headers = [_JSON, (b"content-length", b"%d" % len(body))]
    raw_headers += [(name.lower().encode(), value.encode()) for name, value in (headers or {}).items()]
    start: HTTPResponseStartEvent = {"type": "http.response.start", "status": status, "headers": raw_headers}
    await send(start)
    await send({"type": "http.response.body", "body": body, "more_body": False})


def _internal(scope: Scope, exc: Exception) -> tuple[int, bytes]:
    log_internal_error(scope["method"], scope["path"], exc)  # type: ignore[typeddict-item]
    return 500, msgspec.json.encode(ErrorBody(error="internal_error", message="internal server error"))
