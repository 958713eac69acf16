"""Tracking figures of predicted tracks against a video's ground truth, from trackeval's own code.

Nothing of HOTA, CLEAR (MOTA, IDSW, Frag), Identity (IDF1) or J&F is re-implemented, and the data they score is made
by trackeval's MOTS Challenge dataset: ``sequence_data`` hands it the raw sequence (per frame, the objects' ids and
COCO RLE masks, and an ignore region) and takes back, from its own ``get_preprocessed_seq_data``, the per-sequence
data dict (0-based contiguous ids, (gt × tracker) mask IoU from its ``_calculate_similarities``) that its metrics
read. Each metric's ``eval_sequence`` scores one video and its ``combine_sequences`` pools videos, as
``trackeval.Evaluator`` does.

- Ignore regions: ground-truth objects too little of which is visible on a frame (the caller decides which) are not
  scored there; their masks form the frame's ignore region, and, as in MOTS Challenge, a tracker mask that matches
  no scored object and lies more than half inside that region is dropped rather than counted as a false positive.
- J&F is ``trackeval.metrics.JAndF`` (DAVIS' J region and F boundary measures, one tracker id matched to each gt id
  over the whole video). It takes its boundary disk from scikit-image's ``skimage.morphology.disk``; where
  scikit-image is not installed, ``_boundary_disk`` lends it that one function (scikit-image's own definition) for
  the call. Two properties of JAndF to read its figure with: a frame where neither the gt object nor its matched
  track has a pixel counts J = F = 1, so objects present on few frames of a long video score high; and it indexes
  frames as uint8, so a video may have at most ``MAX_FRAMES`` frames.
- Occlusions (not a trackeval figure): from the ground truth, every spell on which an object stays inside the frame
  unscored, wholly hidden by nearer objects on at least one frame, between two frames it is scored on
  (``Occlusion``). ``reidentify`` says for each whether the object comes back under the id it had before (the
  tracker mask with the highest IoU, at least ``MATCH_IOU``, on its last scored frame before and its first matched
  frame after, within ``window`` frames). ``occluded_data`` restricts a video's data to the gt tracks that go through
  a full occlusion, for trackeval's CLEAR (their IDSW) and Identity (their IDR: tracker predictions of other objects
  are counted as IDFP there, so only the recall side is read).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import importlib.util
import sys
import types
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

# Per frame, the (id, COCO RLE with bytes counts) of every object seen on it.
FrameDets = Sequence[tuple[int, dict[str, Any]]]
MATCH_IOU = 0.5  # trackeval's CLEAR and Identity threshold (their default), and the re-identification match
MAX_FRAMES = 256  # trackeval's JAndF keeps frame indices as uint8
_CLASS = 2  # MOTS Challenge's evaluated class id ("pedestrian"), given to every object


@dataclasses.dataclass(frozen=True)
class Occlusion:
    """One full occlusion of ground-truth track ``track_id``: scored on frame ``last_seen``, then inside the frame but
    not scored (wholly hidden, or too little of it visible) until ``back``, the frame it is scored again, and wholly
    hidden on at least one frame in between."""

    track_id: int
    last_seen: int
    back: int


@dataclasses.dataclass(frozen=True)
class Reidentification:
    """What a tracker did through one occlusion: the id matched to the object on its last scored frame before (None:
    the object was not tracked then), the id matched on the first frame after, within the window, on which any was
    (None: none), and that frame."""

    occlusion: Occlusion
    before: int | None
    after: int | None
    after_frame: int | None

    @property
    def outcome(self) -> str:
        """The outcome: "untracked" (no id before), "same_id", "new_id" or "not_recovered" (no id within the window)."""
        if self.before is None:
            return "untracked"
        if self.after is None:
            return "not_recovered"
        return "same_id" if self.after == self.before else "new_id"


def rle(mask: np.ndarray) -> dict[str, Any]:
    """An (H, W) bool mask as COCO RLE (bytes counts), as pycocotools encodes it."""
    from pycocotools import mask as mask_utils

    return mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))


def find_occlusions(
    evaluated: Sequence[set[int]], present: Sequence[set[int]], hidden: Sequence[set[int]]
) -> list[Occlusion]:
    """The full occlusions of a video, by track id then frame: ``evaluated[t]``, the ids scored on frame t (visible
    enough); ``present[t]``, the ids alive with pixels inside the frame, visible or not; ``hidden[t]``, those of them
    wholly hidden. A spell between two evaluated frames counts when the object stays inside the frame throughout and
    is wholly hidden on at least one of its frames."""
    out = []
    for track_id in sorted(set().union(*evaluated) if evaluated else set()):
        last_seen: int | None = None
        inside, hid = True, False
        for t in range(len(evaluated)):
            if track_id in evaluated[t]:
                if last_seen is not None and last_seen < t - 1 and inside and hid:
                    out.append(Occlusion(track_id, last_seen, t))
                last_seen, inside, hid = t, True, False
            else:
                inside = inside and track_id in present[t]
                hid = hid or track_id in hidden[t]
    return out


def mask_iou(gt: FrameDets, tracker: FrameDets) -> np.ndarray:
    """(len(gt), len(tracker)) mask IoU, as trackeval's MOTS datasets compute it (pycocotools, no crowd)."""
    from pycocotools import mask as mask_utils

    if not gt or not tracker:
        return np.zeros((len(gt), len(tracker)))
    g = [m for _, m in gt]
    d = [m for _, m in tracker]
    return np.atleast_2d(np.asarray(mask_utils.iou(g, d, [0] * len(d)), dtype=np.float64)).reshape(len(g), len(d))


@functools.cache
def _mots() -> Any:
    """trackeval's MOTS Challenge dataset over sequences given in memory: its preprocessing and similarity code as
    written, without the files its constructor looks for (every object is of its one evaluated class)."""
    from trackeval.datasets import MOTSChallenge

    class InMemoryMOTS(MOTSChallenge):  # type: ignore[misc]
        def __init__(self) -> None:  # no files to find: the sequences are handed over
            self.class_name_to_class_id = {"pedestrian": str(_CLASS), "ignore": "10"}

    return InMemoryMOTS()


def sequence_data(
    gt: Sequence[FrameDets],
    tracker: Sequence[FrameDets],
    size: tuple[int, int],
    ignore: Sequence[Sequence[dict[str, Any]]] | None = None,
) -> dict[str, Any]:
    """trackeval's per-sequence data dict for one video, made by its MOTS Challenge dataset: the raw data its
    ``get_raw_seq_data`` would read (``gt[t]``/``tracker[t]``: the objects on frame t as (id, RLE), ids any ints
    unique on a frame; similarity = its mask IoU; ``ignore[t]``: masks of ground-truth objects not evaluated on frame t
    (merged into the frame's ignore region); ``size`` (height, width)), then its ``get_preprocessed_seq_data``: a
    tracker mask that matches no evaluated object (IoU 0.5) and lies more than half inside the ignore region is
    dropped, and ids are renumbered 0..n-1."""
    from pycocotools import mask as mask_utils

    if len(gt) != len(tracker):
        raise ValueError(f"{len(gt)} ground-truth frames but {len(tracker)} tracker frames")
    dataset = _mots()
    empty = rle(np.zeros(size, bool))
    regions = [mask_utils.merge(list(masks), intersect=False) if masks else empty for masks in (ignore or [])]
    raw: dict[str, Any] = {
        "seq": "video",
        "num_timesteps": len(gt),
        "gt_ids": [np.array([k for k, _ in frame], dtype=int) for frame in gt],
        "tracker_ids": [np.array([k for k, _ in frame], dtype=int) for frame in tracker],
        "gt_dets": [[m for _, m in frame] for frame in gt],
        "tracker_dets": [[m for _, m in frame] for frame in tracker],
        "gt_classes": [np.full(len(frame), _CLASS, dtype=int) for frame in gt],
        "tracker_classes": [np.full(len(frame), _CLASS, dtype=int) for frame in tracker],
        "gt_ignore_region": regions or [empty] * len(gt),
    }
    raw["similarity_scores"] = [
        dataset._calculate_similarities(g, d) for g, d in zip(raw["gt_dets"], raw["tracker_dets"], strict=True)
    ]
    return dataset.get_preprocessed_seq_data(raw, "pedestrian")


def occluded_data(
    gt: Sequence[FrameDets],
    tracker: Sequence[FrameDets],
    size: tuple[int, int],
    ignore: Sequence[Sequence[dict[str, Any]]] | None,
    track_ids: set[int],
) -> dict[str, Any]:
    """``sequence_data`` with the ground truth restricted to ``track_ids`` (the tracker's objects all kept)."""
    return sequence_data([[(k, m) for k, m in frame if k in track_ids] for frame in gt], tracker, size, ignore)


@contextlib.contextmanager
def _boundary_disk() -> Iterator[None]:
    """JAndF's ``from skimage.morphology import disk`` answered while the block runs: by scikit-image when it is
    installed, else by a module holding only ``disk``, defined as scikit-image's (``strict_radius`` True, no
    decomposition), removed again afterwards."""
    if importlib.util.find_spec("skimage") is not None:
        yield
        return

    def disk(radius: float, dtype: Any = np.uint8) -> np.ndarray:
        span = np.arange(-radius, radius + 1)
        x, y = np.meshgrid(span, span)
        return np.array((x**2 + y**2) <= radius**2, dtype=dtype)

    skimage, morphology = types.ModuleType("skimage"), types.ModuleType("skimage.morphology")
    morphology.disk = disk  # type: ignore[attr-defined]
    skimage.morphology = morphology  # type: ignore[attr-defined]
    sys.modules.update({"skimage": skimage, "skimage.morphology": morphology})
    try:
        yield
    finally:
        for name in ("skimage.morphology", "skimage"):
            sys.modules.pop(name, None)


def _metrics() -> dict[str, Any]:
    from trackeval.metrics import CLEAR, HOTA, Identity, JAndF

    quiet = {"PRINT_CONFIG": False, "THRESHOLD": MATCH_IOU}
    return {"HOTA": HOTA(), "CLEAR": CLEAR(quiet), "Identity": Identity(quiet), "JAndF": JAndF()}


def evaluate_sequence(data: dict[str, Any], *, j_and_f: bool = True) -> dict[str, dict[str, Any]]:
    """trackeval's results for one video: {"HOTA"|"CLEAR"|"Identity"|"JAndF": that metric's ``eval_sequence``}.
    JAndF pads the mask lists it is given, so it gets copies of them. A video with no ground-truth object has no
    J&F (trackeval's is NaN there, or IndexError with two tracker ids or more): left out, and out of the pool."""
    metrics = _metrics()
    if not j_and_f or not data["num_gt_ids"]:
        metrics.pop("JAndF")
    out = {}
    for name, metric in metrics.items():
        if name == "JAndF":
            if data["num_timesteps"] > MAX_FRAMES:
                raise ValueError(f"trackeval's J&F takes at most {MAX_FRAMES} frames, got {data['num_timesteps']}")
            copied = {**data, "gt_dets": [list(f) for f in data["gt_dets"]]}
            copied["tracker_dets"] = [list(f) for f in data["tracker_dets"]]
            with _boundary_disk():
                out[name] = metric.eval_sequence(copied)
        else:
            out[name] = metric.eval_sequence(data)
    return out


def combine(results: Sequence[dict[str, dict[str, Any]]]) -> dict[str, dict[str, Any]]:
    """Videos' ``evaluate_sequence`` results pooled by each metric's own ``combine_sequences``; J&F over the videos
    that have one (none: no J&F)."""
    metrics = _metrics()
    out = {}
    for name, metric in metrics.items():
        having = {str(i): r[name] for i, r in enumerate(results) if name in r}
        if having and (name == "JAndF" or len(having) == len(results)):
            out[name] = metric.combine_sequences(having)
    return out


def summary(results: dict[str, dict[str, Any]]) -> dict[str, float | int | None]:
    """The headline figures of one video's (or pooled) trackeval results, JSON-ready: HOTA and its parts averaged
    over trackeval's localisation thresholds (as trackeval's own tables show them), MOTA, MOTP, IDSW, Frag, MT/ML,
    IDF1/IDP/IDR, J&F with J and F means; IDSW per 100 frames from CLEAR's own frame count."""
    hota, clear, ident = results["HOTA"], results["CLEAR"], results["Identity"]
    frames = int(clear["CLR_Frames"])
    out: dict[str, float | int | None] = {
        **{k.lower(): float(np.mean(hota[k])) for k in ("HOTA", "DetA", "AssA", "LocA", "DetRe", "DetPr")},
        "mota": float(clear["MOTA"]),
        "motp": float(clear["MOTP"]),
        "idsw": int(clear["IDSW"]),
        "idsw_per_100_frames": 100.0 * int(clear["IDSW"]) / frames if frames else None,
        "frag": int(clear["Frag"]),
        "mostly_tracked": int(clear["MT"]),
        "mostly_lost": int(clear["ML"]),
        "idf1": float(ident["IDF1"]),
        "idp": float(ident["IDP"]),
        "idr": float(ident["IDR"]),
        "frames": frames,
        "gt_dets": int(clear["CLR_TP"] + clear["CLR_FN"]),
        "tracker_dets": int(clear["CLR_TP"] + clear["CLR_FP"]),
    }
    jf = results.get("JAndF")
    out["j_and_f"] = float(jf["J&F"]) if jf else None
    out["j_mean"] = float(jf["J-Mean"]) if jf else None
    out["f_mean"] = float(jf["F-Mean"]) if jf else None
    return out


def _matched_id(gt: FrameDets, tracker: FrameDets, track_id: int) -> int | None:
    """The tracker id whose mask has the highest IoU (at least MATCH_IOU) with gt object ``track_id`` on a frame."""
    row = next((i for i, (k, _) in enumerate(gt) if k == track_id), None)
    if row is None or not tracker:
        return None
    ious = mask_iou([gt[row]], tracker)[0]
    best = int(np.argmax(ious))
    return tracker[best][0] if ious[best] >= MATCH_IOU else None


def reidentify(
    gt: Sequence[FrameDets], tracker: Sequence[FrameDets], occlusions: Sequence[Occlusion], window: int
) -> list[Reidentification]:
    """Each occlusion's ids before and after (``Reidentification``); "after" is looked for on frames
    ``back`` .. ``back + window - 1`` on which the object is visible."""
    out = []
    for o in occlusions:
        before = _matched_id(gt[o.last_seen], tracker[o.last_seen], o.track_id)
        after = after_frame = None
        for t in range(o.back, min(o.back + window, len(gt))):
            after = _matched_id(gt[t], tracker[t], o.track_id)
            if after is not None:
                after_frame = t
                break
        out.append(Reidentification(o, before, after, after_frame))
    return out


def reid_summary(events: Sequence[Reidentification]) -> dict[str, float | int | None]:
    """Counts of the outcomes, and the re-identification rate: same id / occlusions tracked before them."""
    counts = {k: sum(e.outcome == k for e in events) for k in ("same_id", "new_id", "not_recovered", "untracked")}
    tracked = len(events) - counts["untracked"]
    return {"occlusions": len(events), **counts, "reid_rate": counts["same_id"] / tracked if tracked else None}
