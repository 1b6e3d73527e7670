"""Profiles for every signed-in user; search and administration for admins."""

from __future__ import annotations

from typing import Annotated

from litestar import Controller, get, patch, put
from litestar.di import Provide
from litestar.params import FromPath, JSONBody, QueryParameter

from otp_http.guards import CoreDep, PrincipalDep, provide_principal, requires_admin, requires_user
from otp_http.schemas import AdminUserUpdate, ProfileUpdate, UserList, UserOut, error_responses
from otpcore.domain.services import MAX_USER_ID, SEARCH_LIMIT_MAX, SEARCH_OFFSET_MAX


class ProfileController(Controller):
    path = "/api/v1/users/profile"
    tags = ["users"]
    guards = [requires_user]
    dependencies = {"principal": Provide(provide_principal)}

    @get("/", responses=error_responses(401, 403))
    async def profile(self, principal: PrincipalDep) -> UserOut:
        return UserOut.of(principal.user)

    @put("/", responses=error_responses(400, 401, 403, 413))
    async def update_profile(
        self, core: CoreDep, principal: PrincipalDep, data: JSONBody[ProfileUpdate]
    ) -> UserOut:
        return UserOut.of(await core.users.rename(principal.user.id, data.name))


class AdminUsersController(Controller):
    path = "/api/v1/users"
    tags = ["admin"]
    guards = [requires_admin]
    dependencies = {"principal": Provide(provide_principal)}

    @get("/search", responses=error_responses(400, 401, 403))
    async def search(
        self,
        core: CoreDep,
        principal: PrincipalDep,
        # "query" is Litestar's name for the whole query string, hence the alias; its length
        # is checked by the service so the error names "query".
        text: Annotated[str, QueryParameter(name="query")] = "",
        offset: Annotated[int, QueryParameter(ge=0, le=SEARCH_OFFSET_MAX)] = 0,
        limit: Annotated[int, QueryParameter(ge=1, le=SEARCH_LIMIT_MAX)] = 10,
        after_id: Annotated[int | None, QueryParameter(ge=0, le=MAX_USER_ID)] = None,
    ) -> UserList:
        page = await core.users.search(principal.user, text, offset=offset, limit=limit, after_id=after_id)
        return UserList.of(page)

    @get("/{user_id:int}", responses=error_responses(400, 401, 403, 404))
    async def get_user(self, core: CoreDep, user_id: FromPath[int]) -> UserOut:
        return UserOut.of(await core.users.get(user_id))

    @patch("/{user_id:int}", responses=error_responses(400, 401, 403, 404, 413))
    async def update_user(
        self, core: CoreDep, principal: PrincipalDep, user_id: FromPath[int], data: JSONBody[AdminUserUpdate]
    ) -> UserOut:
        user = await core.users.administer(
            principal.user, user_id, role=data.role, is_active=data.is_active, name=data.name
        )
        return UserOut.of(user)
