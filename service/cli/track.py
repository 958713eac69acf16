"""``detseg track``: a video through a running server's Track call; an overlay video, MOTChallenge results and one
JSON object per frame.

The video is decoded with PyAV frame by frame as gRPC sends the frames (JPEG, or raw RGB with ``--raw``), so it is
never held whole; each decoded frame waits in a queue for its answer, which the overlay is drawn on. Frames are
turned upright first (the stream's display rotation, as FFmpeg's players apply it), so boxes are pixels of the video as
it plays; frame indices are the decode order from 0 (MOTChallenge frames from 1). The overlay keeps each frame's
presentation time (a variable frame rate stays in step with the source). A frame FFmpeg cannot decode ends the run
after the answers to the frames before it, with exit status 1.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import itertools
import json
import sys
from collections import deque
from collections.abc import Iterator
from fractions import Fraction
from pathlib import Path
from typing import Any, TextIO

import av
import numpy as np
from tqdm import tqdm

from service.cli.common import BOX_FORM, add_connection_flags, box_region, connection, number
from service.cli.overlay import Drawn, draw_instances
from service.client import DEFAULT_TARGET, Client, FrameResult, TrackInput
from service.client_requests import jpeg
from service.results import instance_content

DEFAULT_RATE = Fraction(25)  # frames/s of the overlay when the video does not say
# The overlay's time base: fine enough for any source's frame times, within MPEG-4 Part 2's limit (65,535).
OVERLAY_TIME_BASE = Fraction(1, 60000)


@dataclasses.dataclass(frozen=True)
class Decoded:
    """A decoded frame: ``rgb`` (H, W, 3) uint8, upright; ``time`` its presentation time in seconds (None: the
    container gives none)."""

    rgb: np.ndarray
    time: float | None


class VideoUnreadable(Exception):
    """A frame FFmpeg cannot decode; the message names it."""


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    g = sub.add_parser("track", help="follow objects through a video on a running server; overlay, MOT, JSON")
    g.add_argument("video", type=Path, help="any video FFmpeg decodes (its first video stream)")
    g.add_argument(
        "--class", dest="classes", metavar="CLASS", action="append", default=[], help="class to find (repeatable)"
    )
    g.add_argument("--text", action="append", default=[], help="free-text prompt to find (repeatable)")
    g.add_argument(
        "--box",
        action="append",
        default=[],
        type=box_region,
        help=f"{BOX_FORM}: an object to follow from the first frame (repeatable)",
    )
    g.add_argument(
        "--detect-every", type=number(int, 0), help="run the detector every K frames (0: never; default the server's)"
    )
    g.add_argument("--max-objects", type=number(int, 1), help="most objects followed at once (default the server's)")
    g.add_argument("--score-threshold", type=number(float, 0, 1))
    g.add_argument("--raw", action="store_true", help="send raw RGB frames (default JPEG, quality 90)")
    g.add_argument("--out", type=Path, help="write an overlay video here (H.264; masks tinted per track id)")
    g.add_argument("--mot", type=Path, help="write MOTChallenge results here (frame,id,left,top,width,height,conf)")
    g.add_argument("--json", action="store_true", help="print one JSON object per frame instead of a summary")
    g.add_argument("--target", default=DEFAULT_TARGET, help=f"server address (default {DEFAULT_TARGET})")
    g.add_argument(
        "--timeout", type=number(float, 0, open_low=True), help="deadline of the whole call in seconds (default none)"
    )
    add_connection_flags(g)
    g.set_defaults(func=track)


def track(args: argparse.Namespace) -> int:
    try:
        container = av.open(str(args.video))
    except av.FFmpegError as e:
        print(f"detseg: cannot read {args.video}: {e}", file=sys.stderr)
        return 2
    pending: deque[Decoded] = deque()  # decoded frames waiting for their answers, in order
    seen: dict[int, tuple[str, int, int, int]] = {}  # track id: label, first and last frame seen, frames seen
    answered = failed = 0
    unreadable: VideoUnreadable | None = None
    with contextlib.ExitStack() as stack:
        stack.enter_context(container)
        if not container.streams.video:
            print(f"detseg: {args.video}: no video stream", file=sys.stderr)
            return 2
        stream = container.streams.video[0]
        decoded = _decoded(container)
        try:  # the first frame before anything is sent: its upright size is the overlay's
            first: list[Decoded] = list(itertools.islice(decoded, 1))
        except VideoUnreadable as e:
            print(f"detseg: {args.video}: {e}", file=sys.stderr)
            return 2
        writer = None
        if args.out:
            h, w = first[0].rgb.shape[:2] if first else (stream.codec_context.height, stream.codec_context.width)
            try:
                writer = stack.enter_context(_writer(args.out, stream.average_rate, (w, h)))
            except ValueError as e:  # before any frame is sent
                print(f"detseg: {e}", file=sys.stderr)
                return 2
        mot = stack.enter_context(args.mot.open("w")) if args.mot else None
        bar = stack.enter_context(tqdm(total=stream.frames or None, unit="frame", file=sys.stderr, disable=None))
        client = stack.enter_context(Client(args.target, **connection(args)))
        answers = client.track(
            _frames(itertools.chain(first, decoded), pending, raw=args.raw),
            classes=args.classes,
            texts=args.text,
            regions=args.box,
            detect_every=args.detect_every,
            max_objects=args.max_objects,
            score_threshold=args.score_threshold,
            timeout=args.timeout,
        )
        try:
            for result in answers:
                frame = pending.popleft()
                answered += 1
                bar.update()
                if args.json:
                    print(json.dumps(_frame_json(result)), flush=True)
                if result.error is not None:
                    failed += 1
                    print(f"detseg: frame {result.frame_index}: {result.error.message}", file=sys.stderr)
                for t in result.visible:
                    _, start, _, count = seen.get(t.track_id, ("", result.frame_index, 0, 0))
                    seen[t.track_id] = (t.instance.label, start, result.frame_index, count + 1)
                if mot is not None:
                    _write_mot(mot, result)
                if writer is not None:
                    writer(_overlay(frame.rgb, result), frame.time)
        except VideoUnreadable as e:  # the frames before it are answered, and the overlay holds them
            unreadable = e
            print(f"detseg: {args.video}: {e}", file=sys.stderr)
    if not args.json:
        print(f"{answered} frame(s), {failed} failed; {len(seen)} track(s) seen")
        for track_id, (label, start, end, count) in sorted(seen.items()):
            print(f"{track_id:4d}  {label:<16} frames {start}..{end}  seen on {count}")
    for path, what in ((args.out, "overlay"), (args.mot, "MOT results")):
        if path:
            print(f"{what} written to {path}", file=sys.stderr)
    return 1 if failed or unreadable else 0


def _decoded(container: Any) -> Iterator[Decoded]:
    """The first video stream's frames in decode order, upright; VideoUnreadable naming the frame FFmpeg cannot
    decode."""
    frames = container.decode(video=0)
    for index in itertools.count():
        try:
            frame = next(frames)
        except StopIteration:
            return
        except av.FFmpegError as e:
            raise VideoUnreadable(f"frame {index}: cannot decode it ({e})") from None
        yield Decoded(_upright(frame.to_ndarray(format="rgb24"), frame.rotation), frame.time)


def _upright(rgb: np.ndarray, rotation: float) -> np.ndarray:
    """The frame as it plays: ``rotation`` is the display matrix's counter-clockwise angle in degrees (PyAV's
    ``VideoFrame.rotation``; -90 for a phone held upright: turned 90 degrees clockwise to play)."""
    turns = round(rotation / 90) % 4
    return np.ascontiguousarray(np.rot90(rgb, turns)) if turns else rgb


def _frames(decoded: Iterator[Decoded], pending: deque[Decoded], *, raw: bool) -> Iterator[TrackInput]:
    """The video's frames in decode order (index: the running count), each queued in ``pending`` for its answer."""
    for frame in decoded:
        pending.append(frame)
        yield TrackInput(frame.rgb if raw else jpeg(frame.rgb), timestamp=frame.time)


@contextlib.contextmanager
def _writer(path: Path, rate: Fraction | None, size: tuple[int, int]) -> Iterator[Any]:
    """A function that appends an (H, W, 3) uint8 RGB frame of ``size`` (W, H) shown at a time in seconds (None:
    one ``rate`` frame after the one before) to an H.264 video at ``path`` (MPEG-4 Part 2 where FFmpeg has no
    libx264), 4:2:0 unless a side is odd, which 4:2:0 cannot hold, then 4:4:4; flushed on exit. The file is opened
    and its stream set up at once: a folder that is not there, a name FFmpeg has no format for, or a format that
    cannot hold the codec raise ValueError (naming ``--out``) before any frame is sent."""
    codec = "libx264" if "libx264" in av.codecs_available else "mpeg4"
    width, height = size
    step = round(1 / (OVERLAY_TIME_BASE * (rate or DEFAULT_RATE)))  # one frame at the stream's rate, in ticks
    try:
        out = av.open(str(path), "w")
    except (av.FFmpegError, ValueError) as e:
        raise ValueError(f"--out {path}: cannot write a video there ({e})") from None
    with out:
        try:
            stream: Any = out.add_stream(codec, rate=rate or DEFAULT_RATE)
            stream.width, stream.height = width, height
            stream.pix_fmt = "yuv420p" if height % 2 == width % 2 == 0 else "yuv444p"
            stream.codec_context.time_base = OVERLAY_TIME_BASE
            out.start_encoding()
        except (av.FFmpegError, ValueError) as e:
            raise ValueError(f"--out {path}: cannot write a video there ({e})") from None
        last: int | None = None

        def write(rgb: np.ndarray, time: float | None) -> None:
            nonlocal last
            frame = av.VideoFrame.from_ndarray(rgb, format="rgb24")
            pts = round(time / OVERLAY_TIME_BASE) if time is not None else (last + step if last is not None else 0)
            frame.pts = last = pts if last is None else max(pts, last + 1)  # strictly increasing, as encoders need
            frame.time_base = OVERLAY_TIME_BASE
            out.mux(stream.encode(frame))

        yield write
        out.mux(stream.encode(None))


def _overlay(rgb: np.ndarray, result: FrameResult) -> np.ndarray:
    """The frame with each visible track's mask tinted in its id's colour, its box and "id label"."""
    drawn = [
        Drawn(t.track_id, t.instance.mask, t.instance.box, f"{t.track_id} {t.instance.label}") for t in result.visible
    ]
    return np.asarray(draw_instances(rgb, drawn)) if drawn else rgb


def _write_mot(out: TextIO, result: FrameResult) -> None:
    """MOTChallenge results lines: frame (from 1), id, left, top, width, height, conf (the instance's score), then
    -1,-1,-1 (no 3D position); one per track seen on the frame."""
    for t in result.visible:
        x0, y0, x1, y1 = t.instance.box
        frame, conf = result.frame_index + 1, t.instance.score
        out.write(f"{frame},{t.track_id},{x0:.2f},{y0:.2f},{x1 - x0:.2f},{y1 - y0:.2f},{conf:.4f},-1,-1,-1\n")


def _frame_json(result: FrameResult) -> dict[str, Any]:
    """One frame's answer as plain JSON: the frame's fields, and each track with the instance as ``detseg segment
    --json`` writes it (``instance_content``)."""
    error = result.error
    return {
        "frame_index": result.frame_index,
        "timestamp": result.timestamp,
        "detected": result.detected,
        "width": result.width,
        "height": result.height,
        "request_id": result.request_id,
        "error": {"code": error.code, "message": error.message} if error else None,
        "tracks": [
            {"track_id": t.track_id, "state": t.state, "first_frame": t.first_frame, **instance_content(m.instance)}
            for t, m in zip(result.instances, result.response.instances, strict=True)
        ],
    }
