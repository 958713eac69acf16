"""Video tracking speed: detseg's Track RPC against sam2's ``SAM2VideoPredictor`` on the same weights and frames
(one run, not a test).

    python -m tests.benchmarks.track_bench [--out benchmarks] [--frames 12] [--objects 5,20]

Frames: 640x480 (480p) from the shapes video world (``service.shapes.video``, val split), as JPEG. Objects: the
first N ground-truth boxes of frame 0 (cycled over the video's objects, shifted, when it has fewer), prompted on frame
0; no re-detection, so both sides do the same work: encode every frame once, propagate every object with SAM 2's
memory, upsample the masks to 480p.

- detseg: a real server (test profile: the seeded SAM 2.1-T at 256², torch backend), called through the
  generated stub; per-frame latency is the time between answers (p50, p99), frames/s over the whole stream
  (JPEG decode, encoder, memory, masks encoded as COCO RLE, gRPC);
- sam2: ``init_state`` on the same JPEG files (decodes and resizes every frame up front, included in its time) then
  ``propagate_in_video`` (tracks each object on its own since sam2 1.1); per-frame time between yields.

Writes ``<out>/TRACK.md`` and ``<out>/track.json``.
"""

from __future__ import annotations

import argparse
import io
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from service.config import Settings
from service.models import testing
from service.proto.detseg.v1 import detseg_pb2 as pb
from service.shapes.video import make_video, split_seed
from tests.benchmarks.pipeline_bench import machine
from tests.conftest import serving

WIDTH, HEIGHT = 640, 480


def jpeg(rgb: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def boxes_for(video: Any, count: int) -> list[tuple[float, float, float, float]]:
    """``count`` boxes on frame 0: the ground truth's, then shifted copies of them (objects that overlap a little)."""
    truth = [o.box for o in video.frame(0).objects] or [(100.0, 100.0, 200.0, 200.0)]
    out = []
    for k in range(count):
        x0, y0, x1, y1 = truth[k % len(truth)]
        dx = 7.0 * (k // len(truth))
        out.append((min(x0 + dx, WIDTH - 2), y0, min(x1 + dx, WIDTH - 1), y1))
    return out


def detseg_run(stub: Any, frames: list[bytes], boxes: list[tuple[float, float, float, float]]) -> dict[str, Any]:
    regions = [pb.TrackPrompt(region=pb.RegionPrompt(box=pb.BoundingBox(x_min=a, y_min=b, x_max=c, y_max=d)))
               for a, b, c, d in boxes]  # fmt: skip
    messages = [pb.TrackRequest(start=pb.TrackStart(max_objects=len(boxes)))]
    for t, data in enumerate(frames):
        frame = pb.TrackFrame(image=pb.Image(encoded=data), frame_index=t, prompts=regions if t == 0 else [])
        messages.append(pb.TrackRequest(frame=frame))
    start = time.perf_counter()
    stamps = []
    for response in stub.Track(iter(messages), timeout=3600):
        assert not response.HasField("error"), response.error.message
        assert len(response.instances) == len(boxes)
        stamps.append(time.perf_counter())
    total = stamps[-1] - start
    per_frame = np.diff([start, *stamps])[1:]  # after the first (prompted) frame
    return {"seconds": total, "fps": len(frames) / total, "p50_ms": 1000 * float(np.median(per_frame)),
            "p99_ms": 1000 * float(np.percentile(per_frame, 99))}  # fmt: skip


def sam2_run(predictor: Any, folder: Path, boxes: list[tuple[float, float, float, float]]) -> dict[str, Any]:
    start = time.perf_counter()
    state = predictor.init_state(str(folder))
    for obj, box in enumerate(boxes):
        predictor.add_new_points_or_box(state, 0, obj, box=np.asarray(box, np.float32))
    stamps = []
    for _ in predictor.propagate_in_video(state):
        stamps.append(time.perf_counter())
    total = stamps[-1] - start
    per_frame = np.diff(stamps)
    return {"seconds": total, "fps": len(stamps) / total, "p50_ms": 1000 * float(np.median(per_frame)),
            "p99_ms": 1000 * float(np.percentile(per_frame, 99))}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("benchmarks"))
    parser.add_argument("--frames", type=int, default=12)
    parser.add_argument("--objects", default="5,20")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    counts = [int(c) for c in args.objects.split(",")]
    video = make_video(split_seed("val", 0), frames=args.frames, width=WIDTH, height=HEIGHT)
    frames = [jpeg(video.frame(t).image) for t in range(args.frames)]
    result: dict[str, Any] = {"date": time.strftime("%Y-%m-%d"), "machine": machine(args.device),
                              "frames": args.frames, "size": f"{WIDTH}x{HEIGHT}", "image_size": testing.TEST_SEGMENTER_IMAGE_SIZE,
                              "runs": []}  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="detseg-track-bench-") as tmp:
        root = Path(tmp)
        folder = root / "frames"
        folder.mkdir()
        for t, data in enumerate(frames):
            (folder / f"{t:05d}.jpg").write_bytes(data)
        from sam2.build_sam import build_sam2_video_predictor

        cache = root / "cache"
        weights = testing.make_test_models(cache / "test-models").segmenter  # the server's own SAM (test profile)
        predictor = build_sam2_video_predictor(
            testing.TEST_SEGMENTER_CONFIG,
            str(weights),
            device=args.device,
            hydra_overrides_extra=list(testing.TEST_SEGMENTER_OVERRIDES),
        )
        settings = Settings(models="test", cache_dir=cache, port=0, offline=True, device=args.device,
                            backend="torch", text_encoder="none", track_max_objects_limit=max(counts))  # fmt: skip
        with serving(settings) as stub:
            detseg_run(stub, frames[:2], boxes_for(video, 1))  # warm-up
            sam2_run(predictor, folder, boxes_for(video, 1))
            for count in counts:
                boxes = boxes_for(video, count)
                ours, theirs = detseg_run(stub, frames, boxes), sam2_run(predictor, folder, boxes)
                result["runs"].append({"objects": count, "detseg": ours, "sam2": theirs,
                                       "speedup": ours["fps"] / theirs["fps"]})  # fmt: skip
                print(json.dumps(result["runs"][-1]))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "track.json").write_text(json.dumps(result, indent=2) + "\n")
    (args.out / "TRACK.md").write_text(report(result))


def report(r: dict[str, Any]) -> str:
    m = r["machine"]
    lines = [
        "# Video tracking speed: detseg Track vs sam2's SAM2VideoPredictor",
        "",
        f"Measured {r['date']} with `python -m tests.benchmarks.track_bench` on {m['cpu']} ({m['cores']} cores"
        f"{', ' + m['gpu'] if m.get('gpu') else ''}): {r['frames']} frames of {r['size']} (shapes video world, JPEG), "
        f"seeded SAM 2.1-T at {r['image_size']}², objects prompted with boxes on frame 0, no re-detection.",
        "",
        "| objects | detseg frames/s | p50 / p99 ms per frame | sam2 frames/s | p50 / p99 ms | detseg / sam2 |",
        "|---|---|---|---|---|---|",
    ]
    for run in r["runs"]:
        d, s = run["detseg"], run["sam2"]
        lines.append(
            f"| {run['objects']} | {d['fps']:.2f} | {d['p50_ms']:.0f} / {d['p99_ms']:.0f} | {s['fps']:.2f} | "
            f"{s['p50_ms']:.0f} / {s['p99_ms']:.0f} | {run['speedup']:.2f}x |"
        )
    lines += [
        "",
        "detseg's time is end to end through gRPC (JPEG decode, encoder, memory, masks as COCO RLE at 480p); sam2's "
        "includes `init_state` (all frames decoded and resized up front) and `propagate_in_video` (masks upsampled "
        "to 480p, left as tensors). Objects that started on the same frame share one batched memory pass in detseg; "
        "sam2 1.1 tracks each object on its own.",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
