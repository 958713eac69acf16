"""The gRPC server: ``start_server(settings) -> Served`` builds, binds and starts it around a
``SegmentationServicer`` (interceptors, message limits, keepalive, TLS, health, reflection, the plaintext
health-only port), and ``serve_forever`` runs it until a signal or a fatal error.

Health answers NOT_SERVING from the start; whoever attaches the servicer's pipeline (the composition root,
``service.app.create_server``) reports SERVING with ``Served.set_serving``, or a failure with ``Served.fail``: health
stays NOT_SERVING and ``serve_forever`` stops the server and raises the error.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
from collections.abc import Callable

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from service import telemetry
from service.api.interceptors import AccessLog, ParseRequests, RpcTelemetry
from service.api.security import TokenAuth, load_tokens, server_credentials
from service.api.servicer import SegmentationServicer
from service.api.workers import WorkerLink
from service.config import Settings
from service.errors import ConfigurationError, DetsegError, ModelUnavailable
from service.proto.detseg.v1 import detseg_pb2 as pb
from service.proto.detseg.v1 import detseg_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)
SERVICE_NAME = pb.DESCRIPTOR.services_by_name["SegmentationService"].full_name


@dataclasses.dataclass
class Served:
    """A started server and what its owner holds on to: the gRPC server, its bound port, the servicer, health
    (and the plaintext health-only port, if any), the background tasks that feed them (cancelled on ``stop``) and
    the error that makes it unable to serve (``fail``)."""

    server: grpc.aio.Server
    port: int
    servicer: SegmentationServicer
    health: health.aio.HealthServicer
    health_server: grpc.aio.Server | None = None  # the plaintext health-only port (Settings.health_port)
    serving: bool = False
    error: BaseException | None = None
    failed: asyncio.Event = dataclasses.field(default_factory=asyncio.Event)
    tasks: list[asyncio.Task[None]] = dataclasses.field(default_factory=list)

    async def set_serving(self, serving: bool) -> None:
        """Health SERVING or NOT_SERVING, for the whole server and for the detseg service."""
        if serving != self.serving:
            self.serving = serving
            status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
            for name in ("", SERVICE_NAME):
                await self.health.set(name, status)

    def fail(self, error: BaseException) -> None:
        """The server cannot serve (its models failed to load): RPCs say so and ``serve_forever`` raises ``error``
        (when it is a DetsegError, else ModelUnavailable)."""
        self.error = error
        self.servicer.load_failed()
        self.failed.set()

    def keep(self, task: asyncio.Task[None]) -> None:
        """Holds a task that runs for the server's life (cancelled by ``stop``)."""
        self.tasks.append(task)

    async def stop(self, grace: float | None) -> None:
        """Stops the server (in-flight RPCs get ``grace``), then the health-only port and the background tasks."""
        await self.server.stop(grace)
        if self.health_server is not None:
            await self.health_server.stop(0)
        for task in self.tasks:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def wait_for_termination(self) -> None:
        await self.server.wait_for_termination()


async def start_server(settings: Settings, link: WorkerLink | None = None) -> Served:
    """Builds, binds and starts the server with health NOT_SERVING and a servicer that answers UNAVAILABLE until
    its pipeline is attached. Configuration errors (TLS files, tokens, signing key) surface before anything binds;
    ``settings.port`` 0 picks a free port (``Served.port``).

    ``link``: this worker's link to its siblings (``service.supervisor``): the port is bound with SO_REUSEPORT, as
    every worker binds it, and admission holds server-wide. A single-process server binds without SO_REUSEPORT, so
    a second server on a port already taken fails to start instead of silently sharing its connections."""
    credentials = server_credentials(settings)
    tokens = load_tokens(settings)
    telemetry.configure(settings, private_scrape=link is not None)
    if link is not None:
        link.set_scrape_port(telemetry.scrape_port() or 0)
    server = grpc.aio.server(
        # Outermost first: the access log sees every status, an authentication refusal's included.
        interceptors=[
            *([AccessLog()] if settings.access_log else []),
            RpcTelemetry(),
            *([TokenAuth(tokens)] if tokens else []),
            ParseRequests(),
        ],
        options=[
            ("grpc.max_receive_message_length", settings.max_message_bytes),
            ("grpc.max_send_message_length", settings.max_message_bytes),
            ("grpc.max_concurrent_streams", settings.max_concurrent_streams),
            ("grpc.keepalive_time_ms", int(settings.keepalive_seconds * 1000)),
            ("grpc.keepalive_timeout_ms", int(settings.keepalive_timeout_seconds * 1000)),
            ("grpc.keepalive_permit_without_calls", 1),
            # clients may ping this often (the client library's defaults stay well above it)
            ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
            ("grpc.so_reuseport", int(link is not None)),
        ],
        maximum_concurrent_rpcs=settings.max_concurrent_rpcs,
    )
    servicer = SegmentationServicer(settings, link)
    telemetry.register(servicer)
    health_servicer = health.aio.HealthServicer()
    pb_grpc.add_SegmentationServiceServicer_to_server(servicer, server)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    if settings.reflection:
        reflection.enable_server_reflection((SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), server)
    address = f"{settings.host}:{settings.port}"
    port = _bound(
        address,
        lambda: server.add_secure_port(address, credentials) if credentials else server.add_insecure_port(address),
    )
    health_server = None
    if settings.health_port:  # Kubernetes' grpc probes cannot speak TLS: health alone, in plaintext, here
        health_server = grpc.aio.server(options=[("grpc.so_reuseport", int(link is not None))])
        health_pb2_grpc.add_HealthServicer_to_server(health_servicer, health_server)
        health_address = f"{settings.host}:{settings.health_port}"
        _bound(health_address, lambda: health_server.add_insecure_port(health_address))
    for name in ("", SERVICE_NAME):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
    await server.start()  # both ports bound first: one that cannot be leaves nothing started
    if health_server is not None:
        await health_server.start()
    return Served(server, port, servicer, health_servicer, health_server)


def _bound(address: str, add_port: Callable[[], int]) -> int:
    """``add_port()``'s port; gRPC's RuntimeError when it cannot bind as a ConfigurationError naming the address."""
    try:
        return add_port()
    except RuntimeError:
        raise ConfigurationError(
            f"cannot listen on {address}: the port is in use, or the host is not an address of this machine"
        ) from None


async def serve_forever(served: Served, grace_seconds: float) -> None:
    """Waits for termination; on SIGTERM/SIGINT, health goes NOT_SERVING and in-flight RPCs get ``grace``.

    Raises:
        DetsegError: the models failed to load (the server is stopped first); the error the loader raised
            when it is a DetsegError (e.g. WeightsNotFound naming the files), else ModelUnavailable.
    """
    import signal

    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    terminated = asyncio.ensure_future(served.wait_for_termination())
    signalled = asyncio.ensure_future(stop.wait())
    failed = asyncio.ensure_future(served.failed.wait())
    await asyncio.wait({terminated, signalled, failed}, return_when=asyncio.FIRST_COMPLETED)
    signalled.cancel()
    failed.cancel()
    try:
        if served.failed.is_set():
            await served.stop(0)
            error = served.error
            raise error if isinstance(error, DetsegError) else ModelUnavailable("models failed to load (see the log)")
        if stop.is_set():
            await served.health.enter_graceful_shutdown()
            log.info("shutting down (grace %.1fs)", grace_seconds)
            await served.stop(grace_seconds)
    finally:
        terminated.cancel()  # only once the server has stopped: cancelling it earlier cancels the shutdown
