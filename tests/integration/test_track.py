"""The Track RPC through the real server (test profile: seeded SAM 2.1 and YOLO, torch backend) on shapes videos:
stable ids and states, detection every K frames, corrections and ends, per-frame errors that leave the session as
it was, session limits, and sessions that never see each other. Tracking itself (our memory vs
``SAM2VideoPredictor``) is checked in tests/unit/test_sam_memory.py; its quality on the demo in a later step."""

from __future__ import annotations

import concurrent.futures
import io
from collections.abc import Iterator, Sequence

import grpc
import numpy as np
import pytest
from google.protobuf.duration_pb2 import Duration
from PIL import Image
from pycocotools import mask as mask_utils

from service.proto.detseg.v1 import detseg_pb2 as pb
from service.proto.detseg.v1 import detseg_pb2_grpc as pb_grpc
from service.shapes.video import make_video
from tests.conftest import ServerThread, serving, wait_serving

FRAMES = 8


def _jpeg(rgb: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


@pytest.fixture(scope="module")
def frames() -> list[bytes]:
    video = make_video(3, frames=FRAMES, width=320, height=240)
    return [_jpeg(video.frame(t).image) for t in range(FRAMES)]


def _frame(data: bytes, index: int, **fields: object) -> pb.TrackRequest:
    return pb.TrackRequest(frame=pb.TrackFrame(image=pb.Image(encoded=data), frame_index=index, **fields))


def _box(x0: float, y0: float, x1: float, y1: float, label: str = "") -> pb.TrackPrompt:
    return pb.TrackPrompt(
        region=pb.RegionPrompt(box=pb.BoundingBox(x_min=x0, y_min=y0, x_max=x1, y_max=y1), label=label)
    )


def _track(stub, messages: Sequence[pb.TrackRequest], timeout: float = 300) -> list[pb.TrackResponse]:  # type: ignore[no-untyped-def]
    return list(stub.Track(iter(messages), timeout=timeout))


def _start(**fields: object) -> pb.TrackRequest:
    return pb.TrackRequest(start=pb.TrackStart(**fields))


def _masks(response: pb.TrackResponse) -> dict[int, np.ndarray]:
    out = {}
    for t in response.instances:
        rle = t.instance.mask.coco_rle
        out[t.track_id] = mask_utils.decode({"size": list(rle.size), "counts": rle.counts})
    return out


def test_region_prompts_become_tracks_with_stable_ids(stub, frames: list[bytes]) -> None:  # type: ignore[no-untyped-def]
    messages = [
        _start(request_id="clip-1"),
        _frame(frames[0], 0, prompts=[_box(10, 10, 120, 100, "left"), _box(160, 60, 300, 200)]),
        *(_frame(frames[t], t * 2) for t in range(1, FRAMES)),  # gaps in the indices are allowed
    ]
    responses = _track(stub, messages)
    assert [r.frame_index for r in responses] == [t * 2 for t in range(FRAMES)]
    assert all(r.request_id == "clip-1" and not r.HasField("error") for r in responses)
    first = responses[0]
    assert [(t.track_id, t.state, t.instance.label, t.first_frame) for t in first.instances] == [
        (1, pb.TRACK_STATE_NEW, "left", 0),
        (2, pb.TRACK_STATE_NEW, "object", 0),
    ]
    assert all(t.instance.source == pb.INSTANCE_SOURCE_REGION_PROMPT for t in first.instances)
    for r in responses[1:]:
        assert [t.track_id for t in r.instances] == [1, 2]  # stable, in track order
        assert {t.state for t in r.instances} <= {pb.TRACK_STATE_TRACKED, pb.TRACK_STATE_LOST}
        for t in r.instances:
            mask = _masks(r)[t.track_id]
            assert mask.shape == (240, 320)
            if t.state == pb.TRACK_STATE_LOST:
                assert mask.sum() == 0 and t.instance.mask_score <= 0.5
            else:
                assert t.instance.mask_score > 0.5
    assert not any(r.detected for r in responses)  # nothing to detect: prompts only


def test_gaps_in_the_frame_index_leave_the_memory_as_it_is(stub, frames: list[bytes]) -> None:  # type: ignore[no-untyped-def]
    """SAM 2 attends exactly the memories 1-6 and pointers 1-15 frames back by index, so frames sent 8 apart left it
    no recent memory at all (tracked from the prompted frame alone). The memory counts frames sent: the same frames
    with any gaps are tracked alike (8 apart: none of the 6 memories left)."""
    answers = []
    for gap in (1, 8):
        messages = [
            _start(),
            _frame(frames[0], 0, prompts=[_box(10, 10, 120, 100), _box(160, 60, 300, 200)]),
            *(_frame(frames[t], t * gap) for t in range(1, FRAMES)),
        ]
        responses = _track(stub, messages)
        assert not any(r.HasField("error") for r in responses)
        answers.append([(_masks(r), [t.instance.mask_score for t in r.instances]) for r in responses])
    for other in answers[1:]:
        for (masks, scores), (their_masks, their_scores) in zip(answers[0], other, strict=True):
            assert masks.keys() == their_masks.keys() and scores == pytest.approx(their_scores, abs=1e-5)
            assert all(np.array_equal(masks[k], their_masks[k]) for k in masks)


def test_detector_runs_every_k_frames_and_starts_tracks(stub, frames: list[bytes]) -> None:  # type: ignore[no-untyped-def]
    messages = [
        _start(
            classes=["person", "car"], detect_every=3, max_objects=4, options=pb.SegmentOptions(score_threshold=0.01)
        )
    ]
    messages += [_frame(frames[t], t, detect=(t == 4)) for t in range(FRAMES)]
    responses = _track(stub, messages)
    assert [r.detected for r in responses] == [t % 3 == 0 or t == 4 for t in range(FRAMES)]
    started = {t.track_id: t for r in responses for t in r.instances if t.state == pb.TRACK_STATE_NEW}
    assert started, "the seeded detector finds something at score 0.01"
    for t in started.values():
        assert t.instance.source == pb.INSTANCE_SOURCE_DETECTOR and t.instance.label in ("person", "car")
        assert responses[[r.frame_index for r in responses].index(t.first_frame)].detected
    ids = [t.track_id for r in responses for t in r.instances]
    assert sorted(set(ids)) == list(range(1, max(ids) + 1))  # from 1, never skipped


def test_corrections_and_ends(stub, frames: list[bytes]) -> None:  # type: ignore[no-untyped-def]
    responses = _track(
        stub,
        [
            _start(),
            _frame(frames[0], 0, prompts=[_box(10, 10, 120, 100), _box(160, 60, 300, 200)]),
            _frame(
                frames[1],
                1,
                prompts=[
                    pb.TrackPrompt(
                        region=pb.RegionPrompt(label="fixed", points=[pb.Point(x=50, y=50, label=1)]), track_id=1
                    )
                ],
            ),
            _frame(frames[2], 2, end_tracks=[2]),
            _frame(frames[3], 3),
        ],
    )
    assert [t.instance.label for t in responses[1].instances] == ["fixed", "object"]
    assert [(t.track_id, t.state) for t in responses[2].instances if t.track_id == 2] == [(2, pb.TRACK_STATE_ENDED)]
    assert [t.track_id for t in responses[3].instances] == [1]


def test_a_bad_frame_is_its_own_error_and_the_session_goes_on(stub, frames: list[bytes]) -> None:  # type: ignore[no-untyped-def]
    small = _jpeg(np.zeros((120, 160, 3), np.uint8))
    good = [
        _start(),
        _frame(frames[0], 0, prompts=[_box(10, 10, 120, 100)]),
        _frame(frames[1], 1),
        _frame(frames[2], 2),
    ]
    bad = [
        good[0],
        good[1],
        _frame(frames[1], 0),  # out of order
        _frame(small, 1),  # another size
        _frame(b"\xff\xd8\xff not a jpeg", 1),  # does not decode
        _frame(
            frames[1],
            1,
            prompts=[pb.TrackPrompt(region=pb.RegionPrompt(box=pb.BoundingBox(x_max=5, y_max=5)), track_id=7)],
        ),
        _frame(frames[1], 1, prompts=[_box(0, 0, 400, 100)]),  # outside the frame
        _frame(frames[1], 1, end_tracks=[9]),
        _frame(frames[1], 1, timestamp=Duration(seconds=1, nanos=-3)),  # not a Duration: signs differ
        _frame(frames[1], 1, timestamp=Duration(seconds=10**12)),  # not a Duration: beyond its range
        good[2],
        _start(),  # a second start
        good[3],
    ]
    expected = _track(stub, good)
    got = _track(stub, bad)
    errors = [r for r in got if r.HasField("error")]
    assert [e.error.code for e in errors] == [grpc.StatusCode.INVALID_ARGUMENT.value[0]] * 9
    assert [e.HasField("timestamp") for e in errors[6:8]] == [False, False]  # not echoed: it is no Duration
    messages = [e.error.message for e in errors]
    for needle, message in zip(
        [
            "frame.frame_index",
            "frame.image",
            "frame.image",
            "frame.prompts[0].track_id",
            "frame.prompts[0].region.box",
            "frame.end_tracks[0]",
            "frame.timestamp: seconds=1, nanos=-3",
            "frame.timestamp: seconds=1000000000000",
            "start",
        ],
        messages,
        strict=True,
    ):
        assert message.startswith(needle), message
    answers = [r for r in got if not r.HasField("error")]
    assert len(answers) == len(expected) - 0 == 3
    for a, e in zip(answers, expected, strict=True):  # the session is as if the bad frames were never sent
        assert a.frame_index == e.frame_index
        assert [(t.track_id, t.state) for t in a.instances] == [(t.track_id, t.state) for t in e.instances]
        for k, m in _masks(e).items():
            assert np.array_equal(_masks(a)[k], m)


def test_a_first_frame_refused_sets_no_size(stub, frames: list[bytes]) -> None:  # type: ignore[no-untyped-def]
    """A first frame answered with an error leaves the session as before it: the next frame, of another size, is the
    first (its size was refused as differing from the failed frame's)."""
    small = _jpeg(np.zeros((120, 160, 3), np.uint8))
    got = _track(stub, [_start(), _frame(small, 0, prompts=[_box(0, 0, 300, 100)]), _frame(frames[0], 0)])
    assert got[0].error.message.startswith("frame.prompts[0].region.box"), got[0].error.message
    assert not got[1].HasField("error"), got[1].error.message
    assert (got[1].image.width, got[1].image.height) == (320, 240)


@pytest.mark.parametrize(
    ("start", "field"),
    [
        (pb.TrackStart(max_objects=0), "start.max_objects"),
        (pb.TrackStart(detect_every=-1), "start.detect_every"),
        (pb.TrackStart(match_iou=2.0), "start.match_iou"),
        (pb.TrackStart(options=pb.SegmentOptions(keep_masks=True)), "start.options.keep_masks"),
        (pb.TrackStart(classes=["no such class"]), "start.classes"),
        (pb.TrackStart(exemplars=[pb.Exemplar(box=pb.BoundingBox(x_max=4, y_max=4))]), "start.exemplars[0].image"),
        (
            pb.TrackStart(exemplars=[pb.Exemplar(box=pb.BoundingBox(x_max=4, y_max=4), image=pb.Image())]),
            "start.exemplars[0].image: missing; set start.exemplars[0].image.encoded",
        ),
    ],
)
def test_a_bad_start_ends_the_call_naming_the_field(
    stub, frames: list[bytes], start: pb.TrackStart, field: str
) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(grpc.RpcError) as e:
        _track(stub, [pb.TrackRequest(start=start), _frame(frames[0], 0)])
    assert e.value.code() in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.FAILED_PRECONDITION)
    assert field in e.value.details()
    assert "Traceback" not in e.value.details() and "/" not in e.value.details().split(":")[0]


def test_the_first_message_must_start_the_session(stub, frames: list[bytes]) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(grpc.RpcError) as e:
        _track(stub, [_frame(frames[0], 0)])
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and e.value.details().startswith("start:")


def test_too_many_objects_is_the_frames_error(stub, frames: list[bytes]) -> None:  # type: ignore[no-untyped-def]
    responses = _track(
        stub,
        [
            _start(max_objects=2),
            _frame(frames[0], 0, prompts=[_box(0, 0, 50, 50)] * 3),
            _frame(frames[1], 1, prompts=[_box(0, 0, 50, 50)] * 2),
        ],
    )
    assert responses[0].error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert "max_objects is 2" in responses[0].error.message
    assert [t.track_id for t in responses[1].instances] == [1, 2]


def _session(stub, frames: list[bytes], box: tuple[float, float, float, float]) -> list[pb.TrackResponse]:  # type: ignore[no-untyped-def]
    return _track(
        stub, [_start(), _frame(frames[0], 0, prompts=[_box(*box)]), *(_frame(frames[t], t) for t in range(1, 5))]
    )


def test_concurrent_sessions_never_see_each_other(stub, frames: list[bytes]) -> None:  # type: ignore[no-untyped-def]
    boxes = [(10, 10, 120, 100), (160, 60, 300, 200), (40, 120, 200, 230)]
    solo = [_session(stub, frames, b) for b in boxes]
    with concurrent.futures.ThreadPoolExecutor(len(boxes)) as pool:
        together = list(pool.map(lambda b: _session(stub, frames, b), boxes))
    # Concurrent frames may share an encoder batch, whose float sums differ in the last bits from a single image's:
    # the same tracks and states, masks equal up to a boundary pixel here and there (another session's object or
    # memory would show as a different mask altogether).
    for s, t in zip(solo, together, strict=True):
        assert [[(i.track_id, i.state) for i in r.instances] for r in s] == [
            [(i.track_id, i.state) for i in r.instances] for r in t
        ]
        for a, b in zip(s, t, strict=True):
            for k, m in _masks(a).items():
                other = _masks(b)[k]
                union = (m | other).sum()
                assert union == 0 or (m & other).sum() / union >= 0.99


@pytest.fixture(scope="module")
def limited(settings, runner) -> Iterator[object]:  # type: ignore[no-untyped-def]
    with serving(settings.replace(max_track_sessions=1, track_idle_seconds=1.5), lambda: runner) as stub:
        yield stub


def test_sessions_beyond_the_limit_are_refused_and_idle_ones_closed(limited, frames: list[bytes]) -> None:  # type: ignore[no-untyped-def]
    import queue
    import threading

    held: queue.Queue[pb.TrackRequest | None] = queue.Queue()

    def messages() -> Iterator[pb.TrackRequest]:
        while (m := held.get()) is not None:
            yield m

    defaults = limited.ListModels(pb.ListModelsRequest(), timeout=30).defaults.track
    assert (defaults.max_sessions, defaults.idle_timeout.ToNanoseconds()) == (1, 1_500_000_000)  # was 1 s: truncated
    held.put(_start())
    held.put(_frame(frames[0], 0, prompts=[_box(10, 10, 120, 100)]))
    first = limited.Track(messages(), timeout=60)
    assert not next(first).HasField("error")  # the session is open
    with pytest.raises(grpc.RpcError) as e:
        _track(limited, [_start(), _frame(frames[0], 0)])
    assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "max_track_sessions" in e.value.details()
    # The first session sends nothing more: closed after track_idle_seconds, and its slot is free again.
    with pytest.raises(grpc.RpcError) as idle:
        next(first)
    assert idle.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED and "track_idle_seconds" in idle.value.details()
    held.put(None)
    threading.Event().wait(0.2)
    assert len(_track(limited, [_start(), _frame(frames[0], 0)])) == 1


def test_a_runner_without_a_memory_path_says_so(settings, frames: list[bytes]) -> None:  # type: ignore[no-untyped-def]
    """Where SAM 2's memory path cannot run (a segmenter without one, the triton backend): FAILED_PRECONDITION."""
    from service.runners.factory import load_runner

    demo = settings.replace(models="demo")
    runner = load_runner(demo)
    runner.tracker = None  # type: ignore[attr-defined]
    with serving(demo, lambda: runner) as stub, pytest.raises(grpc.RpcError) as e:
        _track(stub, [_start(), _frame(frames[0], 0, prompts=[_box(10, 10, 120, 100)])])
    assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "memory" in e.value.details()


def test_a_correction_shows_a_detector_started_track_the_detector_missed(demo_stub, frames: list[bytes]) -> None:  # type: ignore[no-untyped-def]
    """The caller's correction says where the object is: the track answers with it (TRACKED, its mask), though the
    last detection frame missed it. It stayed LOST with an empty mask: a detector-started track was shown only once
    a detection matched it again."""
    black = _jpeg(np.zeros((240, 320, 3), np.uint8))
    first = _track(demo_stub, [_start(detect_every=0), _frame(frames[0], 0, detect=True)])[0]
    assert first.instances, "the demo detector finds the shapes of the first frame"
    t = first.instances[0]
    box = t.instance.box
    fix = pb.TrackPrompt(
        region=pb.RegionPrompt(box=pb.BoundingBox(x_min=box.x_min, y_min=box.y_min, x_max=box.x_max, y_max=box.y_max)),
        track_id=t.track_id,
    )
    got = _track(
        demo_stub,
        [
            _start(detect_every=0),
            _frame(frames[0], 0, detect=True),
            _frame(black, 1, detect=True),  # nothing to detect: every track LOST
            _frame(frames[0], 2, prompts=[fix]),  # the object shown again, by the caller
        ],
    )
    assert all(r.instances and not r.HasField("error") for r in got)
    assert {i.track_id: i.state for i in got[1].instances}[t.track_id] == pb.TRACK_STATE_LOST
    corrected = {i.track_id: i for i in got[2].instances}[t.track_id]
    assert corrected.state == pb.TRACK_STATE_TRACKED
    assert (
        mask_utils.area(
            {"size": list(corrected.instance.mask.coco_rle.size), "counts": corrected.instance.mask.coco_rle.counts}
        )
        > 0
    )


def test_with_detect_every_0_the_tracks_a_detection_starts_are_answered_at_once(stub, frames: list[bytes]) -> None:  # type: ignore[no-untyped-def]
    """The detector runs only on frames that ask: no later detection frame may come to confirm a tentative track, so
    the tracks frame 1's detection starts are answered on it (they stayed hidden for good, each a SAM step every
    frame and a place among max_objects)."""
    got = _track(
        stub,
        [
            _start(classes=["person", "car"], detect_every=0, max_objects=3),
            _frame(frames[0], 0),
            _frame(frames[1], 1, detect=True),
            _frame(frames[2], 2),
        ],
    )
    assert not got[0].instances and got[1].detected
    assert got[1].instances and all(t.state == pb.TRACK_STATE_NEW for t in got[1].instances)
    assert {t.track_id for t in got[2].instances} == {t.track_id for t in got[1].instances}


def test_detect_in_a_session_that_names_nothing_is_the_frames_error(stub, frames: list[bytes]) -> None:  # type: ignore[no-untyped-def]
    """The start named nothing to detect and left detect_every unset: its detector never runs (the proto says so), so
    a frame asking for it is refused (the closed test detector ran over every class and started tracks)."""
    got = _track(
        stub, [_start(), _frame(frames[0], 0, detect=True), _frame(frames[1], 1, prompts=[_box(10, 10, 90, 90)])]
    )
    assert got[0].error.message.startswith("frame.detect: this session names nothing to detect"), got[0]
    assert not got[1].HasField("error") and [t.track_id for t in got[1].instances] == [1]


def test_a_frame_admission_has_no_room_for_is_its_own_error_and_the_session_goes_on(
    settings, runner, frames: list[bytes]
) -> None:  # type: ignore[no-untyped-def]
    """Every running and queued slot taken (max_in_flight + max_queue): the frame is answered RESOURCE_EXHAUSTED and
    the session is as before it, so the frame sent again is answered (the whole call ended, its tracks lost)."""
    import queue

    held: queue.Queue[pb.TrackRequest | None] = queue.Queue()

    def messages() -> Iterator[pb.TrackRequest]:
        while (m := held.get()) is not None:
            yield m

    srv = ServerThread(settings, lambda: runner)
    try:
        with grpc.insecure_channel(srv.target) as channel:
            wait_serving(channel)
            answers = pb_grpc.SegmentationServiceStub(channel).Track(messages(), timeout=120)
            held.put(_start())
            held.put(_frame(frames[0], 0, prompts=[_box(10, 10, 120, 100)]))
            assert [t.track_id for t in next(answers).instances] == [1]
            admission = srv.served.servicer.admission
            limits = admission.max_in_flight, admission.max_queue
            admission.max_in_flight, admission.max_queue = 0, 0  # as if other calls held every slot
            held.put(_frame(frames[1], 1))
            busy = next(answers)
            admission.max_in_flight, admission.max_queue = limits
            assert (
                busy.error.code == grpc.StatusCode.RESOURCE_EXHAUSTED.value[0] and "server busy" in busy.error.message
            )
            held.put(_frame(frames[1], 1))
            again = next(answers)
            held.put(None)
            assert not again.HasField("error") and [t.track_id for t in again.instances] == [1]
            assert again.instances[0].state == pb.TRACK_STATE_TRACKED
    finally:
        srv.stop()


def test_a_caller_placed_track_a_detection_matches_keeps_score_1(demo_stub, frames: list[bytes]) -> None:  # type: ignore[no-untyped-def]
    """The proto: a track's score is the detection's that started or last matched it, 1 for prompts. A detection
    matching the caller's own object (so that it starts no second track) gave it the detection's score."""
    found = _track(demo_stub, [_start(detect_every=0), _frame(frames[0], 0, detect=True)])[0].instances[0]
    b = found.instance.box
    got = _track(
        demo_stub,
        [
            _start(classes=[found.instance.label], detect_every=1),
            _frame(frames[0], 0, prompts=[_box(b.x_min, b.y_min, b.x_max, b.y_max, "mine")]),
            _frame(frames[1], 1),
            _frame(frames[2], 2),
        ],
    )
    assert all(r.detected for r in got)
    mine = [t for r in got for t in r.instances if t.instance.label == "mine"]
    assert len(mine) == 3 and {t.track_id for t in mine} == {1}
    assert [t.instance.score for t in mine] == [1.0, 1.0, 1.0]


def test_a_client_that_reads_no_answer_is_cancelled_after_the_idle_time(settings, runner, frames: list[bytes]) -> None:  # type: ignore[no-untyped-def]
    """gRPC's flow control holds the server's write once the client's window is full (here one frame's answers: its
    window kept at 64 KiB). Past track_idle_seconds the call is cancelled and its session's place among
    max_track_sessions is free again; it was held for as long as the client stayed connected."""
    import time

    srv = ServerThread(settings.replace(max_track_sessions=1, track_idle_seconds=1.0), lambda: runner)
    try:
        with grpc.insecure_channel(srv.target, options=[("grpc.http2.bdp_probe", 0)]) as channel:
            wait_serving(channel)
            stub = pb_grpc.SegmentationServiceStub(channel)
            many = [_box(8 * k, 8, 8 * k + 150, 200) for k in range(20)]
            unread = stub.Track(iter([_start(), _frame(frames[0], 0, prompts=many), *(
                _frame(frames[t], t) for t in range(1, FRAMES))]), timeout=120)  # fmt: skip
            deadline, opened = time.monotonic() + 60, None
            while opened is None and time.monotonic() < deadline:
                time.sleep(0.5)
                try:
                    opened = _track(stub, [_start(), _frame(frames[0], 0)], timeout=30)
                except grpc.RpcError as e:
                    assert e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, e  # the unread session holds the place
            assert opened is not None and not opened[0].HasField("error"), "the unread session was never closed"
            assert srv.served.servicer.tracking.open == 0
            unread.cancel()
    finally:
        srv.stop()
