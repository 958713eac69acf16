"""``detseg segment``: one image to a running server; its labeled instances as a table or JSON, and an overlay."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from service.cli.common import BOX_FORM, add_connection_flags, box_and_label, box_region, number, numbers, target_client
from service.cli.overlay import OVERLAY_FORMATS, render_overlay
from service.client import DEFAULT_TARGET, Exemplar, Point, Region, RequestFailed
from service.provenance.response import instance_content


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    g = sub.add_parser("segment", help="send an image to a running server; print labeled instances")
    g.add_argument("image", type=Path)
    g.add_argument("--classes", default="", help="comma-separated class names (default: every class)")
    g.add_argument("--text", action="append", default=[], help="free-text prompt, e.g. 'round shape' (repeatable)")
    g.add_argument(
        "--box", action="append", default=[], type=box_region, help=f"{BOX_FORM}: a region prompt (repeatable)"
    )
    g.add_argument(
        "--point",
        action="append",
        default=[],
        type=_point,
        help="x,y[,1|0]: a click on one object (1, the default: on it; 0: not on it); repeatable, the clicks are "
        "one object, with the --box when there is exactly one",
    )
    g.add_argument(
        "--exemplar",
        action="append",
        default=[],
        type=_exemplar,
        help="x0,y0,x1,y1[,label][@reference.jpg]: find more of this object (open-vocabulary detectors; repeatable)",
    )
    g.add_argument("--score-threshold", type=number(float, 0, 1))
    g.add_argument("--max-instances", type=number(int, 1))
    g.add_argument("--target", default=DEFAULT_TARGET, help=f"server address (default {DEFAULT_TARGET})")
    g.add_argument("--timeout", type=number(float, 0, open_low=True), default=120.0, help="deadline in seconds")
    g.add_argument("--json", action="store_true", help="print JSON instead of a table")
    g.add_argument(
        "--out", type=_overlay_path, help=f"write an overlay image here ({', '.join(OVERLAY_FORMATS)}: its format)"
    )
    add_connection_flags(g)
    g.set_defaults(func=segment)


def segment(args: argparse.Namespace) -> int:
    data = args.image.read_bytes()
    regions: list[Region] = list(args.box)
    if args.point and len(regions) == 1:  # clicks on the boxed object
        regions = [Region(box=regions[0].box, points=tuple(args.point), label=regions[0].label)]
    elif args.point:
        regions.append(Region(points=tuple(args.point)))
    with target_client(args) as client:
        try:
            result = client.segment(
                data,
                classes=[c.strip() for c in args.classes.split(",") if c.strip()],
                texts=args.text,
                regions=regions,
                exemplars=args.exemplar,
                score_threshold=args.score_threshold,
                max_instances=args.max_instances,
            )
        except RequestFailed as e:
            print(f"detseg: {e}", file=sys.stderr)
            return 1
    instances = [instance_content(i) for i in result.response.instances]
    if args.json:  # `detseg verify` checks this file against its manifest
        manifest = json.loads(result.response.provenance.manifest or "null")
        print(json.dumps({"image": _image_dict(result), "instances": instances, "manifest": manifest}, indent=2))
    else:
        info = result.response.image
        print(f"{info.width}x{info.height} {info.format}: {len(instances)} instance(s)")
        for n, i in enumerate(result.instances):
            box = ", ".join(f"{v:.1f}" for v in i.box)
            read = f", read as {i.read_as!r}" if i.read_as else ""
            via = f"  (text {i.text!r}{read}, similarity {i.similarity:.2f})" if i.text else ""
            print(
                f"{n:3d}  {i.label:<16} score {i.score:.3f}  box [{box}]  mask {i.area} px  "
                f"mask score {i.mask_score:.3f}{via}"
            )
    if args.out:
        args.out.write_bytes(render_overlay(data, instances, format=OVERLAY_FORMATS[args.out.suffix.lower()]))
        print(f"overlay written to {args.out}", file=sys.stderr)
    return 0


def _overlay_path(text: str) -> Path:
    """``--out``: a file whose extension names one of OVERLAY_FORMATS (written in that format)."""
    path = Path(text)
    if path.suffix.lower() not in OVERLAY_FORMATS:
        formats = ", ".join(OVERLAY_FORMATS)
        raise argparse.ArgumentTypeError(f"{text!r}: name the image format by its extension: {formats}")
    return path


def _point(text: str) -> Point:
    """--point x,y[,1|0]."""
    x, y = numbers(text, 2, "x,y[,1|0]")
    flag = text.split(",")[2:]
    if flag not in ([], ["1"], ["0"]):
        raise argparse.ArgumentTypeError(f"expected x,y[,1|0] (1 = on the object, 0 = not on it), got {text!r}")
    return Point(x, y, positive=flag != ["0"])


def _exemplar(text: str) -> Exemplar:
    """--exemplar x0,y0,x1,y1[,label][@reference.jpg] (the client reads the reference image's file)."""
    box_spec, _, reference = text.partition("@")
    box, label = box_and_label(box_spec, "x0,y0,x1,y1[,label][@reference.jpg]")
    return Exemplar(box, label, reference or None)


def _image_dict(result: Any) -> dict[str, Any]:
    im = result.response.image
    return {
        "width": im.width,
        "height": im.height,
        "format": im.format,
        "sha256": im.sha256,
        "request_id": result.request_id,
        "profile": result.profile,
        "backend": result.response.provenance.backend,
    }
