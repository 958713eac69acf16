"""A real detseg server inside this process, on its own event loop in a background thread.

What ``detseg eval`` and ``detseg label`` start when they are given no ``--target`` (the same factory as
``detseg serve``, bound to a free loopback port), and what the tests start on port 0.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable

import grpc

from service.config import Settings
from service.runners.base import Runner


class InProcessServer:
    """``create_server(settings, load_runner)`` in a daemon thread. The port is open on return (models may still
    be loading: ``wait_serving``); ``stop`` ends it. ``load_runner`` defaults to the settings' models."""

    def __init__(self, settings: Settings, load_runner: Callable[[], Runner] | None = None) -> None:
        from service.runners.factory import load_runner as load_for_settings

        self.loop = asyncio.new_event_loop()
        self.port = 0
        self._ready = threading.Event()
        self._error: BaseException | None = None
        factory = load_runner or (lambda: load_for_settings(settings))
        self._thread = threading.Thread(target=self._main, args=(settings, factory), daemon=True)
        self._thread.start()
        if not self._ready.wait(60):
            raise RuntimeError("the in-process server did not start within 60 s")
        if self._error is not None:
            raise self._error

    def _main(self, settings: Settings, factory: Callable[[], Runner]) -> None:
        from service.api.server import create_server

        asyncio.set_event_loop(self.loop)

        async def start() -> None:
            try:
                self.server, self.port = await create_server(settings, factory)
            except BaseException as e:  # surfaced in __init__
                self._error = e
            finally:
                self._ready.set()

        self.loop.run_until_complete(start())
        if self._error is None:
            self.loop.run_forever()

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def wait_serving(self, timeout: float = 300.0) -> None:
        """Blocks until health says SERVING; RuntimeError if the models failed to load or ``timeout`` passed."""
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        from service.api.server import SERVICE_NAME

        request = health_pb2.HealthCheckRequest(service=SERVICE_NAME)
        with grpc.insecure_channel(self.target) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            try:
                for response in stub.Watch(request, timeout=timeout):
                    if response.status == health_pb2.HealthCheckResponse.SERVING:
                        return
                    if self._load_failed():
                        break
            except grpc.RpcError as e:
                raise RuntimeError(f"the in-process server never reported SERVING ({e.code().name})") from None
        raise RuntimeError("the in-process server's models failed to load (see the log)")

    def _load_failed(self) -> bool:
        state = getattr(getattr(self, "server", None), "_detseg_state", None)
        return state is not None and state.load_failed.is_set()

    def stop(self) -> None:
        asyncio.run_coroutine_threadsafe(self.server.stop(0), self.loop).result(30)
        state = getattr(self.server, "_detseg_state", None)
        if state is not None:
            asyncio.run_coroutine_threadsafe(state.stop(0), self.loop).result(30)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(30)
        if not self._thread.is_alive():
            self.loop.close()

    def __enter__(self) -> InProcessServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
