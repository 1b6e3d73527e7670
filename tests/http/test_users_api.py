"""SPEC §3 users endpoints and §4 Users, Search and Tokens (including forged tokens)."""

from __future__ import annotations

import base64
import json
import time

import pytest
from joserfc import jwt
from joserfc.jwk import OctKey

from tests.http.conftest import SECRET, assert_error, auth, new_phone

PROFILE = "/api/v1/users/profile"
SEARCH = "/api/v1/users/search"


def user_url(user_id: object) -> str:
    return f"/api/v1/users/{user_id}"


# -- profile --------------------------------------------------------------------------------


async def test_profile_get_and_put(api):
    body = await api.login(name="Ada")
    headers = auth(body["token"])
    got = await api.get(PROFILE, headers=headers)
    assert got.status_code == 200
    assert got.json() == body["user"]
    put = await api.client().put(PROFILE, json={"name": "  Ada Lovelace\t "}, headers=headers)
    assert put.status_code == 200, put.text
    assert put.json()["name"] == "Ada Lovelace"
    assert put.json()["id"] == body["user"]["id"]
    assert (await api.get(PROFILE, headers=headers)).json()["name"] == "Ada Lovelace"
    # 100 characters after trimming is fine.
    put = await api.client().put(PROFILE, json={"name": " " + "n" * 100 + " "}, headers=headers)
    assert put.status_code == 200
    assert put.json()["name"] == "n" * 100


@pytest.mark.parametrize("name", ["", "   ", "\t\n", "x" * 101])
async def test_profile_put_refuses_bad_names(api, name):
    body = await api.login(name="Keep")
    response = await api.client().put(PROFILE, json={"name": name}, headers=auth(body["token"]))
    error = assert_error(response, 400, "validation_error")
    assert "name" in error["message"]
    assert (await api.get(PROFILE, headers=auth(body["token"]))).json()["name"] == "Keep"


@pytest.mark.parametrize("payload", [{}, {"name": None}, {"name": 5}, {"nom": "x"}])
async def test_profile_put_missing_or_mistyped_name(mem_api, payload):
    body = await mem_api.login()
    response = await mem_api.client().put(PROFILE, json=payload, headers=auth(body["token"]))
    error = assert_error(response, 400, "validation_error")
    assert "name" in error["message"]


async def test_profile_requires_a_token(mem_api):
    assert_error(await mem_api.get(PROFILE), 401, "authorization_required")
    response = await mem_api.client().put(PROFILE, json={"name": "x"})
    assert_error(response, 401, "authorization_required")


# -- search ---------------------------------------------------------------------------------


async def search(api, token, **params):
    return await api.get(SEARCH, params=params, headers=auth(token))


@pytest.fixture
async def people(api):
    """An admin plus users with names chosen to test matching; (admin token, {name: user})."""
    admin = await api.admin()
    names = ["Ada Lovelace", "ADA King", "Grace Hopper", "100% Pure", "100 Pure", "snake_case",
             "snakeXcase", "back\\slash", "backslash"]  # fmt: skip
    users = {}
    for name in names:
        users[name] = (await api.login(name=name))["user"]
    return admin["token"], users


async def test_search_is_admin_only(api):
    plain = await api.login()
    assert_error(await search(api, plain["token"]), 403, "forbidden")
    assert_error(await api.get(SEARCH), 401, "authorization_required")


async def test_search_by_name_case_insensitive(api, people):
    token, _users = people
    response = await search(api, token, query="ada")
    assert response.status_code == 200
    body = response.json()
    assert set(body) >= {"users", "total", "offset", "limit"}
    assert [u["name"] for u in body["users"]] == ["Ada Lovelace", "ADA King"]
    assert body["total"] == 2 and body["offset"] == 0 and body["limit"] == 10
    assert [u["name"] for u in (await search(api, token, query="hOpPeR")).json()["users"]] == ["Grace Hopper"]


async def test_search_by_phone_substring(api, people):
    token, users = people
    target = users["Grace Hopper"]
    body = (await search(api, token, query=target["phone_number"][-6:])).json()
    assert [u["id"] for u in body["users"]] == [target["id"]]
    # The leading + is part of the stored number.
    body = (await search(api, token, query=target["phone_number"])).json()
    assert [u["id"] for u in body["users"]] == [target["id"]]


@pytest.mark.parametrize(
    ("query", "expected"),
    [("%", ["100% Pure"]), ("_", ["snake_case"]), ("\\", ["back\\slash"]), ("0% P", ["100% Pure"])],
)
async def test_search_wildcards_match_literally(api, people, query, expected):
    token, _ = people
    body = (await search(api, token, query=query)).json()
    assert [u["name"] for u in body["users"]] == expected
    assert body["total"] == len(expected)


async def test_search_everything_ordered_by_id_with_total(api, people):
    token, users = people
    body = (await search(api, token, limit=100)).json()
    ids = [u["id"] for u in body["users"]]
    assert ids == sorted(ids)
    assert body["total"] == len(users) + 1  # and the admin
    assert len(ids) == body["total"]


async def test_search_offset_paging(api, people):
    token, _users = people
    everyone = [u["id"] for u in (await search(api, token, limit=100)).json()["users"]]
    page = (await search(api, token, limit=3, offset=2)).json()
    assert [u["id"] for u in page["users"]] == everyone[2:5]
    assert page["offset"] == 2 and page["limit"] == 3 and page["total"] == len(everyone)
    beyond = (await search(api, token, offset=1000)).json()
    assert beyond["users"] == [] and beyond["total"] == len(everyone)


async def test_search_keyset_paging(api, people):
    token, _ = people
    everyone = [u["id"] for u in (await search(api, token, limit=100)).json()["users"]]
    seen: list[int] = []
    after = None
    for _ in range(10):
        params = {"limit": 4} if after is None else {"limit": 4, "after_id": after}
        page = (await search(api, token, **params)).json()
        seen += [u["id"] for u in page["users"]]
        after = page.get("next_after_id")
        if after is None:
            break
        assert after == page["users"][-1]["id"]
    assert seen == everyone


@pytest.mark.parametrize(
    ("params", "field"),
    [
        ({"limit": 101}, "limit"),
        ({"limit": 0}, "limit"),
        ({"limit": -1}, "limit"),
        ({"offset": -1}, "offset"),
        ({"offset": "abc"}, "offset"),
        ({"limit": "ten"}, "limit"),
        ({"offset": "1.5"}, "offset"),
        ({"after_id": "x"}, "after_id"),
        ({"after_id": -1}, "after_id"),
        pytest.param(
            {"query": "q" * 101},
            "query",
        ),
    ],
)
async def test_search_parameter_validation(mem_api, params, field):
    admin = await mem_api.admin()
    response = await search(mem_api, admin["token"], **params)
    body = assert_error(response, 400, "validation_error")
    assert field in body["message"]


async def test_search_limit_bounds_accepted(mem_api):
    admin = await mem_api.admin()
    for limit in (1, 100):
        response = await search(mem_api, admin["token"], limit=limit)
        assert response.status_code == 200
        assert response.json()["limit"] == limit


# -- admin: get / patch ---------------------------------------------------------------------


async def test_get_user_admin_only(api):
    admin = await api.admin()
    plain = await api.login(name="Plain")
    response = await api.get(user_url(plain["user"]["id"]), headers=auth(admin["token"]))
    assert response.status_code == 200
    assert response.json() == plain["user"]
    denied = await api.get(user_url(plain["user"]["id"]), headers=auth(plain["token"]))
    assert_error(denied, 403, "forbidden")
    assert_error(await api.get(user_url(1)), 401, "authorization_required")


async def test_get_unknown_user_is_not_found(api):
    admin = await api.admin()
    assert_error(await api.get(user_url(424242), headers=auth(admin["token"])), 404, "not_found")


HUGE_IDS = ["99999999999999999999999", str(2**63), str(2**64 + 1), "0", "-1"]


@pytest.mark.parametrize("user_id", HUGE_IDS)
async def test_get_out_of_range_user_id_is_not_found(api, user_id):
    admin = await api.admin()
    response = await api.get(user_url(user_id), headers=auth(admin["token"]))
    assert_error(response, 404, "not_found")


@pytest.mark.parametrize("user_id", HUGE_IDS)
async def test_patch_out_of_range_user_id_is_not_found(api, user_id):
    admin = await api.admin()
    response = await api.client().patch(user_url(user_id), json={"name": "x"}, headers=auth(admin["token"]))
    assert_error(response, 404, "not_found")


async def test_non_integer_user_id_is_not_found(mem_api):
    admin = await mem_api.admin()
    for raw in ("abc", "1.5", "1e3"):
        response = await mem_api.get(user_url(raw), headers=auth(admin["token"]))
        assert response.status_code in (400, 404), response.text
        assert set(response.json()) == {"error", "message"}


async def test_patch_changes_role_active_and_name(api):
    admin = await api.admin()
    target = await api.login(name="Before")
    url = user_url(target["user"]["id"])
    headers = auth(admin["token"])
    response = await api.client().patch(url, json={"role": "admin", "name": " After "}, headers=headers)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["role"] == "admin" and body["name"] == "After" and body["is_active"] is True
    # The promoted user may now search.
    assert (await search(api, target["token"])).status_code == 200
    response = await api.client().patch(url, json={"is_active": False}, headers=headers)
    assert response.status_code == 200
    assert response.json()["is_active"] is False
    assert response.json()["name"] == "After"
    got = await api.get(url, headers=headers)
    assert got.json()["is_active"] is False and got.json()["role"] == "admin"


@pytest.mark.parametrize(
    "payload",
    [{"role": "superuser"}, {"is_active": "no"}, {"name": ""}, {"name": "x" * 101}, {"role": 1}],
)
async def test_patch_validation(mem_api, payload):
    admin = await mem_api.admin()
    target = await mem_api.login()
    response = await mem_api.client().patch(
        user_url(target["user"]["id"]), json=payload, headers=auth(admin["token"])
    )
    body = assert_error(response, 400, "validation_error")
    assert next(iter(payload)) in body["message"]


async def test_patch_is_admin_only_and_unknown_is_404(api):
    admin = await api.admin()
    plain = await api.login()
    url = user_url(plain["user"]["id"])
    response = await api.client().patch(url, json={"role": "admin"}, headers=auth(plain["token"]))
    assert_error(response, 403, "forbidden")
    assert (await api.get(PROFILE, headers=auth(plain["token"]))).json()["role"] == "user"
    response = await api.client().patch(user_url(424242), json={"name": "x"}, headers=auth(admin["token"]))
    assert_error(response, 404, "not_found")


async def test_deactivation_takes_effect_at_once(api):
    admin = await api.admin()
    phone = new_phone()
    target = await api.login(phone)
    assert (await api.get(PROFILE, headers=auth(target["token"]))).status_code == 200
    response = await api.client().patch(
        user_url(target["user"]["id"]), json={"is_active": False}, headers=auth(admin["token"])
    )
    assert response.status_code == 200
    assert_error(await api.get(PROFILE, headers=auth(target["token"])), 403, "user_inactive")
    response = await api.post("/api/v1/auth/refresh", {"refresh_token": target["refresh_token"]})
    assert_error(response, 403, "user_inactive")
    code = await api.send_and_code(phone)
    assert_error(await api.verify(phone, code), 403, "user_inactive")
    # Reactivated, the user can sign in again.
    await api.client().patch(
        user_url(target["user"]["id"]), json={"is_active": True}, headers=auth(admin["token"])
    )
    api.clock.advance(0)
    code = await api.send_and_code(phone)
    assert (await api.verify(phone, code)).status_code == 200


async def test_demoted_admin_loses_admin_access_at_once(api):
    admin = await api.admin()
    other = await api.login()
    promote = await api.client().patch(
        user_url(other["user"]["id"]), json={"role": "admin"}, headers=auth(admin["token"])
    )
    assert promote.status_code == 200
    assert (await search(api, other["token"])).status_code == 200
    await api.client().patch(
        user_url(other["user"]["id"]), json={"role": "user"}, headers=auth(admin["token"])
    )
    assert_error(await search(api, other["token"]), 403, "forbidden")


# -- forged and malformed tokens ------------------------------------------------------------


def _b64(data: dict) -> str:
    return base64.urlsafe_b64encode(json.dumps(data).encode()).rstrip(b"=").decode()


def _claims(user_id: int, sid: str, **changes) -> dict:
    now = int(time.time())
    claims = {
        "iss": "otp-server",
        "aud": "otp-server",
        "sub": str(user_id),
        "role": "admin",
        "sid": sid,
        "iat": now,
        "exp": now + 600,
        "jti": "x",
    }
    claims.update(changes)
    return claims


def _sign(claims: dict, secret: str = SECRET, alg: str = "HS256", typ: str = "at+jwt") -> str:
    header = {"alg": alg, "typ": typ}
    return jwt.encode(header, claims, OctKey.import_key(secret.encode()), algorithms=[alg])


@pytest.fixture
async def victim(mem_api):
    body = await mem_api.login()
    sid = json.loads(base64.urlsafe_b64decode(body["token"].split(".")[1] + "=="))["sid"]
    return mem_api, body, sid


async def test_well_formed_token_built_here_is_accepted(victim):
    """Sanity check of the forging helpers: the right secret and claims pass."""
    api, body, sid = victim
    token = _sign(_claims(body["user"]["id"], sid))
    assert (await api.get(PROFILE, headers=auth(token))).status_code == 200


@pytest.mark.parametrize(
    "forge",
    [
        pytest.param(
            lambda uid, sid: _b64({"alg": "none", "typ": "at+jwt"}) + "." + _b64(_claims(uid, sid)) + ".",
            id="alg-none",
        ),
        pytest.param(
            lambda uid, sid: _b64({"alg": "none", "typ": "at+jwt"}) + "." + _b64(_claims(uid, sid)),
            id="alg-none-two-parts",
        ),
        pytest.param(lambda uid, sid: _sign(_claims(uid, sid), secret="x" * 40), id="other-secret"),
        pytest.param(lambda uid, sid: _sign(_claims(uid, sid), alg="HS512"), id="other-alg"),
        pytest.param(lambda uid, sid: _sign(_claims(uid, sid, iss="evil")), id="wrong-iss"),
        pytest.param(lambda uid, sid: _sign(_claims(uid, sid, aud="other")), id="wrong-aud"),
        pytest.param(
            lambda uid, sid: _sign({k: v for k, v in _claims(uid, sid).items() if k != "exp"}),
            id="no-exp",
        ),
        pytest.param(lambda uid, sid: _sign(_claims(uid, sid, exp=int(time.time()) - 120)), id="expired"),
        pytest.param(lambda uid, sid: _sign(_claims(uid, "not-a-session")), id="unknown-sid"),
        pytest.param(lambda uid, sid: _sign(_claims(uid + 1000, sid)), id="sid-of-another-user"),
        pytest.param(lambda uid, sid: _sign(_claims(uid, sid), typ="JWT"), id="typ-not-at+jwt"),
        pytest.param(
            lambda uid, sid: _sign(_claims(uid, sid, sub="abc")),
            id="sub-not-int",
        ),
        pytest.param(lambda uid, sid: "garbage", id="garbage"),
        pytest.param(lambda uid, sid: "a.b.c", id="three-garbage-parts"),
        pytest.param(lambda uid, sid: "é" * 10, id="non-ascii"),
    ],
)
async def test_forged_tokens_are_invalid_token(victim, forge):
    api, body, sid = victim
    token = forge(body["user"]["id"], sid)
    response = await api.get(PROFILE, headers={"Authorization": f"Bearer {token}".encode()})
    assert_error(response, 401, "invalid_token")


async def test_expired_token_issued_by_the_service_is_invalid_token(victim):
    api, body, sid = victim
    user = await api.core.users.get(body["user"]["id"])
    token = api.core.tokens.issue_access(user, sid, now=int(time.time()) - 10_000)
    assert_error(await api.get(PROFILE, headers=auth(token)), 401, "invalid_token")


async def test_tampered_role_claim_is_invalid_token(victim):
    api, body, sid = victim
    header, _, signature = body["token"].split(".")
    forged = ".".join([header, _b64(_claims(body["user"]["id"], sid)), signature])
    assert_error(await api.get(SEARCH, headers=auth(forged)), 401, "invalid_token")


@pytest.mark.parametrize(
    "value",
    ["Bearer", "Bearer ", "Bearer    ", "Basic xyz", "Token abc", "bearer", "", "Bearer a b"],
)
async def test_malformed_authorization_header(victim, value):
    api, _, _ = victim
    response = await api.get(PROFILE, headers={"Authorization": value})
    assert_error(response, 401, "authorization_required")


async def test_bearer_scheme_is_case_insensitive(victim):
    api, body, _ = victim
    response = await api.get(PROFILE, headers={"Authorization": f"bearer {body['token']}"})
    assert response.status_code == 200
