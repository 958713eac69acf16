"""``detseg serve --workers N``: N server processes on one port, gRPC's own multiprocessing pattern.

The supervisor (the ``detseg serve`` process) reserves the port (a socket bound with SO_REUSEPORT, never
listening, so ``--port 0`` resolves once for all), starts the shared tier if none is configured, then starts N
workers with the spawn start method. The supervisor loads no model code (torch stays out of it); each worker is a
whole server (``service.app.create_server``: its own models, caches and event loop) bound to the port with
SO_REUSEPORT, so the kernel spreads incoming connections over them. What the workers share
(``service.api.workers.WorkerLink``): admission counts, readiness (one health status) and, through the shared tier,
every image handle: a handle made by one worker is answered by any other without a second encoder run.

- **Shared tier**: ``redis_url`` when set; otherwise a ``redis-server`` (found on PATH, as Debian's
  ``redis-server`` package installs it) the supervisor starts on a unix socket in a private folder, no TCP port, no
  persistence, ``maxmemory`` = ``cache_max_bytes`` with LRU eviction; it stops with the workers.
- **SIGTERM / SIGINT**: forwarded to every worker; each drains its in-flight calls (``grace_seconds``), then the
  supervisor stops the tier and exits 0 when every worker did.
- **Threads**: ``threads`` 0 (all cores) becomes the cores shared out among the workers (``worker_threads``).
- **Start-up**: worker 0 loads first, fetching and converting into the cache whatever its models need; the
  others start once it serves. Health says NOT_SERVING until every worker has loaded.
- **A worker that dies** after the server came up (killed, out of memory) is replaced: the new worker loads its
  models before it binds the port, so connections only ever reach workers that can answer, and the others serve
  meanwhile. A worker that dies while the server comes up (e.g. missing weights), or a replacement that dies
  before it serves, stops the whole server, which exits with that worker's status: never half-serving.
- **Orphans**: workers and the local redis-server get SIGTERM from the kernel when the supervisor dies, even by
  SIGKILL (Linux ``PR_SET_PDEATHSIG``), so none outlives it.
- **Metrics** (``metrics_exporter = prometheus``): one endpoint on ``metrics_port``, served by the supervisor: each
  worker's samples, read from its loopback endpoint at scrape time and labelled ``worker="<index>"``.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import dataclasses
import errno
import http.client
import logging
import multiprocessing
import multiprocessing.connection
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from multiprocessing.process import BaseProcess
from pathlib import Path
from typing import Any

from service import telemetry
from service.api.workers import WorkerLink
from service.config import Settings
from service.errors import ConfigurationError, DetsegError
from service.startup import configure_logging, configure_process

log = logging.getLogger("detseg.supervisor")

_PR_SET_PDEATHSIG = 1  # prctl option (linux/prctl.h)
_POLL_SECONDS = 0.2  # how often the supervisor looks at its workers between events
_TIER_START_SECONDS = 10.0  # the longest the local redis-server may take to answer
_SCRAPE_SECONDS = 2.0  # the longest the metrics endpoint waits for one worker's samples


@dataclasses.dataclass
class _Shared:
    """The shared-memory objects every WorkerLink holds."""

    admitted: Any
    ready: Any
    started: Any
    scrape_ports: Any

    @classmethod
    def create(cls, ctx: Any, n: int) -> _Shared:
        return cls(ctx.Array("q", n), ctx.Array("b", n), ctx.Event(), ctx.Array("i", n))

    def link(self, index: int, workers: int, replacement: bool) -> WorkerLink:
        return WorkerLink(index, workers, self.admitted, self.ready, self.started, self.scrape_ports, replacement)


def run_workers(settings: Settings) -> int:
    """Runs ``settings.workers`` worker processes until a signal or a failure; the exit status (0: all drained)."""
    n = settings.workers
    ctx = multiprocessing.get_context("spawn")  # gRPC's core does not survive fork
    with reserve_port(settings.host, settings.port) as port, _shared_tier(settings) as redis_url:
        worker_settings = settings.replace(port=port, redis_url=redis_url, threads=worker_threads(settings))
        shared = _Shared.create(ctx, n)
        if settings.metrics_exporter == "prometheus":
            _serve_metrics(settings, shared.scrape_ports)
        stopping = _Signals()
        # Worker 0 first: it fetches, converts and caches whatever its models need (downloads, exports, the int8
        # encoder), and the others, started once it serves, find it all in the cache.
        procs = [_start(ctx, worker_settings, shared.link(0, n, replacement=False))]
        log.info("listening on %s:%d with %d workers; loading models", settings.host, port, n)
        status = _supervise(ctx, worker_settings, shared, procs, stopping)
        terminated = set()
        for p in procs:
            if p.is_alive():
                p.terminate()  # SIGTERM: each drains its in-flight calls
                terminated.add(p.pid)
        deadline = time.monotonic() + settings.grace_seconds + 30.0
        for p in procs:
            p.join(max(0.0, deadline - time.monotonic()))
            if p.is_alive():
                log.error("worker pid %d did not stop in time; killing it", p.pid)
                p.kill()
                p.join()
            if status == 0:
                status = worker_status(p.exitcode, stopped=stopping.received or p.pid in terminated)
        log.info("all workers stopped")
        return status


def worker_status(exitcode: int | None, *, stopped: bool) -> int:
    """The server's exit status for a worker that ended with ``exitcode`` (multiprocessing's: -N for signal N);
    ``stopped``: the server was told to stop (SIGTERM, sent on to the worker). A worker that SIGTERM ended by its
    default action had not yet set its handler, so it was still starting, with nothing in flight: a clean stop (it was
    status 1, a failed stop for systemd or Kubernetes, when SIGTERM came in a worker's first half second)."""
    if exitcode == 0 or (stopped and exitcode == -signal.SIGTERM):
        return 0
    return exitcode if exitcode and exitcode > 0 else 1


def worker_threads(settings: Settings) -> int:
    """Each worker's intra-op threads: ``settings.threads`` when set, else the cores this process may run on (its CPU
    affinity: a container's cpuset, not the host's cores) shared out (at least 1), so N workers do not run N × cores
    threads on the cores."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return settings.threads or max(1, cores // settings.workers)


def _supervise(ctx: Any, settings: Settings, shared: _Shared, procs: list[BaseProcess], stopping: _Signals) -> int:
    """Starts the other workers once worker 0 serves, then watches them until a signal (0) or a failure (the
    failed worker's exit status). ``procs``: the started workers, updated in place."""
    n = settings.workers
    while not stopping.received:
        multiprocessing.connection.wait([p.sentinel for p in procs], timeout=_POLL_SECONDS)
        if len(procs) == 1 < n and shared.ready[0]:
            procs += [_start(ctx, settings, shared.link(i, n, replacement=False)) for i in range(1, n)]
        if not shared.started.is_set() and all(shared.ready[i] for i in range(n)):
            shared.started.set()
            log.info("all %d workers serving", n)
        for i, p in enumerate(procs):
            if p.is_alive() or stopping.received:
                continue
            code = p.exitcode if p.exitcode is not None else 1
            served = bool(shared.ready[i])
            with shared.admitted.get_lock():
                shared.admitted[i] = 0  # what it had admitted died with it
            shared.ready[i] = 0
            shared.scrape_ports[i] = 0  # not scraped until its replacement serves its own (the port may be reused)
            if not shared.started.is_set() or not served:
                log.error("worker %d (pid %d) exited with status %d before serving: stopping", i, p.pid, code)
                return code if code > 0 else 1
            log.warning("worker %d (pid %d) exited with status %d; starting a replacement", i, p.pid, code)
            procs[i] = _start(ctx, settings, shared.link(i, n, replacement=True))
    log.info("shutting down %d workers (grace %.1fs)", n, settings.grace_seconds)
    return 0


class _Signals:
    """SIGTERM and SIGINT set ``received`` (the supervisor then stops its workers)."""

    def __init__(self) -> None:
        self.received = False
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._handle)

    def _handle(self, signum: int, frame: object) -> None:
        self.received = True


def _start(ctx: Any, settings: Settings, link: WorkerLink) -> BaseProcess:
    p: BaseProcess = ctx.Process(
        target=_worker_main, args=(settings, link, os.getpid()), name=f"detseg-worker-{link.index}"
    )
    p.start()
    return p


def _die_with_parent() -> None:
    """Linux: this process gets SIGTERM when the process that started it dies (even by SIGKILL), so no worker or
    redis-server outlives its supervisor. Elsewhere: nothing."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def _exit_before_serving(signum: int, frame: Any) -> None:
    """Exits at once, 0: nothing is in flight yet, and a replacement's models may be loading on a thread (a normal
    exit under it can abort in torch's C++ code; ``service.app.exit_if_loading``)."""
    logging.shutdown()
    os._exit(0)


def _worker_main(settings: Settings, link: WorkerLink, supervisor: int) -> None:
    """A worker process: one whole server on the shared port until SIGTERM. Exit 2 when its models cannot load.
    ``supervisor``: the PID of the process that started it."""
    # SIGTERM before the server's own handler (serve_forever's drain) is in place, while torch imports and the
    # models load: nothing to drain, so exit 0 at once (Python's default, death by the signal, made the supervisor
    # report a failed worker and exit 1).
    signal.signal(signal.SIGTERM, _exit_before_serving)
    _die_with_parent()
    if os.getppid() != supervisor:  # the supervisor died before the line above took effect (its PID may be 1: the
        return  # container's entrypoint, where a worker's parent was taken for init and every worker quit at once)
    configure_logging(settings.log_level, settings.log_format)
    configure_process(settings)  # before anything imports ultralytics (its switches are read at import)
    # The server's modules load torch: imported here, in the worker, so that the supervisor never loads it
    # (measured with 2 workers of the test models: the supervisor holds 118 MB instead of 843, and they serve
    # 27 s after the start instead of 37).
    from service.api.server import serve_forever
    from service.app import create_server, exit_if_loading
    from service.runners.factory import load_runner

    async def run() -> None:
        served, _ = await create_server(settings, lambda: load_runner(settings), link)
        await serve_forever(served, settings.grace_seconds)

    try:
        asyncio.run(run())
    except DetsegError as e:
        log.error("worker %d: %s", link.index, e)
        sys.exit(2)
    exit_if_loading()


def _serve_metrics(settings: Settings, scrape_ports: Any) -> None:
    """The one Prometheus endpoint on ``metrics_port``: every worker's samples, each labelled with its worker."""
    from prometheus_client import CollectorRegistry

    registry = CollectorRegistry(auto_describe=False)
    registry.register(_WorkerMetrics(scrape_ports))
    telemetry.scrape_endpoint(settings.host, settings.metrics_port, registry)


class _WorkerMetrics:
    """A prometheus_client collector reading each worker's loopback endpoint at scrape time (``worker`` label)."""

    def __init__(self, scrape_ports: Any) -> None:
        self._ports = scrape_ports

    def collect(self) -> Iterator[Any]:
        import urllib.request

        from prometheus_client.metrics_core import Metric
        from prometheus_client.parser import text_string_to_metric_families

        merged: dict[str, Metric] = {}
        for index, port in enumerate(list(self._ports)):
            if not port:
                continue
            try:  # loopback only, to this server's own workers
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=_SCRAPE_SECONDS) as reply:
                    text = reply.read().decode()
                families = list(text_string_to_metric_families(text))
            except (OSError, http.client.HTTPException, ValueError):
                # a worker dying or restarting (refused, cut short mid-reply, or another process's answer on its
                # port): its samples are missing from this scrape, never every worker's
                continue
            for family in families:
                into = merged.setdefault(family.name, Metric(family.name, family.documentation, family.type))
                for sample in family.samples:
                    into.samples.append(sample._replace(labels={**sample.labels, "worker": str(index)}))
        yield from merged.values()


@contextlib.contextmanager
def reserve_port(host: str, port: int) -> Iterator[int]:
    """Binds (never listens on) ``host:port`` with SO_REUSEPORT for the body, so the workers can bind it too and
    ``port`` 0 names one free port for all of them. Yields the port.

    The port is first bound without SO_REUSEPORT, which fails when any socket holds it: with SO_REUSEPORT alone, a
    second ``detseg serve --workers N`` on the same port would share it with the first, each taking some of the
    connections. ConfigurationError names the address when it is taken or not this machine's. A port held only by
    the closing connections of a server just stopped (TIME_WAIT, which gRPC's own SO_REUSEADDR binds through) is
    waited for, up to TIME_WAIT_SECONDS: a restart right after a stop failed with "Address already in use"."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        port = _probe(family, kind, proto, address, host)
        sock = socket.socket(family, kind, proto)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            sock.bind((address[0], port, *address[2:]))
        except OSError:
            sock.close()
            raise
    except OSError as e:
        raise ConfigurationError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    try:
        yield port
    finally:
        sock.close()


TIME_WAIT_SECONDS = 65  # Linux keeps a closed connection's port in TIME_WAIT for 60 s


def _probe(family: int, kind: int, proto: int, address: Any, host: str) -> int:
    """Binds ``address`` with no reuse option and returns the port bound; while only TIME_WAIT holds it (a bind with
    SO_REUSEADDR, which no listening socket allows, succeeds), tries again each second up to TIME_WAIT_SECONDS."""
    deadline, said = time.monotonic() + TIME_WAIT_SECONDS, False
    while True:
        try:
            with socket.socket(family, kind, proto) as probe:
                probe.bind(address)
                return int(probe.getsockname()[1])
        except OSError as e:
            if (
                e.errno != errno.EADDRINUSE
                or time.monotonic() > deadline
                or not _only_closing(family, kind, proto, address)
            ):
                raise
            if not said:
                log.info("%s:%s is held by connections closing (TIME_WAIT): waiting up to %d s", host, address[1],
                         TIME_WAIT_SECONDS)  # fmt: skip
                said = True
            time.sleep(1.0)


def _only_closing(family: int, kind: int, proto: int, address: Any) -> bool:
    """Whether ``address`` can be bound with SO_REUSEADDR: nothing listens on it (TIME_WAIT holds it, or a socket
    bound with SO_REUSEADDR too)."""
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(address)
        except OSError:
            return False
        return True


@contextlib.contextmanager
def _shared_tier(settings: Settings) -> Iterator[str]:
    """``settings.redis_url`` when set; otherwise a private redis-server on a unix socket, for the body."""
    if settings.redis_url:
        yield settings.redis_url
        return
    with local_redis(settings.cache_max_bytes) as url:
        yield url


@contextlib.contextmanager
def local_redis(max_bytes: int) -> Iterator[str]:
    """A redis-server on a unix socket in a private temporary folder (mode 0700), for the body: no TCP port, no
    persistence, ``max_bytes`` of memory with LRU eviction. Yields its ``unix://`` URL.

    Raises:
        ConfigurationError: no redis-server on PATH, or it did not answer in time.
    """
    import redis

    exe = shutil.which("redis-server")
    if exe is None:
        raise ConfigurationError(
            "--workers above 1 needs a shared tier for image handles: install redis-server (Debian: "
            "apt-get install redis-server) or set redis_url"
        )
    with tempfile.TemporaryDirectory(prefix="detseg-tier-") as folder:
        sock = Path(folder) / "redis.sock"
        memory = str(max(max_bytes, 1 << 20))
        options = {"port": "0", "unixsocket": str(sock), "unixsocketperm": "700", "save": "", "appendonly": "no"}
        options |= {"maxmemory": memory, "maxmemory-policy": "allkeys-lru", "loglevel": "warning", "dir": folder}
        command = [exe, *(arg for name, value in options.items() for arg in (f"--{name}", value))]
        proc = subprocess.Popen(
            command, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, preexec_fn=_die_with_parent
        )
        try:
            url = f"unix://{sock}"
            _wait_for_redis(redis.Redis.from_url(url), proc)
            log.info("shared tier: redis-server (pid %d) on a unix socket, maxmemory %d bytes", proc.pid, max_bytes)
            yield url
        finally:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def _wait_for_redis(client: Any, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + _TIER_START_SECONDS
    while time.monotonic() < deadline and proc.poll() is None:
        with contextlib.suppress(Exception):
            if client.ping():
                return
        time.sleep(0.05)
    proc.kill()
    raise ConfigurationError("the shared tier's redis-server did not start")
