"""Video tracking sessions (the Track RPC): every labeled object followed through a stream with SAM 2's memory.

Per frame, in order: the frame is checked and decoded (nothing has run yet: a bad frame is its own error and the
session is as before it); SAM's image encoder runs once; every live track is propagated from its memory (or
re-prompted where the frame corrects it) and new prompts start tracks, in one ``Runner.track`` call; on detection
frames the detector runs, each detection's mask is decoded (SAM without memory) and matched to the tracks by mask
IoU with an assignment solver (scipy's ``linear_sum_assignment``). Detections whose masks overlap a higher-scored
one's by SAME_OBJECT_IOU are dropped first (one object named twice, "star" and "triangle": ``_one_per_object``). IoU
with the track's mask on the frame (from its memory) or with where its last detection's mask is expected (moved on
at the speed its detections showed: a constant-velocity motion model), whichever is higher, decides whether a
detection may continue a track; the latter alone decides which (see ``_match_scores``). A detection continues only a
track of its colour (the median RGB under the masks within SAME_COLOUR: the appearance cue of DeepSORT-style
trackers at its simplest; objects that cross are often told apart by it). A detection whose mask fills less than
MIN_MASK_FILL of its box (SAM's box prompt gave a sliver of a large, occluded object) is matched by its box as well
(``_box_scores``), and a track it matches keeps its own mask. An unmatched detection starts a track (highest scores
first, up to max_objects) unless its mask overlaps a track's or a higher-scored detection's by match_iou or more
(one object, one track, whatever class each detection says), or it re-finds a lost track (``_refind``: near where
the track's motion expects it, of a like size and colour, preferably of its label; the track keeps its id and label
and starts a new memory there); a new track stays tentative, not answered, until confirm_after detection frames in a
row have shown it, and ends unseen if one misses it before (``_tentative``). A matched track answers the frame with
its detection's mask, and its memory of the frame is re-encoded from that mask (``Runner.remember``): what it
carries on is what the frame showed, not what it propagated. A track whose object score says absent is LOST on that
frame (empty mask) and ends after lost_after such frames in a row; so is a track the detector started that the
latest detection frame did not match (its memory went on to something else, or the object left; a detection matching
it again brings it back). Such a track whose mask overlaps a matched track's by match_iou has drifted
(``_duplicates``): its memory went on to the other track's object, so it no longer matches by mask (the two would
take turns at the object), only by re-finding. The caller's own region tracks answer to SAM 2 only. Masks are
finished as Segment's (upsampled in their window, refined, encoded).

A session holds, per track, the bounded memory bank of ``service.models.sam_memory``, its last sighting (one
low-resolution mask, the centroids of at most MOTION_SIGHTINGS sightings and a colour) and a few numbers; nothing
grows with the video's length. Matching reads the low-resolution masks (S/4 square, SAM's own output).
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import math
import re
import time

import numpy as np
from scipy.optimize import linear_sum_assignment

from service.errors import InvalidInput, NotFound
from service.models.tensors import ImageFeatures, MemoryCorrection, TrackStep
from service.pipeline.detect import ExemplarGroup
from service.pipeline.image import DecodedImage
from service.pipeline.pipeline import Pipeline, Vocabulary
from service.pipeline.prompts import (
    Exemplar,
    ImageInput,
    Options,
    Plan,
    Region,
    SamPrompt,
    SegmentQuery,
    check_inside,
    check_query,
    plan,
)
from service.pipeline.results import REGION, InstanceResult
from service.pipeline.stages import stage
from service.pipeline.vocabulary import TextMatch

NEW, TRACKED, LOST, ENDED = "new", "tracked", "lost", "ended"
# Measured on the demo (SHAPES_SAM2_VIDEO.md, History). On eval-track's 20 val videos, the first two rules and
# re-finding: 21 ID switches against 26. On 40 val videos (those 20 and 20 more), the colour gates (SAME_COLOUR,
# FULL_VIEW), the fitted velocity (MOTION_SIGHTINGS), re-finding by the largest area, under any label and with the
# area factor 0.15, with Settings track_lost_after 90: 40 switches against 55; without lost_after 90, 52; with only
# the colour gates, any label and the factor 0.15, 54.
SAME_OBJECT_IOU = 0.7  # detections' mask IoU at which they are one object (the higher-scored one stays)
MIN_MASK_FILL = 0.2  # share of its box a detection's mask must fill to decide a match by itself
REFIND_DISTANCE = 1.5  # re-finding: centroid within this many object sizes (sqrt of the largest area shown) ...
REFIND_AREA = 0.15  # ... and area within this factor of that largest area, either way
RELABEL_COST = 1.0  # re-finding under another label than the track's costs this many object sizes more
SAME_COLOUR = 40.0  # a detection continues or re-finds only a track whose colour is within this RGB distance of its own
FULL_VIEW = 0.7  # a sighting shows the whole object when its mask has this share of the largest area it has shown
MOTION_SIGHTINGS = 16  # the motion model's velocity: fitted to the centroids of this many latest sightings
MAX_DETECT_EVERY = 10_000
MAX_FRAME_INDEX = 2**53
_REGION_FIELD = re.compile(r"\bregions\[(\d+)\]")


@dataclasses.dataclass(frozen=True)
class TrackLimits:
    """The server's tracking defaults and limits (Settings track_*)."""

    detect_every: int
    lost_after: int
    max_objects: int
    max_objects_limit: int
    match_iou: float
    confirm_after: int


@dataclasses.dataclass(frozen=True)
class TrackQuery:
    """A session's start: what the detector looks for and how the session runs; None = the server default."""

    classes: tuple[str, ...] = ()
    texts: tuple[str, ...] = ()
    exemplars: tuple[Exemplar, ...] = ()
    detect_every: int | None = None
    lost_after: int | None = None
    max_objects: int | None = None
    match_iou: float | None = None
    options: Options = dataclasses.field(default_factory=Options)
    request_id: str = ""


@dataclasses.dataclass(frozen=True)
class TrackPrompt:
    """An object the caller places on a frame: a new track (track_id 0) or a correction of a live one."""

    region: Region
    track_id: int = 0


@dataclasses.dataclass(frozen=True)
class FrameQuery:
    image: ImageInput
    frame_index: int
    prompts: tuple[TrackPrompt, ...] = ()
    end_tracks: tuple[int, ...] = ()
    detect: bool = False


@dataclasses.dataclass(frozen=True)
class TrackedInstance:
    track_id: int
    state: str  # NEW | TRACKED | LOST | ENDED
    instance: InstanceResult
    first_frame: int


@dataclasses.dataclass(frozen=True)
class FrameResult:
    frame_index: int
    image: DecodedImage
    instances: list[TrackedInstance]
    detected: bool
    timings: dict[str, float]


@dataclasses.dataclass
class _Track:
    """One followed object: what it is (as it started), its memory bank, and how long it has been unseen."""

    track_id: int
    label: str
    class_id: int
    source: str
    text_match: TextMatch | None
    score: float
    first_frame: int
    memory: object
    unseen: int = 0
    confirmed: bool = True  # matched by the latest detection frame (tracks the detector started)
    sighting: _Sighting | None = None  # where a detection last showed it (tracks the detector started)
    hits: int = 1  # detection frames that showed it since it started (tracks the detector started)
    answered: bool = False  # answered on some frame (a tentative track has not been yet: ``_tentative``)
    drifted: bool = False  # its memory went on to another track's object: matched only by re-finding (``_refind``)

    def sighted(self, mask: np.ndarray, index: int, colour: np.ndarray) -> None:
        """A detection showed the object as ``mask`` (S/4 square, bool) on frame ``index``, of ``colour`` (its
        median RGB, ``_colours``); an empty one shows nothing."""
        if mask.any():
            self.sighting = (
                _Sighting.first(mask, index, colour)
                if self.sighting is None
                else self.sighting.seen(mask, index, colour)
            )


@dataclasses.dataclass
class _Sighting:
    """Where a detection last showed a track's object: its mask (S/4 square, bool) on frame ``index``; ``area``, the
    largest area (mask pixels) any sighting showed, the object's size; ``path``, (n, 4) frame index, centroid row,
    column and mask area of the latest MOTION_SIGHTINGS sightings; and how fast the centroid moves (rows, columns per
    frame, ``_velocity`` of the path; None until it has been seen twice). ``expected`` moves the mask on at that
    speed: the constant-velocity motion model of SORT-style trackers, which decides the matching's assignment
    (``_match_scores``). Its appearance: ``colour``, the median RGB under the mask of the latest sighting that showed
    FULL_VIEW or more of ``area`` (a partly hidden object's mask also holds some of what hides it)."""

    mask: np.ndarray
    index: int
    velocity: np.ndarray | None
    colour: np.ndarray
    area: float
    path: np.ndarray

    @staticmethod
    def first(mask: np.ndarray, index: int, colour: np.ndarray) -> _Sighting:
        """The first sighting: non-empty ``mask`` on frame ``index``, of ``colour``."""
        area = float(mask.sum())
        return _Sighting(mask, index, None, colour, area, np.array([[index, *_centroid(mask), area]]))

    def seen(self, mask: np.ndarray, index: int, colour: np.ndarray) -> _Sighting:
        """The sighting after the object was seen again: non-empty ``mask`` on frame ``index`` (after this one), of
        ``colour``."""
        if index <= self.index:
            return self
        shown = float(mask.sum())
        area = max(self.area, shown)
        path = np.vstack([self.path, [index, *_centroid(mask), shown]])[-MOTION_SIGHTINGS:]
        colour = colour if shown >= FULL_VIEW * area else self.colour
        return _Sighting(mask, index, _velocity(path, area), colour, area, path)

    def expected(self, index: int) -> np.ndarray:
        """The mask moved on to frame ``index`` at the sighting's velocity (pixels moved past the edge are lost)."""
        if self.velocity is None:
            return self.mask
        dy, dx = np.round(self.velocity * (index - self.index)).astype(int)
        h, w = self.mask.shape
        out = np.zeros_like(self.mask)
        if abs(dy) < h and abs(dx) < w:
            out[max(dy, 0) : h + min(dy, 0), max(dx, 0) : w + min(dx, 0)] = self.mask[
                max(-dy, 0) : h + min(-dy, 0), max(-dx, 0) : w + min(-dx, 0)
            ]
        return out


@dataclasses.dataclass(frozen=True)
class _Detected:
    """What a detection frame found: the tracks its unmatched detections start or re-find, with their box prompts;
    the matched tracks (rows of the frame's tracks) with their detection's low-res mask logits; and the rows that
    re-found tracks replace."""

    new: list[tuple[_Track, SamPrompt]]
    seen: dict[int, np.ndarray]
    replaced: set[int]


@dataclasses.dataclass(frozen=True)
class _Settled:
    """A session's start with every default resolved."""

    detect_every: int
    lost_after: int
    max_objects: int
    match_iou: float
    detects: bool  # whether detection frames run the detector at all
    confirm_after: int


class TrackSession:
    """One Track call's state. ``open`` checks the start; ``frame`` answers one frame; ``close`` releases it all."""

    def __init__(self, pipeline: Pipeline, query: TrackQuery, limits: TrackLimits) -> None:
        self.pipeline = pipeline
        self.query = query
        self.settled = _settle(query, limits)
        self.request_id = query.request_id
        self._tracks: dict[int, _Track] = {}
        self._next_id = 1
        self._frames = 0  # frames answered
        self._last_index: int | None = None
        self._size: tuple[int, int] | None = None
        self._vocabulary: Vocabulary | None = None
        self._exemplars: list[ExemplarGroup] = []  # the start message's exemplars, checked at open

    @property
    def tracks(self) -> int:
        """Live tracks."""
        return len(self._tracks)

    async def open(self) -> None:
        """Checks the start message (no frame needed) and prepares the session's vocabulary and exemplar images."""
        q = self.query
        for i, e in enumerate(q.exemplars):
            if e.image is None:
                raise InvalidInput(f"start.exemplars[{i}].image: a track session's exemplars need their own image")
        query = self._segment_query(ImageInput(), ())
        try:  # the start message's fields, named as the caller sent them
            check_query(query, self.pipeline.limits)
            if self.settled.detects:
                v = self._vocabulary = await self.pipeline.vocabulary(query, {})
                open_vocabulary = self.pipeline.runner.detector.open_vocabulary
                plan(query, self.pipeline.limits, v.names, v.texts, open_vocabulary)  # class names, here
                references = await asyncio.to_thread(self.pipeline.images.reference_images, q.exemplars)
                self._exemplars = self.pipeline.detector.exemplar_groups(q.exemplars, None, references)
        except InvalidInput as e:
            raise InvalidInput(f"start.{e}", field=f"start.{e.field}" if e.field else None) from None
        except NotFound as e:  # an exemplar's image by a handle not cached
            raise NotFound(f"start.{e}") from None
        self.pipeline.runner.track_memory()  # Unsupported (FAILED_PRECONDITION) where the runner cannot track

    def close(self) -> None:
        self._tracks.clear()

    def _segment_query(self, image: ImageInput, regions: tuple[Region, ...]) -> SegmentQuery:
        q = self.query
        return SegmentQuery(
            image=image,
            classes=q.classes,
            regions=regions,
            options=q.options,
            request_id=q.request_id,
            texts=q.texts,
            exemplars=q.exemplars,
        )

    async def frame(self, f: FrameQuery) -> FrameResult:
        """Answers one frame. Everything that can be wrong with it is checked before any model runs (InvalidInput
        naming the field; the session is then as before the frame)."""
        timings: dict[str, float] = {}
        start = time.perf_counter()
        self._check_frame(f)
        image = await self._decode(f, timings)
        p = self._plan(f, image)
        self._size = (image.width, image.height)  # the first frame answered sets the session's size
        features = await self.pipeline.features(image, timings, frame=True)
        index = f.frame_index
        # SAM 2's memory steps once per frame answered, whatever the caller's frame_index gaps: it attends exactly
        # the frames before by its own count (memories 1-6 back, pointers 1-15), so indices 8 apart left it none.
        step = self._frames
        matched: set[int] = set()  # tracks a detection matched on this frame: visible whatever SAM's object score

        # Every live track steps onto the frame (from its memory, or with the frame's correction); prompts start tracks.
        corrections = {tp.track_id: p.regions[i] for i, tp in enumerate(f.prompts) if tp.track_id}
        ended = [self._tracks.pop(t) for t in f.end_tracks]
        rows = list(self._tracks.values())
        steps = [self._step(t.memory, step, corrections.get(t.track_id)) for t in rows]
        for i, tp in enumerate(f.prompts):
            if tp.track_id:
                if tp.region.label:
                    self._tracks[tp.track_id].label = tp.region.label
                continue
            track = self._new_track(p.region_labels[i], -1, REGION, None, 1.0, index)
            rows.append(track)
            steps.append(self._step(track.memory, step, p.regions[i]))
        logits, scores = await self._track(features, steps, timings)

        detected = f.detect or (
            self.settled.detects and self.settled.detect_every > 0 and self._frames % self.settled.detect_every == 0
        )
        if detected:
            found = await self._detect(image, p, features, index, logits, rows, set(corrections), timings)
            kept = [k for k in range(len(rows)) if k not in found.replaced]  # a re-found track answers as its new row
            row_of = {k: i for i, k in enumerate(kept)}
            rows, logits, scores = [rows[k] for k in kept], [logits[k] for k in kept], [scores[k] for k in kept]
            seen = {row_of[k]: mask for k, mask in found.seen.items()}
            new = found.new
            if seen:  # matched tracks remember the frame as its detection showed it, and answer with that mask
                remembered = [MemoryCorrection(rows[k].memory, step, mask) for k, mask in seen.items()]
                with stage(timings, "remember", objects=len(remembered)):
                    await self.pipeline.runner.remember(features, remembered)
                for k, mask in seen.items():
                    logits[k] = mask
                    matched.add(rows[k].track_id)
            more_logits, more_scores = await self._track(
                features, [self._step(t.memory, step, box) for t, box in new], timings
            )
            rows.extend(t for t, _ in new)
            logits.extend(more_logits)
            scores.extend(more_scores)
        for t in rows:
            if t.track_id in corrections:  # the caller showed where it is: seen, its memory anchored there
                t.confirmed, t.drifted = True, False
            self._tracks[t.track_id] = t

        answered = await self._answer(image, p, rows, logits, scores, matched, ended, index, timings)
        self._frames += 1
        self._last_index = index
        timings["total"] = time.perf_counter() - start
        return FrameResult(index, image, answered, detected, timings)

    async def _track(
        self, features: ImageFeatures, steps: list[TrackStep], timings: dict[str, float]
    ) -> tuple[list[np.ndarray], list[float]]:
        if not steps:
            return [], []
        with stage(timings, "track", objects=len(steps)):
            out = await self.pipeline.runner.track(features, steps)
        return list(out.low_res_masks), [float(s) for s in out.object_scores]

    def _check_frame(self, f: FrameQuery) -> None:
        """The frame's checks that need no pixels."""
        if not 0 <= f.frame_index <= MAX_FRAME_INDEX:
            raise InvalidInput(f"frame.frame_index: {f.frame_index} is outside [0, 2^53]")
        if self._last_index is not None and f.frame_index <= self._last_index:
            raise InvalidInput(
                f"frame.frame_index: {f.frame_index} is not after the previous frame's {self._last_index}; "
                "send frames in order"
            )
        if f.detect and not self.settled.detects:  # its start said the detector never runs
            raise InvalidInput(
                "frame.detect: this session names nothing to detect; give start.classes, texts or exemplars (or "
                "start.detect_every, 0 for frames that ask, to detect every class of a fixed vocabulary)"
            )
        if f.image.handle is not None:
            raise InvalidInput("frame.image: send encoded bytes or raw pixels (a handle is not a video frame)")
        for i, t in enumerate(f.end_tracks):
            if t not in self._tracks:
                raise InvalidInput(f"frame.end_tracks[{i}]: track {t} is not live in this session")
        if len(set(f.end_tracks)) != len(f.end_tracks):
            raise InvalidInput("frame.end_tracks: a track is named twice")
        corrections = []
        for i, tp in enumerate(f.prompts):
            if tp.region.previous_mask:
                raise InvalidInput(f"frame.prompts[{i}].region.previous_mask: does not apply to tracking")
            if tp.track_id:
                if tp.track_id not in self._tracks or tp.track_id in f.end_tracks:
                    raise InvalidInput(f"frame.prompts[{i}].track_id: track {tp.track_id} is not live in this session")
                if tp.track_id in corrections:
                    raise InvalidInput(f"frame.prompts[{i}].track_id: track {tp.track_id} is corrected twice")
                corrections.append(tp.track_id)
        new = len(f.prompts) - len(corrections)
        live = len(self._tracks) - len(f.end_tracks)
        if live + new > self.settled.max_objects:
            raise InvalidInput(
                f"frame.prompts: {new} new objects would make {live + new} tracks; the session's max_objects is "
                f"{self.settled.max_objects}"
            )

    async def _decode(self, f: FrameQuery, timings: dict[str, float]) -> DecodedImage:
        digest = hashlib.sha256(f.image.data).hexdigest()
        with stage(timings, "decode_image", bytes=len(f.image.data)):
            image = await asyncio.to_thread(self.pipeline.images.decode, f.image, digest, "frame.image")
        if self._size is not None and (image.width, image.height) != self._size:
            w, h = self._size
            raise InvalidInput(
                f"frame.image: {image.width}x{image.height} differs from the session's {w}x{h}; every frame of a "
                "session has the first frame's size"
            )
        return image

    def _plan(self, f: FrameQuery, image: DecodedImage) -> Plan:
        """The frame's plan: its prompts as regions (checked inside the frame) and the session's detector query."""
        q = self._segment_query(f.image, tuple(tp.region for tp in f.prompts))
        v = self._vocabulary
        names, texts = (v.names, v.texts) if v is not None else (self.pipeline.runner.detector.names, [])
        open_vocabulary = self.pipeline.runner.detector.open_vocabulary and v is not None
        try:
            check_query(q, self.pipeline.limits)
            check_inside(q, image.width, image.height)
            return plan(q, self.pipeline.limits, names, texts, open_vocabulary)
        except InvalidInput as e:  # the frame's prompts are its regions: name them as the caller sent them
            raise InvalidInput(_REGION_FIELD.sub(r"frame.prompts[\1].region", str(e))) from None

    def _step(self, memory: object, index: int, prompt: SamPrompt | None) -> TrackStep:
        """A track's step onto the frame the memory counts as ``index`` (frames answered before it): from its memory,
        or prompted (its box and clicks in SAM's frame)."""
        if prompt is None:
            return TrackStep(memory, index)
        assert self._size is not None
        hw = (self._size[1], self._size[0])
        (_, batch), *_ = self.pipeline.segmentation.prompt_batches([prompt], hw, multimask=False)
        return TrackStep(memory, index, batch.point_coords[0], batch.point_labels[0])

    def _new_track(
        self, label: str, class_id: int, source: str, text_match: TextMatch | None, score: float, index: int
    ) -> _Track:
        track = _Track(
            track_id=self._next_id,
            label=label,
            class_id=class_id,
            source=source,
            text_match=text_match,
            score=score,
            first_frame=index,
            memory=self.pipeline.runner.track_memory(),
        )
        self._next_id += 1
        return track

    async def _detect(
        self,
        image: DecodedImage,
        p: Plan,
        features: ImageFeatures,
        index: int,
        tracked: list[np.ndarray],
        order: list[_Track],
        corrected: set[int],
        timings: dict[str, float],
    ) -> _Detected:
        """Runs the detector, matches its detections to this frame's tracks (mask IoU, assignment) and returns the
        tracks the unmatched ones re-find or start (with their box prompts; new ones highest score first, within
        max_objects; a track the caller corrected on this frame, by id in ``corrected``, is not re-found), and the
        matched tracks (their rows in ``order``; the caller's own region tracks and the tracks it corrected, which
        answer with their correction, left out) with their detection's low-res mask logits, where the mask is
        trusted."""
        pipeline = self.pipeline
        v = self._vocabulary
        detected = await pipeline.detector.detect(
            image,
            p,
            timings,
            entry=None,
            text_embeddings=v.embeddings if v is not None else None,
            exemplars=self._exemplars,
        )
        # one candidate per distinct box (the first: a box answering a class and a text is one object, one track)
        candidates = pipeline.candidates(detected.detections, dataclasses.replace(p, regions=[], region_labels=[]))
        firsts: dict[int, int] = {}
        for k, c in enumerate(candidates.instances):
            firsts.setdefault(c.mask_index, k)
        starts = [candidates.instances[k] for k in firsts.values()]
        prompts = [candidates.prompts[c.mask_index] for c in starts]
        detector_started = [t for t, track in enumerate(order) if track.source != REGION]
        if not prompts:  # the detector missed every track (a correction shows its own: below)
            for t in detector_started:
                order[t].confirmed = order[t].track_id in corrected
            return _Detected([], {}, set())
        with stage(timings, "decode_masks", prompts=len(prompts)):
            low = await pipeline.masks.decode(features, prompts, image, False)
        detection_logits = np.asarray(low.logits if isinstance(low.logits, np.ndarray) else low.logits.float().cpu())
        shown = detection_logits > 0
        among = _mask_iou(shown, shown)
        one = _one_per_object(among, SAME_OBJECT_IOU)
        starts, prompts, detection_logits = [starts[d] for d in one], [prompts[d] for d in one], detection_logits[one]
        detections, among = shown[one], among[np.ix_(one, one)]
        boxes = _low_res_boxes(np.array([q.box for q in prompts], np.float64), image, detections.shape[-1])
        sliver = _fill(detections, boxes) < MIN_MASK_FILL
        colours = _colours(image.rgb, detections)
        threshold = self.settled.match_iou
        masks = np.stack(tracked) > 0 if tracked else np.zeros((0, *detections.shape[1:]), bool)
        to_tracks, gain = _match_scores(detections, masks, order, index)
        if sliver.any() and tracked:
            by_box, box_gain = _box_scores(boxes, masks, order, index)
            to_tracks[sliver] = np.maximum(to_tracks[sliver], by_box[sliver])
            gain[sliver] = np.maximum(gain[sliver], box_gain[sliver])
        # a track whose memory drifted matches by re-finding only; an object of another colour is another object
        barred = _unlike(colours, order) | np.array([t.drifted for t in order], bool)
        to_tracks[barred] = 0.0
        gain[barred] = 0.0
        matched: dict[int, int] = {}  # detection: track
        for d, t in zip(*linear_sum_assignment(-gain), strict=True):
            if to_tracks[d, t] >= threshold:
                matched[int(d)] = int(t)
                if order[t].source != REGION:  # the caller's own objects score 1 (the proto's TrackedInstance)
                    order[t].score = starts[d].score
                order[t].hits += 1
        confirmed = set(matched.values())
        for t in detector_started:
            order[t].confirmed = t in confirmed or order[t].track_id in corrected
        for t in _duplicates(_mask_iou(masks, masks), confirmed, detector_started, threshold):
            order[t].drifted = True
        fresh = _new_objects(to_tracks, among, set(matched), threshold)
        lost = [
            t
            for t in detector_started
            if t not in confirmed and order[t].answered and order[t].track_id not in corrected
        ]
        refound = _refind(fresh, detections, colours, [c.label for c in starts], [order[t] for t in lost], index)
        new = []
        for d, k in refound.items():  # the track goes on under its id from a new memory, started at the detection
            old = order[lost[k]]
            track = dataclasses.replace(
                old,
                memory=self.pipeline.runner.track_memory(),
                score=starts[d].score,
                hits=old.hits + 1,
                confirmed=True,
                drifted=False,
            )
            track.sighted(detections[d], index, colours[d])
            new.append((track, prompts[d]))
        room = self.settled.max_objects - len(order)
        for d in fresh:
            if d in refound:
                continue
            if room <= 0:
                break
            c = starts[d]
            track = self._new_track(c.label, c.class_id, c.source, c.text_match, c.score, index)
            track.sighted(detections[d], index, colours[d])
            if self._frames == 0 or self.settled.detect_every == 0:
                # answered at once: the session's first frame, and any frame when the detector runs only on frames
                # that ask (no later detection frame may come to confirm a tentative track, which would stay hidden)
                track.hits = self.settled.confirm_after
            new.append((track, prompts[d]))
            room -= 1
        seen = {}
        for d, t in matched.items():
            if order[t].source != REGION and not sliver[d]:
                order[t].sighted(detections[d], index, colours[d])
                if order[t].track_id not in corrected:
                    seen[t] = detection_logits[d]
        return _Detected(new, seen, {lost[k] for k in refound.values()})

    async def _answer(
        self,
        image: DecodedImage,
        p: Plan,
        rows: list[_Track],
        logits: list[np.ndarray],
        scores: list[float],
        matched: set[int],
        ended: list[_Track],
        index: int,
        timings: dict[str, float],
    ) -> list[TrackedInstance]:
        """Each track's state and finished mask on this frame (by track id): unseen tracks (SAM's object score at
        most 0, and no detection of the frame ``matched`` it) are LOST with an empty mask and end after lost_after such
        frames; tracks the caller ended are answered once more, ENDED; tentative tracks are not answered
        (``_tentative``)."""
        hidden, dropped = _tentative(rows, self.settled.confirm_after)
        for k in dropped:
            self._tracks.pop(rows[k].track_id, None)
        kept = [k for k in range(len(rows)) if k not in hidden]
        rows, logits, scores = [rows[k] for k in kept], [logits[k] for k in kept], [scores[k] for k in kept]
        visible = [(s > 0 or t.track_id in matched) and t.confirmed for s, t in zip(scores, rows, strict=True)]
        visible += [False] * len(ended)
        side = self.pipeline.runner.segmenter.image_size // 4
        absent = np.full((side, side), -1.0, np.float32)
        shown = [lg if v else absent for lg, v in zip(logits, visible, strict=False)] + [absent] * len(ended)
        if not shown:
            return []
        bare = SamPrompt(box=None, points=np.zeros((0, 2), np.float32), point_labels=np.zeros(0, np.int32))
        with stage(timings, "encode_masks", masks=len(shown)):
            final = await asyncio.to_thread(self.pipeline.masks.finish, np.stack(shown), image, p, [bare] * len(shown))
        out = []
        for k, t in enumerate([*rows, *ended]):
            if k >= len(rows):
                state = ENDED
            elif visible[k]:
                t.unseen = 0
                state = TRACKED if t.answered else NEW
            else:
                t.unseen += 1
                state = LOST if t.answered else NEW
                if t.unseen >= self.settled.lost_after:
                    state = ENDED
                    self._tracks.pop(t.track_id, None)
            box = final.boxes[k]
            instance = InstanceResult(
                label=t.label,
                class_id=t.class_id,
                score=t.score,
                box=box if box is not None else np.zeros(4, np.float32),
                mask=final.encoded[k],
                mask_score=_sigmoid(scores[k]) if k < len(rows) else 0.0,
                source=t.source,
                region_index=-1,
                text_match=t.text_match,
            )
            t.answered = True
            out.append(TrackedInstance(t.track_id, state, instance, t.first_frame))
        out.sort(key=lambda a: a.track_id)
        return out


def _settle(q: TrackQuery, limits: TrackLimits) -> _Settled:
    """The start's numbers checked against their ranges, defaults filled in."""
    if q.detect_every is not None and not 0 <= q.detect_every <= MAX_DETECT_EVERY:
        raise InvalidInput(f"start.detect_every: {q.detect_every} is outside [0, {MAX_DETECT_EVERY}]")
    if q.lost_after is not None and not 1 <= q.lost_after <= MAX_DETECT_EVERY:
        raise InvalidInput(f"start.lost_after: {q.lost_after} is outside [1, {MAX_DETECT_EVERY}]")
    if q.max_objects is not None and not 1 <= q.max_objects <= limits.max_objects_limit:
        raise InvalidInput(f"start.max_objects: {q.max_objects} is outside [1, {limits.max_objects_limit}]")
    if q.match_iou is not None and not (math.isfinite(q.match_iou) and 0.0 <= q.match_iou <= 1.0):
        raise InvalidInput(f"start.match_iou: {q.match_iou} is outside [0, 1]")
    return _Settled(
        detect_every=limits.detect_every if q.detect_every is None else q.detect_every,
        lost_after=limits.lost_after if q.lost_after is None else q.lost_after,
        max_objects=limits.max_objects if q.max_objects is None else q.max_objects,
        match_iou=limits.match_iou if q.match_iou is None else q.match_iou,
        detects=bool(q.classes or q.texts or q.exemplars) or q.detect_every is not None,
        confirm_after=limits.confirm_after,
    )


def _tentative(rows: list[_Track], confirm_after: int) -> tuple[set[int], set[int]]:
    """The tracks (indices into ``rows``) not answered on this frame, and those of them that end unseen. A track the
    detector started is tentative until detection frames have shown it ``confirm_after`` times in a row (its
    start counts; on the session's first frame, at once): until then it is not answered, and one that a detection
    frame misses ends without ever being answered. A detection on one frame or two (a part of an object, two
    objects merged where they cross) then never shows as a track of its own: each such id was an ID switch
    (SORT's ``min_hits``, ByteTrack's unconfirmed tracks). The caller's own region tracks are answered at once."""
    hidden = {k for k, t in enumerate(rows) if t.source != REGION and not t.answered and t.hits < confirm_after}
    return hidden, {k for k in hidden if not rows[k].confirmed}


def _new_objects(to_tracks: np.ndarray, among: np.ndarray, matched: set[int], threshold: float) -> list[int]:
    """The detections (indices, in score order) that start tracks: unmatched, and overlapping by ``threshold`` mask
    IoU or more none of: a track, a matched detection (whatever its score), a higher-scored detection that starts a
    track. to_tracks (D, T) and among (D, D): mask IoUs; detections in score order."""
    taken = sorted(matched)
    out = []
    for d in range(len(among)):
        if d in matched:
            continue
        if (to_tracks.shape[1] and to_tracks[d].max() >= threshold) or any(among[d, k] >= threshold for k in taken):
            continue
        taken.append(d)
        out.append(d)
    return out


def _one_per_object(among: np.ndarray, threshold: float) -> list[int]:
    """The detections (indices, in score order) kept when those whose masks overlap a kept, higher-scored one's by
    ``threshold`` mask IoU or more (among (D, D): their mask IoUs) are dropped: one object the detector named twice
    ("star" and "triangle") would otherwise match two tracks, and the two would take turns at it."""
    kept: list[int] = []
    for d in range(len(among)):
        if all(among[d, k] < threshold for k in kept):
            kept.append(d)
    return kept


def _fill(detections: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """(D,) the share of each box (D, 4 XYXY, in the masks' frame) that its detection's (D, h, w) bool mask fills."""
    areas = np.maximum((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]), 1.0)
    return detections.reshape(len(detections), -1).sum(1) / areas


def _box_scores(
    boxes: np.ndarray, tracked: np.ndarray, tracks: list[_Track], index: int
) -> tuple[np.ndarray, np.ndarray]:
    """``_match_scores`` by boxes: (D, T) the IoU of each detection's box (D, 4 XYXY, in the masks' frame) with the
    box of the track's mask on the frame (``tracked``: (T, h, w) bool) and with the box of where its last sighting
    expects it (for a track never sighted, its mask's again), for the detections whose mask is a sliver of their
    box."""
    propagated = [_box(m) for m in tracked]
    expected = [_box(t.sighting.expected(index)) if t.sighting else b for t, b in zip(tracks, propagated, strict=True)]
    return _box_iou(boxes, propagated), _box_iou(boxes, expected)


def _refind(
    fresh: list[int],
    detections: np.ndarray,
    colours: np.ndarray,
    labels: list[str],
    lost: list[_Track],
    index: int,
) -> dict[int, int]:
    """Lost tracks that new detections re-find: {detection: index into ``lost``}, by an optimal assignment of the
    costs below. A detection (of ``fresh``, indices into ``detections``, (D, h, w) bool masks with their (D, 3)
    ``colours`` and ``labels``) may re-find a track with a sighting when its mask's centroid lies within
    REFIND_DISTANCE object sizes (the square root of the largest area the track showed) of the centroid of where the
    sighting expects the object on frame ``index`` (where it was last seen, once that has left the frame), its area
    is within a factor REFIND_AREA of that largest area, either way, and its colour within SAME_COLOUR of the
    sighting's. The cost: that distance, plus the colour distance in units of SAME_COLOUR, plus RELABEL_COST where
    the detection's label is not the track's (the detector may name a half-hidden object another shape; the track
    keeps its label). An object back from behind another, or seen again after the detector missed it for a while,
    keeps its id (the lost-track pool of ByteTrack and OC-SORT)."""
    cost = np.full((len(fresh), len(lost)), np.inf)
    for j, t in enumerate(lost):
        if t.sighting is None:
            continue
        area = t.sighting.area
        expected = t.sighting.expected(index)
        where = _centroid(expected if expected.any() else t.sighting.mask)
        for i, d in enumerate(fresh):
            if not detections[d].any():
                continue
            distance = float(np.linalg.norm(_centroid(detections[d]) - where)) / math.sqrt(area)
            colour = float(np.linalg.norm(colours[d] - t.sighting.colour))
            if (
                distance <= REFIND_DISTANCE
                and REFIND_AREA <= detections[d].sum() / area <= 1 / REFIND_AREA
                and colour <= SAME_COLOUR
            ):
                cost[i, j] = distance + colour / SAME_COLOUR + (RELABEL_COST if labels[d] != t.label else 0.0)
    if not np.isfinite(cost).any():
        return {}
    rows, cols = linear_sum_assignment(np.where(np.isfinite(cost), cost, 1e9))
    return {fresh[i]: int(j) for i, j in zip(rows, cols, strict=True) if np.isfinite(cost[i, j])}


def _duplicates(among: np.ndarray, matched: set[int], candidates: list[int], threshold: float) -> list[int]:
    """The tracks (indices into ``among``, (T, T) mask IoUs on this frame) that have drifted: a candidate no
    detection matched whose mask overlaps a matched track's by ``threshold`` or more. Its memory went on to an
    object another track holds (matched by its mask, the two would take turns at the object's detections: an ID
    switch each time)."""
    return [t for t in candidates if t not in matched and any(among[t, u] >= threshold for u in matched)]


def _match_scores(
    detections: np.ndarray, tracked: np.ndarray, tracks: list[_Track], index: int
) -> tuple[np.ndarray, np.ndarray]:
    """(D, T) how well each detection (bool masks) fits each track on frame ``index``, twice. First, whether it may
    continue the track: its mask IoU with the track's mask on the frame (``tracked``: (T, h, w) bool, from its
    memory) or with the mask its last sighting expects there, whichever is higher (a match needs ``match_iou`` of
    that). Second, the assignment's gain: the IoU with where its last sighting expects it, or, for a track never
    sighted (the caller's own regions), with its memory's mask. Memory can drift onto another object where two cross,
    and a motion model does not follow it there: measured on the demo (SHAPES_SAM2_VIDEO.md, History), the assignment
    by motion alone switches fewer ids than by both IoUs summed."""
    if not len(tracked):
        return np.zeros((len(detections), 0)), np.zeros((len(detections), 0))
    propagated = _mask_iou(detections, tracked)
    empty = np.zeros(detections.shape[1:], bool)
    expected = _mask_iou(detections, np.stack([t.sighting.expected(index) if t.sighting else empty for t in tracks]))
    sighted = np.array([t.sighting is not None for t in tracks])
    return np.maximum(propagated, expected), np.where(sighted, expected, propagated)


def _low_res_boxes(boxes: np.ndarray, image: DecodedImage, side: int) -> np.ndarray:
    """(D, 4) XYXY image-pixel boxes in SAM's low-res mask frame (``side`` square): sam2's transforms resize the
    image to a square, so each axis scales by its own factor."""
    return boxes * (side / np.array([image.width, image.height] * 2, np.float64))


def _box(mask: np.ndarray) -> np.ndarray:
    """(4,) XYXY pixel box of a bool mask; all zeros when it is empty."""
    if not mask.any():
        return np.zeros(4)
    rows, cols = np.nonzero(mask)
    return np.array([cols.min(), rows.min(), cols.max() + 1, rows.max() + 1], np.float64)


def _box_iou(a: np.ndarray, b: list[np.ndarray]) -> np.ndarray:
    """(N, 4) and M (4,) XYXY boxes → (N, M) IoU (0 with an empty box)."""
    if not b:
        return np.zeros((len(a), 0))
    bb = np.stack(b)
    w = np.clip(np.minimum(a[:, None, 2], bb[None, :, 2]) - np.maximum(a[:, None, 0], bb[None, :, 0]), 0, None)
    h = np.clip(np.minimum(a[:, None, 3], bb[None, :, 3]) - np.maximum(a[:, None, 1], bb[None, :, 1]), 0, None)
    inter = w * h
    area_a = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
    area_b = (bb[:, 2] - bb[:, 0]) * (bb[:, 3] - bb[:, 1])
    union = area_a[:, None] + area_b[None, :] - inter
    return np.where(union > 0, inter / np.maximum(union, 1e-9), 0.0)


def _velocity(path: np.ndarray, area: float) -> np.ndarray:
    """(2,) rows, columns per frame: the least-squares slope of the centroids over the frames of ``path`` (a
    ``_Sighting``'s, two or more frames), read from its sightings that showed FULL_VIEW or more of ``area`` where two
    or more did (a partly hidden object's centroid is off its centre)."""
    whole = path[path[:, 3] >= FULL_VIEW * area]
    p = whole if len(whole) >= 2 else path
    t = p[:, 0] - p[:, 0].mean()
    return np.asarray((t[:, None] * (p[:, 1:3] - p[:, 1:3].mean(0))).sum(0) / (t**2).sum())


def _colours(rgb: np.ndarray, masks: np.ndarray) -> np.ndarray:
    """(D, 3) float32: the median RGB of the image (``rgb``, (H, W, 3)) under each of the (D, s, s) bool masks of
    SAM's low-res frame (the image resized to a square), read at the pixels nearest the frame's cell centres; an
    empty mask's is 0."""
    h, w = rgb.shape[:2]
    side = masks.shape[-1]
    rows = np.minimum(((np.arange(side) + 0.5) * h / side).astype(int), h - 1)
    cols = np.minimum(((np.arange(side) + 0.5) * w / side).astype(int), w - 1)
    cells = rgb[rows[:, None], cols[None, :]].astype(np.float32)
    return np.array([np.median(cells[m], axis=0) if m.any() else np.zeros(3) for m in masks], np.float32).reshape(
        len(masks), 3
    )


def _unlike(colours: np.ndarray, tracks: list[_Track]) -> np.ndarray:
    """(D, T) bool: a detection's colour (D, 3) lies farther than SAME_COLOUR from the track's (a track never
    sighted, the caller's own region, has no colour: never)."""
    out = np.zeros((len(colours), len(tracks)), bool)
    for t, track in enumerate(tracks):
        if track.sighting is not None:
            out[:, t] = np.linalg.norm(colours - track.sighting.colour, axis=1) > SAME_COLOUR
    return out


def _centroid(mask: np.ndarray) -> np.ndarray:
    """(row, column) mean of a non-empty bool mask's pixels."""
    return np.array([c.mean() for c in np.nonzero(mask)])


def _mask_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(N, h, w) and (M, h, w) bool → (N, M) IoU."""
    fa, fb = (m.reshape(len(m), math.prod(m.shape[1:])).astype(np.float32) for m in (a, b))
    inter = fa @ fb.T
    union = fa.sum(1)[:, None] + fb.sum(1)[None, :] - inter
    return np.where(union > 0, inter / np.maximum(union, 1), 0.0)


def _sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-max(min(x, 60.0), -60.0)))
