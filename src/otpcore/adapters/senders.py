"""Code senders: how a code reaches the phone."""

from __future__ import annotations

import logging

log = logging.getLogger("otpcore.sender")


class ConsoleCodeSender:
    """Development sender: one log line with the E.164 number and the code.

    The only place a code is ever printed; production refuses to start with it.
    """

    async def send(self, phone: str, code: str, message: str) -> None:
        log.warning("OTP for %s: %s (console sender, development only)", phone, code)
