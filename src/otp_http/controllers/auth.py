"""Sign-in: send a code, verify it, refresh and log out."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from litestar import Controller, Request, post
from litestar.di import Provide
from litestar.params import JSONBody
from litestar.status_codes import HTTP_200_OK, HTTP_204_NO_CONTENT

from otp_http.guards import CoreDep, PrincipalDep, provide_principal, requires_user
from otp_http.middleware import DECISIONS, RATE_LIMITED
from otp_http.schemas import (
    LogoutRequest,
    RefreshRequest,
    SendOtpRequest,
    SendOtpResponse,
    TokenResponse,
    VerifyOtpRequest,
    error_responses,
)
from otpcore import Core
from otpcore.domain.errors import RateLimitExceeded
from otpcore.domain.ports import Limit, RateDecision


async def send_otp(
    core: Core, state: dict[str, Any], data: SendOtpRequest, admission: Sequence[Limit] = ()
) -> SendOtpResponse:
    """Send a code; every limit decided joins the per-IP ones in the rate-limit headers.

    ``admission``: per-IP limits the edge left to the send's own step (the fast lane's).
    """
    decisions: list[RateDecision] = state[DECISIONS]
    try:
        sent = await core.auth.send_code(data.phone_number, admission=admission, decided=decisions)
    except RateLimitExceeded as exc:
        if exc.decision not in decisions:  # the per-country budget's
            decisions.append(exc.decision)
        state[RATE_LIMITED] = exc.decision.name
        raise
    return SendOtpResponse(
        message="OTP sent successfully",
        phone_number=sent.phone_number,
        expires_in=sent.expires_in,
    )


class AuthController(Controller):
    path = "/api/v1/auth"
    tags = ["auth"]

    @post("/send-otp", status_code=HTTP_200_OK, responses=error_responses(400, 413))
    async def send_otp(
        self, request: Request, core: CoreDep, data: JSONBody[SendOtpRequest]
    ) -> SendOtpResponse:
        return await send_otp(core, request.scope["state"], data)

    @post("/verify-otp", status_code=HTTP_200_OK, responses=error_responses(400, 403, 413))
    async def verify_otp(self, core: CoreDep, data: JSONBody[VerifyOtpRequest]) -> TokenResponse:
        result = await core.auth.verify_code(data.phone_number, data.otp_code, name=data.name)
        return TokenResponse.of(result)

    @post("/refresh", status_code=HTTP_200_OK, responses=error_responses(400, 401, 403, 413))
    async def refresh(self, core: CoreDep, data: JSONBody[RefreshRequest]) -> TokenResponse:
        return TokenResponse.of(await core.auth.refresh(data.refresh_token))

    @post(
        "/logout",
        status_code=HTTP_204_NO_CONTENT,
        guards=[requires_user],
        dependencies={"principal": Provide(provide_principal)},
        responses=error_responses(400, 401, 403, 413),
    )
    async def logout(
        self, core: CoreDep, principal: PrincipalDep, data: JSONBody[LogoutRequest | None] = None
    ) -> None:
        await core.auth.logout(principal, data.refresh_token if data else None)
