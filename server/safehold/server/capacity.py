"""Separate capacity for each kind of call, so that no caller can take all of it.

gRPC's sync server has one pool of worker threads, and every open stream
holds one of them. Health checks and reflection need no password, so without
their own bounds 32 reflection streams opened and never used would take
every thread and lock out callers who know the password. Here each group of
methods gets its own number of places; a call beyond its group's places is
refused at once with RESOURCE_EXHAUSTED and holds nothing. Streams of the
services that need no password (health Watch, reflection) also last at most
the stall timeout: their clients re-open them, and a stream opened and never
used gives its place back.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import grpc

from safehold.server.errors import ResourceBusy
from safehold.server.limiter import RefusalLog, address_key

if TYPE_CHECKING:  # grpc-stubs makes these generic; grpc itself does not
    Handler = grpc.RpcMethodHandler[Any, Any]
    Interceptor = grpc.ServerInterceptor[Any, Any]
else:
    Handler = grpc.RpcMethodHandler
    Interceptor = grpc.ServerInterceptor
Continuation = Callable[[grpc.HandlerCallDetails], "Handler | None"]
Behavior = Callable[[Any, grpc.ServicerContext], Any]


@dataclass(frozen=True)
class Group:
    """Methods whose full names start with prefix share `places` at once."""

    name: str
    prefix: str
    places: int
    open_to_all: bool = False
    """Needs no password: its streams end after the stall timeout."""


def groups(backup_service: str) -> tuple[Group, ...]:
    """The groups safehold serves, first match wins. BackupService callers hold
    the password, so they get most of the places; the open services a few."""
    return (
        Group("BackupService", f"/{backup_service}/", 32),
        Group("health checks", "/grpc.health.v1.Health/Check", 8, open_to_all=True),
        Group("health watches", "/grpc.health.v1.Health/Watch", 4, open_to_all=True),
        Group("reflection", "/grpc.reflection.", 4, open_to_all=True),
    )


SPARE_WORKERS = 8
"""Threads beyond the groups' places, for refusals that end at once."""


def workers(all_groups: tuple[Group, ...]) -> int:
    """The size of the thread pool and of gRPC's concurrent-call limit."""
    return sum(group.places for group in all_groups) + SPARE_WORKERS


class CapacityInterceptor(Interceptor):
    """Gives each call a place in its group for as long as the call lasts."""

    def __init__(self, all_groups: tuple[Group, ...], stall_timeout: float) -> None:
        self._groups = all_groups
        self._places = {g.name: threading.BoundedSemaphore(g.places) for g in all_groups}
        self._stall_timeout = stall_timeout
        self._refusals = RefusalLog("calls over their group's places")

    def intercept_service(
        self, continuation: Continuation, handler_call_details: grpc.HandlerCallDetails
    ) -> Handler | None:
        handler = continuation(handler_call_details)
        method: str = handler_call_details.method
        group = next((g for g in self._groups if method.startswith(g.prefix)), None)
        if handler is None or group is None:
            return handler
        places = self._places[group.name]
        streaming = handler.request_streaming or handler.response_streaming
        lifetime = self._stall_timeout if group.open_to_all and streaming else 0.0

        def placed(behavior: Behavior) -> Behavior:
            def run(request: Any, context: grpc.ServicerContext) -> Any:
                if not places.acquire(blocking=False):
                    self._refusals.refused(address_key(context.peer()), group.name)
                    context.abort_with_status(
                        ResourceBusy(
                            f"all places for {group.name} are taken; retry later"
                        ).to_status()
                    )
                _when_done(context, places.release)
                if lifetime > 0:
                    timer = threading.Timer(lifetime, context.cancel)
                    timer.daemon = True
                    timer.start()
                    _when_done(context, timer.cancel)
                return behavior(request, context)

            return run

        return rewrap(handler, placed)


def _when_done(context: grpc.ServicerContext, callback: Callable[[], None]) -> None:
    """Run callback when the call ends, or now if it already has."""
    if not context.add_callback(callback):
        callback()


def rewrap(handler: Handler, wrap: Callable[[Behavior], Behavior]) -> Handler:
    """A handler of the same shape and serializers as handler, its behavior wrapped."""
    args = (handler.request_deserializer, handler.response_serializer)
    if handler.request_streaming and handler.response_streaming:
        assert handler.stream_stream is not None
        return grpc.stream_stream_rpc_method_handler(wrap(handler.stream_stream), *args)
    if handler.response_streaming:
        assert handler.unary_stream is not None
        return grpc.unary_stream_rpc_method_handler(wrap(handler.unary_stream), *args)
    if handler.request_streaming:
        assert handler.stream_unary is not None
        return grpc.stream_unary_rpc_method_handler(wrap(handler.stream_unary), *args)
    assert handler.unary_unary is not None
    return grpc.unary_unary_rpc_method_handler(wrap(handler.unary_unary), *args)
