"""Writes the demo's sample video: a held-out shapes video (the video world's test split) as H.264, for
``detseg track`` on the demo (README quick start), with its MOTChallenge ground truth beside it.

    python -m service.training.sample_video [--out service/models/demo] [--frames 100]

Seeded: the same command writes the same frames (the container's bytes may differ between FFmpeg builds).
"""

from __future__ import annotations

import argparse
from fractions import Fraction
from pathlib import Path
from typing import Any

import av

from service.models.demo.profile import DEMO_DIR
from service.shapes.video import make_video, mot_lines, split_seed

SAMPLE_SEED = split_seed("test", 0)
WIDTH, HEIGHT = 480, 360


def write(out: Path, frames: int) -> tuple[Path, Path]:
    """The video (``sample-video.mp4``) and its ground truth (``sample-video-gt.txt``, MOT17 gt layout) in ``out``."""
    video = make_video(SAMPLE_SEED, frames=frames, width=WIDTH, height=HEIGHT)
    path, truth = out / "sample-video.mp4", out / "sample-video-gt.txt"
    codec = "libx264" if "libx264" in av.codecs_available else "mpeg4"
    with av.open(str(path), "w") as container:
        stream: Any = container.add_stream(codec, rate=Fraction(video.fps))
        stream.width, stream.height, stream.pix_fmt = WIDTH, HEIGHT, "yuv420p"
        if codec == "libx264":
            stream.options = {"crf": "26", "preset": "slow"}
        for t in range(frames):
            frame = av.VideoFrame.from_ndarray(video.frame(t).image, format="rgb24")
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))
    truth.write_text("\n".join(mot_lines(video)) + "\n")
    return path, truth


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=DEMO_DIR)
    parser.add_argument("--frames", type=int, default=100)
    args = parser.parse_args()
    for path in write(args.out, args.frames):
        print(f"{path} ({path.stat().st_size} bytes)")


if __name__ == "__main__":
    main()
