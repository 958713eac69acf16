"""The shared (Redis) cache tier with a real redis-server on a free loopback port: a handle made on one
replica is answered by another without re-encoding; Redis killed mid-run never fails a request; entries
expire; entries over the size bound are not shared."""

from __future__ import annotations

import hashlib
import io
import shutil
import socket
import subprocess
import time

import grpc
import numpy as np
import pytest

from service.proto.detseg.v1 import detseg_pb2 as pb
from service.proto.detseg.v1 import detseg_pb2_grpc as pb_grpc
from tests.conftest import ServerThread, metric_points, wait_serving
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
    return srv.served.servicer.pipeline.runner


def _image(seed: int) -> bytes:
    return encode(np.random.default_rng(seed).integers(0, 255, (120, 160, 3), dtype=np.uint8))


def _keys(client, kind: str, handle: str) -> list[bytes]:
    """The Redis keys of an image's entry ("img") or detector outputs ("det"), in whatever models' namespace."""
    return sorted(client.scan_iter(f"detseg:{kind}:*{handle.removeprefix('sha256:')}"))


def _answer(response) -> list[tuple]:
    """Labels, scores, boxes and masks of a Segment response (to compare answers)."""
    box = lambda b: tuple(round(v, 1) for v in (b.x_min, b.y_min, b.x_max, b.y_max))  # noqa: E731
    return [(i.label, round(i.score, 4), box(i.box), i.mask.SerializeToString()) for i in response.instances]


def _metric(name: str) -> int:
    return sum(int(point.value) for point in metric_points(name))


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
            a.served.servicer.pipeline.images.cache.clear()  # force A to the shared tier
            via_a = stub_a.Segment(pb.SegmentRequest(image=pb.Image(encoded=image)), timeout=60)
            assert _runner(a).calls["detect"] == detect_a and _runner(b).calls["detect"] == detects + 1
            assert [i.label for i in via_a.instances] == [i.label for i in via_b.instances]
            # Raw pixels too: their handle hashes their size with their bytes; ImageInfo.sha256 is the bytes' own.
            pixels = np.random.default_rng(2).integers(0, 255, (90, 120, 3), dtype=np.uint8).tobytes()
            raw = pb.Image(raw=pb.RawImage(data=pixels, width=120, height=90))
            raw_handle = stub_a.EncodeImage(pb.EncodeImageRequest(image=raw)).handle
            encodes = _runner(b).calls["encode"]
            raw_via_b = stub_b.Segment(pb.SegmentRequest(image=pb.Image(handle=raw_handle)), timeout=60)
            assert _runner(b).calls["encode"] == encodes
            assert raw_via_b.image.sha256 == hashlib.sha256(pixels).hexdigest() and raw_via_b.image.format == "raw"
            assert (raw_via_b.image.width, raw_via_b.image.height) == (120, 90)
            tier = b.served.servicer.shared_tier
            assert tier.hits >= 2 and tier.up
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
            tier = srv.served.servicer.shared_tier
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
            (key,) = _keys(redis_server.client, "img", handle)
            assert 0 < redis_server.client.pttl(key) <= 1250  # the TTL and a quarter (the touch interval)
            time.sleep(2.1)
            assert not redis_server.client.exists(key)  # expired in Redis
            big = stub_small.EncodeImage(pb.EncodeImageRequest(image=pb.Image(encoded=_image(9)))).handle
            assert not _keys(redis_server.client, "img", big)
            with pytest.raises(grpc.RpcError) as err:
                stub_a.Segment(pb.SegmentRequest(image=pb.Image(handle=big)), timeout=60)
            assert err.value.code() == grpc.StatusCode.NOT_FOUND
    finally:
        a.stop()
        small.stop()


def _started(settings, redis_url):
    """A replica of ``settings``' models on ``redis_url``, SERVING (RuntimeError if its models fail to load)."""
    srv = ServerThread(settings.replace(redis_url=redis_url, redis_retry_seconds=0.5))
    try:
        srv.wait_serving()
    except BaseException:
        srv.stop()
        raise
    return srv


def test_a_replica_of_other_models_starts_and_never_answers_from_their_entries(settings, redis_server):
    """A rolling upgrade: the demo models join test models on one Redis. Every replica warms up on the same image,
    and a handle of the other models' is a miss, never their features (which would not even fit)."""
    a = _replica(settings, redis_server.url)
    b = _started(settings.replace(models="demo"), redis_server.url)
    try:
        with grpc.insecure_channel(a.target) as ca, grpc.insecure_channel(b.target) as cb:
            stub_a, stub_b = pb_grpc.SegmentationServiceStub(ca), pb_grpc.SegmentationServiceStub(cb)
            image = _image(20)
            handle = stub_a.EncodeImage(pb.EncodeImageRequest(image=pb.Image(encoded=image))).handle
            stub_a.Segment(pb.SegmentRequest(image=pb.Image(handle=handle)), timeout=60)  # A's detections shared too
            with pytest.raises(grpc.RpcError) as err:
                stub_b.Segment(pb.SegmentRequest(image=pb.Image(handle=handle)), timeout=60)
            assert err.value.code() == grpc.StatusCode.NOT_FOUND
            encodes, detects = _runner(b).calls["encode"], _runner(b).calls["detect"]
            own = stub_b.Segment(pb.SegmentRequest(image=pb.Image(encoded=image)), timeout=60)
            assert (_runner(b).calls["encode"], _runner(b).calls["detect"]) == (encodes + 1, detects + 1)
            served = {(m.name, m.weights_sha256) for m in _runner(b).models}
            assert {(m.name, m.weights_sha256) for m in own.provenance.models} == served
            assert {m.name for m in own.provenance.models} >= {"shapes-yolo11n", "shapes-sam2-mini"}
            # B's answer is its models' own: the same as from the image alone, with nothing cached anywhere
            redis_server.client.flushdb()
            b.served.servicer.pipeline.images.cache.clear()
            alone = stub_b.Segment(pb.SegmentRequest(image=pb.Image(encoded=image)), timeout=60)
            assert _answer(own) == _answer(alone)
    finally:
        a.stop()
        b.stop()


def test_a_replica_with_another_detector_shares_features_but_runs_its_own_detector(settings, redis_server):
    """Same segmenter, another detector of the same classes (seed 1): SAM features are shared, detections never
    (they would be returned under the other detector's provenance)."""
    from service.models.testing import make_test_models

    other_detector, _ = make_test_models(settings.cache_dir / "test-models", seed=1)
    a = _replica(settings, redis_server.url)
    b = _started(settings.replace(detector=str(other_detector)), redis_server.url)
    try:
        with grpc.insecure_channel(a.target) as ca, grpc.insecure_channel(b.target) as cb:
            stub_a, stub_b = pb_grpc.SegmentationServiceStub(ca), pb_grpc.SegmentationServiceStub(cb)
            image = _image(21)
            request = pb.SegmentRequest(image=pb.Image(encoded=image), options=pb.SegmentOptions(score_threshold=0.01))
            stub_a.Segment(request, timeout=60)
            encodes, detects = _runner(b).calls["encode"], _runner(b).calls["detect"]
            via_b = stub_b.Segment(request, timeout=60)
            assert _runner(b).calls["encode"] == encodes  # A's SAM features: the same segmenter computed them
            assert _runner(b).calls["detect"] == detects + 1  # never A's detections
            redis_server.client.flushdb()
            b.served.servicer.pipeline.images.cache.clear()
            assert _answer(via_b) == _answer(stub_b.Segment(request, timeout=60))  # B's own answer
    finally:
        a.stop()
        b.stop()


def _bad_values(good: bytes, wrong: dict[str, np.ndarray]) -> dict[str, bytes]:
    """Unreadable stand-ins for a good ``.npz`` value: garbage, the value truncated, and the value with
    ``wrong`` arrays (another model's shapes) in place of its own."""
    with np.load(io.BytesIO(good)) as data:
        arrays = {name: data[name] for name in data.files}
    buffer = io.BytesIO()
    np.savez(buffer, **{**arrays, **wrong})
    return {"garbage": b"\x00garbage, not an npz", "truncated npz": good[: len(good) // 2],
            "wrong arrays": buffer.getvalue()}  # fmt: skip


def test_a_corrupt_shared_image_entry_is_a_miss_deleted_and_counted(settings, redis_server, caplog):
    """By handle: NOT_FOUND (a miss, the key deleted), never INTERNAL; by bytes: answered (recomputed and shared
    anew). Each unreadable value is counted; one WARNING for them all."""
    srv = _replica(settings, redis_server.url)
    client = redis_server.client
    try:
        with grpc.insecure_channel(srv.target) as channel:
            stub = pb_grpc.SegmentationServiceStub(channel)
            tier = srv.served.servicer.shared_tier
            local = srv.served.servicer.pipeline.images.cache
            other_model = {"image_embed": np.zeros((1, 64, 16, 16), np.float32),
                           "high_res_0": np.zeros((1, 8, 64, 64), np.float32),
                           "high_res_1": np.zeros((1, 16, 32, 32), np.float32)}  # fmt: skip
            caplog.set_level("WARNING", logger="service.pipeline.shared_cache")
            for n, seed in enumerate((30, 31, 32)):
                image = _image(seed)
                handle = stub.EncodeImage(pb.EncodeImageRequest(image=pb.Image(encoded=image))).handle
                (key,) = _keys(client, "img", handle)
                bad = list(_bad_values(client.get(key), other_model).values())[n]
                client.set(key, bad, ex=3600)
                local.clear()
                with pytest.raises(grpc.RpcError) as err:
                    stub.Segment(pb.SegmentRequest(image=pb.Image(handle=handle)), timeout=60)
                assert err.value.code() == grpc.StatusCode.NOT_FOUND
                assert not client.exists(key)  # deleted, not kept alive by the read
                client.set(key, bad, ex=3600)
                local.clear()
                response = stub.Segment(pb.SegmentRequest(image=pb.Image(encoded=image)), timeout=60)
                assert response.image.width == 160
                assert client.get(key) not in (None, bad)  # recomputed and shared anew
            assert tier.corrupt == 6
            assert _metric("detseg.cache.shared.corrupt") >= 6
            warnings = [
                r
                for r in caplog.records
                if r.name == "service.pipeline.shared_cache" and "could not be read" in r.message
            ]
            assert len(warnings) == 1
    finally:
        srv.stop()


def test_a_corrupt_shared_detector_output_is_left_out_deleted_and_recomputed(settings, redis_server):
    srv = _replica(settings, redis_server.url)
    client = redis_server.client
    try:
        with grpc.insecure_channel(srv.target) as channel:
            stub = pb_grpc.SegmentationServiceStub(channel)
            tier = srv.served.servicer.shared_tier
            local = srv.served.servicer.pipeline.images.cache
            for n, seed in enumerate((40, 41, 42)):
                image = _image(seed)
                request = pb.SegmentRequest(image=pb.Image(encoded=image))
                expected = _answer(stub.Segment(request, timeout=60))
                (key,) = _keys(client, "det", "sha256:" + hashlib.sha256(image).hexdigest())
                (field,) = client.hkeys(key)
                good = client.hget(key, field)
                raw = np.load(io.BytesIO(good))["raw"]
                bad = list(_bad_values(good, {"raw": raw[:, :7]}).values())[n]  # 3 classes, not 6
                client.hset(key, field, bad)
                local.clear()
                detects = _runner(srv).calls["detect"]
                assert _answer(stub.Segment(request, timeout=60)) == expected
                assert _runner(srv).calls["detect"] == detects + 1  # the bad output was not used
                assert client.hget(key, field) not in (None, bad)  # replaced by the recomputed one
            assert tier.corrupt == 3
    finally:
        srv.stop()


def test_a_mask_kept_on_one_replica_is_the_previous_mask_on_another(settings, redis_server):
    """options.keep_masks shares the low-res masks: a follow-up click naming one works on any replica, with the
    same answer as on the replica that kept it; a kept value of the wrong size is a miss (NOT_FOUND), deleted."""
    a, b = _replica(settings, redis_server.url), _replica(settings, redis_server.url)
    try:
        with grpc.insecure_channel(a.target) as ca, grpc.insecure_channel(b.target) as cb:
            stub_a, stub_b = pb_grpc.SegmentationServiceStub(ca), pb_grpc.SegmentationServiceStub(cb)
            handle = stub_a.EncodeImage(pb.EncodeImageRequest(image=pb.Image(encoded=_image(21)))).handle
            box = pb.BoundingBox(x_min=20, y_min=20, x_max=120, y_max=100)
            kept = stub_a.Segment(
                pb.SegmentRequest(
                    image=pb.Image(handle=handle),
                    regions=[pb.RegionPrompt(box=box)],
                    options=pb.SegmentOptions(keep_masks=True),
                ),
                timeout=60,
            ).instances[0]
            follow_up = pb.SegmentRequest(
                image=pb.Image(handle=handle),
                regions=[
                    pb.RegionPrompt(box=box, points=[pb.Point(x=60, y=60, label=1)], previous_mask=kept.mask_handle)
                ],
            )
            on_b, on_a = stub_b.Segment(follow_up, timeout=60), stub_a.Segment(follow_up, timeout=60)
            assert _answer(on_b) == _answer(on_a)
            key = next(k for k in redis_server.client.scan_iter("detseg:msk:*") if not k.endswith(b":order"))
            redis_server.client.hset(key, kept.mask_handle, b"garbage")
            b.served.servicer.pipeline.images.cache.clear()
            with pytest.raises(grpc.RpcError) as missing:
                stub_b.Segment(follow_up, timeout=60)
            assert missing.value.code() == grpc.StatusCode.NOT_FOUND
            assert not redis_server.client.hexists(key, kept.mask_handle)
    finally:
        a.stop()
        b.stop()


def test_a_handle_used_on_one_replica_stays_alive_for_the_others(settings, redis_server):
    """Calls with a handle that keep reaching replica A hit A's own copy: the shared entry's TTL was never restarted,
    it expired from Redis while the handle was in use, and the next call that reached B was NOT_FOUND."""
    a = _replica(settings, redis_server.url, cache_ttl_seconds=2.0)
    b = _replica(settings, redis_server.url, cache_ttl_seconds=2.0)
    try:
        with grpc.insecure_channel(a.target) as ca, grpc.insecure_channel(b.target) as cb:
            stub_a, stub_b = pb_grpc.SegmentationServiceStub(ca), pb_grpc.SegmentationServiceStub(cb)
            handle = stub_a.EncodeImage(pb.EncodeImageRequest(image=pb.Image(encoded=_image(31)))).handle
            until = time.monotonic() + 3.5  # past the TTL, in use on A all along
            while time.monotonic() < until:
                stub_a.Segment(pb.SegmentRequest(image=pb.Image(handle=handle)), timeout=60)
                time.sleep(0.3)
            (key,) = _keys(redis_server.client, "img", handle)
            assert redis_server.client.ttl(key) > 0
            assert stub_b.Segment(pb.SegmentRequest(image=pb.Image(handle=handle)), timeout=60).image.width == 160
    finally:
        a.stop()
        b.stop()


# --- the tier itself, against the real redis-server ---------------------------------------------------------------


def _tier(redis_server, **changes):  # type: ignore[no-untyped-def]
    from service.pipeline.shared_cache import ModelIdentity, RedisTier

    fields = {"url": redis_server.url, "identity": ModelIdentity("seg", "det", 64, 0), "ttl": 8.0}
    fields |= {"max_entry_bytes": 1 << 20, "timeout": 1.0, "retry_after": 5.0, "max_masks": 3}
    return RedisTier(**(fields | changes))


def _entry(nbytes: int = 0):  # type: ignore[no-untyped-def]
    """A cache entry with features of the tier's 64² SAM (and ``nbytes`` more bytes of pixels)."""
    from service.models.tensors import ImageFeatures
    from service.pipeline.cache import CacheEntry
    from service.pipeline.image import DecodedImage

    rgb = np.zeros((32, 48 + nbytes // 96, 3), np.uint8)
    features = ImageFeatures(
        np.zeros((1, 8, 4, 4), np.float32), (np.zeros((1, 2, 16, 16), np.float32), np.zeros((1, 4, 8, 8), np.float32))
    )
    return CacheEntry(DecodedImage(rgb=rgb, format="png", sha256="0" * 64), features)


def test_the_shared_tier_keeps_the_newest_kept_masks_and_detector_outputs_within_its_bounds(redis_server):
    """Kept masks and an open vocabulary's detector outputs were added to an image's hashes and never dropped:
    max_kept_masks held in each replica only, and one image asked with ever new vocabularies grew without bound
    (every read of it loading them all)."""
    from service.models.tensors import DetectorOutput

    tier, handle, client = _tier(redis_server), "sha256:" + "a" * 64, redis_server.client
    stored = len(tier._output_to_bytes(DetectorOutput(np.zeros((1, 5, 50), np.float32))))  # as Redis holds one
    tier.max_entry_bytes = 2 * stored + stored // 2  # room for two outputs
    for k in range(10):
        assert tier.add_masks(handle, {f"m{k}": np.full((16, 16), k, np.float32)})
        tier.add_detector_output(handle, DetectorOutput(np.full((1, 5, 50), k, np.float32)), ((f"v{k}",), "0" * 64))
    masks, outputs = f"detseg:msk:seg:{'a' * 64}", f"detseg:det:det:{'a' * 64}"
    assert sorted(client.hkeys(masks)) == [b"m7", b"m8", b"m9"]  # max_masks 3, the newest
    assert [tier.mask(handle, f"m{k}") is not None for k in (6, 9)] == [False, True]
    assert sorted(client.hkeys(outputs)) == [b'[["v8"], "' + b"0" * 64 + b'"]', b'[["v9"], "' + b"0" * 64 + b'"]']
    assert client.zcard(f"{masks}:order") == 3 and 9000 < client.pttl(f"{masks}:order") <= 10000
    client.delete(f"{masks}:order")  # evicted alone (mask reads touch the hash only): the bound held no more
    tier.add_masks(handle, {"m10": np.zeros((16, 16), np.float32)})
    assert sorted(client.hkeys(masks)) == [b"m10"]


def test_a_shared_entry_lost_is_shared_again_by_the_replica_that_still_uses_it(redis_server):
    """Its TTL restarts (touch) ran EXPIRE on keys no longer there (evicted, or Redis restarted): the handle then
    worked only on the replica that kept its own copy. Shared values also live a touch interval past the TTL (a
    replica restarts them at most every quarter TTL), so a handle in use never expires from the shared tier."""
    tier, handle, client = _tier(redis_server), "sha256:" + "b" * 64, redis_server.client
    entry = _entry()
    assert tier.put(handle, entry)
    key = f"detseg:img:seg:{'b' * 64}"
    assert 9000 < client.pttl(key) <= 10000  # ttl 8 and a quarter of it
    client.flushall()
    tier.touch(handle, entry)
    assert client.exists(key) and 9000 < client.pttl(key) <= 10000
    assert tier.get(handle) is not None


def test_a_write_redis_refuses_leaves_the_tier_up_and_the_value_unshared(redis_server):
    """Redis over its maxmemory refuses a write (OOM): that was taken for an outage, every read and write of the
    replica skipped for redis_retry_seconds and a WARNING said Redis was unavailable."""
    client = redis_server.client
    client.config_set("maxmemory-policy", "noeviction")
    client.config_set("maxmemory", str(client.info("memory")["used_memory"] + (1 << 20)))
    tier = _tier(redis_server, max_entry_bytes=64 << 20)
    assert not tier.put("sha256:" + "c" * 64, _entry(nbytes=8 << 20))
    assert tier.up and tier.refused == 1 and tier.errors == 0
    assert tier.put("sha256:" + "d" * 64, _entry()) and client.exists(f"detseg:img:seg:{'d' * 64}")
    client.config_set("maxmemory", "1")  # over it: every write refused, and every command in a MULTI (reads too)
    assert tier.get("sha256:" + "d" * 64) is not None and tier.up and tier.errors == 0
    client.config_set("maxmemory", "0")
    client.config_set("min-replicas-to-write", "1")  # any other refusal (NOREPLICAS here, READONLY...) is an outage
    assert not tier.put("sha256:" + "e" * 64, _entry()) and not tier.up and tier.errors == 1


def test_a_handle_or_mask_handle_no_tier_holds_is_never_given(settings, redis_server):
    """With a shared tier, EncodeImage answered a handle for features neither tier took (over both size bounds),
    NOT_FOUND on first use; with Redis down, keep_masks answered mask handles kept nowhere."""
    srv = _replica(settings, redis_server.url, cache_max_bytes=1, redis_max_entry_bytes=1)
    try:
        with grpc.insecure_channel(srv.target) as channel:
            stub = pb_grpc.SegmentationServiceStub(channel)
            with pytest.raises(grpc.RpcError) as refused:
                stub.EncodeImage(pb.EncodeImageRequest(image=pb.Image(encoded=_image(41))), timeout=60)
            assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
            assert "nor does the shared cache take them now" in refused.value.details()
            redis_server.kill()
            box = pb.RegionPrompt(box=pb.BoundingBox(x_min=20, y_min=20, x_max=120, y_max=100))
            request = pb.SegmentRequest(
                image=pb.Image(encoded=_image(42)), regions=[box], options=pb.SegmentOptions(keep_masks=True)
            )
            assert stub.Segment(request, timeout=60).instances[0].mask_handle == ""
    finally:
        srv.stop()
