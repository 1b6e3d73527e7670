"""otp_http: the Litestar HTTP adapter over otpcore."""

from otp_http.app import create_app

__all__ = ["create_app"]
