"""Track soak (not part of `make test`): a real `detseg serve` process following objects through one long stream,
and many sessions at once.

    python -m tests.benchmarks.track_soak [--frames 10000] [--sessions 20] [--models demo-open] [--out benchmarks]

1. Long stream: one session of ``--frames`` frames (a 300-frame shapes video at 320x240, played back and forth so
   objects keep moving; the detector every 10 frames, as the service's default) on a server of its own; the
   server's RSS (from /proc) every 500 frames. Bounded memory means flat after warm-up: the growth from frame 1000
   on is reported (target: <= 50 MB).
2. Concurrent sessions: ``--sessions`` sessions on one server at once, each its own video and seed (40 frames), then
   each again alone; every session's ids, states and masks must equal its solo run (no cross-talk). Masks compare
   by IoU >= 0.99 (frames of concurrent sessions may share an encoder batch, whose float sums differ in the last
   bits) and ids and states exactly.

Writes ``<out>/TRACK-SOAK.md`` and ``<out>/track-soak.json``.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import functools
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
from pycocotools import mask as mask_utils

from service.proto.detseg.v1 import detseg_pb2 as pb
from service.proto.detseg.v1 import detseg_pb2_grpc as pb_grpc
from service.shapes.video import make_video, split_seed
from tests.benchmarks.soak import free_port, rss_mb
from tests.conftest import wait_serving
from tests.helpers import encode

CLASSES = ["circle", "square", "triangle", "star", "hexagon"]


def video_frames(seed: int, count: int) -> list[bytes]:
    video = make_video(seed, frames=count, width=320, height=240)
    return [encode(video.frame(t).image, "JPEG", quality=90) for t in range(count)]


def requests(frames: list[bytes], total: int) -> Iterator[pb.TrackRequest]:
    yield pb.TrackRequest(start=pb.TrackStart(classes=CLASSES, detect_every=10))
    period = 2 * len(frames) - 2
    for t in range(total):
        k = t % period
        k = k if k < len(frames) else period - k  # back and forth
        yield pb.TrackRequest(frame=pb.TrackFrame(image=pb.Image(encoded=frames[k]), frame_index=t))


def start_server(models: str, port: int, env: dict[str, str]) -> subprocess.Popen[str]:
    command = [sys.executable, "-m", "service.cli", "serve", "--models", models, "--port", str(port), "--offline",
               "--backend", "torch"]  # fmt: skip
    return subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, text=True)


def long_stream(stub: Any, pid: int, frames: list[bytes], total: int) -> dict[str, Any]:
    rss: list[tuple[int, float]] = [(0, rss_mb(pid))]
    tracks: set[int] = set()
    start = time.monotonic()
    for t, response in enumerate(stub.Track(requests(frames, total), timeout=24 * 3600)):
        assert not response.HasField("error"), response.error.message
        tracks.update(i.track_id for i in response.instances)
        if (t + 1) % 500 == 0:
            rss.append((t + 1, rss_mb(pid)))
            print(f"frame {t + 1}: RSS {rss[-1][1]:.0f} MB, {len(tracks)} tracks so far", flush=True)
    after_warmup = [mb for frame, mb in rss if frame >= 1000]
    return {"frames": total, "seconds": time.monotonic() - start, "rss_mb": rss, "tracks": len(tracks),
            "growth_after_1000_mb": max(after_warmup) - after_warmup[0] if after_warmup else float("nan")}  # fmt: skip


def session(stub: Any, seed: int) -> list[pb.TrackResponse]:
    return list(stub.Track(requests(video_frames(seed, 40), 40), timeout=3600))


def same(a: list[pb.TrackResponse], b: list[pb.TrackResponse]) -> bool:
    if [[(i.track_id, i.state) for i in r.instances] for r in a] != [
        [(i.track_id, i.state) for i in r.instances] for r in b
    ]:
        return False
    for x, y in zip(a, b, strict=True):
        for i, j in zip(x.instances, y.instances, strict=True):
            m, n = (mask_utils.decode({"size": list(k.instance.mask.coco_rle.size),
                                       "counts": k.instance.mask.coco_rle.counts}) for k in (i, j))  # fmt: skip
            union = int((m | n).sum())
            if union and (m & n).sum() / union < 0.99:
                return False
    return True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--frames", type=int, default=10_000)
    parser.add_argument("--sessions", type=int, default=20)
    parser.add_argument("--models", default="demo-open")
    parser.add_argument("--out", type=Path, default=Path("benchmarks"))
    args = parser.parse_args()
    env = {**os.environ, "DETSEG_MAX_TRACK_SESSIONS": str(args.sessions), "DETSEG_MAX_IN_FLIGHT": "64",
           "DETSEG_MAX_CONCURRENT_RPCS": "256"}  # fmt: skip
    result: dict[str, Any] = {"date": time.strftime("%Y-%m-%d"), "models": args.models}
    options = [("grpc.max_receive_message_length", 64 << 20)]
    for part in ("long", "concurrent"):
        port = free_port()
        server = start_server(args.models, port, env)
        try:
            with grpc.insecure_channel(f"127.0.0.1:{port}", options=options) as channel:
                grpc.channel_ready_future(channel).result(timeout=300)
                wait_serving(channel)
                stub = pb_grpc.SegmentationServiceStub(channel)
                if part == "long":
                    frames = video_frames(split_seed("val", 100), 300)
                    result["long"] = long_stream(stub, server.pid, frames, args.frames)
                else:
                    seeds = [split_seed("val", 200 + k) for k in range(args.sessions)]
                    with concurrent.futures.ThreadPoolExecutor(args.sessions) as pool:
                        together = list(pool.map(functools.partial(session, stub), seeds))
                    alone = [session(stub, s) for s in seeds]
                    equal = [same(a, b) for a, b in zip(alone, together, strict=True)]
                    result["concurrent"] = {"sessions": args.sessions, "equal_to_solo": sum(equal)}
        finally:
            server.terminate()
            server.wait(timeout=60)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "track-soak.json").write_text(json.dumps(result, indent=2) + "\n")
    (args.out / "TRACK-SOAK.md").write_text(report(result))
    print(report(result))


def report(r: dict[str, Any]) -> str:
    long, many = r["long"], r["concurrent"]
    first, last = long["rss_mb"][0][1], long["rss_mb"][-1][1]
    return "\n".join(
        [
            "# Track soak: one long stream, many sessions",
            "",
            f"Measured {r['date']} with `python -m tests.benchmarks.track_soak` (profile {r['models']}, torch).",
            "",
            f"- One stream of {long['frames']} frames (320x240, detector every 10 frames, {long['tracks']} tracks "
            f"in all) in {long['seconds']:.0f} s: server RSS {first:.0f} MB at the start, {last:.0f} MB at the end; "
            f"growth from frame 1000 on: {long['growth_after_1000_mb']:.1f} MB (target <= 50 MB).",
            f"- {many['sessions']} sessions at once: {many['equal_to_solo']} of {many['sessions']} equal to their "
            "solo runs (ids and states exactly, masks IoU >= 0.99).",
            "",
            "RSS every 500 frames (frame, MB): " + ", ".join(f"{frame}: {mb:.0f}" for frame, mb in long["rss_mb"]),
            "",
        ]
    )


if __name__ == "__main__":
    main()
