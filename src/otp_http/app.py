"""The Litestar application factory. Nothing is built at import time."""

from __future__ import annotations

import functools
import logging

from litestar import Litestar, Request, Response, get
from litestar.config.cors import CORSConfig
from litestar.datastructures import State
from litestar.di import Provide
from litestar.middleware._internal.cors import CORSMiddleware
from litestar.openapi import OpenAPIConfig
from litestar.types import ASGIApp, Receive, Scope, Send

from otp_http.controllers.auth import AuthController
from otp_http.controllers.system import VERSION, SystemController
from otp_http.controllers.users import AdminUsersController, ProfileController
from otp_http.errors import EXCEPTION_HANDLERS
from otp_http.fastlane import FastLane
from otp_http.guards import provide_core
from otp_http.middleware import EdgeMiddleware
from otpcore import Core, Settings, build_core

MAX_BODY_BYTES = 16 * 1024
PROMETHEUS_TEXT = "text/plain; version=0.0.4"
log = logging.getLogger("otp_http")


async def _metrics_text(request: Request) -> Response[bytes]:
    core: Core = request.app.state.core
    return Response(core.telemetry.render(), media_type=PROMETHEUS_TEXT)


def create_litestar(core: Core) -> Litestar:
    """The Litestar app alone (routes, errors, OpenAPI), without the outer ASGI layers (CORS is
    one of them: see ``with_cors``)."""
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
        openapi_config=OpenAPIConfig(title="otp-server", version=VERSION, path="/schema"),
        on_startup=[start_core],
        on_shutdown=[close_core],
        debug=False,
        logging_config=None,
    )


def with_cors(app: Litestar, settings: Settings, inner: ASGIApp) -> ASGIApp:
    """Litestar's CORS handling (CORS_ALLOWED_*) of ``app`` around ``inner`` (the app itself, or
    what answers for it): what Litestar does when given a cors_config, as an app of its own so that
    EdgeMiddleware sends it only requests with an Origin header. Given a cors_config, Litestar runs
    it on every request, and it costs tens of µs even for the requests it passes through untouched.

    CORSMiddleware comes from Litestar's internal module: its public alias
    (litestar.middleware.cors) is deprecated and warns; tests/http/test_system.py pins the
    answers."""
    cors = CORSMiddleware(
        inner,
        CORSConfig(
            allow_origins=list(settings.cors_origins),
            allow_methods=list(settings.cors_methods),  # type: ignore[arg-type]
            allow_headers=list(settings.cors_headers),
            expose_headers=[
                "X-Request-ID",
                "X-RateLimit-Limit",
                "X-RateLimit-Remaining",
                "X-RateLimit-Reset",
                "Retry-After",
                "X-RateLimit-Exceeded",
            ],
        ),
    )

    async def asgi(scope: Scope, receive: Receive, send: Send) -> None:
        # The preflight answer is built with the app's request class, found in
        # scope["litestar_app"], which Litestar itself sets only once it is called.
        scope["litestar_app"] = app
        await cors(scope, receive, send)

    return asgi


def create_app(
    core: Core | None = None, settings: Settings | None = None, *, fast_lane: bool = True
) -> ASGIApp:
    """The whole ASGI app: client IP, request id, CORS, rate limits and metrics around Litestar.

    ``fast_lane=False`` sends every request through Litestar (tests compare the two).
    """
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
    return EdgeMiddleware(
        app,
        cors=functools.partial(with_cors, app, core.settings),
        limiter=core.container.rate_limiter(),
        events=core.events,
        settings=core.settings,
        metrics_path=core.settings.metrics_endpoint,
        telemetry=core.telemetry,
        fast_lane=FastLane(core, app, max_body=MAX_BODY_BYTES) if fast_lane else None,
    )
