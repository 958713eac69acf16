"""``detseg eval-track``: held-out shapes videos through a running server's Track call, and through a no-memory
baseline, scored with trackeval (``track_metrics``); a JSON + markdown report.

- Videos: ``service.shapes.video.make_video(seed, frames, width, height)``, seeds ``split_seed(split, i)``; every
  frame rendered once, sent to both methods as the same bytes: raw RGB pixels (default; nothing between the pixels
  and the models) or JPEG at ``jpeg_quality``. Ground truth: each object's visible mask, by track id.
- **track**: one ``Client.track`` call per video (the detector every ``detect_every`` frames, SAM 2's memory in
  between); its prediction on a frame is every track it sees there (``FrameResult.visible``).
- **baseline** (no memory): one ``Client.segment`` per frame (detect + segment, at most the Track call's
  ``max_objects`` instances), its instances matched to the live
  tracks' last masks by mask IoU with an optimal assignment (``scipy.optimize.linear_sum_assignment``; a pair needs
  IoU ≥ ``baseline_iou``); an unmatched instance starts a new id; a track unmatched for ``lost_after`` frames in a
  row ends (``IouTracker``).
- Speed: frames/s of each method per video, from its first request to its last answer (client-side, with the
  baseline's matching), rendering and scoring excluded.

Targets (issue 23): HOTA ≥ 0.7, IDF1 ≥ 0.8, ID switches ≤ 1 per 100 frames, J&F ≥ 0.8, for ``track`` over all
videos pooled.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from service.client import Client, FrameResult
from service.client_requests import jpeg
from service.evaluation import track_metrics as tm
from service.shapes.video import VideoFrame, make_video, split_seed
from service.shapes.world import CLASSES

METHODS = ("track", "baseline")
# Objects less of whose shape is visible on a frame are not scored there (an ignore region, as in MOTS Challenge).
MIN_VISIBLE = 0.25
# (figure, comparison, value): what issue 23 asks of the tracker, over all videos pooled.
TARGETS = (("hota", ">=", 0.7), ("idf1", ">=", 0.8), ("idsw_per_100_frames", "<=", 1.0), ("j_and_f", ">=", 0.8))


@dataclasses.dataclass(frozen=True)
class TrackOptions:
    """What both methods ask: ``classes``/``texts`` (the detector's prompts; default the shapes' five classes),
    ``score_threshold`` (None: the server's); the Track call's ``detect_every``, ``max_objects``, ``match_iou`` (None:
    the server's); ``lost_after`` (None: the server's), also the frames the baseline keeps an unmatched track;
    ``baseline_iou``, the baseline's least mask IoU for a match; ``reid_window``, frames after an occlusion within
    which the object's id is read."""

    classes: tuple[str, ...] = tuple(CLASSES)
    texts: tuple[str, ...] = ()
    score_threshold: float | None = None
    detect_every: int | None = None
    lost_after: int | None = None
    max_objects: int | None = None
    match_iou: float | None = None
    baseline_iou: float = 0.3
    reid_window: int = 10


@dataclasses.dataclass(frozen=True)
class VideoTruth:
    """One rendered video: its frames as sent (raw RGB arrays or JPEG bytes), ``size`` (height, width), and per frame
    the objects scored (``objects``: at least ``min_visible`` of the shape visible) and the masks of those that are
    not (``ignored``: some pixels visible, too few), as (track id, RLE); every visible object (``all_objects``:
    ``objects`` and the ignored ones); its full occlusions."""

    seed: int
    size: tuple[int, int]
    images: tuple[np.ndarray | bytes, ...]
    objects: tuple[tm.FrameDets, ...]
    ignored: tuple[tuple[dict[str, Any], ...], ...]
    all_objects: tuple[tm.FrameDets, ...]
    occlusions: tuple[tm.Occlusion, ...]


class IouTracker:
    """The no-memory baseline's association: ``update(masks)`` gives each of a frame's instance masks (COCO RLE) an
    id: the live track whose last mask it overlaps most in an optimal assignment with IoU ≥ ``min_iou``, else a new
    id (from 1, never reused). A track not matched for ``lost_after`` frames in a row ends."""

    def __init__(self, min_iou: float, lost_after: int) -> None:
        self.min_iou, self.lost_after = min_iou, lost_after
        self._tracks: dict[int, tuple[dict[str, Any], int]] = {}  # id: last mask, frames since it was matched
        self._next = 1

    def update(self, masks: Sequence[dict[str, Any]]) -> list[int]:
        from scipy.optimize import linear_sum_assignment

        live = list(self._tracks.items())
        ious = tm.mask_iou([(0, m) for m in masks], [(k, m) for k, (m, _) in live])
        ids: list[int | None] = [None] * len(masks)
        if ious.size:
            for r, c in zip(*linear_sum_assignment(-ious), strict=True):
                if ious[r, c] >= self.min_iou:
                    ids[r] = live[c][0]
        for k, (m, unseen) in live:
            if k not in ids:
                if unseen + 1 >= self.lost_after:
                    del self._tracks[k]
                else:
                    self._tracks[k] = (m, unseen + 1)
        out = []
        for mask, matched in zip(masks, ids, strict=True):
            k = matched if matched is not None else self._new_id()
            self._tracks[k] = (mask, 0)
            out.append(k)
        return out

    def _new_id(self) -> int:
        self._next += 1
        return self._next - 1


def render(
    seed: int, frames: int, width: int, height: int, jpeg_quality: int | None = None, min_visible: float = 0.0
) -> VideoTruth:
    """Video ``seed`` rendered once: the frames to send and the ground truth. An object is scored on a frame when
    its visible pixels are at least ``min_visible`` of all the shape's pixels (in the frame or not), else its
    visible pixels are an ignore region there."""
    video = make_video(seed, frames=frames, width=width, height=height)
    images, objects, ignored, every, evaluated, present, hidden = [], [], [], [], [], [], []
    for t in range(frames):
        f: VideoFrame = video.frame(t)
        images.append(f.image if jpeg_quality is None else jpeg(f.image, jpeg_quality))
        masks = [(o.track_id, tm.rle(o.mask)) for o in f.objects]
        scored = {o.track_id for o in f.objects if o.visible * o.in_frame >= min_visible}
        every.append(masks)
        objects.append([(k, m) for k, m in masks if k in scored])
        ignored.append(tuple(m for k, m in masks if k not in scored))
        evaluated.append(scored)
        present.append({o.track_id for o in (*f.objects, *f.hidden) if o.in_frame > 0})
        hidden.append({o.track_id for o in f.hidden if o.in_frame > 0})
    return VideoTruth(
        seed,
        (height, width),
        tuple(images),
        tuple(objects),
        tuple(ignored),
        tuple(every),
        tuple(tm.find_occlusions(evaluated, present, hidden)),
    )


def _rle(instance_rle: dict[str, Any]) -> dict[str, Any]:
    return {"size": list(instance_rle["size"]), "counts": instance_rle["counts"].encode("ascii")}


def run_track(client: Client, video: VideoTruth, options: TrackOptions) -> tuple[list[tm.FrameDets], float, int]:
    """The video through one Track call: per frame the tracks seen on it (id, RLE), the seconds it took, and how
    many frames came back with an error (counted as seeing nothing)."""
    out: list[tm.FrameDets] = [[] for _ in video.images]
    failed = 0
    start = time.perf_counter()
    answers = client.track(
        list(video.images),
        classes=list(options.classes),
        texts=list(options.texts),
        detect_every=options.detect_every,
        lost_after=options.lost_after,
        max_objects=options.max_objects,
        match_iou=options.match_iou,
        score_threshold=options.score_threshold,
    )
    for result in answers:
        failed += _collect(result, out)
    return out, time.perf_counter() - start, failed


def _collect(result: FrameResult, out: list[tm.FrameDets]) -> int:
    if result.error is not None:
        return 1
    out[result.frame_index] = [(t.track_id, _rle(t.instance.rle)) for t in result.visible]
    return 0


def run_baseline(
    client: Client, video: VideoTruth, options: TrackOptions, lost_after: int, max_instances: int
) -> tuple[list[tm.FrameDets], float]:
    """The video through the no-memory baseline: per frame (id, RLE) of every instance (at most ``max_instances``,
    the Track call's max_objects), and the seconds it took."""
    tracker = IouTracker(options.baseline_iou, lost_after)
    out: list[tm.FrameDets] = []
    start = time.perf_counter()
    for image in video.images:
        result = client.segment(
            image,
            classes=list(options.classes),
            texts=list(options.texts),
            score_threshold=options.score_threshold,
            max_instances=max_instances,
        )
        masks = [_rle(i.rle) for i in result.instances]
        out.append(list(zip(tracker.update(masks), masks, strict=True)))
    return out, time.perf_counter() - start


def _score(video: VideoTruth, predicted: Sequence[tm.FrameDets], reid_window: int) -> dict[str, Any]:
    """One method on one video: trackeval's results (kept for pooling) and the JSON figures. ``strict``: HOTA,
    CLEAR and Identity with every visible object scored (no ignore regions)."""
    data = tm.sequence_data(video.objects, predicted, video.size, video.ignored)
    results = tm.evaluate_sequence(data)
    strict = tm.evaluate_sequence(tm.sequence_data(video.all_objects, predicted, video.size), j_and_f=False)
    occluded_ids = {o.track_id for o in video.occlusions}
    occluded = (
        tm.evaluate_sequence(
            tm.occluded_data(video.objects, predicted, video.size, video.ignored, occluded_ids), j_and_f=False
        )
        if occluded_ids
        else None
    )
    events = tm.reidentify(video.objects, predicted, video.occlusions, reid_window)
    return {
        "results": results,
        "strict_results": strict,
        "occluded_results": occluded,
        "events": events,
        "figures": {
            **tm.summary(results),
            "tracks": int(data["num_tracker_ids"]),
            "strict": _strict_figures(strict),
            "occluded_tracks": _occluded_figures(occluded) if occluded else None,
            "reidentification": tm.reid_summary(events),
        },
    }


def _strict_figures(results: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The headline figures with every visible object scored."""
    f = tm.summary(results)
    return {k: f[k] for k in ("hota", "deta", "assa", "idf1", "mota", "idsw", "idsw_per_100_frames", "gt_dets")}


def _occluded_figures(results: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """ID switches and IDR of the gt tracks that go through a full occlusion, and their visible object-frames."""
    clear, ident = results["CLEAR"], results["Identity"]
    return {"gt_dets": int(clear["CLR_TP"] + clear["CLR_FN"]), "idsw": int(clear["IDSW"]), "idr": float(ident["IDR"])}


def evaluate_tracking(
    client: Client,
    seeds: Sequence[int],
    *,
    frames: int = 100,
    width: int = 640,
    height: int = 480,
    options: TrackOptions | None = None,
    jpeg_quality: int | None = None,
    baseline: bool = True,
    min_visible: float = MIN_VISIBLE,
    progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Every video of ``seeds`` through both methods (``baseline`` False: the Track call only); the figures as a
    JSON-ready dict: ``config`` (what was asked, the server's profile, backend and models, and the limits it
    resolved), ``videos`` (per video: ground-truth counts, each method's figures and speed), ``combined`` (each
    method's figures over all videos, pooled by trackeval's ``combine_sequences``) and ``targets``. An object is
    scored on a frame when at least ``min_visible`` of its shape is visible there (``render``); ``strict`` figures
    score every visible pixel."""
    options = options or TrackOptions()
    listing = client.list_models()
    track_defaults = listing.defaults.track
    resolved = {
        "detect_every": _given(options.detect_every, int(track_defaults.detect_every)),
        "lost_after": _given(options.lost_after, int(track_defaults.lost_after)),
        "max_objects": _given(options.max_objects, int(track_defaults.max_objects)),
        "match_iou": _given(options.match_iou, float(track_defaults.match_iou)),
        "confirm_after": int(track_defaults.confirm_after),  # the server's setting (no session may change it)
        "score_threshold": _given(options.score_threshold, float(listing.defaults.score_threshold)),
    }
    methods = METHODS if baseline else METHODS[:1]
    config = {
        "seeds": list(seeds),
        "frames": frames,
        "width": width,
        "height": height,
        "images": "raw RGB" if jpeg_quality is None else f"JPEG quality {jpeg_quality}",
        "min_visible": min_visible,
        "options": dataclasses.asdict(options),
        "resolved": resolved,
        "server": {
            "profile": listing.profile,
            "backend": listing.backend,
            "models": [f"{m.name} {m.version}".strip() for m in listing.models],
        },
        "methods": list(methods),
    }
    videos: list[dict[str, Any]] = []
    kinds = ("results", "strict_results", "occluded_results")
    pooled: dict[str, dict[str, list[dict[str, Any]]]] = {m: {k: [] for k in kinds} for m in methods}
    events: dict[str, list[tm.Reidentification]] = {m: [] for m in methods}
    seconds: dict[str, float] = dict.fromkeys(methods, 0.0)
    failed_frames = 0
    for n, seed in enumerate(seeds):
        video = render(seed, frames, width, height, jpeg_quality, min_visible)
        row: dict[str, Any] = {
            "seed": seed,
            "gt_tracks": len({k for frame in video.objects for k, _ in frame}),
            "gt_dets": sum(len(frame) for frame in video.objects),
            "ignored_dets": sum(len(frame) for frame in video.ignored),
            "occlusions": len(video.occlusions),
            "methods": {},
        }
        for method in methods:
            if method == "track":
                predicted, took, failed = run_track(client, video, options)
                failed_frames += failed
            else:
                predicted, took = run_baseline(client, video, options, resolved["lost_after"], resolved["max_objects"])
            scored = _score(video, predicted, options.reid_window)
            for kind in kinds:
                if scored[kind] is not None:
                    pooled[method][kind].append(scored[kind])
            events[method] += scored["events"]
            seconds[method] += took
            row["methods"][method] = {**scored["figures"], "seconds": took, "fps": frames / took if took else None}
        videos.append(row)
        if progress is not None:
            figures = row["methods"]
            progress(
                f"video {n + 1}/{len(seeds)} (seed {seed}): "
                + "; ".join(
                    f"{m} HOTA {f['hota']:.3f} IDF1 {f['idf1']:.3f} IDSW {f['idsw']} {f['fps']:.1f} fps"
                    for m, f in figures.items()
                )
            )
    combined: dict[str, Any] = {}
    total_frames = frames * len(seeds)
    for method in methods:
        occluded = tm.combine(pooled[method]["occluded_results"]) if pooled[method]["occluded_results"] else None
        combined[method] = {
            **tm.summary(tm.combine(pooled[method]["results"])),
            "tracks": sum(v["methods"][method]["tracks"] for v in videos),
            "strict": _strict_figures(tm.combine(pooled[method]["strict_results"])),
            "occluded_tracks": _occluded_figures(occluded) if occluded else None,
            "reidentification": tm.reid_summary(events[method]),
            "seconds": seconds[method],
            "fps": total_frames / seconds[method] if seconds[method] else None,
        }
    return {
        "config": config,
        "videos": videos,
        "combined": combined,
        "failed_frames": failed_frames,
        "gt": {
            "videos": len(seeds),
            "frames": total_frames,
            "tracks": sum(v["gt_tracks"] for v in videos),
            "dets": sum(v["gt_dets"] for v in videos),
            "ignored_dets": sum(v["ignored_dets"] for v in videos),
            "occlusions": sum(v["occlusions"] for v in videos),
        },
        "targets": _targets(combined.get("track")),
    }


def _given(value: Any, default: Any) -> Any:
    """An option as asked, or the server's default where it was left unset (None)."""
    return default if value is None else value


def _targets(figures: dict[str, Any] | None) -> list[dict[str, Any]]:
    out = []
    for name, op, value in TARGETS:
        measured = figures.get(name) if figures else None
        met = None if measured is None else (measured >= value if op == ">=" else measured <= value)
        out.append({"figure": name, "target": f"{op} {value:g}", "measured": measured, "met": met})
    return out


def seeds_of(split: str, count: int, first: int = 0) -> list[int]:
    """The seeds of ``count`` videos of ``split`` ("val" or "test"), from its ``first``-th on."""
    if split not in ("val", "test"):
        raise ValueError(f"held-out videos come from split 'val' or 'test', not {split!r}")
    return [split_seed(split, i) for i in range(first, first + count)]


# --- report ---

_LABELS = {
    "hota": "HOTA",
    "deta": "DetA",
    "assa": "AssA",
    "loca": "LocA",
    "idf1": "IDF1",
    "idp": "IDP",
    "idr": "IDR",
    "mota": "MOTA",
    "motp": "MOTP",
    "idsw": "ID switches",
    "idsw_per_100_frames": "ID switches / 100 frames",
    "frag": "Frag",
    "mostly_tracked": "mostly tracked (gt tracks)",
    "mostly_lost": "mostly lost (gt tracks)",
    "j_and_f": "J&F",
    "j_mean": "J mean",
    "f_mean": "F mean",
    "tracks": "predicted tracks",
    "fps": "frames/s",
}


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None:
        return "–"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def tables(figures: dict[str, Any]) -> list[tuple[str, list[str], list[list[str]]]]:
    """(title, header, rows) of every table the report shows."""
    combined, methods = figures["combined"], figures["config"]["methods"]
    targets = [
        [_LABELS[t["figure"]], _fmt(t["measured"]), t["target"], _fmt(t["met"])] for t in figures["targets"]
    ]  # the tracker's
    overall = [[label, *(_fmt(combined[m].get(key)) for m in methods)] for key, label in _LABELS.items()]
    overall += [
        [f"{label}, every visible object scored", *(_fmt(combined[m]["strict"][key]) for m in methods)]
        for key, label in (("hota", "HOTA"), ("idf1", "IDF1"), ("mota", "MOTA"), ("idsw", "ID switches"))
    ]
    occlusion_rows = []
    for key, label in (
        ("occlusions", "full occlusions (gt)"),
        ("same_id", "back under the same id"),
        ("new_id", "back under a new id"),
        ("not_recovered", "not matched again within the window"),
        ("untracked", "not tracked before the occlusion"),
        ("reid_rate", "re-identification rate (same id / tracked before)"),
    ):
        occlusion_rows.append([label, *(_fmt(combined[m]["reidentification"][key]) for m in methods)])
    for key, label in (("idsw", "ID switches on occluded gt tracks"), ("idr", "IDR of occluded gt tracks")):
        occlusion_rows.append([label, *(_fmt((combined[m]["occluded_tracks"] or {}).get(key)) for m in methods)])
    per_video = [
        [
            str(v["seed"]),
            str(v["gt_tracks"]),
            str(v["occlusions"]),
            *(
                f"{_fmt(v['methods'][m]['hota'])} / {_fmt(v['methods'][m]['idf1'])} / {v['methods'][m]['idsw']} / "
                f"{_fmt(v['methods'][m]['j_and_f'])} / {_fmt(v['methods'][m]['fps'], 1)}"
                for m in methods
            ),
        ]
        for v in figures["videos"]
    ]
    return [
        ("Targets (track, all videos pooled)", ["figure", "measured", "target", "met"], targets),
        ("All videos pooled (trackeval combine_sequences)", ["figure", *methods], overall),
        ("Through occlusions", ["figure", *methods], occlusion_rows),
        (
            "Per video: HOTA / IDF1 / ID switches / J&F / frames/s",
            ["seed", "gt tracks", "occlusions", *methods],
            per_video,
        ),
    ]


def write_report(figures: dict[str, Any], json_path: Path, markdown_path: Path, title: str, preamble: str = "") -> None:
    """The figures as JSON at ``json_path`` and a markdown report (``preamble``, then the tables) at
    ``markdown_path``."""
    json_path.parent.mkdir(parents=True, exist_ok=True)
    markdown_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(figures, indent=1))
    c, gt = figures["config"], figures["gt"]
    r = c["resolved"]
    models = ", ".join(f"`{m}`" for m in c["server"]["models"])
    md = [f"# {title}", ""]
    if preamble:
        md += [preamble, ""]
    md += [
        f"{gt['videos']} videos (seeds {c['seeds'][0]}..{c['seeds'][-1]}), {c['frames']} frames each at "
        f"{c['width']}x{c['height']} ({c['images']}); {gt['tracks']} ground-truth tracks, {gt['dets']} scored "
        f"object-frames (at least {c['min_visible']:g} of the shape visible; {gt['ignored_dets']} more with fewer "
        f"pixels visible are ignore regions, as in MOTS Challenge), {gt['occlusions']} full occlusions. Server: "
        f"profile `{c['server']['profile']}`, backend `{c['server']['backend']}`, models {models}.",
        "",
        f"Prompt: classes {', '.join(c['options']['classes']) or '–'}"
        + (f", texts {', '.join(c['options']['texts'])}" if c["options"]["texts"] else "")
        + f"; score threshold {r['score_threshold']:g}. **track**: detect_every {r['detect_every']}, lost_after "
        f"{r['lost_after']}, max_objects {r['max_objects']}, match_iou {r['match_iou']:g}, confirm_after "
        f"{r['confirm_after']}. **baseline**: Segment per "
        f"frame (at most {r['max_objects']} instances), optimal IoU matching to the live tracks' last masks (IoU ≥ "
        f"{c['options']['baseline_iou']:g}), a track ends after {r['lost_after']} unmatched frames. Occlusion ids "
        f"read within {c['options']['reid_window']} frames of the object's return. Frames answered with an error: "
        f"{figures['failed_frames']}.",
        "",
    ]
    for name, head, rows in tables(figures):
        md += [f"## {name}", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        md += ["| " + " | ".join(row) + " |" for row in rows] + [""]
    markdown_path.write_text("\n".join(md))
