"""Tracing for the stub: the server span continues the caller's trace from gRPC metadata.

The provider is configured from the same OTEL_* variables as the bridge's
(``bzb_shared.otel.build_tracer_provider``), only with the service name ``rag-stub``.

Why not opentelemetry-instrumentation-grpc's ``aio_server_interceptor``: for server-streaming
methods it does ``async for response in behavior(...)``, which only works for async-generator
handlers. The stub's ``StreamChat`` is a coroutine that writes with ``context.write`` (so it can
send initial metadata first), and with that interceptor every call fails with UNKNOWN
"'async for' requires an object with __aiter__". This interceptor accepts both handler styles.
"""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from typing import Any

import grpc
from opentelemetry import trace
from opentelemetry.sdk.trace import SpanProcessor, TracerProvider
from opentelemetry.trace import Span, SpanKind, Status, StatusCode

from bzb_shared.otel import PROPAGATOR, build_tracer_provider

INSTRUMENTATION_NAME = "rag_stub"
_UNTRACED_PREFIXES = ("/grpc.health.", "/grpc.reflection.")

__all__ = ["TracingServerInterceptor", "server_interceptors"]


def server_interceptors(
    environ: Mapping[str, str] | None = None, *, extra_processors: tuple[SpanProcessor, ...] = ()
) -> list[grpc.aio.ServerInterceptor[Any, Any]]:
    """The tracing interceptor when OTEL_* in ``environ`` enable tracing, else [].

    ``environ`` defaults to nothing (tracing off) so that no module reads ``os.environ`` on its
    own; the CLI passes ``os.environ``. The provider flushes at interpreter exit.
    """
    provider = build_tracer_provider(
        environ or {}, "rag-stub", shutdown_on_exit=True, extra_processors=extra_processors
    )
    if provider is None:
        return []
    return [TracingServerInterceptor(provider.get_tracer(INSTRUMENTATION_NAME), provider)]


def _incoming_context(context: grpc.aio.ServicerContext[Any, Any]) -> Any:
    headers = {str(k): v for k, v in (context.invocation_metadata() or ()) if isinstance(v, str)}
    return PROPAGATOR.extract(headers)


def _finish(span: Span, context: grpc.aio.ServicerContext[Any, Any], error: BaseException | None) -> None:
    """Set the gRPC status on the span from how the handler ended, then end it."""
    if isinstance(error, asyncio.CancelledError):
        code = grpc.StatusCode.CANCELLED
    elif error is not None and not isinstance(error, grpc.aio.AbortError):
        code = grpc.StatusCode.UNKNOWN
        span.record_exception(error)
    else:
        code = context.code() or grpc.StatusCode.OK
    if not isinstance(code, grpc.StatusCode):  # older grpc returns the raw integer
        code = next((c for c in grpc.StatusCode if c.value[0] == code), grpc.StatusCode.UNKNOWN)
    span.set_attribute("rpc.grpc.status_code", code.value[0])
    if code != grpc.StatusCode.OK:
        span.set_status(Status(StatusCode.ERROR, code.name))
    span.end()


class TracingServerInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    """One SERVER span per unary-unary or unary-stream call, child of the caller's span."""

    def __init__(self, tracer: trace.Tracer, provider: TracerProvider | None = None) -> None:
        self._tracer = tracer
        self.provider = provider  # kept so a test (or a shutdown hook) can flush it

    def shutdown(self) -> None:
        """Flush and stop the provider's exporters (blocking)."""
        if self.provider is not None:
            self.provider.shutdown()

    def _start(self, method: str, context: grpc.aio.ServicerContext[Any, Any]) -> Span:
        service, _, name = method.lstrip("/").partition("/")
        return self._tracer.start_span(
            method,
            context=_incoming_context(context),
            kind=SpanKind.SERVER,
            attributes={"rpc.system": "grpc", "rpc.service": service, "rpc.method": name},
        )

    def _wrap_streaming(self, method: str, behavior: Callable[..., Any]) -> Callable[..., Any]:
        if inspect.isasyncgenfunction(behavior):

            async def generator(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> AsyncIterator[Any]:
                span, error = self._start(method, context), None
                try:
                    with trace.use_span(span, end_on_exit=False):
                        async for response in behavior(request, context):
                            yield response
                except BaseException as exc:
                    error = exc
                    raise
                finally:
                    _finish(span, context, error)

            return generator
        return self._wrap_coroutine(method, behavior)

    def _wrap_coroutine(self, method: str, behavior: Callable[..., Awaitable[Any]]) -> Callable[..., Any]:
        async def coroutine(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            span, error = self._start(method, context), None
            try:
                with trace.use_span(span, end_on_exit=False):
                    return await behavior(request, context)
            except BaseException as exc:
                error = exc
                raise
            finally:
                _finish(span, context, error)

        return coroutine

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any]]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any]:
        handler = await continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None or method.startswith(_UNTRACED_PREFIXES):
            return handler
        if handler.unary_stream is not None:
            return grpc.unary_stream_rpc_method_handler(
                self._wrap_streaming(method, handler.unary_stream),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        if handler.unary_unary is not None:
            return grpc.unary_unary_rpc_method_handler(
                self._wrap_coroutine(method, handler.unary_unary),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        return handler
