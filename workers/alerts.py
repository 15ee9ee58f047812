"""Alertmanager webhook payload (version 4) and the keys that identify an alert episode.

Timestamps are kept as canonical RFC 3339 strings with nanoseconds, UTC (``...123456789Z``):
Alertmanager sends nanoseconds, Python's datetime holds microseconds, and two databases store
datetimes differently. A canonical string is exact and compares equal everywhere.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime
from functools import lru_cache
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field

_RFC3339 = re.compile(
    r"^(?P<date>\d{4}-\d{2}-\d{2})[Tt ](?P<time>\d{2}:\d{2}:\d{2})"
    r"(?:\.(?P<frac>\d{1,9}))?(?P<tz>[Zz]|[+-]\d{2}:\d{2})$"
)
ZERO_TIME = "0001-01-01T00:00:00.000000000Z"


@lru_cache(maxsize=4096)  # pure; every firing alert has the zero endsAt, repeats share startsAt
def canonical_time(value: str) -> str:
    """Normalise an RFC 3339 timestamp to UTC with exactly nine fractional digits.

    Raises:
        ValueError: the value is not an RFC 3339 timestamp.
    """
    match = _RFC3339.match(value)
    if match is None:
        raise ValueError(f"not an RFC 3339 timestamp: {value[:64]!r}")
    nanos = (match["frac"] or "").ljust(9, "0")
    tz = match["tz"].upper()
    try:
        # Also for UTC: a date like 2026-13-45T99:99:99Z matches the pattern but is no instant.
        base = datetime.fromisoformat(f"{match['date']}T{match['time']}{'+00:00' if tz == 'Z' else tz}")
        utc = base.astimezone(UTC)
    except (ValueError, OverflowError) as exc:
        raise ValueError(f"not a valid UTC instant: {value[:64]!r}") from exc
    return (
        f"{utc.year:04d}-{utc.month:02d}-{utc.day:02d}"
        f"T{utc.hour:02d}:{utc.minute:02d}:{utc.second:02d}.{nanos}Z"
    )


def instant(canonical: str) -> datetime | None:
    """The UTC instant of a canonical timestamp (microseconds), None for Alertmanager's zero time."""
    if canonical == ZERO_TIME:
        return None
    return datetime.fromisoformat(canonical[:26] + "+00:00")


def no_nul(value: str) -> str:
    """Refuse NUL characters: no text column can store them (PostgreSQL refuses them)."""
    if "\x00" in value:
        raise ValueError("must not contain a NUL character")
    return value


Timestamp = Annotated[str, AfterValidator(canonical_time)]
Text = Annotated[str, AfterValidator(no_nul)]
# Alertmanager sends truncatedAlerts as a uint64.
MAX_UINT64 = 2**64 - 1


class _Lenient(BaseModel):
    # Newer Alertmanagers add fields: unknown keys are ignored, not errors.
    model_config = ConfigDict(extra="ignore", populate_by_name=True)


class Alert(_Lenient):
    """One alert of a notification; handled by its own ``status``, never the group's."""

    status: Literal["firing", "resolved"]
    labels: dict[str, str]
    annotations: dict[str, str] = Field(default_factory=dict)
    starts_at: Timestamp = Field(alias="startsAt")
    ends_at: Timestamp = Field(default=ZERO_TIME, alias="endsAt")
    generator_url: Text = Field(default="", alias="generatorURL")
    fingerprint: str = Field(min_length=1, max_length=64, pattern=r"^[0-9a-fA-F]+$")

    @property
    def episode(self) -> tuple[str, str]:
        """One firing of one alert: ``(fingerprint, startsAt)``."""
        return (self.fingerprint, self.starts_at)

    @property
    def event_key(self) -> tuple[str, str, str]:
        """One state of one episode: the episode plus ``status``."""
        return (self.fingerprint, self.starts_at, self.status)

    def template_data(self) -> dict[str, Any]:
        """The ``alert`` object templates see (Alertmanager's own field names)."""
        return {
            "status": self.status,
            "labels": dict(self.labels),
            "annotations": dict(self.annotations),
            "startsAt": self.starts_at,
            "endsAt": self.ends_at,
            "generatorURL": self.generator_url,
            "fingerprint": self.fingerprint,
        }


class WebhookPayload(_Lenient):
    """The body Alertmanager posts to a webhook receiver (``version: "4"``)."""

    version: Literal["4"]
    receiver: Text = ""
    status: Literal["firing", "resolved"]
    alerts: list[Alert]
    group_labels: dict[str, str] = Field(default_factory=dict, alias="groupLabels")
    common_labels: dict[str, str] = Field(default_factory=dict, alias="commonLabels")
    common_annotations: dict[str, str] = Field(default_factory=dict, alias="commonAnnotations")
    external_url: str = Field(default="", alias="externalURL")
    group_key: Text = Field(default="", alias="groupKey")
    truncated_alerts: int = Field(default=0, ge=0, le=MAX_UINT64, alias="truncatedAlerts")
