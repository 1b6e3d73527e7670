"""Bearer authentication and the admin guard, as plain Litestar guards.

A guard authenticates once and leaves the Principal in ``connection.state`` for
``provide_principal`` to hand to the handler.
"""

from __future__ import annotations

from litestar import Request
from litestar.connection import ASGIConnection
from litestar.di import NamedDependency
from litestar.handlers.base import BaseRouteHandler

from otpcore import Core, Principal, Role
from otpcore.domain.errors import AuthorizationRequired, Forbidden

_PRINCIPAL = "principal"

# Handler parameters filled by the app's dependencies, named so Litestar does not infer them.
CoreDep = NamedDependency[Core]
PrincipalDep = NamedDependency[Principal]


def core_of(connection: ASGIConnection) -> Core:
    return connection.app.state.core


def bearer_token(authorization: str) -> str:
    """The token of an ``Authorization: Bearer <token>`` header value."""
    scheme, _, token = authorization.partition(" ")
    if scheme.lower() != "bearer" or not token.strip() or " " in token.strip():
        raise AuthorizationRequired()
    return token.strip()


async def requires_user(connection: ASGIConnection, _: BaseRouteHandler) -> None:
    token = bearer_token(connection.headers.get("authorization", ""))
    principal = await core_of(connection).auth.authenticate(token)
    connection.state[_PRINCIPAL] = principal


async def requires_admin(connection: ASGIConnection, handler: BaseRouteHandler) -> None:
    await requires_user(connection, handler)
    if connection.state[_PRINCIPAL].user.role is not Role.ADMIN:
        raise Forbidden("admin role required")


async def provide_principal(request: Request) -> Principal:
    return request.state[_PRINCIPAL]


async def provide_core(request: Request) -> Core:
    return core_of(request)
