"""Telemetry with the OpenTelemetry SDK: a span per RPC (``detseg.v1.SegmentationService/<Method>``, opened by
``service.api.interceptors.RpcTelemetry``) whose
children are the pipeline's stages (``service.pipeline.stages``) and the runners' model calls; metrics; and
the trace id in every log record.

Settings choose the exporters: ``traces_exporter`` none | console | otlp, ``metrics_exporter`` none | console |
otlp | prometheus (a scrape endpoint on ``metrics_port``), ``otlp_endpoint`` (gRPC, e.g.
http://otel-collector:4317). Providers are process-wide (OpenTelemetry's global API); ``configure`` sets them
once, before the first server starts; a process that already has an SDK provider (a test harness with
in-memory exporters) keeps its own.

Metrics (Prometheus names in brackets):
- ``detseg.rpc.duration`` histogram, seconds, by ``rpc.method`` and ``rpc.grpc.status_code``
  [detseg_rpc_duration_seconds_*]; ``detseg.rpc.errors`` counter by method and code [detseg_rpc_errors_total];
- ``detseg.requests.in_flight`` and ``detseg.requests.queued`` gauges (admission control)
  [detseg_requests_in_flight, detseg_requests_queued];
- ``detseg.cache.hits`` / ``misses`` / ``evictions`` counters of the embedding cache
  [detseg_cache_hits_total, ...]; ``detseg.cache.shared.hits`` / ``misses`` / ``errors`` / ``corrupt`` (values
  that did not parse, deleted) of the shared (Redis) tier and ``detseg.cache.shared.up`` (1 answering, 0 down or
  none);
- ``detseg.track.sessions`` and ``detseg.track.objects`` gauges (Track sessions open, the tracks they follow)
  [detseg_track_sessions, detseg_track_objects]; ``detseg.track.frames`` counter of frames answered
  [detseg_track_frames_total] (frames/s: its rate).
"""

from __future__ import annotations

import asyncio
import weakref
from collections.abc import Callable, Iterable
from typing import Any

import grpc
from opentelemetry import metrics, trace

from service.config import Settings
from service.errors import ConfigurationError

_sources: weakref.WeakSet[Any] = weakref.WeakSet()  # live servicers, read by the observable gauges
_instruments: Instruments | None = None


_scrape_port: int | None = None  # the port this process's Prometheus endpoint is bound to


def scrape_port() -> int | None:
    """The port of this process's Prometheus scrape endpoint; None when it serves none."""
    return _scrape_port


def scrape_endpoint(host: str, port: int, registry: Any = None) -> int:
    """Starts prometheus_client's HTTP endpoint on ``host:port`` (``registry``: its default one when None); returns
    the port. ConfigurationError names ``metrics_port`` and the address when it cannot listen there."""
    from prometheus_client import REGISTRY, start_http_server

    try:
        httpd, _ = start_http_server(port, addr=host, registry=registry if registry is not None else REGISTRY)
    except OSError as e:
        raise ConfigurationError(f"metrics_port: cannot listen on {host}:{port}: {e.strerror or e}") from None
    return int(httpd.server_port)


def configure(settings: Settings, private_scrape: bool = False) -> None:
    """Sets the global tracer and meter providers from the settings (once per process; see module doc).

    ``private_scrape``: a worker of ``detseg serve --workers N`` serves its Prometheus endpoint on a free loopback
    port (``scrape_port``), which the supervisor's one endpoint on ``metrics_port`` reads with a ``worker`` label."""
    global _scrape_port
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider

    from service import __version__

    resource = Resource.create({"service.name": "detseg", "service.version": __version__})
    if settings.traces_exporter != "none" and not isinstance(trace.get_tracer_provider(), TracerProvider):
        from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter, SpanExporter

        provider = TracerProvider(resource=resource)
        exporter: SpanExporter
        if settings.traces_exporter == "otlp":
            from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

            exporter = OTLPSpanExporter(endpoint=settings.otlp_endpoint or None)
        else:
            exporter = ConsoleSpanExporter()
        provider.add_span_processor(BatchSpanProcessor(exporter))
        trace.set_tracer_provider(provider)
    if settings.metrics_exporter != "none" and not isinstance(metrics.get_meter_provider(), MeterProvider):
        from opentelemetry.sdk.metrics.export import (
            ConsoleMetricExporter,
            MetricReader,
            PeriodicExportingMetricReader,
        )

        reader: MetricReader
        if settings.metrics_exporter == "prometheus":
            from opentelemetry.exporter.prometheus import PrometheusMetricReader

            address = ("127.0.0.1", 0) if private_scrape else (settings.host, settings.metrics_port)
            _scrape_port = scrape_endpoint(*address)
            reader = PrometheusMetricReader()
        elif settings.metrics_exporter == "otlp":
            from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import OTLPMetricExporter

            reader = PeriodicExportingMetricReader(OTLPMetricExporter(endpoint=settings.otlp_endpoint or None))
        else:
            reader = PeriodicExportingMetricReader(ConsoleMetricExporter())
        metrics.set_meter_provider(MeterProvider(resource=resource, metric_readers=[reader]))


# detseg.rpc.duration's bucket bounds, seconds: OpenTelemetry's semantic conventions' for request durations
# (5 ms to 10 s), and 30 s to 5 min for streams (a Track call lasts its video). The SDK's default bounds (0 to
# 10,000) are made for milliseconds: in seconds every unary call fell in one bucket (le="5.0").
DURATION_BUCKETS_S = (
    0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 30.0, 60.0, 300.0,
)  # fmt: skip


class Instruments:
    """The metric instruments, made once per process from the global meter provider."""

    def __init__(self) -> None:
        from opentelemetry.metrics import CallbackOptions, Observation

        meter = metrics.get_meter("detseg")
        self.duration = meter.create_histogram(
            "detseg.rpc.duration",
            unit="s",
            description="RPC latency (a stream's: the whole call)",
            explicit_bucket_boundaries_advisory=DURATION_BUCKETS_S,
        )
        self.errors = meter.create_counter("detseg.rpc.errors", description="RPCs that ended with an error code")

        def gauge(read: Callable[[Any], int]) -> Callable[[CallbackOptions], Iterable[Observation]]:
            return lambda options: [Observation(sum(read(s) for s in list(_sources)))]

        meter.create_observable_gauge(
            "detseg.requests.in_flight", [gauge(lambda s: s.admission.in_flight)], description="requests running"
        )
        meter.create_observable_gauge(
            "detseg.requests.queued", [gauge(lambda s: s.admission.queued)], description="requests waiting (queue)"
        )
        for event in ("hits", "misses", "evictions"):
            meter.create_observable_counter(
                f"detseg.cache.{event}", [gauge(_cache_count(event))], description=f"embedding cache {event}"
            )
        # corrupt: unreadable values read (then deleted); refused: calls Redis refused for want of memory
        for event in ("hits", "misses", "errors", "corrupt", "refused"):
            meter.create_observable_counter(
                f"detseg.cache.shared.{event}", [gauge(_shared_count(event))], description=f"shared cache {event}"
            )
        meter.create_observable_gauge(
            "detseg.track.sessions", [gauge(lambda s: s.tracking.open)], description="Track sessions open"
        )
        meter.create_observable_gauge(
            "detseg.track.objects", [gauge(lambda s: s.tracking.objects)], description="tracks followed by sessions"
        )
        meter.create_observable_counter(
            "detseg.track.frames", [gauge(lambda s: s.tracking.frames)], description="Track frames answered"
        )
        meter.create_observable_gauge(
            "detseg.cache.shared.up",
            [gauge(lambda s: int(bool(s.shared_tier and s.shared_tier.up)))],
            description="1 when the shared cache (Redis) answers, 0 when it does not or there is none",
        )


def _cache_count(event: str) -> Callable[[Any], int]:
    return lambda servicer: int(getattr(servicer.cache_stats(), event))


def _shared_count(event: str) -> Callable[[Any], int]:
    return lambda servicer: int(getattr(servicer.shared_tier, event, 0))


def instruments() -> Instruments:
    global _instruments
    if _instruments is None:
        _instruments = Instruments()
    return _instruments


def register(servicer: Any) -> None:
    """Makes a servicer's admission counts and cache statistics visible to the gauges."""
    _sources.add(servicer)


# gRPC's core cancels a call at its deadline a few milliseconds before time_remaining() reaches 0 (measured: 5-6 ms
# left): a cancellation this close to the deadline is the deadline's.
_DEADLINE_SLACK_S = 0.05


def rpc_status(context: grpc.aio.ServicerContext, error: BaseException) -> grpc.StatusCode:
    """The status an RPC ended with: the one the handler aborted with; for a call gRPC cancelled (or whose write
    failed as it was), DEADLINE_EXCEEDED when its deadline had passed (what the client sees), else CANCELLED."""
    if isinstance(error, asyncio.CancelledError) or (
        not isinstance(error, grpc.aio.AbortError) and context.cancelled()
    ):
        remaining = context.time_remaining()
        if remaining is not None and remaining <= _DEADLINE_SLACK_S:
            return grpc.StatusCode.DEADLINE_EXCEEDED
        return grpc.StatusCode.CANCELLED
    code = context.code()
    return code if isinstance(code, grpc.StatusCode) else grpc.StatusCode.UNKNOWN


def record_rpc(span: trace.Span, method: str, code: grpc.StatusCode, seconds: float) -> None:
    """Marks an RPC's span with its method and status and records its duration (and error) in the instruments."""
    attributes = {"rpc.method": method, "rpc.grpc.status_code": code.name}
    span.set_attributes({"rpc.system": "grpc", "rpc.service": "detseg.v1.SegmentationService", **attributes})
    if code != grpc.StatusCode.OK:
        span.set_status(trace.Status(trace.StatusCode.ERROR, code.name))
        instruments().errors.add(1, attributes)
    instruments().duration.record(seconds, attributes)


def current_trace_id() -> str | None:
    """Hex trace id of the current span, None outside one (log records carry it)."""
    context = trace.get_current_span().get_span_context()
    return format(context.trace_id, "032x") if context.is_valid else None
