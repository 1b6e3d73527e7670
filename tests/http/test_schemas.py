"""Response bodies built from domain objects: the User shape of SPEC.md's HTTP API."""

from __future__ import annotations

from datetime import UTC, datetime

import msgspec

from otp_http.schemas import UserOut
from otpcore.domain.model import Role, User

SPEC_USER_FIELDS = ("id", "phone_number", "name", "role", "is_active", "created_at", "updated_at")


def test_a_user_is_shown_with_every_field_the_spec_names_and_no_other() -> None:
    user = User(
        id=7,
        phone_number="+14155550123",
        name="Zoë",
        role=Role.ADMIN,
        is_active=False,
        created_at=datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC),
        updated_at=datetime(2026, 2, 3, 4, 5, 6, 789000, tzinfo=UTC),
    )
    shown = msgspec.json.decode(msgspec.json.encode(UserOut.of(user)))
    assert tuple(shown) == SPEC_USER_FIELDS
    assert shown == msgspec.to_builtins(user)
    # UserOut.of copies field by field: a field added to User must be added there too.
    assert User.__struct_fields__ == UserOut.__struct_fields__ == SPEC_USER_FIELDS
