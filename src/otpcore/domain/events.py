"""Event types and their shape: ``{"event_id", "event_type", "timestamp", "data"}``.

``data`` never holds a code or a token.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import msgspec

from otpcore.domain.ids import unique_id

OTP_GENERATED = "otp:generated"
OTP_VERIFIED = "otp:verified"
OTP_EXPIRED = "otp:expired"
OTP_DELIVERY_FAILED = "otp:delivery_failed"
AUTH_FAILED = "auth:failed"
AUTH_RATE_LIMITED = "auth:rate_limited"
USER_CREATED = "user:created"
USER_AUTHENTICATED = "user:authenticated"
USER_UPDATED = "user:updated"
SESSION_REVOKED = "session:revoked"


class Event(msgspec.Struct, frozen=True, kw_only=True):
    event_type: str
    data: dict[str, Any] = msgspec.field(default_factory=dict)
    event_id: str = msgspec.field(default_factory=unique_id)
    timestamp: datetime = msgspec.field(default_factory=lambda: datetime.now(UTC))
