"""``detseg eval-track``: held-out shapes videos through a running server's Track call and a no-memory baseline,
scored with trackeval (``service.evaluation.tracking``); a summary table, and ``tracking.json`` + ``TRACKING.md``."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from service.cli.common import add_connection_flags, number, target_client
from service.client import DEFAULT_TARGET
from service.evaluation.track_metrics import MAX_FRAMES
from service.evaluation.tracking import MIN_VISIBLE, TrackOptions, evaluate_tracking, seeds_of, tables, write_report
from service.shapes.video import MIN_SIDE
from service.shapes.world import CLASSES

# A video's largest side, pixels: what a rendered video holds in memory is bounded (every frame is kept until scored:
# MAX_FRAMES frames of 1920 x 1920 RGB are 2.8 GB).
MAX_SIDE = 1920


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    e = sub.add_parser(
        "eval-track", help="held-out shapes videos through Track and a no-memory baseline: HOTA, IDF1, IDSW, J&F"
    )
    e.add_argument("--split", choices=["val", "test"], default="val", help="held-out videos (default val)")
    e.add_argument("--videos", type=number(int, 1), default=20, help="how many videos (default 20)")
    e.add_argument("--first", type=number(int, 0), default=0, help="index of the first video in the split (default 0)")
    e.add_argument(
        "--frames",
        type=number(int, 1, MAX_FRAMES),
        default=100,
        help=f"frames per video (default 100; at most {MAX_FRAMES}, what trackeval's J&F takes)",
    )
    e.add_argument(
        "--size", type=_size, default=(640, 480), help=f"WIDTHxHEIGHT, each {MIN_SIDE} to {MAX_SIDE} (default 640x480)"
    )
    e.add_argument(
        "--class",
        dest="classes",
        metavar="CLASS",
        action="append",
        help=f"class to find (repeatable; default the shapes' {', '.join(CLASSES)})",
    )
    e.add_argument("--text", action="append", default=[], help="free-text prompt to find (repeatable)")
    e.add_argument("--score-threshold", type=number(float, 0, 1), help="default the server's")
    e.add_argument(
        "--detect-every", type=number(int, 0), help="Track: run the detector every K frames (default the server's)"
    )
    e.add_argument(
        "--lost-after", type=number(int, 1), help="a track unseen this many frames ends (both; default the server's)"
    )
    e.add_argument("--max-objects", type=number(int, 1), help="Track: most objects at once (default the server's)")
    e.add_argument(
        "--match-iou", type=number(float, 0, 1), help="Track: detection-to-track mask IoU (default the server's)"
    )
    e.add_argument(
        "--baseline-iou", type=number(float, 0, 1), default=0.3, help="baseline: least IoU of a match (default 0.3)"
    )
    e.add_argument("--no-baseline", dest="baseline", action="store_false", help="run the Track call only")
    e.add_argument(
        "--min-visible",
        type=number(float, 0, 1),
        default=MIN_VISIBLE,
        help=f"score an object on a frame when this share of its shape is visible there (default {MIN_VISIBLE})",
    )
    e.add_argument(
        "--jpeg", type=number(int, 0, 100), metavar="QUALITY", help="send JPEG frames at this quality (default raw RGB)"
    )
    e.add_argument("--out", type=Path, default=Path("eval-track"), help="report folder (default eval-track)")
    e.add_argument("--target", default=DEFAULT_TARGET, help=f"a running server (default {DEFAULT_TARGET})")
    e.add_argument(
        "--timeout",
        type=number(float, 0, open_low=True),
        default=300.0,
        help="per-request deadline in seconds (default 300)",
    )
    add_connection_flags(e)
    e.set_defaults(func=eval_track)


def _size(spec: str) -> tuple[int, int]:
    try:
        width, height = (int(v) for v in spec.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{spec!r}: expected WIDTHxHEIGHT, e.g. 640x480") from None
    if not (MIN_SIDE <= width <= MAX_SIDE and MIN_SIDE <= height <= MAX_SIDE):
        raise argparse.ArgumentTypeError(f"{spec!r}: each side from {MIN_SIDE} to {MAX_SIDE} pixels")
    return width, height


def eval_track(args: argparse.Namespace) -> int:
    width, height = args.size
    options = TrackOptions(
        classes=tuple(args.classes or CLASSES),
        texts=tuple(args.text),
        score_threshold=args.score_threshold,
        detect_every=args.detect_every,
        lost_after=args.lost_after,
        max_objects=args.max_objects,
        match_iou=args.match_iou,
        baseline_iou=args.baseline_iou,
    )
    args.out.mkdir(parents=True, exist_ok=True)  # before the videos: a folder that cannot be made fails at once
    with target_client(args) as client:
        figures = evaluate_tracking(
            client,
            seeds_of(args.split, args.videos, args.first),
            frames=args.frames,
            width=width,
            height=height,
            options=options,
            jpeg_quality=args.jpeg,
            baseline=args.baseline,
            min_visible=args.min_visible,
            progress=lambda line: print(line, file=sys.stderr, flush=True),
        )
    json_path, md_path = args.out / "tracking.json", args.out / "TRACKING.md"
    write_report(figures, json_path, md_path, f"detseg eval-track: {args.videos} {args.split} videos")
    for name, head, rows in tables(figures)[:3]:
        print(f"{name}\n  " + " | ".join(head))
        for row in rows:
            print("  " + " | ".join(row))
    print(f"report: {md_path} (figures: {json_path})")
    return 1 if figures["failed_frames"] else 0
