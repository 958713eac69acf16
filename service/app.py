"""The composition root: Settings → the runner (through the loader it is given), the caches and the shared tier,
the ImageStore and the pipeline, served by the gRPC face (``service.api.server``).

``create_server(settings, load_runner) -> (served, port)`` (grpc examples' shape; tests bind port 0): the port
opens at once, before any model loads: health answers NOT_SERVING and the detseg RPCs UNAVAILABLE while the models
load and warm up (what Kubernetes probes expect), then SERVING. If loading fails, health stays NOT_SERVING, RPCs say
the models failed to load, and ``serve_forever`` (``service.api.server``) stops the server and raises the error.
``InProcessServer``: the same server on its own event loop in a background thread.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import logging
import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple, TypeVar

import grpc
import numpy as np

from service.api.server import SERVICE_NAME, Served, start_server
from service.api.workers import WorkerLink
from service.config import Settings
from service.errors import DetsegError
from service.models.adapted import read_adapted
from service.models.catalog import PROFILE_SCORE_THRESHOLDS
from service.models.profiles import ADAPTED_PROFILE
from service.pipeline.cache import EmbeddingCache
from service.pipeline.image import ImageLimits, check_jpeg_device
from service.pipeline.images import ImageStore
from service.pipeline.lru import LRU
from service.pipeline.phrases import PhraseReader
from service.pipeline.pipeline import Pipeline
from service.pipeline.prompts import ImageInput, Limits, SegmentQuery
from service.pipeline.review import ReviewRules
from service.pipeline.shared_cache import ModelIdentity, RedisTier
from service.pipeline.vocabulary import EmbeddingLRU, VocabularyMatcher
from service.runners.base import Runner
from service.startup import configure_process

if TYPE_CHECKING:
    from _typeshed import DataclassInstance

log = logging.getLogger(__name__)

_SIBLINGS_POLL_SECONDS = 0.1  # how often a loaded worker looks whether its siblings have loaded too
RunnerFactory = Callable[[], Runner]  # may block (runs in a thread); the server awaits runner.start()
C = TypeVar("C", bound="DataclassInstance")


def _from_settings(config: type[C], settings: Settings, prefix: str = "", **given: Any) -> C:
    """A config dataclass whose fields are the Settings fields ``prefix + name``, but for those ``given``."""
    named = {f.name: getattr(settings, prefix + f.name) for f in dataclasses.fields(config) if f.name not in given}
    return config(**named, **given)


def review_rules(settings: Settings) -> ReviewRules:
    """The server's review rules (Settings ``review_*``)."""
    return _from_settings(ReviewRules, settings, prefix="review_")


def request_limits(settings: Settings, profile: str) -> Limits:
    """What a request may ask and its defaults (the Settings fields of the same names), with the review rules; the
    default score threshold is the one ``profile``'s detector was calibrated to answer at (an adapted folder's: its
    card's, its base's) unless the settings name one (``Settings.request_score_threshold``)."""
    if profile == ADAPTED_PROFILE and settings.adapted:
        calibrated = read_adapted(Path(settings.adapted)).score_threshold
    else:
        calibrated = PROFILE_SCORE_THRESHOLDS.get(profile)
    threshold = settings.request_score_threshold(calibrated)
    return _from_settings(Limits, settings, review=review_rules(settings), default_score_threshold=threshold)


def image_limits(settings: Settings) -> ImageLimits:
    return ImageLimits(
        max_bytes=settings.max_image_bytes, max_pixels=settings.max_image_pixels, max_side=settings.max_image_side
    )


def shared_tier(settings: Settings, runner: Runner, reader: PhraseReader | None = None) -> RedisTier | None:
    """The Redis tier when ``redis_url`` is set, its keys naming ``runner``'s models and the phrase ``reader``
    (checked once now; a Redis that is down is only logged)."""
    if not settings.redis_url:
        return None
    tier = RedisTier(
        url=settings.redis_url,
        identity=ModelIdentity.of(runner, reader, settings.jpeg_device, settings.device),
        ttl=settings.cache_ttl_seconds,
        max_entry_bytes=settings.redis_max_entry_bytes,
        timeout=settings.redis_timeout_seconds,
        retry_after=settings.redis_retry_seconds,
        max_masks=settings.max_kept_masks,
    )
    tier.ping()
    return tier


def image_store(settings: Settings, runner: Runner, reader: PhraseReader | None = None) -> ImageStore:
    """This process's embedding cache and, with ``redis_url``, the shared tier behind it."""
    cache = EmbeddingCache(settings.cache_max_bytes, settings.cache_ttl_seconds)
    shared = shared_tier(settings, runner, reader)
    jpeg_device = check_jpeg_device(settings.jpeg_device)
    return ImageStore(image_limits(settings), cache, shared, settings.max_kept_masks, jpeg_device)


def phrase_reader(runner: Runner) -> PhraseReader | None:
    """The reader of an open-vocabulary detector whose class names are an attribute grammar (the demo's), when
    the server has a sentence encoder; None otherwise (texts are embedded as sent)."""
    if not runner.detector.open_vocabulary or runner.text_encoder is None:
        return None
    return PhraseReader.for_vocabulary(runner.detector.names, runner.embed_text)


def build_pipeline(runner: Runner, settings: Settings) -> Pipeline:
    open_vocabulary = runner.detector.open_vocabulary
    reader = phrase_reader(runner)
    return Pipeline(
        runner,
        image_store(settings, runner, reader),
        request_limits(settings, runner.profile),
        matcher=(
            VocabularyMatcher(runner.embed_text, settings.text_match_threshold, settings.text_cache_entries)
            if runner.text_encoder is not None and not open_vocabulary
            else None
        ),
        class_embeddings=EmbeddingLRU(runner.embed_classes, settings.text_cache_entries) if open_vocabulary else None,
        phrase_reader=reader,
        exemplar_embeddings=LRU(settings.exemplar_cache_entries),
        mask_threads=settings.mask_threads or min(8, settings.threads or len(os.sched_getaffinity(0))),
    )


async def create_server(
    settings: Settings, load_runner: RunnerFactory, link: WorkerLink | None = None
) -> tuple[Served, int]:
    """Builds, binds and starts the server; models load in the background via ``load_runner`` (in a thread).

    Sets the process-wide third-party switches first (``service.startup.configure_process``). Returns the
    started server (``Served``: the gRPC server, its servicer and health; ``serve_forever`` runs it) and the bound
    port (``settings.port`` 0 picks a free one). ``link``: this worker's link to its siblings (one of
    ``detseg serve --workers N``, ``service.supervisor``); a worker that replaces one that died loads its models
    first and binds the port after (a load failure then raises here).
    """
    configure_process(settings)
    if link is not None and link.replacement:
        loaded = await _prepare(settings, load_runner)
        served = await start_server(settings, link)
        served.keep(asyncio.create_task(_serve(served, settings, loaded, link)))
    else:
        served = await start_server(settings, link)
        served.keep(asyncio.create_task(_load(served, settings, load_runner, link)))
    return served, served.port


LOAD_THREAD = "detseg-load"


def exit_if_loading() -> None:
    """For a server process whose server has stopped: when its models are still loading (SIGTERM came during the
    load: nothing was in flight), exits at once with status 0. Waiting meant the whole download, export or int8
    build (an executor's thread is joined at exit); a normal exit under the running load aborts in torch's C++ code
    ("terminate called without an active exception"). What a load writes lands whole or not at all."""
    if any(t.name == LOAD_THREAD and t.is_alive() for t in threading.enumerate()):
        logging.shutdown()
        os._exit(0)


class _Loaded(NamedTuple):
    runner: Runner
    pipeline: Pipeline


async def _prepare(settings: Settings, load_runner: RunnerFactory) -> _Loaded:
    """Loads the models on a thread that ends with the loading (its torch threads with it:
    ``service.runners.local.torch_thread``; named LOAD_THREAD, a daemon: ``exit_if_loading``), starts the runner and
    warms the pipeline up."""
    loading: concurrent.futures.Future[Runner] = concurrent.futures.Future()

    def load() -> None:
        try:
            loading.set_result(load_runner())
        except BaseException as e:  # the caller's to handle
            loading.set_exception(e)

    threading.Thread(target=load, name=LOAD_THREAD, daemon=True).start()
    runner = await asyncio.wrap_future(loading)
    await runner.start()
    pipeline = build_pipeline(runner, settings)
    await _warm_up(pipeline)
    return _Loaded(runner, pipeline)


async def _load(served: Served, settings: Settings, load_runner: RunnerFactory, link: WorkerLink | None) -> None:
    """Loads and warms the models, then serves them (``_serve``); a failure makes the server unable to serve."""
    try:
        loaded = await _prepare(settings, load_runner)
    except Exception as e:
        if isinstance(e, DetsegError):
            log.error("models could not be loaded: %s", e)
        else:
            log.exception("model loading failed")
        served.fail(e)
        return
    await _serve(served, settings, loaded, link)


async def _serve(served: Served, settings: Settings, loaded: _Loaded, link: WorkerLink | None) -> None:
    """Attaches the pipeline and keeps gRPC health in step with the runner's readiness (and, for a worker, with
    every worker having loaded: one health status for the whole server)."""
    runner = loaded.runner
    served.servicer.attach(loaded.pipeline, runner.profile)
    log.info("serving: profile %s, backend %s, models %s", runner.profile, runner.backend, _names(runner))
    if link is not None:
        link.set_ready(True)
    ready = True
    while True:  # a remote backend may go away and come back (Triton restarted): health follows it
        siblings = link is None or link.all_started()
        await served.set_serving(ready and siblings)
        await asyncio.sleep(settings.health_interval_seconds if siblings else _SIBLINGS_POLL_SECONDS)
        now = await runner.ready()
        if now != ready:
            log.warning("backend %s %s", runner.backend, "ready again: SERVING" if now else "not ready: NOT_SERVING")
        ready = now


def _names(runner: Runner) -> str:
    return ", ".join(m.name for m in runner.models)


def _warm_up_size(limits: ImageLimits) -> tuple[int, int]:
    """(height, width) of the warm-up image: 64 x 96, or as much of it as the server's image limits take (a server
    whose max_image_pixels was under 6,144 failed its warm-up and never served)."""
    scale = min(1.0, limits.max_side / 96, (limits.max_pixels / 6144) ** 0.5, (limits.max_bytes / (3 * 6144)) ** 0.5)
    return max(1, int(64 * scale)), max(1, int(96 * scale))


async def _warm_up(pipeline: Pipeline) -> None:
    """One full request on a small synthetic image, so the first caller pays no first-call costs (and one text
    for a concept segmenter). Without the shared tier: every replica warms up on the same image, and its own
    models must run (nothing is read from, or left in, Redis)."""
    h, w = _warm_up_size(pipeline.images.limits)
    rgb = np.random.default_rng(0).integers(0, 255, (h, w, 3), dtype=np.uint8)
    image = ImageInput(raw=rgb.tobytes(), width=w, height=h)
    detector = pipeline.runner.detector
    # an open-vocabulary detector has no classes of its own: one of its checkpoint's names (a phrase reader reads
    # it, where one would refuse other words) or any word
    classes = (detector.names[:1] or ("object",)) if detector.open_vocabulary else ()
    with pipeline.images.local_only():
        await pipeline.segment(SegmentQuery(image=image, request_id="warm-up", classes=classes))
        if pipeline.concept_processing is not None:
            await pipeline.segment(SegmentQuery(image=image, request_id="warm-up", texts=("object",)))
        if pipeline.matcher is not None:
            await pipeline.matcher.prepare(pipeline.runner.detector.names)
        pipeline.runner.calls.clear()
        pipeline.images.cache.clear()


class InProcessServer:
    """A real detseg server inside this process, on its own event loop in a daemon thread: what ``detseg eval``
    and ``detseg label`` start when they are given no ``--target`` (``create_server`` bound to a free loopback
    port), and what the tests start on port 0.

    The port is open on return (models may still be loading: ``wait_serving``); ``served`` is the running server;
    ``stop`` ends it. ``load_runner`` defaults to the settings' models."""

    def __init__(self, settings: Settings, load_runner: RunnerFactory | None = None) -> None:
        from service.runners.factory import load_runner as load_for_settings

        self.loop = asyncio.new_event_loop()
        self.port = 0
        self._served: Served | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None
        factory = load_runner or (lambda: load_for_settings(settings))
        self._thread = threading.Thread(target=self._main, args=(settings, factory), daemon=True)
        self._thread.start()
        if not self._ready.wait(60):
            raise RuntimeError("the in-process server did not start within 60 s")
        if self._error is not None:
            raise self._error

    def _main(self, settings: Settings, factory: RunnerFactory) -> None:
        asyncio.set_event_loop(self.loop)

        async def start() -> None:
            try:
                self._served, self.port = await create_server(settings, factory)
            except BaseException as e:  # surfaced in __init__
                self._error = e
            finally:
                self._ready.set()

        self.loop.run_until_complete(start())
        if self._error is None:
            self.loop.run_forever()

    @property
    def served(self) -> Served:
        """The running server: its gRPC server, servicer (and through it the pipeline) and health."""
        if self._served is None:
            raise RuntimeError("the in-process server did not start")
        return self._served

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def wait_serving(self, timeout: float = 300.0) -> None:
        """Blocks until health says SERVING; RuntimeError if the models failed to load or ``timeout`` passed."""
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        request = health_pb2.HealthCheckRequest(service=SERVICE_NAME)
        failed = asyncio.run_coroutine_threadsafe(self.served.failed.wait(), self.loop)
        with grpc.insecure_channel(self.target) as channel:
            call = health_pb2_grpc.HealthStub(channel).Watch(request, timeout=timeout)
            # A failed load sends no new health status (NOT_SERVING already): it ends the watch itself.
            failed.add_done_callback(lambda _: call.cancel())
            try:
                for response in call:
                    if response.status == health_pb2.HealthCheckResponse.SERVING:
                        return
            except grpc.RpcError as e:
                if not self.served.failed.is_set():
                    raise RuntimeError(f"the in-process server never reported SERVING ({e.code().name})") from None
            finally:
                failed.cancel()
        error = self.served.error
        raise RuntimeError(f"the in-process server's models failed to load: {error or 'see the log'}")

    def stop(self) -> None:
        if self._served is not None:
            asyncio.run_coroutine_threadsafe(self._served.stop(0), self.loop).result(30)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(30)
        if not self._thread.is_alive():
            self.loop.close()

    def __enter__(self) -> InProcessServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
