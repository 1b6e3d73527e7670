"""Liveness, readiness, metrics and public keys."""

from __future__ import annotations

import asyncio
from typing import Any

from litestar import Controller, Response, get
from litestar.openapi.datastructures import ResponseSpec
from litestar.status_codes import HTTP_503_SERVICE_UNAVAILABLE

from otp_http.guards import CoreDep
from otp_http.schemas import ErrorBody, Health, Readiness, error_responses

VERSION = "0.1.0"
CHECK_TIMEOUT = 2.0


class SystemController(Controller):
    tags = ["system"]

    @get("/health")
    async def health(self) -> Health:
        return Health(status="ok", service="otp-server", version=VERSION)

    @get(
        "/health/ready",
        responses={503: ResponseSpec(ErrorBody, description="a store is down", generate_examples=False)},
    )
    async def ready(self, core: CoreDep) -> Response[Readiness | ErrorBody]:
        names, probes = zip(*core.checks().items(), strict=True)
        results = await asyncio.gather(
            *(asyncio.wait_for(probe(), CHECK_TIMEOUT) for probe in probes), return_exceptions=True
        )
        checks = {
            name: "ok" if not isinstance(result, BaseException) else f"error: {type(result).__name__}"
            for name, result in zip(names, results, strict=True)
        }
        failed = [name for name, status in checks.items() if status != "ok"]
        if failed:
            body = ErrorBody(
                error="service_unavailable",
                message=f"backing store unavailable: {', '.join(failed)}",
                checks=checks,
            )
            return Response(body, status_code=HTTP_503_SERVICE_UNAVAILABLE)
        return Response(Readiness(status="ok", checks=checks))

    @get("/.well-known/jwks.json", responses=error_responses())
    async def jwks(self, core: CoreDep) -> dict[str, Any]:
        return core.tokens.keys.jwks()
