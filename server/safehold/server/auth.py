"""Checks the database password on every BackupService call.

Health checking and reflection stay open so that load balancers and grpcurl
work without a secret. The comparison is constant-time and nothing about the
presented value is ever logged.
"""

from __future__ import annotations

import hmac
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import grpc
from safehold.contract import PASSWORD_METADATA_KEY, SERVICE_NAME
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

    def __init__(self, password: str) -> None:
        self._expected = password.encode("utf-8")

    def intercept_service(
        self, continuation: Continuation, handler_call_details: grpc.HandlerCallDetails
    ) -> Handler | None:
        handler = continuation(handler_call_details)
        method: str = handler_call_details.method
        if handler is None or not method.startswith(f"/{SERVICE_NAME}/"):
            return handler
        if self._accepts(handler_call_details.invocation_metadata):
            return handler
        log.warning("refused %s: missing or wrong %s", method, PASSWORD_METADATA_KEY)
        return _refusal(handler)

    def _accepts(self, metadata: Any) -> bool:
        presented = b""
        for key, value in metadata or ():
            if key == PASSWORD_METADATA_KEY:
                presented = value.encode("utf-8") if isinstance(value, str) else value
        if not presented or len(presented) > _MAX_PASSWORD_BYTES:
            return False
        return hmac.compare_digest(presented, self._expected)


def _refusal(handler: Handler) -> Handler:
    """A handler of the same shape as `handler` that ends the call UNAUTHENTICATED."""
    status = Unauthenticated(
        f"missing or wrong password: send it in the {PASSWORD_METADATA_KEY} metadata"
    ).to_status()

    def refuse(_request: object, context: grpc.ServicerContext) -> None:
        context.abort_with_status(status)

    if handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(refuse)
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(refuse)
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(refuse)
    return grpc.unary_unary_rpc_method_handler(refuse)
