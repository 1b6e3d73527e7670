"""Attacks not covered elsewhere, each named after the attack."""

from __future__ import annotations

from tests.http.conftest import Api, auth, new_phone


async def test_enumeration_known_and_unknown_numbers_answer_alike(mem_api: Api) -> None:
    known = new_phone()
    await mem_api.login(known)
    unknown = new_phone()
    for phone in (known, unknown):
        sent = await mem_api.send(phone)
        assert sent.status_code == 200
        assert set(sent.json()) == {"message", "phone_number", "expires_in"}
    wrong = [await mem_api.verify(phone, "000000") for phone in (known, unknown)]
    assert [r.status_code for r in wrong] == [400, 400]
    assert wrong[0].json() == wrong[1].json()


async def test_header_injection_in_names_is_refused(mem_api: Api) -> None:
    user = await mem_api.login()
    for name in ("Ada\r\nSet-Cookie: x=1", "Ada\nX-Evil: 1", "Ada\x00"):
        response = await mem_api.client().put(
            "/api/v1/users/profile", json={"name": name}, headers=auth(user["token"])
        )
        assert response.status_code == 400 and response.json()["error"] == "validation_error"
        assert "set-cookie" not in response.headers and "x-evil" not in response.headers
