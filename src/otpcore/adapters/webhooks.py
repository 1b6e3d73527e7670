"""Outbound webhooks signed the Standard Webhooks way, and the SMS code sender built on them."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import logging
import time
import uuid

import httpx
import msgspec

log = logging.getLogger("otpcore.webhooks")

SECRET_PREFIX = "whsec_"  # noqa: S105 - the format's prefix, not a secret
# Statuses worth another try: the receiver may accept later. Other 4xx answers are final.
_RETRYABLE = {408, 409, 425, 429}


class WebhookSigner:
    """Signs ``{id}.{timestamp}.{body}`` with HMAC-SHA256 (Standard Webhooks, v1 signatures)."""

    def __init__(self, secret: str) -> None:
        if not secret.startswith(SECRET_PREFIX):
            raise ValueError(f"a webhook secret starts with {SECRET_PREFIX!r} (base64 after it)")
        self.key = base64.b64decode(secret.removeprefix(SECRET_PREFIX))
        if len(self.key) < 24:
            raise ValueError("a webhook secret needs at least 24 random bytes")

    def headers(self, message_id: str, timestamp: int, body: bytes) -> dict[str, str]:
        signed = f"{message_id}.{timestamp}.".encode() + body
        signature = base64.b64encode(hmac.new(self.key, signed, hashlib.sha256).digest()).decode()
        return {
            "webhook-id": message_id,
            "webhook-timestamp": str(timestamp),
            "webhook-signature": f"v1,{signature}",
            "content-type": "application/json",
        }


class DeliveryFailed(Exception):
    """The receiver did not accept the message before the deadline."""


class WebhookPoster:
    """POSTs one signed message, retrying with backoff until accepted or ``give_up_after``."""

    def __init__(
        self, url: str, signer: WebhookSigner, *, timeout: float = 5.0, first_backoff: float = 0.5
    ) -> None:
        self.url = url
        self.signer = signer
        self.timeout = timeout
        self.first_backoff = first_backoff
        self._client: httpx.AsyncClient | None = None

    async def post(self, payload: object, *, give_up_after: float, message_id: str | None = None) -> int:
        """Deliver ``payload``; the number of attempts it took. Raises DeliveryFailed."""
        body = msgspec.json.encode(payload)
        message_id = message_id or f"msg_{uuid.uuid4().hex}"
        deadline = time.monotonic() + give_up_after
        backoff, attempt = self.first_backoff, 0
        while True:
            attempt += 1
            # One id for every attempt, so the receiver can drop duplicates.
            headers = self.signer.headers(message_id, int(time.time()), body)
            try:
                response = await self._http().post(self.url, content=body, headers=headers)
                if response.is_success:
                    return attempt
                reason = f"HTTP {response.status_code}"
                final = response.status_code < 500 and response.status_code not in _RETRYABLE
            except httpx.HTTPError as exc:
                reason, final = type(exc).__name__, False
            remaining = deadline - time.monotonic()
            if final or remaining <= 0:
                raise DeliveryFailed(f"{reason} after {attempt} attempt(s)")
            log.info("webhook attempt %d to %s failed (%s); retrying", attempt, self.url, reason)
            await asyncio.sleep(min(backoff, remaining))
            backoff = min(backoff * 2, 30.0)

    def _http(self) -> httpx.AsyncClient:
        if self._client is None:
            self._client = httpx.AsyncClient(timeout=self.timeout, follow_redirects=False)
        return self._client

    async def aclose(self) -> None:
        if self._client is not None:
            await self._client.aclose()
            self._client = None


class WebhookCodeSender:
    """Sends the SMS through the operator's provider bridge at SMS_WEBHOOK_URL.

    Retries until the code expires: after that a delivery is useless.
    """

    def __init__(self, poster: WebhookPoster, *, give_up_after: float) -> None:
        self.poster = poster
        self.give_up_after = give_up_after

    async def send(self, phone: str, code: str, message: str) -> None:
        await self.deliver(phone, message, give_up_after=self.give_up_after)

    async def deliver(
        self, phone: str, message: str, *, give_up_after: float, message_id: str | None = None
    ) -> None:
        """POST the SMS, retrying for up to ``give_up_after`` seconds under one message id."""
        payload = {"type": "otp.sms", "phone_number": phone, "message": message}
        try:
            await self.poster.post(payload, give_up_after=give_up_after, message_id=message_id)
        except DeliveryFailed as exc:
            raise DeliveryFailed(f"SMS to {phone} not delivered: {exc}") from None

    async def aclose(self) -> None:
        await self.poster.aclose()
