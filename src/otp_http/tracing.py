"""Traces through the OpenTelemetry SDK: spans for HTTP requests, Redis commands and Postgres
statements, exported as the standard OTEL_* variables say (none unless OTEL_TRACES_EXPORTER).

Instrumentation patches the drivers process-wide, so it is set up once per server process.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

from litestar.types import ASGIApp, Message, Receive, Scope, Send
from opentelemetry import trace
from opentelemetry.instrumentation.asgi import OpenTelemetryMiddleware
from opentelemetry.instrumentation.psycopg import PsycopgInstrumentor
from opentelemetry.instrumentation.redis import RedisInstrumentor
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter, SpanExporter

from otpcore import SettingsError
from otpcore.adapters import pg_prepared, redis_wire


def _exporter(name: str) -> SpanExporter:
    if name == "console":
        return ConsoleSpanExporter()
    if name == "otlp":
        # Reads OTEL_EXPORTER_OTLP_ENDPOINT / _HEADERS / _TIMEOUT itself.
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        return OTLPSpanExporter()
    raise SettingsError(f"OTEL_TRACES_EXPORTER: unknown exporter {name!r} (use none, console or otlp)")


def configure_tracing(environ: Mapping[str, str] = os.environ) -> TracerProvider | None:
    """Install the tracer provider and driver instrumentation; None when tracing is off."""
    names = [n.strip().lower() for n in environ.get("OTEL_TRACES_EXPORTER", "none").split(",")]
    names = [n for n in names if n and n != "none"]
    if not names:
        return None
    # Resource.create reads OTEL_SERVICE_NAME and OTEL_RESOURCE_ATTRIBUTES.
    provider = TracerProvider(resource=Resource.create({"service.name": "otp-server"}))
    for name in names:
        provider.add_span_processor(BatchSpanProcessor(_exporter(name)))
    trace.set_tracer_provider(provider)
    RedisInstrumentor().instrument(tracer_provider=provider)
    redis_wire.instrument(provider)
    PsycopgInstrumentor().instrument(tracer_provider=provider)
    pg_prepared.instrument(provider)
    return provider


def traced(app: ASGIApp, provider: TracerProvider) -> ASGIApp:
    """The app inside a server span per request (outermost, so every answer is traced).

    Spans still batched are exported when the app shuts down: uvicorn ends the process by
    re-raising the signal it caught, so exit handlers would not run.
    """
    spans = OpenTelemetryMiddleware(app)

    async def asgi(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "lifespan":
            await spans(scope, receive, send)  # type: ignore[arg-type]
            return

        async def flush_on_shutdown(message: Message) -> None:
            if message["type"] == "lifespan.shutdown.complete":
                provider.shutdown()
            await send(message)

        await app(scope, receive, flush_on_shutdown)

    return asgi
