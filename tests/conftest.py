"""Shared fixtures: seeded test models, a real gRPC server on port 0 in its own thread, generated stubs."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest
import torch
from opentelemetry import metrics, trace
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from service.app import InProcessServer as ServerThread
from service.config import Settings
from service.proto.detseg.v1 import detseg_pb2_grpc as pb_grpc
from service.runners.base import Runner
from service.startup import block_telemetry

# ONNX Runtime reads its telemetry switch when it is imported (test modules import it): off before any of them.
block_telemetry()

# Telemetry of every in-process server goes to in-memory exporters (the SDK's own), set before any server
# starts; service.telemetry.configure keeps a provider that is already there.
SPANS = InMemorySpanExporter()
METRICS = InMemoryMetricReader()
_tracer_provider = TracerProvider()
_tracer_provider.add_span_processor(SimpleSpanProcessor(SPANS))
trace.set_tracer_provider(_tracer_provider)
metrics.set_meter_provider(MeterProvider(metric_readers=[METRICS]))


def metric_points(name: str) -> list:
    """Every data point of the in-process servers' metric ``name`` so far (cumulative; one per attribute set)."""
    data = METRICS.get_metrics_data()
    return [
        point
        for rm in (data.resource_metrics if data else [])
        for sm in rm.scope_metrics
        for m in sm.metrics
        if m.name == name
        for point in m.data.data_points
    ]


ASSETS = Path(__file__).parent / "assets"
THREADS = 2
# Where the torch runner and the reference predictors run: cpu in CI; a GPU machine runs the same parity
# tests with DETSEG_TEST_DEVICE=cuda.
DEVICE = os.environ.get("DETSEG_TEST_DEVICE", "cpu")
# On a lent GPU machine: DETSEG_TEST_PRECISION=fp32 compares exact paths with the references, and the sentence
# encoder's package (90 MB) does not travel there, so DETSEG_TEST_TEXT_ENCODER=none.
GPU_RUN_OVERRIDES = {
    field: os.environ[var]
    for field, var in (("precision", "DETSEG_TEST_PRECISION"), ("text_encoder", "DETSEG_TEST_TEXT_ENCODER"))
    if var in os.environ
}

# Modules whose servers run in processes of their own while the test process holds what earlier modules left (~3.3
# to 4 GB of models and session servers by the end of the integration tests): they run first, while it holds least.
# Session 29's CI: test_workers (two workers, ~4.1 GB) peaked at 4.70 GiB first, against 7.63 GiB last in session 28;
# the suite's peak then moved to test_reliability's SIGTERM drain (7.59 GiB), which runs second since (after
# test_workers: its in-process session server would otherwise be loaded beside the workers).
RUN_FIRST = ("tests/integration/test_workers.py", "tests/integration/test_reliability.py")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Moves the tests of ``RUN_FIRST`` to the front in its order, keeping every other test's order."""
    module = {item: item.nodeid.split("::")[0] for item in items}
    first = sorted((i for i in items if module[i] in RUN_FIRST), key=lambda i: RUN_FIRST.index(module[i]))
    items[:] = first + [i for i in items if module[i] not in RUN_FIRST]


def ultralytics_asset(name: str) -> Path:
    from ultralytics.utils import ASSETS as UL_ASSETS

    return Path(UL_ASSETS) / name


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="session")
def settings(cache_dir: Path) -> Settings:
    # torch: the references these tests compare with (ultralytics, sam2) are torch; the CPU default backend
    # (openvino, int8 encoder) has its own tests (test_openvino, test_cli's default serve).
    return Settings(
        models="test", cache_dir=cache_dir, port=0, threads=THREADS, offline=True, device=DEVICE, backend="torch",
        **GPU_RUN_OVERRIDES,
    )  # fmt: skip


@pytest.fixture(scope="session")
def runner(settings: Settings) -> Runner:
    from service.runners.factory import load_runner

    return load_runner(settings)


@pytest.fixture(autouse=True)
def _torch_threads() -> Iterator[None]:
    """ultralytics' predict drops torch to cpu_count-1 threads process-wide; restore after every test."""
    yield
    torch.set_num_threads(THREADS)


def wait_serving(channel: grpc.Channel, timeout: float = 120.0) -> None:
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    stub = health_pb2_grpc.HealthStub(channel)
    request = health_pb2.HealthCheckRequest(service="detseg.v1.SegmentationService")
    for response in stub.Watch(request, timeout=timeout):
        if response.status == health_pb2.HealthCheckResponse.SERVING:
            return
    raise AssertionError("server never reported SERVING")


@contextlib.contextmanager
def serving(
    settings: Settings, factory: Callable[[], Runner] | None = None, timeout: float = 600.0
) -> Iterator[pb_grpc.SegmentationServiceStub]:
    """A real server for ``settings`` (its runner from ``factory``, else loaded for the settings), SERVING, and
    a stub on it (large responses allowed); the server stops on exit. ``timeout``: for loading, which builds seeded
    models anew in a fresh cache for some tests (one took over 120 s on a loaded 2-core CI machine)."""
    from service.runners.factory import load_runner

    srv = ServerThread(settings, factory or (lambda: load_runner(settings)))
    try:
        with grpc.insecure_channel(srv.target, options=[("grpc.max_receive_message_length", 64 << 20)]) as channel:
            wait_serving(channel, timeout)
            yield pb_grpc.SegmentationServiceStub(channel)
    finally:
        srv.stop()


@pytest.fixture(scope="session")
def server(settings: Settings, runner: Runner) -> Iterator[ServerThread]:
    srv = ServerThread(settings, lambda: runner)
    with grpc.insecure_channel(srv.target) as channel:
        wait_serving(channel)
    yield srv
    srv.stop()


@pytest.fixture(scope="session")
def demo_server(settings: Settings) -> Iterator[ServerThread]:
    """A server with the demo profile (the shapes-trained models shipped in service/models/demo)."""
    from service.runners.factory import load_runner

    demo = settings.replace(models="demo")
    srv = ServerThread(demo, lambda: load_runner(demo))
    with grpc.insecure_channel(srv.target) as channel:
        wait_serving(channel)
    yield srv
    srv.stop()


@pytest.fixture(scope="session")
def demo_stub(demo_server: ServerThread) -> Iterator[pb_grpc.SegmentationServiceStub]:
    options = [("grpc.max_receive_message_length", 64 << 20)]
    with grpc.insecure_channel(demo_server.target, options=options) as ch:
        yield pb_grpc.SegmentationServiceStub(ch)


@pytest.fixture(scope="session")
def open_settings(settings: Settings) -> Settings:
    """The "test-open" profile: a seeded open-vocabulary YOLOE-11n (see service.models.testing)."""
    return settings.replace(models="test-open")


@pytest.fixture(scope="session")
def open_runner(open_settings: Settings) -> Runner:
    from service.runners.factory import load_runner

    return load_runner(open_settings)


@pytest.fixture(scope="session")
def open_stub(open_settings: Settings, open_runner: Runner) -> Iterator[pb_grpc.SegmentationServiceStub]:
    """An embedded (torch) server with the open-vocabulary test detector."""
    with serving(open_settings, lambda: open_runner) as stub:
        yield stub


@pytest.fixture(scope="session")
def world(open_settings: Settings) -> Iterator[tuple[Path, dict[str, pb_grpc.SegmentationServiceStub]]]:
    """Servers (torch, and ONNX Runtime on its export) with a seeded YOLO-World v2 (n): texts only."""
    from service.models import testing

    path = testing.make_test_open_detector(open_settings.cache_dir / "test-models", architecture="yolov8n-worldv2.yaml")
    with contextlib.ExitStack() as stack:
        stubs = {
            backend: stack.enter_context(serving(open_settings.replace(detector=str(path), backend=backend)))
            for backend in ("torch", "onnx")
        }
        yield path, stubs


@pytest.fixture(scope="session")
def channel(server: ServerThread) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(server.target, options=[("grpc.max_receive_message_length", 64 << 20)]) as ch:
        yield ch


@pytest.fixture(scope="session")
def stub(channel: grpc.Channel) -> pb_grpc.SegmentationServiceStub:
    return pb_grpc.SegmentationServiceStub(channel)


_FIGURES: dict[str, object] = {}


@pytest.fixture(scope="session")
def figures() -> dict[str, object]:
    """Measured figures (parity deviations, IoUs) that the run prints in its summary."""
    return _FIGURES


def pytest_terminal_summary(terminalreporter: object, exitstatus: int, config: object) -> None:
    if _FIGURES:
        write = terminalreporter.write_line  # type: ignore[attr-defined]
        write("detseg measured figures:")
        for key, value in sorted(_FIGURES.items()):
            write(f"  {key}: {value}")
