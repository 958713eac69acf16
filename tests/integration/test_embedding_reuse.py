"""Embedding reuse through the real gRPC server: EncodeImage handles and repeated images skip the encoder."""

from __future__ import annotations

import contextlib
import hashlib
import time
from collections.abc import Iterator

import grpc
import numpy as np
import pytest

from service.proto.detseg.v1 import detseg_pb2 as pb
from service.proto.detseg.v1 import detseg_pb2_grpc as pb_grpc
from tests.conftest import ServerThread, wait_serving
from tests.helpers import encode, rle_mask, synthetic_rgb


@contextlib.contextmanager
def _server(settings, runner, **changes) -> Iterator[pb_grpc.SegmentationServiceStub]:  # type: ignore[no-untyped-def]
    """A server of its own on the shared runner, with ``changes`` to the settings; its stub once it serves."""
    srv = ServerThread(settings.replace(**changes), lambda: runner)
    try:
        with grpc.insecure_channel(srv.target) as channel:
            wait_serving(channel)
            yield pb_grpc.SegmentationServiceStub(channel)
    finally:
        srv.stop()


def regions(*boxes: tuple[float, float, float, float]) -> list[pb.RegionPrompt]:
    return [pb.RegionPrompt(box=pb.BoundingBox(x_min=a, y_min=b, x_max=c, y_max=d)) for a, b, c, d in boxes]


def test_encode_image_then_segment_by_handle_skips_the_encoder(stub, runner):
    data = encode(synthetic_rgb(240, 320, seed=101))
    before = dict(runner.calls)
    encoded = stub.EncodeImage(pb.EncodeImageRequest(image=pb.Image(encoded=data)), timeout=60)
    assert encoded.handle == "sha256:" + hashlib.sha256(data).hexdigest() and not encoded.cached
    assert encoded.image.width == 320 and encoded.ttl.seconds > 0
    assert runner.calls["encode"] - before.get("encode", 0) == 1

    answers = []
    for boxes in (((10, 10, 120, 100),), ((50, 60, 200, 200), (0, 0, 319, 239))):  # re-prompting, twice
        request = pb.SegmentRequest(image=pb.Image(handle=encoded.handle), regions=regions(*boxes))
        answers.append(stub.Segment(request, timeout=60))
    assert runner.calls["encode"] - before.get("encode", 0) == 1  # no encoder run for either
    assert [len(a.instances) for a in answers] == [1, 2]
    assert answers[1].image.sha256 == encoded.image.sha256 and answers[1].image.width == 320

    # The same prompts with the image bytes give the same masks.
    full = stub.Segment(
        pb.SegmentRequest(image=pb.Image(encoded=data), regions=regions((50, 60, 200, 200), (0, 0, 319, 239))),
        timeout=60,
    )
    for a, b in zip(full.instances, answers[1].instances, strict=True):
        assert np.array_equal(rle_mask(a.mask), rle_mask(b.mask))
    again = stub.EncodeImage(pb.EncodeImageRequest(image=pb.Image(encoded=data)), timeout=60)
    assert again.cached and again.handle == encoded.handle


def test_calls_with_the_same_new_image_at_once_run_the_encoder_once(stub, runner):
    """Each of them missed the cache and ran SAM's encoder (4 calls at once: 2 to 4 runs)."""
    import concurrent.futures

    data = encode(synthetic_rgb(480, 640, seed=107))
    before = runner.calls["encode"]
    request = pb.SegmentRequest(image=pb.Image(encoded=data), regions=regions((10, 10, 120, 100)))
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        encode_image = pb.EncodeImageRequest(image=request.image)
        calls = [pool.submit(stub.Segment, request, timeout=120) for _ in range(2)]
        calls += [pool.submit(stub.EncodeImage, encode_image, timeout=120) for _ in range(2)]
        answers = [c.result() for c in calls]
    assert runner.calls["encode"] == before + 1
    assert rle_mask(answers[0].instances[0].mask).tobytes() == rle_mask(answers[1].instances[0].mask).tobytes()


def test_the_single_flight_joins_the_cache_and_a_late_caller_never_joins_a_cancelled_flight(settings, runner):
    """Driven on the server's own loop: (1) a request that looked in the cache before another's computation ended
    and asks for the features after its result was cached ran the encoder again; (2) a request arriving after the
    only waiter left (its computation cancelled, its callback not yet run) joined the cancelled computation and got a
    CancelledError it never asked for (a unary call CANCELLED, a stream ended)."""
    import asyncio

    from service.pipeline.cache import CacheEntry
    from service.pipeline.image import DecodedImage

    srv = ServerThread(settings, lambda: runner)
    try:
        srv.wait_serving()
        pipeline = srv.served.servicer._pipeline
        rgb = synthetic_rgb(120, 160, seed=109)
        image = DecodedImage(rgb=rgb, format="raw", sha256="9" * 64)
        handle = "sha256:" + "9" * 64

        async def cached_meanwhile() -> int:
            features = await pipeline.features(image, {})
            await pipeline.images.put(handle, CacheEntry(image, features))
            before = runner.calls["encode"]
            await pipeline._features_once(handle, image, {})
            return runner.calls["encode"] - before

        async def late_caller() -> tuple[int, bool]:
            other = "sha256:" + "8" * 64
            first = asyncio.ensure_future(pipeline._features_once(other, image, {}))
            await asyncio.sleep(0)  # its computation starts
            first.cancel()  # its only waiter leaves
            await asyncio.sleep(0)
            before = runner.calls["encode"]
            features = await pipeline._features_once(other, image, {})  # before the cancelled one is forgotten
            return runner.calls["encode"] - before, features is not None

        assert asyncio.run_coroutine_threadsafe(cached_meanwhile(), srv.loop).result(60) == 0
        assert asyncio.run_coroutine_threadsafe(late_caller(), srv.loop).result(60) == (1, True)
    finally:
        srv.stop()


def test_the_same_image_twice_skips_encoder_and_detector(stub, runner):
    data = encode(synthetic_rgb(200, 260, seed=102))
    request = pb.SegmentRequest(image=pb.Image(encoded=data), options=pb.SegmentOptions(score_threshold=0.01))
    first = stub.Segment(request, timeout=60)
    before = dict(runner.calls)
    second = stub.Segment(request, timeout=60)
    assert runner.calls["encode"] == before.get("encode", 0) and runner.calls["detect"] == before.get("detect", 0)
    assert [i.label for i in second.instances] == [i.label for i in first.instances]
    assert "encode" not in {t.stage for t in second.provenance.timings}
    # A class prompt on the cached image filters the cached detector output (no detector run either).
    name = first.instances[0].label
    filtered = stub.Segment(
        pb.SegmentRequest(
            image=pb.Image(encoded=data), classes=[name], options=pb.SegmentOptions(score_threshold=0.01)
        ),
        timeout=60,
    )
    assert filtered.instances and {i.label for i in filtered.instances} == {name}
    assert runner.calls["detect"] == before.get("detect", 0)


def test_the_same_raw_bytes_at_another_size_are_another_image(stub, runner):
    """Raw pixels name their image only with their width and height: the handle hashes all three (the same bytes
    as 24 x 32 and as 32 x 24 were one cache entry, so the second size was answered with the first's pixels)."""
    pixels = synthetic_rgb(24, 32, seed=103).tobytes()
    raw = lambda width, height: pb.Image(raw=pb.RawImage(data=pixels, width=width, height=height))  # noqa: E731
    wide = stub.EncodeImage(pb.EncodeImageRequest(image=raw(32, 24)), timeout=60)
    before = runner.calls["encode"]
    tall = stub.EncodeImage(pb.EncodeImageRequest(image=raw(24, 32)), timeout=60)
    assert tall.handle != wide.handle and not tall.cached and runner.calls["encode"] == before + 1
    assert (tall.image.width, tall.image.height) == (24, 32) and (wide.image.width, wide.image.height) == (32, 24)
    assert tall.image.sha256 == wide.image.sha256 == hashlib.sha256(pixels).hexdigest()  # the bytes received
    answer = stub.Segment(pb.SegmentRequest(image=raw(24, 32), regions=regions((0, 0, 23, 31))), timeout=60)
    assert (answer.image.width, answer.image.height) == (24, 32) and runner.calls["encode"] == before + 1
    assert rle_mask(answer.instances[0].mask).shape == (32, 24)
    again = stub.EncodeImage(pb.EncodeImageRequest(image=raw(32, 24)), timeout=60)
    assert again.cached and again.handle == wide.handle
    # A size the bytes cannot have is refused, cached bytes or not.
    with pytest.raises(grpc.RpcError) as info:
        stub.Segment(pb.SegmentRequest(image=raw(2**31 - 1, 2**31 - 1), regions=regions((0, 0, 9, 9))), timeout=30)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "image.raw" in info.value.details()


def test_unknown_and_malformed_handles(stub):
    with pytest.raises(grpc.RpcError) as info:
        stub.Segment(pb.SegmentRequest(image=pb.Image(handle="sha256:" + "0" * 64)), timeout=30)
    assert info.value.code() == grpc.StatusCode.NOT_FOUND
    assert "unknown or expired" in info.value.details() and "send the image again" in info.value.details()
    # Not lower-case hex ("A" * 64 was NOT_FOUND, "send the image again", as if it had been a handle once).
    for bad in ("../etc/passwd", "sha256:" + "A" * 64, "sha256:" + "g" * 63 + " "):
        with pytest.raises(grpc.RpcError) as info:
            stub.Segment(pb.SegmentRequest(image=pb.Image(handle=bad)), timeout=30)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "image.handle" in info.value.details()


@pytest.mark.slow  # its own server, and waits out a TTL
def test_handle_expires_after_its_ttl(settings, runner):
    with _server(settings, runner, cache_ttl_seconds=0.5) as stub:
        data = encode(synthetic_rgb(64, 64, seed=103))
        handle = stub.EncodeImage(pb.EncodeImageRequest(image=pb.Image(encoded=data)), timeout=60).handle
        request = pb.SegmentRequest(image=pb.Image(handle=handle), regions=regions((1, 1, 30, 30)))
        assert stub.Segment(request, timeout=60).instances
        time.sleep(1.0)
        with pytest.raises(grpc.RpcError) as info:
            stub.Segment(request, timeout=60)
        assert info.value.code() == grpc.StatusCode.NOT_FOUND


def test_keep_masks_names_only_the_masks_it_kept(stub):
    """With more instances than max_kept_masks (64), every instance got a handle and the first ones were dropped at
    once: instance 0's handle was NOT_FOUND on the next call. Now the first 64 are kept and named, the rest have none;
    kept logits are clamped to [-32, 32] as SAM2ImagePredictor returns them."""
    image = encode(synthetic_rgb(96, 128))
    boxes = [(x, y, x + 20, y + 20) for x in range(0, 100, 10) for y in range(0, 70, 10)][:66]
    response = stub.Segment(
        pb.SegmentRequest(
            image=pb.Image(encoded=image), regions=regions(*boxes), options=pb.SegmentOptions(keep_masks=True)
        ),
        timeout=120,
    )
    handles = [i.mask_handle for i in response.instances]
    assert len(handles) == 66 and all(handles[:64]) and handles[64:] == ["", ""]
    for k in (0, 63):
        follow_up = pb.RegionPrompt(box=regions(boxes[k])[0].box, previous_mask=handles[k])
        again = stub.Segment(pb.SegmentRequest(image=pb.Image(encoded=image), regions=[follow_up]), timeout=60)
        assert len(again.instances) == 1


def test_an_image_the_cache_cannot_hold_gets_no_handle(settings, runner):
    """With caching off (or features larger than the cache) EncodeImage answered a handle and a 600 s TTL for an
    image it had not kept: the first Segment by that handle was NOT_FOUND."""
    with _server(settings, runner, cache_max_bytes=0) as stub:
        data = encode(synthetic_rgb(64, 64, seed=104))
        with pytest.raises(grpc.RpcError) as info:
            stub.EncodeImage(pb.EncodeImageRequest(image=pb.Image(encoded=data)), timeout=60)
        assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "do not fit this server's embedding cache (cache_max_bytes 0)" in info.value.details()
        # Segment by bytes still answers (the cache is only skipped)
        assert stub.Segment(pb.SegmentRequest(image=pb.Image(encoded=data), regions=regions((1, 1, 30, 30))))


def test_with_drop_flagged_the_kept_masks_go_to_the_instances_answered(settings, runner):
    """Masks were kept for every prompt before the flagged instances were dropped: with max_kept_masks 1 the one
    place went to a dropped instance, and no instance answered had a handle."""
    with _server(settings, runner, max_kept_masks=1) as stub:
        data = encode(synthetic_rgb(200, 300, seed=3))
        prompts = regions((10, 10, 150, 120), (0, 0, 300, 200), (120, 40, 290, 190))
        off = {"score_below": 0, "stability_below": 0, "min_mask_area": 0, "max_mask_components": 0}
        options = pb.SegmentOptions(keep_masks=True, review=pb.ReviewRules(mask_score_below=1.0, **off))
        flagged = stub.Segment(pb.SegmentRequest(image=pb.Image(encoded=data), regions=prompts, options=options))
        scores = sorted(i.mask_score for i in flagged.instances)
        options.review.mask_score_below = (scores[0] + scores[1]) / 2  # flags the lowest-scored one only
        options.review.drop_flagged = True
        kept = stub.Segment(pb.SegmentRequest(image=pb.Image(encoded=data), regions=prompts, options=options))
        assert len(kept.instances) == 2 and not any(i.review.needed for i in kept.instances)
        assert kept.instances[0].mask_handle and not kept.instances[1].mask_handle  # the first answered
