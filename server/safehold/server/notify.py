"""The webhook of scheduled backups (`--notify-url`): a small JSON document, POSTed.

Bounded: each attempt has a timeout, and a few attempts with backoff are all a
notification gets, so that a dead receiver never holds the schedule. The URL may
carry a token in its path or query, so only its scheme and host are ever logged;
the document holds no secret (no password, no key, no credentials).
"""

from __future__ import annotations

import json
import logging
import urllib.error
import urllib.request
from collections.abc import Callable
from importlib.metadata import version
from urllib.parse import urlsplit

import tenacity

log = logging.getLogger(__name__)

TIMEOUT_SECONDS = 10.0
ATTEMPTS = 3


def post(
    url: str,
    document: dict[str, object],
    *,
    sleep: Callable[[float], None],
    timeout: float = TIMEOUT_SECONDS,
) -> bool:
    """POST document as JSON to url; whether a 2xx answer came within the attempts."""
    body = json.dumps(document).encode()
    request = urllib.request.Request(  # noqa: S310 (the scheme is checked at start: http or https)
        url,
        data=body,
        method="POST",
        headers={
            "Content-Type": "application/json",
            "User-Agent": f"safehold/{version('safehold')}",
        },
    )

    def send() -> None:
        with urllib.request.urlopen(request, timeout=timeout) as reply:  # noqa: S310
            reply.read(4096)

    where = _host(url)
    try:
        tenacity.Retrying(
            stop=tenacity.stop_after_attempt(ATTEMPTS),
            wait=tenacity.wait_exponential(multiplier=0.5, max=5),
            retry=tenacity.retry_if_exception_type(OSError),
            sleep=sleep,
            reraise=True,
        )(send)
    except OSError as err:
        # HTTPError and URLError are OSErrors; neither is shown with the URL.
        reason = (
            f"HTTP {err.code}" if isinstance(err, urllib.error.HTTPError) else type(err).__name__
        )
        log.warning("webhook to %s failed after %d attempts: %s", where, ATTEMPTS, reason)
        return False
    log.info("webhook to %s: %s sent", where, document.get("event"))
    return True


def _host(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.hostname}" + (f":{parts.port}" if parts.port else "")
