"""Entities and value rules: users, roles, phone numbers, names, search pages."""

from __future__ import annotations

import enum
import functools
import unicodedata
from collections.abc import Collection
from datetime import datetime
from typing import NamedTuple

import msgspec
import phonenumbers

from otpcore.domain.errors import InvalidPhoneNumber, ValidationError

NAME_MAX = 100


class Role(enum.StrEnum):
    USER = "user"
    ADMIN = "admin"


class User(msgspec.Struct, frozen=True, kw_only=True):
    id: int
    phone_number: str
    name: str
    role: Role
    is_active: bool
    created_at: datetime
    updated_at: datetime


class UserPage(msgspec.Struct, frozen=True, kw_only=True):
    users: list[User]
    total: int
    offset: int
    limit: int
    next_after_id: int | None = None


class Phone(NamedTuple):
    e164: str
    country: str  # ISO region, "ZZ" when unknown


class PhonePolicy(msgspec.Struct, frozen=True, kw_only=True):
    """How raw input becomes an E.164 number, and where codes may go."""

    # Configured test numbers need only be well-formed: they are often fictitious (+1 555 01xx).
    test_numbers: frozenset[str] = frozenset()
    allowed_countries: frozenset[str] = frozenset()

    def normalize(self, raw: str, *, test_numbers: Collection[str] | None = None) -> str:
        """Return the E.164 form of ``raw`` or raise InvalidPhoneNumber.

        ``test_numbers`` (default: the policy's own) are the test numbers in force right now.
        """
        return self.parse(raw, test_numbers=test_numbers).e164

    def parse(self, raw: str, *, test_numbers: Collection[str] | None = None) -> Phone:
        """``normalize``, with the number's country found on the way (one parse, not two)."""
        reading = _read(raw) if isinstance(raw, str) and raw.strip() and len(raw) <= 64 else None
        if reading is None:
            raise InvalidPhoneNumber("phone number must be an international number like +14155550123")
        e164, region, valid = reading
        if e164 in (self.test_numbers if test_numbers is None else test_numbers):
            return Phone(e164, region or "ZZ")
        if region is None or not valid:
            raise InvalidPhoneNumber("phone number is not a valid number")
        if self.allowed_countries and region not in self.allowed_countries:
            raise InvalidPhoneNumber("codes cannot be sent to this country")
        return Phone(e164, region)

    @staticmethod
    def country_of(e164: str) -> str:
        """ISO region of a normalised number ("ZZ" when unknown), for per-country budgets."""
        try:
            return phonenumbers.region_code_for_number(phonenumbers.parse(e164, None)) or "ZZ"
        except phonenumbers.NumberParseException:
            return "ZZ"


# A number is read at send-otp and again at verify-otp, about 100 µs each time: readings are
# kept (phonenumbers' metadata never changes in a process), the least recently used dropped.
@functools.lru_cache(maxsize=16_384)
def _read(raw: str) -> tuple[str, str | None, bool] | None:
    """phonenumbers' reading of ``raw``: (E.164, region, valid in that region); None when it
    cannot be read as an international number."""
    try:
        parsed = phonenumbers.parse(raw, None)
    except phonenumbers.NumberParseException:
        return None
    region = phonenumbers.region_code_for_number(parsed)
    # is_valid_number is exactly this, finding the region again. A region found by validation
    # needs none again (~10 µs, a quarter of a reading; tests hold this to is_valid_number).
    valid = region is not None and (
        _found_valid(parsed.country_code, region) or phonenumbers.is_valid_number_for_region(parsed, region)
    )
    return phonenumbers.format_number(parsed, phonenumbers.PhoneNumberFormat.E164), region, valid


@functools.cache
def _found_valid(country_code: int, region: str) -> bool:
    """Whether region_code_for_number returns ``region`` only for numbers valid there: among a
    shared code's regions, it picks one without leading digits by validating the number in it."""
    regions = phonenumbers.COUNTRY_CODE_TO_REGION_CODE.get(country_code, ())
    metadata = phonenumbers.PhoneMetadata.metadata_for_region(region, None)
    return len(regions) > 1 and metadata is not None and metadata.leading_digits is None


def well_formed_e164(raw: str) -> str:
    """Normalise a configured number (test or admin list) without the validity check."""
    try:
        parsed = phonenumbers.parse(raw.strip(), None)
    except phonenumbers.NumberParseException as exc:
        raise ValueError(f"not an E.164 phone number: {raw!r}") from exc
    return phonenumbers.format_number(parsed, phonenumbers.PhoneNumberFormat.E164)


# Characters that render as nothing or reorder text; refused so a name shows what it stores.
_INVISIBLE_CATEGORIES = {"Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp"}
# Joiners are format characters too, but emoji sequences and Persian/Indic scripts need them.
_ALLOWED_JOINERS = {"\u200c", "\u200d"}


def clean_name(raw: str | None, *, required: bool) -> str:
    """Trim a display name and check it: 1-100 characters, or empty when not ``required``."""
    if raw is None:
        if required:
            raise ValidationError("name: is required")
        return ""
    name = unicodedata.normalize("NFC", raw).strip()
    if not name:
        if required:
            raise ValidationError("name: must be 1 to 100 characters after trimming")
        return ""
    if len(name) > NAME_MAX:
        raise ValidationError("name: must be at most 100 characters")
    if any(unicodedata.category(ch) in _INVISIBLE_CATEGORIES and ch not in _ALLOWED_JOINERS for ch in name):
        raise ValidationError("name: must not contain control or invisible characters")
    return name
