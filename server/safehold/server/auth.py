"""Checks the database password on every BackupService call.

Health checking and reflection stay open so that load balancers and grpcurl
work without a secret. The comparison is constant-time, nothing about the
presented value is ever logged, and an address that keeps guessing is slowed.
"""

from __future__ import annotations

import hmac
import logging
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import grpc

from safehold.contract import PASSWORD_METADATA_KEY, SERVICE_NAME, Reason
from safehold.server.errors import Unauthenticated

log = logging.getLogger(__name__)

_MAX_PASSWORD_BYTES = 4096
"""Longer metadata values are refused without comparing them."""

if TYPE_CHECKING:  # grpc-stubs makes these generic; grpc itself does not
    Handler = grpc.RpcMethodHandler[Any, Any]
    Interceptor = grpc.ServerInterceptor[Any, Any]
else:
    Handler = grpc.RpcMethodHandler
    Interceptor = grpc.ServerInterceptor
Continuation = Callable[[grpc.HandlerCallDetails], "Handler | None"]


class PasswordInterceptor(Interceptor):
    """Refuses BackupService calls whose x-database-password is missing or wrong."""

    def __init__(self, password: str, on_refusal: Callable[[str], None] | None = None) -> None:
        self._expected = password.encode("utf-8")
        self._throttle = FailureThrottle()
        self._on_refusal = on_refusal

    def intercept_service(
        self, continuation: Continuation, handler_call_details: grpc.HandlerCallDetails
    ) -> Handler | None:
        handler = continuation(handler_call_details)
        method: str = handler_call_details.method
        if handler is None or not method.startswith(f"/{SERVICE_NAME}/"):
            return handler
        if self._accepts(handler_call_details.invocation_metadata):
            return handler
        if self._on_refusal:
            self._on_refusal(Reason.UNAUTHENTICATED)
        return _refusal(handler, self._throttle, method)

    def _accepts(self, metadata: Any) -> bool:
        presented = b""
        for key, value in metadata or ():
            if key == PASSWORD_METADATA_KEY:
                presented = value.encode("utf-8") if isinstance(value, str) else value
        if not presented or len(presented) > _MAX_PASSWORD_BYTES:
            return False
        return hmac.compare_digest(presented, self._expected)


class FailureThrottle:
    """Slows refusals to an address that keeps failing, holding up nobody else.

    The delay runs in the refused call's own worker thread (never in gRPC's
    polling thread), and only a few such threads may sleep at once, so a flood
    of wrong passwords cannot starve callers who know the password.
    """

    FREE_FAILURES = 3
    MAX_DELAY_SECONDS = 2.0
    FORGET_AFTER_SECONDS = 300.0
    MAX_SLEEPERS = 4
    MAX_TRACKED = 10_000

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._failures: dict[str, tuple[int, float]] = {}
        self._sleepers = threading.BoundedSemaphore(self.MAX_SLEEPERS)

    def failed(self, peer: str) -> None:
        """Count a failure from peer and sleep as long as its record says."""
        address = peer.rsplit(":", 1)[0]  # ipv4:127.0.0.1:5555 -> ipv4:127.0.0.1
        now = time.monotonic()
        with self._lock:
            count, last = self._failures.get(address, (0, now))
            count = 1 if now - last > self.FORGET_AFTER_SECONDS else count + 1
            if len(self._failures) >= self.MAX_TRACKED:
                self._failures.clear()
            self._failures[address] = (count, now)
        excess = count - self.FREE_FAILURES
        if excess <= 0 or not self._sleepers.acquire(blocking=False):
            return
        try:
            time.sleep(min(self.MAX_DELAY_SECONDS, 0.1 * 2 ** (excess - 1)))
        finally:
            self._sleepers.release()


def _refusal(handler: Handler, throttle: FailureThrottle, method: str) -> Handler:
    """A handler of the same shape as `handler` that ends the call UNAUTHENTICATED,
    logged with the caller's address (known only here, not to the interceptor)."""
    status = Unauthenticated(
        f"missing or wrong password: send it in the {PASSWORD_METADATA_KEY} metadata"
    ).to_status()

    def refuse(_request: object, context: grpc.ServicerContext) -> None:
        peer = context.peer()
        log.warning(
            "refused %s from %s: missing or wrong %s",
            method,
            peer,
            PASSWORD_METADATA_KEY,
            extra={"reason": Reason.UNAUTHENTICATED.value, "peer": peer},
        )
        throttle.failed(peer)
        context.abort_with_status(status)

    if handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(refuse)
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(refuse)
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(refuse)
    return grpc.unary_unary_rpc_method_handler(refuse)
