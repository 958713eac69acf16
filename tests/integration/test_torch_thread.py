"""torch on the host runs on one thread of the server (``service.runners.local.torch_thread``): the models' torch calls
on the runner's torch thread with the configured thread count, every other thread of the server with one, so that
libgomp keeps one team of OpenMP threads (more teams than cores make it throttle them all: the re-prompt's decoder
call 26-32 vs 33-41 ms, benchmarks/RESULTS.md)."""

from __future__ import annotations

import asyncio
import threading

import grpc
import torch

from service.app import InProcessServer
from service.proto.detseg.v1 import detseg_pb2 as pb
from service.proto.detseg.v1 import detseg_pb2_grpc as pb_grpc
from service.runners.factory import load_runner
from tests.conftest import THREADS, ultralytics_asset, wait_serving


def _threads_on_a_new_thread() -> int:
    found: list[int] = []
    probe = threading.Thread(target=lambda: found.append(torch.get_num_threads()))
    probe.start()
    probe.join()
    return found[0]


def test_the_models_run_torch_on_one_thread_and_every_other_thread_on_one_core(settings):
    settings = settings.replace(device="cpu", backend="torch")  # every call is torch on the host
    runner = load_runner(settings)
    assert runner.torch_calls >= {"detect", "encode", "decode"}
    ran: list[tuple[str, int, int]] = []  # (call, thread, torch threads there)
    for name in ("_detect_sync", "_encode_sync", "_decode_sync"):
        real = getattr(runner, name)

        def spy(*args, _real=real, _name=name):
            ran.append((_name, threading.get_ident(), torch.get_num_threads()))
            return _real(*args)

        setattr(runner, name, spy)
    server = InProcessServer(settings, lambda: runner)
    try:
        with grpc.insecure_channel(server.target) as channel:
            wait_serving(channel)
            stub = pb_grpc.SegmentationServiceStub(channel)
            image = pb.Image(encoded=ultralytics_asset("bus.jpg").read_bytes())
            answer = stub.Segment(pb.SegmentRequest(image=image), timeout=300)
            assert answer.instances
            box = pb.BoundingBox(x_min=50, y_min=200, x_max=300, y_max=800)
            again = stub.Segment(pb.SegmentRequest(image=image, regions=[pb.RegionPrompt(box=box)]), timeout=300)
            assert len(again.instances) == 1
        torch_thread = runner._torch.submit(threading.get_ident).result()
        assert {call for call, _, _ in ran} == {"_detect_sync", "_encode_sync", "_decode_sync"}
        assert {(thread, threads) for _, thread, threads in ran} == {(torch_thread, THREADS)}, ran
        # Every other thread of the server runs torch on one: the event loop's default executor (pre-processing),
        # the mask pool, and any thread started later.
        pipeline = server.served.servicer._pipeline
        assert pipeline is not None
        default = asyncio.run_coroutine_threadsafe(_on_default_executor(), server.loop).result(timeout=60)
        assert default == 1
        assert pipeline.masks._pool.submit(torch.get_num_threads).result() == 1
        assert _threads_on_a_new_thread() == 1
    finally:
        server.stop()
        torch.set_num_threads(THREADS)  # the default for later threads, as the other tests expect it


async def _on_default_executor() -> int:
    return await asyncio.get_running_loop().run_in_executor(None, torch.get_num_threads)
