"""Checks the database password on every BackupService call.

Health checking (and reflection, when it is turned on) stay open so that
load balancers and grpcurl work without a secret. The comparison is
constant-time, nothing about the presented value is ever logged, and each
address may have only so many passwords checked per second (limiter.py):
guessing is slow however many connections or threads a guesser uses.
"""

from __future__ import annotations

import hmac
import logging
from typing import Any

import grpc

from safehold.contract import PASSWORD_METADATA_KEY, SERVICE_NAME
from safehold.server.capacity import Behavior, Continuation, Handler, Interceptor, rewrap
from safehold.server.errors import TooManyAttempts, Unauthenticated
from safehold.server.limiter import GuessLimiter, RefusalLog, Verdict, address_key
from safehold.server.metrics import Metrics

log = logging.getLogger(__name__)

_MAX_PASSWORD_BYTES = 4096
"""Longer metadata values are refused without comparing them."""


class PasswordInterceptor(Interceptor):
    """Refuses BackupService calls whose x-database-password is missing or wrong."""

    def __init__(
        self,
        password: str,
        metrics: Metrics,
        *,
        require_tls: bool = False,
        limiter: GuessLimiter | None = None,
    ) -> None:
        self._expected = password.encode("utf-8")
        self._require_tls = require_tls
        self._metrics = metrics
        self._limiter = limiter or GuessLimiter()
        self._refusals = RefusalLog("BackupService calls")

    def intercept_service(
        self, continuation: Continuation, handler_call_details: grpc.HandlerCallDetails
    ) -> Handler | None:
        handler = continuation(handler_call_details)
        method: str = handler_call_details.method
        if handler is None or not method.startswith(f"/{SERVICE_NAME}/"):
            return handler
        accepted = self._accepts(handler_call_details.invocation_metadata)

        def guarded(behavior: Behavior) -> Behavior:
            def run(request: Any, context: grpc.ServicerContext) -> Any:
                self._check(accepted, context)
                return behavior(request, context)

            return run

        return rewrap(handler, guarded)

    def _check(self, accepted: bool, context: grpc.ServicerContext) -> None:
        """Let the call go on, or end it; the limiter decides first, so an
        address over its budget learns nothing about its password."""
        key = address_key(context.peer())
        if self._require_tls and _transport(context) != "ssl":
            # A plaintext health port (--health-listen) never carries a password.
            self._refuse(
                key,
                "plaintext",
                context,
                Unauthenticated("this port serves health checks only: call BackupService over TLS"),
            )
        if self._limiter.admit(key) is Verdict.REFUSE:
            self._refuse(
                key,
                "throttled",
                context,
                TooManyAttempts("too many password attempts from this address; wait and retry"),
            )
        if accepted:
            self._limiter.refund(key)
            return
        self._refuse(
            key,
            "wrong password",
            context,
            Unauthenticated(
                f"missing or wrong password: send it in the {PASSWORD_METADATA_KEY} metadata"
            ),
        )

    def _refuse(
        self,
        key: str,
        why: str,
        context: grpc.ServicerContext,
        error: Unauthenticated | TooManyAttempts,
    ) -> None:
        self._metrics.refused(error.reason)
        self._refusals.refused(key, why, error.reason.value)
        context.abort_with_status(error.to_status())

    def _accepts(self, metadata: Any) -> bool:
        presented = b""
        for key, value in metadata or ():
            if key == PASSWORD_METADATA_KEY:
                presented = value.encode("utf-8") if isinstance(value, str) else value
        if not presented or len(presented) > _MAX_PASSWORD_BYTES:
            return False
        return hmac.compare_digest(presented, self._expected)


def _transport(context: grpc.ServicerContext) -> str:
    values = context.auth_context().get("transport_security_type") or [b""]
    return bytes(values[0]).decode("ascii", "replace")
