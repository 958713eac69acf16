"""Named stages of a request: one mechanism that feeds both the provenance timings (``Provenance.timings``)
and the trace (an OpenTelemetry span per stage, a child of the request's span).

Uses the OpenTelemetry API only: without a configured SDK (``service.telemetry``) spans are no-ops and only the
timings remain.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from typing import Any

from opentelemetry import trace

_tracer = trace.get_tracer("detseg.pipeline")


@contextlib.contextmanager
def stage(timings: dict[str, float], name: str, **attributes: Any) -> Iterator[trace.Span]:
    """Times the body into ``timings[name]`` (seconds, added up if the stage repeats) inside a span
    ``detseg.<name>`` carrying ``attributes``; the span is yielded for attributes known only later."""
    start = time.perf_counter()
    with _tracer.start_as_current_span(f"detseg.{name}", attributes=attributes) as span:
        try:
            yield span
        finally:
            timings[name] = timings.get(name, 0.0) + time.perf_counter() - start
