"""The shared (Redis) cache tier with a real redis-server on a free loopback port: a handle made on one
replica is answered by another without re-encoding; Redis killed mid-run never fails a request; entries
expire; entries over the size bound are not shared."""

from __future__ import annotations

import shutil
import socket
import subprocess
import time

import grpc
import numpy as np
import pytest

from service.api.gen.detseg.v1 import detseg_pb2 as pb
from service.api.gen.detseg.v1 import detseg_pb2_grpc as pb_grpc
from tests.conftest import ServerThread, wait_serving
from tests.helpers import encode


class RedisServer:
    """redis-server on 127.0.0.1:<free port>, no persistence files outside ``folder``, stopped by its pid."""

    def __init__(self, folder, port: int | None = None) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError("redis-server is not installed: run `make redis-tools` (Debian's redis-server)")
        if port is None:
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                port = s.getsockname()[1]
        self.port = port
        self.proc = subprocess.Popen(
            [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--dir", str(folder), "--maxmemory", "256mb", "--maxmemory-policy", "allkeys-lru"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        import redis

        self.client = redis.Redis(port=port)
        deadline = time.monotonic() + 10
        while True:
            try:
                self.client.ping()
                break
            except redis.ConnectionError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait(10)


@pytest.fixture
def redis_server(tmp_path):
    server = RedisServer(tmp_path)
    yield server
    server.kill()


def _replica(settings, redis_url, **more):
    srv = ServerThread(settings.replace(redis_url=redis_url, redis_retry_seconds=0.5, **more))
    with grpc.insecure_channel(srv.target) as channel:
        wait_serving(channel)
    return srv


def _runner(srv):
    return srv.server._detseg_state.servicer.pipeline.runner


def _image(seed: int) -> bytes:
    return encode(np.random.default_rng(seed).integers(0, 255, (120, 160, 3), dtype=np.uint8))


def test_a_handle_made_on_one_replica_is_answered_by_another_without_re_encoding(settings, redis_server, figures):
    a, b = _replica(settings, redis_server.url), _replica(settings, redis_server.url)
    try:
        with grpc.insecure_channel(a.target) as ca, grpc.insecure_channel(b.target) as cb:
            stub_a, stub_b = pb_grpc.SegmentationServiceStub(ca), pb_grpc.SegmentationServiceStub(cb)
            image = _image(1)
            handle = stub_a.EncodeImage(pb.EncodeImageRequest(image=pb.Image(encoded=image))).handle
            encodes, detects = _runner(b).calls["encode"], _runner(b).calls["detect"]
            via_b = stub_b.Segment(pb.SegmentRequest(image=pb.Image(handle=handle)), timeout=60)
            assert _runner(b).calls["encode"] == encodes  # B never ran the SAM encoder for it
            # the detector output B computed is shared too: A answers the same image without the detector
            detect_a = _runner(a).calls["detect"]
            a.server._detseg_state.servicer.pipeline.cache.clear()  # force A to the shared tier
            via_a = stub_a.Segment(pb.SegmentRequest(image=pb.Image(encoded=image)), timeout=60)
            assert _runner(a).calls["detect"] == detect_a and _runner(b).calls["detect"] == detects + 1
            assert [i.label for i in via_a.instances] == [i.label for i in via_b.instances]
            tier = b.server._detseg_state.servicer.shared_tier
            assert tier.hits >= 1 and tier.up
        figures["shared cache: handle from replica A answered by B, encoder runs on B"] = "0"
    finally:
        a.stop()
        b.stop()


def test_redis_killed_mid_run_never_fails_a_request(settings, tmp_path):
    redis_server = RedisServer(tmp_path)
    srv = _replica(settings, redis_server.url)
    try:
        with grpc.insecure_channel(srv.target) as channel:
            stub = pb_grpc.SegmentationServiceStub(channel)
            stub.Segment(pb.SegmentRequest(image=pb.Image(encoded=_image(2))), timeout=60)
            redis_server.kill()
            start = time.monotonic()
            for seed in (3, 4, 5):  # new images: every request goes to the (dead) shared tier
                response = stub.Segment(pb.SegmentRequest(image=pb.Image(encoded=_image(seed))), timeout=60)
                assert response.image.width == 160
            tier = srv.server._detseg_state.servicer.shared_tier
            assert not tier.up and tier.errors >= 1 and time.monotonic() - start < 10
            handle = stub.EncodeImage(pb.EncodeImageRequest(image=pb.Image(encoded=_image(6)))).handle
            assert stub.Segment(pb.SegmentRequest(image=pb.Image(handle=handle)), timeout=60).image.width == 160
            revived = RedisServer(tmp_path, port=redis_server.port)  # Redis back: the tier follows
            try:
                time.sleep(0.6)  # past redis_retry_seconds
                stub.Segment(pb.SegmentRequest(image=pb.Image(encoded=_image(7))), timeout=60)
                assert tier.up and revived.client.dbsize() >= 1
            finally:
                revived.kill()
    finally:
        srv.stop()


def test_shared_entries_expire_and_large_ones_are_not_shared(settings, redis_server):
    a = _replica(settings, redis_server.url, cache_ttl_seconds=1.0)
    small = _replica(settings, redis_server.url, redis_max_entry_bytes=1000)  # smaller than any entry
    try:
        with grpc.insecure_channel(a.target) as ca, grpc.insecure_channel(small.target) as cs:
            stub_a, stub_small = pb_grpc.SegmentationServiceStub(ca), pb_grpc.SegmentationServiceStub(cs)
            handle = stub_a.EncodeImage(pb.EncodeImageRequest(image=pb.Image(encoded=_image(8)))).handle
            key = "detseg:img:" + handle.removeprefix("sha256:")
            assert redis_server.client.exists(key) and 0 < redis_server.client.ttl(key) <= 1
            time.sleep(2.1)
            assert not redis_server.client.exists(key)  # expired in Redis
            big = stub_small.EncodeImage(pb.EncodeImageRequest(image=pb.Image(encoded=_image(9)))).handle
            assert not redis_server.client.exists("detseg:img:" + big.removeprefix("sha256:"))
            with pytest.raises(grpc.RpcError) as err:
                stub_a.Segment(pb.SegmentRequest(image=pb.Image(handle=big)), timeout=60)
            assert err.value.code() == grpc.StatusCode.NOT_FOUND
    finally:
        a.stop()
        small.stop()
