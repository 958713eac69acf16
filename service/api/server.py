"""Server factory: ``create_server(settings) -> (server, port)`` (grpc examples' shape; tests bind port 0).

The port opens at once, before any model loads: health answers NOT_SERVING and the detseg RPCs UNAVAILABLE
while the models load and warm up (what Kubernetes probes expect), then SERVING. If loading fails, health stays
NOT_SERVING, RPCs say the models failed to load, and ``serve_forever`` stops the server and raises the error.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
from collections.abc import Callable

import grpc
import numpy as np
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from service import telemetry
from service.api.access_log import AccessLog
from service.api.security import TokenAuth, load_tokens, server_credentials
from service.api.servicer import SegmentationServicer
from service.config import Settings
from service.errors import DetsegError, ModelUnavailable
from service.pipeline.cache import EmbeddingCache
from service.pipeline.image import ImageLimits
from service.pipeline.lru import LRU
from service.pipeline.pipeline import Pipeline
from service.pipeline.prompts import ImageInput, Limits, SegmentQuery
from service.pipeline.review import ReviewRules
from service.pipeline.shared_cache import ModelIdentity, RedisTier
from service.pipeline.vocabulary import EmbeddingLRU, VocabularyMatcher
from service.proto.detseg.v1 import detseg_pb2 as pb
from service.proto.detseg.v1 import detseg_pb2_grpc as pb_grpc
from service.runners.base import Runner
from service.startup import configure_process

log = logging.getLogger(__name__)
SERVICE_NAME = pb.DESCRIPTOR.services_by_name["SegmentationService"].full_name

RunnerFactory = Callable[[], Runner]  # may block (runs in a thread); the server awaits runner.start()


@dataclasses.dataclass
class _State:
    """What the running server holds on to (kept alive on the server object)."""

    servicer: SegmentationServicer
    health: health.aio.HealthServicer
    loading: asyncio.Task[None] | None = None
    serving: bool = False
    load_error: BaseException | None = None
    load_failed: asyncio.Event = dataclasses.field(default_factory=asyncio.Event)
    health_server: grpc.aio.Server | None = None  # the plaintext health-only port (Settings.health_port)

    async def stop(self, grace: float | None) -> None:
        """Stops the health-only port, if any, and the loading task that keeps health in step with the runner
        (it holds the models; the main server is stopped by its owner)."""
        if self.health_server is not None:
            await self.health_server.stop(grace)
        if self.loading is not None:
            self.loading.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.loading

    async def set_serving(self, serving: bool) -> None:
        if serving != self.serving:
            self.serving = serving
            status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
            for name in ("", SERVICE_NAME):
                await self.health.set(name, status)


def review_rules(settings: Settings) -> ReviewRules:
    """The server's review rules (Settings ``review_*``)."""
    return ReviewRules(
        score_below=settings.review_score_below,
        mask_score_below=settings.review_mask_score_below,
        stability_below=settings.review_stability_below,
        min_mask_area=settings.review_min_mask_area,
        max_mask_components=settings.review_max_mask_components,
        text_similarity_below=settings.review_text_similarity_below,
    )


def build_pipeline(runner: Runner, settings: Settings) -> Pipeline:
    return Pipeline(
        runner,
        ImageLimits(settings.max_image_bytes, settings.max_image_pixels, settings.max_image_side),
        Limits(
            max_class_prompts=settings.max_class_prompts,
            max_region_prompts=settings.max_region_prompts,
            max_points_per_region=settings.max_points_per_region,
            max_instances=settings.max_instances,
            default_score_threshold=settings.default_score_threshold,
            default_iou_threshold=settings.default_iou_threshold,
            default_max_instances=settings.default_max_instances,
            max_image_pixels=settings.max_image_pixels,
            mask_min_region_area=settings.mask_min_region_area,
            mask_clip_to_box=settings.mask_clip_to_box,
            mask_box_margin=settings.mask_box_margin,
            max_text_prompts=settings.max_text_prompts,
            max_text_chars=settings.max_text_chars,
            max_exemplars=settings.max_exemplars,
            review=review_rules(settings),
        ),
        EmbeddingCache(settings.cache_max_bytes, settings.cache_ttl_seconds),
        matcher=(
            VocabularyMatcher(runner.embed_text, settings.text_match_threshold, settings.text_cache_entries)
            if runner.text_encoder is not None and not runner.detector.open_vocabulary
            else None
        ),
        class_embeddings=(
            EmbeddingLRU(runner.embed_classes, settings.text_cache_entries) if runner.detector.open_vocabulary else None
        ),
        exemplar_embeddings=LRU(settings.exemplar_cache_entries),
        shared=shared_tier(settings, runner),
        mask_threads=settings.mask_threads or min(8, os.cpu_count() or 1),
    )


def shared_tier(settings: Settings, runner: Runner) -> RedisTier | None:
    """The Redis tier when ``redis_url`` is set, its keys naming ``runner``'s models (checked once now; a Redis
    that is down is only logged)."""
    if not settings.redis_url:
        return None
    tier = RedisTier(
        settings.redis_url, ModelIdentity.of(runner), settings.cache_ttl_seconds, settings.redis_max_entry_bytes,
        settings.redis_timeout_seconds, settings.redis_retry_seconds,
    )  # fmt: skip
    tier.ping()
    return tier


async def create_server(settings: Settings, load_runner: RunnerFactory) -> tuple[grpc.aio.Server, int]:
    """Builds, binds and starts the server; models load in the background via ``load_runner`` (in a thread).

    Sets the process-wide third-party switches first (``service.startup.configure_process``). Returns the
    started server and the bound port (``settings.port`` 0 picks a free one).
    """
    configure_process(settings)
    credentials = server_credentials(settings)  # configuration errors surface before anything binds
    tokens = load_tokens(settings)
    telemetry.configure(settings)
    server = grpc.aio.server(
        # Outermost first: the access log sees every status, an authentication refusal's included.
        interceptors=[
            *([AccessLog()] if settings.access_log else []),
            telemetry.RpcTelemetry(),
            *([TokenAuth(tokens)] if tokens else []),
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
        ],
        maximum_concurrent_rpcs=settings.max_concurrent_rpcs,
    )
    servicer = SegmentationServicer(settings)
    telemetry.register(servicer)
    health_servicer = health.aio.HealthServicer()
    pb_grpc.add_SegmentationServiceServicer_to_server(servicer, server)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    if settings.reflection:
        reflection.enable_server_reflection((SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), server)
    address = f"{settings.host}:{settings.port}"
    port = server.add_secure_port(address, credentials) if credentials else server.add_insecure_port(address)
    for name in ("", SERVICE_NAME):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
    await server.start()
    state = _State(servicer, health_servicer)
    if settings.health_port:  # Kubernetes' grpc probes cannot speak TLS: health alone, in plaintext, here
        state.health_server = grpc.aio.server()
        health_pb2_grpc.add_HealthServicer_to_server(health_servicer, state.health_server)
        state.health_server.add_insecure_port(f"{settings.host}:{settings.health_port}")
        await state.health_server.start()
    state.loading = asyncio.create_task(_load(state, settings, load_runner))
    server._detseg_state = state  # type: ignore[attr-defined]  # keeps the loading task referenced
    return server, port


async def _load(state: _State, settings: Settings, load_runner: RunnerFactory) -> None:
    """Loads and warms the models, then keeps gRPC health in step with the runner's readiness."""
    try:
        runner = await asyncio.to_thread(load_runner)
        await runner.start()
        pipeline = build_pipeline(runner, settings)
        await _warm_up(pipeline)
    except Exception as e:
        if isinstance(e, DetsegError):
            log.error("models could not be loaded: %s", e)
        else:
            log.exception("model loading failed")
        state.load_error = e
        state.servicer.load_failed()
        state.load_failed.set()
        return
    state.servicer.attach(pipeline, runner.profile)
    await state.set_serving(True)
    log.info("serving: profile %s, backend %s, models %s", runner.profile, runner.backend, _names(runner))
    while True:  # a remote backend may go away and come back (Triton restarted): health follows it
        await asyncio.sleep(settings.health_interval_seconds)
        ready = await runner.ready()
        if ready != state.serving:
            log.warning("backend %s %s", runner.backend, "ready again: SERVING" if ready else "not ready: NOT_SERVING")
        await state.set_serving(ready)


def _names(runner: Runner) -> str:
    return ", ".join(m.name for m in runner.models)


async def _warm_up(pipeline: Pipeline) -> None:
    """One full request on a small synthetic image, so the first caller pays no first-call costs (and one text
    for a concept segmenter). Without the shared tier: every replica warms up on the same image, and its own
    models must run (nothing is read from, or left in, Redis)."""
    shared, pipeline.shared = pipeline.shared, None
    rgb = np.random.default_rng(0).integers(0, 255, (64, 96, 3), dtype=np.uint8)
    image = ImageInput(raw=rgb.tobytes(), width=96, height=64)
    classes = ("object",) if pipeline.runner.detector.open_vocabulary else ()  # it has no classes of its own
    await pipeline.segment(SegmentQuery(image=image, request_id="warm-up", classes=classes))
    if pipeline.concept_processing is not None:
        await pipeline.segment(SegmentQuery(image=image, request_id="warm-up", texts=("object",)))
    if pipeline.matcher is not None:
        await pipeline.matcher.prepare(pipeline.runner.detector.names)
    pipeline.runner.calls.clear()
    pipeline.cache.clear()
    pipeline.shared = shared


async def serve_forever(server: grpc.aio.Server, grace_seconds: float) -> None:
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
    state: _State = server._detseg_state  # type: ignore[attr-defined]
    terminated = asyncio.ensure_future(server.wait_for_termination())
    signalled = asyncio.ensure_future(stop.wait())
    failed = asyncio.ensure_future(state.load_failed.wait())
    await asyncio.wait({terminated, signalled, failed}, return_when=asyncio.FIRST_COMPLETED)
    signalled.cancel()
    failed.cancel()
    try:
        if state.load_failed.is_set():
            await server.stop(0)
            await state.stop(0)
            error = state.load_error
            raise error if isinstance(error, DetsegError) else ModelUnavailable("models failed to load (see the log)")
        if stop.is_set():
            await state.health.enter_graceful_shutdown()
            log.info("shutting down (grace %.1fs)", grace_seconds)
            await server.stop(grace_seconds)
            await state.stop(0)
    finally:
        terminated.cancel()  # only once the server has stopped: cancelling it earlier cancels the shutdown
