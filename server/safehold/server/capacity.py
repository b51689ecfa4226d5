"""Separate capacity for each kind of call, so that no caller can take all of it.

gRPC's sync server has one pool of worker threads, and every open stream
holds one of them. Health checks and reflection need no password, so without
their own bounds 32 reflection streams opened and never used would take
every thread and lock out callers who know the password. Here each group of
methods gets its own number of places; a call beyond its group's places is
refused at once with RESOURCE_EXHAUSTED and holds nothing. Request streams
of the unauthenticated services also end when the caller sends nothing for
the stall timeout.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import grpc

from safehold.server.errors import ResourceBusy
from safehold.server.watchdog import IdleWatchdog

log = logging.getLogger(__name__)

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
    idle_ends: bool = False
    """End request streams that send nothing for the stall timeout."""


def groups(backup_service: str) -> tuple[Group, ...]:
    """The groups safehold serves, first match wins. BackupService callers hold
    the password, so they get most of the places; the open services a few."""
    return (
        Group("BackupService", f"/{backup_service}/", 32),
        Group("health checks", "/grpc.health.v1.Health/Check", 8),
        Group("health watches", "/grpc.health.v1.Health/Watch", 4),
        Group("reflection", "/grpc.reflection.", 4, idle_ends=True),
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

    def intercept_service(
        self, continuation: Continuation, handler_call_details: grpc.HandlerCallDetails
    ) -> Handler | None:
        handler = continuation(handler_call_details)
        method: str = handler_call_details.method
        group = next((g for g in self._groups if method.startswith(g.prefix)), None)
        if handler is None or group is None:
            return handler
        places = self._places[group.name]
        idle = self._stall_timeout if group.idle_ends and handler.request_streaming else 0.0

        def placed(behavior: Behavior) -> Behavior:
            def run(request: Any, context: grpc.ServicerContext) -> Any:
                if not places.acquire(blocking=False):
                    log.warning("refused %s: all %s places are taken", method, group.name)
                    context.abort_with_status(
                        ResourceBusy(
                            f"all places for {group.name} are taken; retry later"
                        ).to_status()
                    )
                if not context.add_callback(places.release):
                    places.release()  # the call already ended
                if idle > 0:
                    return _idle_ending(behavior, request, context, idle)
                return behavior(request, context)

            return run

        return rewrap(handler, placed)


def _idle_ending(
    behavior: Behavior, requests: Iterator[Any], context: grpc.ServicerContext, timeout: float
) -> Iterator[Any]:
    with IdleWatchdog(requests, context, timeout) as watched:
        yield from behavior(watched, context)


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
