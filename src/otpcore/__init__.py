"""otpcore: phone-number one-time-code sign-in as a library.

from otpcore import Settings, build_core

core = build_core(Settings(db_provider="memory"))
await core.auth.send_code("+1 415 555 0123")
result = await core.auth.verify_code("+14155550123", code, name="Ada")
"""

from otpcore.container import Core, build_core
from otpcore.domain.errors import OtpError
from otpcore.domain.model import Role, User, UserPage
from otpcore.domain.services import AuthResult, AuthService, Principal, SendResult, UserService
from otpcore.settings import Settings, SettingsError

__all__ = [
    "AuthResult",
    "AuthService",
    "Core",
    "OtpError",
    "Principal",
    "Role",
    "SendResult",
    "Settings",
    "SettingsError",
    "User",
    "UserPage",
    "UserService",
    "build_core",
]
