"""What every gRPC front of serving shares, so that every role answers every call with a clear code.

* Bytes that are not a valid protobuf message are the client's fault: INVALID_ARGUMENT. Left to
  grpc, a deserializer that raises becomes UNKNOWN ("Unexpected DecodeError") on the ``grpc.aio``
  server and INTERNAL on the threaded one, and no handler ever sees the call. So the handlers are
  registered with :func:`request_parser`, which hands a :class:`MalformedRequest` to the handler
  instead of raising, and the handler answers INVALID_ARGUMENT like any other bad field.
* A call to a service this process's role does not serve (``Recommend`` sent to a ``--role ps``
  shard, ``Lookup`` sent to a recommender) gets UNIMPLEMENTED with a message naming the role that
  does serve it (:func:`wrong_role_handler`), not grpc's bare "Method not found!".
"""

from __future__ import annotations

from typing import Any, Callable

import grpc

from serving.pb import pb2

__all__ = ["MalformedRequest", "request_parser", "wrong_role_handler"]


class MalformedRequest:
    """Stands in for a request whose bytes did not parse; ``message`` is the INVALID_ARGUMENT detail."""

    __slots__ = ("message",)

    def __init__(self, message: str) -> None:
        self.message = message


def request_parser(message_cls: Any) -> Callable[[bytes], Any]:
    """A request deserializer that returns a :class:`MalformedRequest` where ``FromString`` raises."""
    name = message_cls.DESCRIPTOR.full_name

    def parse(data: bytes) -> Any:
        try:
            return message_cls.FromString(data)
        except Exception as exc:  # DecodeError, or whatever else the protobuf runtime raises on junk
            return MalformedRequest(f"request: not a valid {name} message ({type(exc).__name__})")

    return parse


def wrong_role_handler(service: str, message: str, *, aio: bool) -> grpc.GenericRpcHandler:
    """Answers every method of ``headwater.v1.<service>`` with UNIMPLEMENTED and ``message``.

    ``aio``: for a ``grpc.aio`` server (coroutine handlers) rather than a threaded one.
    """
    descriptor = pb2.DESCRIPTOR.services_by_name[service]

    if aio:
        async def refuse(_request: bytes, context: Any) -> None:
            await context.abort(grpc.StatusCode.UNIMPLEMENTED, message)
    else:
        def refuse(_request: bytes, context: Any) -> None:  # type: ignore[misc]
            context.abort(grpc.StatusCode.UNIMPLEMENTED, message)

    # No deserializer: the request stays bytes, so even junk gets the same clear answer.
    handlers = {m.name: grpc.unary_unary_rpc_method_handler(refuse) for m in descriptor.methods}
    return grpc.method_handlers_generic_handler(descriptor.full_name, handlers)
