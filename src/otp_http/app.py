"""The Litestar application factory. Nothing is built at import time."""

from __future__ import annotations

import logging

from litestar import Litestar, Request, Response, get
from litestar.config.cors import CORSConfig
from litestar.datastructures import State
from litestar.di import Provide
from litestar.openapi import OpenAPIConfig
from litestar.types import ASGIApp

from otp_http.controllers.auth import AuthController
from otp_http.controllers.system import VERSION, SystemController
from otp_http.controllers.users import AdminUsersController, ProfileController
from otp_http.errors import EXCEPTION_HANDLERS
from otp_http.guards import provide_core
from otp_http.metrics import MetricsMiddleware
from otp_http.middleware import EdgeMiddleware
from otpcore import Core, Settings, build_core

MAX_BODY_BYTES = 16 * 1024
PROMETHEUS_TEXT = "text/plain; version=0.0.4"
log = logging.getLogger("otp_http")


async def _metrics_text(request: Request) -> Response[bytes]:
    core: Core = request.app.state.core
    return Response(core.telemetry.render(), media_type=PROMETHEUS_TEXT)


def create_litestar(core: Core) -> Litestar:
    """The Litestar app alone (routes, errors, OpenAPI), without the outer ASGI layers."""
    settings = core.settings
    handlers: list[object] = [
        AuthController,
        ProfileController,
        AdminUsersController,
        SystemController,
    ]
    if settings.metrics_enabled:
        handlers.append(
            get(settings.metrics_endpoint, tags=["system"], media_type=PROMETHEUS_TEXT)(_metrics_text)
        )

    async def start_core() -> None:
        await core.start()

    async def close_core() -> None:
        await core.aclose()

    return Litestar(
        route_handlers=handlers,  # type: ignore[arg-type]
        dependencies={"core": Provide(provide_core)},
        exception_handlers=EXCEPTION_HANDLERS,  # type: ignore[arg-type]
        request_max_body_size=MAX_BODY_BYTES,
        state=State({"core": core}),
        cors_config=CORSConfig(
            allow_origins=list(settings.cors_origins),
            allow_methods=list(settings.cors_methods),  # type: ignore[arg-type]
            allow_headers=list(settings.cors_headers),
            expose_headers=[
                "X-Request-ID",
                "X-RateLimit-Limit",
                "X-RateLimit-Remaining",
                "X-RateLimit-Reset",
                "Retry-After",
            ],
        ),
        openapi_config=OpenAPIConfig(title="otp-server", version=VERSION, path="/schema"),
        on_startup=[start_core],
        on_shutdown=[close_core],
        debug=False,
        logging_config=None,
    )


def create_app(core: Core | None = None, settings: Settings | None = None) -> ASGIApp:
    """The whole ASGI app: metrics around client IP, request id and rate limits around Litestar."""
    core = core or build_core(settings)
    test_numbers = core.auth.policy.test_codes
    if test_numbers:
        until = core.settings.test_numbers_valid_until or "no expiry date"
        log.warning(
            "test phone numbers active (%d, until %s): they sign in with a fixed code",
            len(test_numbers),
            until,
        )
    app = create_litestar(core)
    edge = EdgeMiddleware(
        app,
        limiter=core.container.rate_limiter(),
        events=core.events,
        settings=core.settings,
        metrics_path=core.settings.metrics_endpoint,
    )
    return MetricsMiddleware(edge, core.telemetry)
