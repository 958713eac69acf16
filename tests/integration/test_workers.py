"""`detseg serve --workers N`: N server processes on one port (service.supervisor), as an operator runs them.

Which worker a connection reached is read from the kernel (psutil: each worker's established connections to the
port), so the tests pick channels on different workers on purpose instead of hoping for it.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
import psutil
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from service.client import Client
from service.proto.detseg.v1 import detseg_pb2 as pb
from service.proto.detseg.v1 import detseg_pb2_grpc as pb_grpc
from tests.conftest import wait_serving
from tests.helpers import encode
from tests.triton_helpers import free_ports

pytestmark = pytest.mark.slow  # starts `detseg serve` processes

DETSEG = [sys.executable, "-m", "service.cli"]
HEALTH = health_pb2.HealthCheckRequest(service="detseg.v1.SegmentationService")


def _image(seed: int, side: int = 160) -> bytes:
    return encode(np.random.default_rng(seed).integers(0, 255, (side, side, 3), dtype=np.uint8))


@dataclass
class Workers:
    """A running `detseg serve --workers N`: its supervisor process, port and output file."""

    proc: subprocess.Popen[str]
    port: int
    log: str

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def pids(self) -> list[int]:
        """The worker processes' pids (the supervisor's children but redis-server and multiprocessing's tracker)."""
        children = psutil.Process(self.proc.pid).children()
        return sorted(c.pid for c in children if "spawn_main" in " ".join(c.cmdline()))

    def peers(self, pid: int) -> set[int]:
        """Client ports of the connections worker ``pid`` holds on the port."""
        conns = psutil.Process(pid).net_connections(kind="tcp")
        return {c.raddr.port for c in conns if c.laddr.port == self.port and c.status == "ESTABLISHED" and c.raddr}

    def channels_on_each_worker(self, stack: ExitStack, tries: int = 40) -> dict[int, grpc.Channel]:
        """One open channel per worker, keyed by the worker's pid (new connections until every worker has one)."""
        found: dict[int, grpc.Channel] = {}
        pids = self.pids()
        for _ in range(tries):
            before = {pid: self.peers(pid) for pid in pids}
            # A local subchannel pool: a new TCP connection per channel, not one shared by the process.
            channel = stack.enter_context(
                grpc.insecure_channel(self.target, options=[("grpc.use_local_subchannel_pool", 1)])
            )
            health_pb2_grpc.HealthStub(channel).Check(HEALTH, timeout=30)
            (pid,) = [p for p in pids if self.peers(p) - before[p]]
            found.setdefault(pid, channel)
            if len(found) == len(pids):
                return found
        raise AssertionError(f"{tries} connections never reached every worker: {sorted(found)} of {pids}")

    def listening(self, pid: int) -> bool:
        """Whether worker ``pid`` has bound the port (a replacement binds it only once its models are loaded)."""
        conns = psutil.Process(pid).net_connections(kind="tcp")
        return any(c.laddr.port == self.port and c.status == "LISTEN" for c in conns)

    def output(self) -> str:
        with open(self.log) as f:
            return f.read()


def _start(settings, folder: Path, n: int = 2, launcher: tuple[str, ...] = (), **env: str) -> Workers:
    """`detseg serve --models test --workers n` on a free port (``env`` over the environment), once it is SERVING;
    ``launcher``: a command it runs under."""
    port = free_ports(1)[0]
    log = str(folder / f"serve-{port}.log")
    environ = {
        **os.environ,
        "DETSEG_CACHE_DIR": str(settings.cache_dir),
        "DETSEG_THREADS": "1",
        "DETSEG_BACKEND": "torch",
        **env,
    }
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [*launcher, *DETSEG, "serve", "--models", "test", "--workers", str(n), "--port", str(port)],
            env=environ,
            stdout=out,
            stderr=subprocess.STDOUT,
            text=True,
        )
    workers = Workers(proc, port, log)
    try:
        with grpc.insecure_channel(workers.target) as channel:
            grpc.channel_ready_future(channel).result(timeout=180)
            wait_serving(channel, timeout=300)
    except BaseException:
        _stop(workers)
        raise
    return workers


def _stop(workers: Workers) -> None:
    if workers.proc.poll() is None:
        workers.proc.terminate()
        try:
            workers.proc.wait(60)
        except subprocess.TimeoutExpired:
            workers.proc.kill()
            workers.proc.wait(30)


@pytest.fixture
def start_workers(settings, tmp_path) -> Iterator:
    started: list[Workers] = []

    def start(n: int = 2, **env: str) -> Workers:
        started.append(_start(settings, tmp_path, n, **env))
        return started[-1]

    yield start
    for w in started:
        _stop(w)


@pytest.fixture(scope="module")
def two_workers(settings, tmp_path_factory) -> Iterator[tuple[Workers, int]]:
    """Two workers with one Prometheus endpoint (its port), shared by the three tests that follow each other: the
    first leaves them as they are, the second kills a worker (its replacement takes its place), the third kills
    their supervisor (two starts less: each takes ~30 s)."""
    metrics_port = free_ports(1)[0]
    env = {"DETSEG_METRICS_EXPORTER": "prometheus", "DETSEG_METRICS_PORT": str(metrics_port)}
    workers = _start(settings, tmp_path_factory.mktemp("workers"), 2, **env)
    yield workers, metrics_port
    _stop(workers)


def _encode_image(channel: grpc.Channel, image: bytes) -> pb.EncodeImageResponse:
    return pb_grpc.SegmentationServiceStub(channel).EncodeImage(pb.EncodeImageRequest(image=pb.Image(encoded=image)))


def _segment(channel: grpc.Channel, image: pb.Image, **request) -> pb.SegmentResponse:
    return pb_grpc.SegmentationServiceStub(channel).Segment(pb.SegmentRequest(image=image, **request), timeout=120)


def _stages(response: pb.SegmentResponse) -> set[str]:
    return {t.stage for t in response.provenance.timings}


def test_workers_share_the_port_and_a_handle_crosses_them_without_a_second_encoder_run(two_workers):
    w, metrics_port = two_workers
    assert len(w.pids()) == 2 and w.proc.pid not in w.pids()
    # The supervisor loads no model code: torch is in its workers only (it held ~0.7 GB more when it imported it).
    assert not [m.path for m in psutil.Process(w.proc.pid).memory_maps() if "libtorch" in m.path]
    with ExitStack() as stack:
        (pid_a, a), (pid_b, b) = w.channels_on_each_worker(stack).items()
        assert pid_a != pid_b  # two connections answered by two processes on one port
        encoded = pb_grpc.SegmentationServiceStub(a).EncodeImage(
            pb.EncodeImageRequest(image=pb.Image(encoded=_image(1)))
        )
        assert not encoded.cached
        # Worker B answers A's handle without running its SAM encoder: no "encode" stage in its timings.
        via_b = _segment(b, pb.Image(handle=encoded.handle))
        assert via_b.provenance.timings and "encode" not in _stages(via_b)
        again = _encode_image(b, _image(1))
        assert again.cached and again.handle == encoded.handle
        # The same answer as from the bytes on A (where the encoder ran for another image's bytes).
        fresh = _segment(a, pb.Image(encoded=_image(1)))
        assert [i.label for i in fresh.instances] == [i.label for i in via_b.instances]
        # A new image through B runs B's own encoder.
        assert "encode" in _stages(_segment(b, pb.Image(encoded=_image(2))))
    # The client's `connections`: its calls take turns on that many connections, which the kernel spreads over the
    # workers (16 connections all on one of 2 workers: odds 2**-15); one channel would reach one worker only.
    before = {pid: w.peers(pid) for pid in w.pids()}
    with Client(w.target, connections=16) as client:
        handle = client.encode_image(_image(3))
        answers = [client.segment(handle) for _ in range(16)]
        reached = {pid: len(w.peers(pid) - before[pid]) for pid in before}
    assert sum(reached.values()) == 16 and all(reached.values()), reached
    assert all([i.label for i in a.instances] == [i.label for i in answers[0].instances] for a in answers)
    # One Prometheus endpoint: every worker's samples, labelled with the worker.
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=30) as reply:
        families = {f.name: f for f in text_string_to_metric_families(reply.read().decode())}
    durations = families["detseg_rpc_duration_seconds"].samples
    assert {s.labels["worker"] for s in durations} == {"0", "1"}
    counts = [s for s in durations if s.name.endswith("_count") and "Segment" in s.labels.get("rpc_method", "")]
    assert {s.labels["worker"] for s in counts} == {"0", "1"}, counts


def test_a_killed_worker_is_replaced_while_the_others_serve(two_workers):
    w, _ = two_workers  # after the test above; the test below kills their supervisor, replacement included
    with ExitStack() as stack:
        (victim, a), (survivor, b) = w.channels_on_each_worker(stack).items()
        handle = pb_grpc.SegmentationServiceStub(a).EncodeImage(
            pb.EncodeImageRequest(image=pb.Image(encoded=_image(4)))
        )
        os.kill(victim, signal.SIGKILL)
        # The survivor keeps serving, and health stays SERVING on the port.
        for _ in range(3):
            health = health_pb2_grpc.HealthStub(b).Check(HEALTH, timeout=30)
            assert health.status == health_pb2.HealthCheckResponse.SERVING
            assert _segment(b, pb.Image(handle=handle.handle)).provenance.timings
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and not [p for p in w.pids() if p != survivor and w.listening(p)]:
        time.sleep(0.5)
    (replacement,) = set(w.pids()) - {survivor}
    assert replacement != victim
    # The replacement binds the port only once its models are loaded; then it answers, handles included.
    with ExitStack() as stack:
        channels = w.channels_on_each_worker(stack)
        via_new = _segment(channels[replacement], pb.Image(handle=handle.handle))
        assert "encode" not in _stages(via_new)
    assert "starting a replacement" in w.output()


def test_no_worker_or_redis_server_outlives_a_killed_supervisor(two_workers):
    w, _ = two_workers  # right after the tests above (four workers at once would pass the memory budget): kills them
    children = psutil.Process(w.proc.pid).children()
    assert len(children) >= 3  # two workers and the redis-server (and multiprocessing's tracker)
    # The redis-server's private folder: a killed supervisor cannot remove it (its unix socket goes with redis).
    redis = [p for p in children if "redis-server" in p.name()]
    assert len(redis) == 1, [p.name() for p in children]
    sockets = {c.laddr for c in redis[0].net_connections(kind="unix") if c.laddr}
    assert len(sockets) == 1, sockets
    folder = Path(sockets.pop()).parent
    w.proc.kill()
    w.proc.wait(30)
    gone, alive = psutil.wait_procs(children, timeout=60)
    assert not alive, [" ".join(p.cmdline())[:80] for p in alive]
    assert not list(folder.iterdir())  # nothing of the tier's left on disk but the empty folder
    folder.rmdir()


HELD_BOXES = 120


def _slow_request(channel: grpc.Channel, seed: int) -> pb.SegmentResponse:
    """A Segment call of seconds on the test models: a new 1024² image and HELD_BOXES box prompts (enough that the
    two held calls overlap even when another process shares the cores)."""
    boxes = [
        pb.RegionPrompt(box=pb.BoundingBox(x_min=x, y_min=y, x_max=x + 200, y_max=y + 290))
        for x, y in ((20 * (k % 40), 10 + 300 * (k // 40)) for k in range(HELD_BOXES))
    ]
    return _segment(channel, pb.Image(encoded=_image(seed, 1024)), regions=boxes)


def test_admission_limits_hold_across_workers_and_sigterm_drains_every_worker(start_workers):
    # Two calls admitted server-wide (one running per worker): a third is refused whichever worker it reaches.
    metrics_port = free_ports(1)[0]
    w = start_workers(
        2,
        DETSEG_MAX_IN_FLIGHT="2",
        DETSEG_MAX_QUEUE="0",
        DETSEG_GRACE_SECONDS="60",
        DETSEG_METRICS_EXPORTER="prometheus",
        DETSEG_METRICS_PORT=str(metrics_port),
    )
    with ExitStack() as stack, concurrent.futures.ThreadPoolExecutor(4) as pool:
        (pid_a, a), (pid_b, b) = w.channels_on_each_worker(stack).items()
        _slow_request(a, 0)  # warm: the first 1024² call of each worker
        _slow_request(b, 0)
        start = time.monotonic()
        running = [pool.submit(_slow_request, a, 1), pool.submit(_slow_request, b, 2)]
        # The third call goes once both held calls are running (the workers' in-flight gauges say so; their start
        # is not timed: a loaded machine delays it, and a third call sent earlier could take a held call's slot).
        while _in_flight(metrics_port) < 2:
            assert not any(f.done() for f in running), [f.exception() for f in running]
            time.sleep(0.05)
        with pytest.raises(grpc.RpcError) as refused:
            _segment(a, pb.Image(encoded=_image(3)))
        assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "2 workers" in refused.value.details() and "2 + 0" in refused.value.details()
        assert not any(f.done() for f in running), f"the held calls ended too soon ({time.monotonic() - start:.1f} s)"
        # SIGTERM with a call in flight in each worker: both answer, every process exits 0.
        signalled = time.monotonic()
        w.proc.send_signal(signal.SIGTERM)
        for f in running:
            try:
                answered = f.result(timeout=120)
            except grpc.RpcError as error:  # failed once in a clean-clone CI run (UNAVAILABLE after GOAWAY)
                when = time.monotonic() - signalled
                pytest.fail(f"a held call failed {when:.1f} s after SIGTERM: {error}\n{w.output()[-6000:]}")
            assert len(answered.instances) == HELD_BOXES
    assert w.proc.wait(120) == 0, w.output()[-3000:]
    assert not psutil.pid_exists(pid_a) and not psutil.pid_exists(pid_b)
    assert "all workers stopped" in w.output()


def _in_flight(metrics_port: int) -> float:
    """Requests running now in all workers (their ``detseg_requests_in_flight`` gauges on the one endpoint)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=30) as reply:
        families = {f.name: f for f in text_string_to_metric_families(reply.read().decode())}
    family = families.get("detseg_requests_in_flight")
    return sum(s.value for s in family.samples) if family is not None else 0.0


_MARK = "TEST_WORKERS_RUN"  # in the environment of a server a test starts, and so of its workers and redis-server


def _helpers(mark: str) -> set[int]:
    """Worker and redis-server processes alive now that a server started with ``mark`` in its environment started
    (other servers on the machine are not this test's: another one's redis-server failed it once)."""
    marks = ("spawn_main", "redis-server")
    found = set()
    for p in psutil.process_iter(["cmdline"]):
        if any(m in " ".join(p.info["cmdline"] or []) for m in marks):
            with contextlib.suppress(psutil.Error):
                if p.environ().get(_MARK) == mark:
                    found.add(p.pid)
    return found


def test_a_worker_that_cannot_load_stops_the_whole_server(tmp_path):
    empty = tmp_path / "empty-cache"
    env = {**os.environ, "DETSEG_THREADS": "1", _MARK: str(tmp_path)}
    command = [*DETSEG, "serve", "--models", "official", "--offline", "--cache-dir", str(empty), "--workers", "2"]
    done = subprocess.run([*command, "--port", "0"], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stderr[-3000:]
    assert "before serving: stopping" in done.stderr and "downloads are off" in done.stderr
    assert "Traceback" not in done.stderr
    assert not _helpers(str(tmp_path))  # no worker or redis-server left behind


def test_a_port_already_taken_is_refused_by_name_never_shared(tmp_path):
    """With SO_REUSEPORT alone, a second `detseg serve --workers N` on a port another one holds bound it too and
    took a share of the connections (seen: two supervisors, four listeners on one port); a single server's port in
    use was a RuntimeError traceback. Both now stop at once, exit 2, one line naming the address."""
    from service.errors import ConfigurationError
    from service.supervisor import reserve_port

    with reserve_port("127.0.0.1", 0) as port:
        taken = f"cannot listen on 127.0.0.1:{port}: Address already in use"
        with pytest.raises(ConfigurationError, match=taken), reserve_port("127.0.0.1", port):
            pass
        for workers in ("2", "1"):
            result = subprocess.run(
                [sys.executable, "-m", "service.cli", "serve", "--models", "test", "--offline", "--port", str(port),
                 "--workers", workers, "--allocator", "system", "--cache-dir", str(tmp_path)],
                capture_output=True, text=True, timeout=120,
            )  # fmt: skip
            assert result.returncode == 2, result.stderr[-2000:]
            assert result.stderr.strip().splitlines()[-1].startswith(f"detseg: cannot listen on 127.0.0.1:{port}: ")


def test_a_port_held_only_by_closing_connections_is_waited_for_not_refused() -> None:
    """A server just stopped leaves its side of the connections it closed in TIME_WAIT for 60 s: a `detseg serve
    --workers N` restarted then failed with "Address already in use" (a single server, binding as gRPC does with
    SO_REUSEADDR, did not). The supervisor now waits for the port; another server's port is still refused at once."""
    import socket

    from service.errors import ConfigurationError
    from service.supervisor import TIME_WAIT_SECONDS, reserve_port

    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    port = listener.getsockname()[1]
    client = socket.create_connection(("127.0.0.1", port))
    accepted, _ = listener.accept()
    accepted.close()  # the server's side closes first: its end of the connection stays in TIME_WAIT
    time.sleep(0.2)
    client.close()
    listener.close()
    start = time.monotonic()
    with reserve_port("127.0.0.1", port) as reserved:
        waited = time.monotonic() - start
        assert reserved == port and waited < TIME_WAIT_SECONDS
        refused = time.monotonic()
        with pytest.raises(ConfigurationError, match="Address already in use"), reserve_port("127.0.0.1", port):
            pass
        assert time.monotonic() - refused < 5


def test_workers_start_when_the_supervisor_is_pid_1(settings, tmp_path) -> None:
    """A container's entrypoint (the image's `detseg serve`, no init) is PID 1: every worker took its parent for init,
    as if the supervisor had died, and quit; the supervisor then stopped (exit 1) and the pod crash-looped. Here the
    supervisor runs as PID 1 of a new PID namespace (util-linux unshare, as root: this suite's machines)."""
    launcher = ("unshare", "--pid", "--fork", "--kill-child=SIGTERM")
    workers = _start(settings, tmp_path, 2, launcher)
    try:
        with Client(workers.target) as client:
            assert client.segment(_image(1), classes=["person"]).width == 160
        assert "all 2 workers serving" in workers.output(), workers.output()[-2000:]
        # unshare ignores SIGTERM while it waits (the test waited 60 s for it, then killed it): the supervisor is
        # told, as a container runtime tells its PID 1, and unshare exits with its status
        (supervisor,) = psutil.Process(workers.proc.pid).children()
        supervisor.send_signal(signal.SIGTERM)
        assert workers.proc.wait(60) == 0, workers.output()[-2000:]
    finally:
        _stop(workers)
