"""The client side of Track against the real server (test profile): ``Client.track`` gives, typed, what the raw stub
gets for the same messages; a bad frame is that frame's error and the stream goes on; a failed call raises; and
``detseg track`` turns an MP4 into an overlay video, MOTChallenge lines and JSON lines."""

from __future__ import annotations

import io
import json
import struct
from fractions import Fraction
from pathlib import Path

import av
import grpc
import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils

from service.cli import main
from service.client import AsyncClient, Client, Region, RequestFailed, TrackInput
from service.proto.detseg.v1 import detseg_pb2 as pb
from service.shapes.video import make_video

FRAMES, WIDTH, HEIGHT = 6, 320, 240
BOXES = [(10.0, 10.0, 120.0, 100.0), (160.0, 60.0, 300.0, 200.0)]


def _jpeg(rgb: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


@pytest.fixture(scope="module")
def rgb_frames() -> list[np.ndarray]:
    video = make_video(3, frames=FRAMES, width=WIDTH, height=HEIGHT)
    return [video.frame(t).image for t in range(FRAMES)]


@pytest.fixture(scope="module")
def frames(rgb_frames: list[np.ndarray]) -> list[bytes]:
    return [_jpeg(rgb) for rgb in rgb_frames]


def _raw_messages(frames: list[bytes]) -> list[pb.TrackRequest]:
    """What the client should send for ``test_the_client_reads_what_the_stub_gets``, written out by hand."""
    start = pb.TrackStart(request_id="clip-7", options=pb.SegmentOptions(mask_encoding=pb.MASK_ENCODING_COCO_RLE))
    messages = [pb.TrackRequest(start=start)]
    for t, data in enumerate(frames):
        frame = pb.TrackFrame(image=pb.Image(encoded=data), frame_index=t)
        frame.timestamp.FromNanoseconds(t * 100_000_000)
        if t == 0:
            for box, label in zip(BOXES, ("left", ""), strict=True):
                x0, y0, x1, y1 = box
                region = pb.RegionPrompt(box=pb.BoundingBox(x_min=x0, y_min=y0, x_max=x1, y_max=y1), label=label)
                frame.prompts.add(region=region)
        messages.append(pb.TrackRequest(frame=frame))
    return messages


def _decode(instance: pb.Instance) -> np.ndarray:
    rle = instance.mask.coco_rle
    return mask_utils.decode({"size": list(rle.size), "counts": rle.counts}).astype(bool)


def test_the_client_reads_what_the_stub_gets(server, stub, frames: list[bytes]) -> None:  # type: ignore[no-untyped-def]
    inputs = [TrackInput(data, timestamp=t / 10, regions=[BOXES[1]] if t == 0 else ()) for t, data in enumerate(frames)]
    with Client(server.target) as detseg:  # the keyword's regions go on the first frame, before its own
        got = list(detseg.track(inputs, regions=[Region(box=BOXES[0], label="left")], request_id="clip-7", timeout=300))
    expected = list(stub.Track(iter(_raw_messages(frames)), timeout=300))

    assert [f.frame_index for f in got] == list(range(FRAMES))
    assert [f.timestamp for f in got] == pytest.approx([t / 10 for t in range(FRAMES)])
    assert all(f.error is None and f.request_id == "clip-7" and (f.width, f.height) == (WIDTH, HEIGHT) for f in got)
    assert [(t.track_id, t.state, t.instance.label) for t in got[0]] == [(1, "new", "left"), (2, "new", "object")]
    for frame, response in zip(got, expected, strict=True):
        assert frame.response == response
        assert [(t.track_id, t.state, t.first_frame) for t in frame] == [
            (t.track_id, pb.TrackState.Name(t.state).removeprefix("TRACK_STATE_").lower(), t.first_frame)
            for t in response.instances
        ]
        for t, raw in zip(frame, response.instances, strict=True):
            assert np.array_equal(t.instance.mask, _decode(raw.instance))
            box = raw.instance.box
            assert t.instance.box == pytest.approx((box.x_min, box.y_min, box.x_max, box.y_max))
            assert t.visible == (t.state in ("new", "tracked") and t.instance.area > 0)


async def test_the_async_client_tracks_too(server, frames: list[bytes]) -> None:  # type: ignore[no-untyped-def]
    with Client(server.target) as detseg:
        expected = list(detseg.track(frames[:2], regions=[BOXES[0]], timeout=300))
    async with AsyncClient(server.target) as detseg:
        got = [f async for f in detseg.track(frames[:2], regions=[BOXES[0]], timeout=300)]
    assert [f.response.instances for f in got] == [f.response.instances for f in expected]


def test_a_bad_frame_is_answered_with_its_error_and_the_stream_goes_on(server, frames: list[bytes]) -> None:  # type: ignore[no-untyped-def]
    inputs = [
        TrackInput(frames[0], regions=[BOXES[0]]),
        TrackInput(frames[1], index=0),  # out of order
        frames[1],  # the running count: 1
        TrackInput(frames[2], end_tracks=[9]),  # no such track
        TrackInput(frames[3], corrections={1: Region(box=(20, 20, 110, 90), label="fixed")}),  # 3: after a sent 2
        TrackInput(frames[4], end_tracks=[1]),
    ]
    with Client(server.target) as detseg:
        got = list(detseg.track(inputs, timeout=300))
    assert [f.frame_index for f in got] == [0, 0, 1, 2, 3, 4]
    assert [f.error.code if f.error else 0 for f in got] == [0, 3, 0, 3, 0, 0]
    assert got[1].error and got[1].error.message.startswith("frame.frame_index")
    assert got[3].error and got[3].error.message.startswith("frame.end_tracks[0]")
    assert [t.track_id for t in got[2]] == [1] and got[2].instances[0].state in ("tracked", "lost")
    assert [(t.track_id, t.state, t.instance.label) for t in got[4]] == [(1, "tracked", "fixed")]
    assert [(t.track_id, t.state) for t in got[5]] == [(1, "ended")]


def test_a_failed_call_raises_and_a_frame_that_cannot_be_read_is_raised_as_itself(server, frames: list[bytes]) -> None:  # type: ignore[no-untyped-def]
    with Client(server.target) as detseg:
        with pytest.raises(RequestFailed) as failed:
            list(detseg.track(frames[:1], classes=["no such class"], timeout=300))
        assert failed.value.code == grpc.StatusCode.INVALID_ARGUMENT and "start.classes" in failed.value.message

        answered = []
        with pytest.raises(FileNotFoundError):
            for f in detseg.track([frames[0], Path("/nonexistent/frame.jpg")], regions=[BOXES[0]], timeout=300):
                answered.append(f)
    assert [f.frame_index for f in answered] == [0]  # the frames sent before it are answered


def _write_mp4(path: Path, rgb_frames: list[np.ndarray]) -> None:
    with av.open(str(path), "w") as out:
        stream = out.add_stream("libx264", rate=10)
        stream.width, stream.height, stream.pix_fmt = WIDTH, HEIGHT, "yuv420p"
        for rgb in rgb_frames:
            out.mux(stream.encode(av.VideoFrame.from_ndarray(rgb, format="rgb24")))
        out.mux(stream.encode(None))


def test_detseg_track_writes_an_overlay_mot_lines_and_json_lines(  # type: ignore[no-untyped-def]
    server, rgb_frames: list[np.ndarray], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    video, overlay, mot = tmp_path / "clip.mp4", tmp_path / "overlay.mp4", tmp_path / "mot.txt"
    _write_mp4(video, rgb_frames)
    argv = ["track", str(video), "--box", "10,10,120,100:left", "--box", "160,60,300,200", "--target", server.target]
    assert main([*argv, "--out", str(overlay), "--mot", str(mot), "--json", "--timeout", "300"]) == 0

    with av.open(str(overlay)) as container:
        decoded = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    assert len(decoded) == FRAMES and all(f.shape == (HEIGHT, WIDTH, 3) for f in decoded)

    records = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["frame_index"] for r in records] == list(range(FRAMES)) and all(r["error"] is None for r in records)
    first = [(t["track_id"], t["state"], t["label"]) for t in records[0]["tracks"]]
    assert first == [(1, "new", "left"), (2, "new", "object")]
    assert all(r["width"] == WIDTH and "rle" in t for r in records for t in r["tracks"])

    rows = [line.split(",") for line in mot.read_text().splitlines()]
    assert rows and all(len(r) == 10 and r[7:] == ["-1", "-1", "-1"] for r in rows)
    frames_ids = [(int(r[0]), int(r[1])) for r in rows]
    assert all(1 <= f <= FRAMES and i >= 1 for f, i in frames_ids)
    assert (1, 1) in frames_ids and (1, 2) in frames_ids  # both boxes seen on the first frame
    shown = {(r["frame_index"] + 1, t["track_id"]) for r in records for t in r["tracks"] if t["state"] != "lost"}
    assert set(frames_ids) <= shown
    assert all(float(r[4]) > 0 and float(r[5]) > 0 for r in rows)

    assert main([*argv, "--raw", "--timeout", "300"]) == 0  # raw RGB frames; a summary instead of JSON
    summary = capsys.readouterr().out.splitlines()
    assert summary[0] == f"{FRAMES} frame(s), 0 failed; 2 track(s) seen"
    assert summary[1].split()[:2] == ["1", "left"] and summary[2].split()[:2] == ["2", "object"]


@pytest.mark.parametrize(
    ("name", "says"),
    [
        ("missing-folder/overlay.mp4", "No such file or directory"),
        ("overlay.gif", "'gif' format does not support"),
        ("overlay", "Could not determine output format"),
    ],
)
def test_detseg_track_refuses_an_overlay_it_cannot_write_before_sending_a_frame(  # type: ignore[no-untyped-def]
    server, rgb_frames: list[np.ndarray], tmp_path: Path, capsys: pytest.CaptureFixture[str], name: str, says: str
) -> None:
    """(An av traceback, after the call had started.)"""
    video, overlay = tmp_path / "clip.mp4", tmp_path / name
    _write_mp4(video, rgb_frames[:2])
    assert main(["track", str(video), "--box", "10,10,120,100", "--out", str(overlay), "--target", server.target]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.startswith(f"detseg: --out {overlay}: cannot write a video there (")
    assert says in captured.err and "Traceback" not in captured.err


def _write_video(path: Path, rgb_frames: list[np.ndarray], codec: str = "libx264", times_ms: list[int] | None = None):  # type: ignore[no-untyped-def]
    """Frames encoded at their ``times_ms`` (a variable frame rate; default 10 frames/s)."""
    with av.open(str(path), "w") as out:
        stream = out.add_stream(codec, rate=10)
        stream.width, stream.height, stream.pix_fmt = WIDTH, HEIGHT, "yuv420p"
        stream.codec_context.time_base = Fraction(1, 1000)
        for k, rgb in enumerate(rgb_frames):
            frame = av.VideoFrame.from_ndarray(rgb, format="rgb24")
            frame.pts, frame.time_base = (times_ms[k] if times_ms else 100 * k), Fraction(1, 1000)
            out.mux(stream.encode(frame))
        out.mux(stream.encode(None))


def _rotated(path: Path) -> None:
    """The MP4 with its track's display matrix set to [0 1; -1 0]: played turned 90 degrees clockwise, as a phone
    held upright records (PyAV reads rotation -90; the pixels stored are as before)."""
    data = bytearray(path.read_bytes())
    at = data.index(b"tkhd") - 4
    offset = at + 8 + 4 + (32 if data[at + 8] == 1 else 20) + 16
    identity = struct.pack(">9i", 0x10000, 0, 0, 0, 0x10000, 0, 0, 0, 0x40000000)
    assert data[offset : offset + 36] == identity
    data[offset : offset + 36] = struct.pack(">9i", 0, 0x10000, 0, -0x10000, 0, 0, 0, 0, 0x40000000)
    path.write_bytes(data)


def test_detseg_track_plays_frames_upright_and_keeps_their_times(  # type: ignore[no-untyped-def]
    server, rgb_frames: list[np.ndarray], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A rotated, variable-frame-rate video: the stored pixels were sent sideways and the overlay played sideways,
    at a constant rate (0.48 s long for a 2 s source, out of step with it)."""
    from service.cli.track import _decoded

    video, overlay = tmp_path / "phone.mp4", tmp_path / "overlay.mp4"
    times = [0, 40, 80, 500, 540, 2000]
    _write_video(video, rgb_frames, times_ms=times)
    with av.open(str(video)) as container:
        stored = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    _rotated(video)
    with av.open(str(video)) as container:
        upright = [d.rgb for d in _decoded(container)]
    assert [u.shape for u in upright] == [(WIDTH, HEIGHT, 3)] * FRAMES
    assert all(np.array_equal(u, np.rot90(s, -1)) for u, s in zip(upright, stored, strict=True))  # clockwise

    argv = ["track", str(video), "--box", "10,10,200,100", "--out", str(overlay), "--json", "--target", server.target]
    assert main([*argv, "--timeout", "300"]) == 0
    records = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [(r["width"], r["height"]) for r in records] == [(HEIGHT, WIDTH)] * FRAMES
    with av.open(str(overlay)) as container:
        played = [(f.width, f.height, round(f.time * 1000)) for f in container.decode(video=0)]
    assert played == [(HEIGHT, WIDTH, t) for t in times]


def test_detseg_track_answers_the_frames_before_one_it_cannot_decode(  # type: ignore[no-untyped-def]
    server, rgb_frames: list[np.ndarray], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """(A traceback, and an overlay without its trailer: no video stream in it.)"""
    video, overlay = tmp_path / "damaged.mkv", tmp_path / "overlay.mp4"
    _write_video(video, rgb_frames, codec="ffv1")  # every frame coded on its own
    data = bytearray(video.read_bytes())
    at = len(data) * 7 // 10  # into the fifth frame's packet
    data[at : at + 4000] = (bytes(range(256)) * 16)[:4000]
    video.write_bytes(data)
    with av.open(str(video)) as container, pytest.raises(av.FFmpegError):
        readable = 0
        for _ in container.decode(video=0):
            readable += 1
    assert 0 < readable < FRAMES

    argv = ["track", str(video), "--box", "10,10,120,100", "--out", str(overlay), "--target", server.target]
    assert main([*argv, "--timeout", "300"]) == 1
    captured = capsys.readouterr()
    assert captured.out.startswith(f"{readable} frame(s), 0 failed")
    assert f"detseg: {video}: frame {readable}: cannot decode it (" in captured.err and "Traceback" not in captured.err
    with av.open(str(overlay)) as container:
        assert len(list(container.decode(video=0))) == readable


def test_detseg_track_says_a_file_without_a_video_stream_has_none(  # type: ignore[no-untyped-def]
    server, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """(IndexError: tuple index out of range, a traceback.)"""
    sound = tmp_path / "sound.wav"
    with av.open(str(sound), "w") as out:
        stream = out.add_stream("pcm_s16le", rate=8000)
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 800), np.int16), format="s16", layout="mono")
        frame.sample_rate = 8000
        out.mux(stream.encode(frame))
        out.mux(stream.encode(None))
    assert main(["track", str(sound), "--box", "1,1,5,5", "--target", server.target]) == 2
    assert capsys.readouterr().err == f"detseg: {sound}: no video stream\n"
