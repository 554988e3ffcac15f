"""`Retry-After` (RFC 9110 section 10.2.3) as seconds to wait: shared by every outbound client
(the hooks' FHIR fallback and the Bulk Data exporter)."""

from __future__ import annotations

import email.utils
import time


def retry_after_seconds(value: str | None, default: float) -> float:
    """Seconds to wait from a Retry-After header value (delta-seconds or an HTTP date);
    `default` when it is absent or unreadable; never negative."""
    if not value:
        return default
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return default
    return max(0.0, when.timestamp() - time.time())
