"""Timestamps as stored in dalbt's databases and shown on the labelling page."""

from __future__ import annotations

from datetime import UTC, datetime


def utc_now(timespec: str = "seconds") -> str:
    """The current UTC time in ISO 8601, e.g. ``2025-01-31T12:00:00+00:00``.

    Args:
        timespec: Precision, as :meth:`datetime.isoformat` takes it (``seconds``,
            ``milliseconds``, ...).
    """
    return datetime.now(UTC).isoformat(timespec=timespec)
