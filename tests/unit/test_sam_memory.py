"""Streamed SAM 2 memory tracking equals ``SAM2VideoPredictor.propagate_in_video`` on the same seeded SAM 2.1 weights
and frames, and what an object keeps stays bounded however long the stream."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from scipy import ndimage

from service.models import sam_memory, sam_ops
from service.models.loading import load_segmenter_module
from service.models.tensors import ImageFeatures
from service.models.testing import TEST_SEGMENTER_CONFIG, TEST_SEGMENTER_OVERRIDES, make_test_models

FRAMES = 20  # past SAM 2.1's 7 memories and 16 object pointers: the reference drops the oldest, as ours must
H, W = 360, 480
BOXES = [np.array([40, 60, 200, 300], np.float32), np.array([250, 30, 470, 200], np.float32)]
CLICK = (np.array([[300, 250]], np.float32), np.array([1], np.int32))


def _connected_components(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """sam2's CUDA ``get_connected_components`` on the CPU (8-connected labels, and each pixel's component area),
    so the reference runs its hole filling here as it does on a GPU."""
    m = mask.cpu().numpy()
    labels, areas = np.zeros(m.shape, np.int32), np.zeros(m.shape, np.int32)
    for i in range(m.shape[0]):
        lab, _ = ndimage.label(m[i, 0], structure=np.ones((3, 3), bool))
        counts = np.bincount(lab.ravel())
        counts[0] = 0
        labels[i, 0], areas[i, 0] = lab, counts[lab]
    return torch.from_numpy(labels), torch.from_numpy(areas)


@pytest.fixture(scope="module")
def video(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """FRAMES JPEG frames: a camera panning over ultralytics' bus photo."""
    from ultralytics.utils import ASSETS

    folder = tmp_path_factory.mktemp("frames")
    photo = np.asarray(Image.open(ASSETS / "bus.jpg").convert("RGB"))
    for t in range(FRAMES):
        crop = photo[100 + 3 * t : 100 + 3 * t + H, 50 + 4 * t : 50 + 4 * t + W]
        Image.fromarray(crop).save(folder / f"{t:05d}.jpg", quality=95)
    return folder


def _frames(video: Path, size: int) -> list[torch.Tensor]:
    """The video's JPEG frames as the server pre-processes a tracked frame: decoded by its image decoder, then
    ``SegmenterProcessing.preprocess_frame``; (1, 3, size, size) float32 each."""
    from service.models.tensors import SegmenterSpec
    from service.pipeline.image import ImageLimits, decode_image
    from service.processing.segmentation import SegmenterProcessing

    processing = SegmenterProcessing(SegmenterSpec(image_size=size))
    limits = ImageLimits(max_bytes=1 << 24, max_pixels=1 << 24, max_side=4096)
    return [
        torch.from_numpy(processing.preprocess_frame(decode_image(path.read_bytes(), limits, "frame").rgb))
        for path in sorted(video.glob("*.jpg"))
    ]


def test_a_tracked_frame_is_preprocessed_as_sam2s_video_predictor_loads_it(video: Path, segmenter: Path) -> None:
    """Byte-equal to the frames ``SAM2VideoPredictor.init_state`` loads (Pillow's bicubic resize); the image
    predictor's bilinear pre-processing, used for tracked frames before, was not (up to 0.55 apart, normalised)."""
    from sam2.build_sam import build_sam2_video_predictor

    reference = build_sam2_video_predictor(
        TEST_SEGMENTER_CONFIG, str(segmenter), device="cpu", hydra_overrides_extra=list(TEST_SEGMENTER_OVERRIDES)
    )
    state = reference.init_state(str(video))
    ours = _frames(video, reference.image_size)
    assert len(ours) == FRAMES and all(torch.equal(ours[t][0], state["images"][t]) for t in range(FRAMES))


@pytest.fixture(scope="module")
def segmenter(cache_dir: Path) -> Path:
    return make_test_models(cache_dir / "test-models").segmenter  # the test profile's, as its servers find them


def test_streamed_tracking_equals_sam2s_video_predictor(
    video: Path, segmenter: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import sam2.utils.misc
    from sam2.build_sam import build_sam2_video_predictor

    monkeypatch.setattr(sam2.utils.misc, "get_connected_components", _connected_components)
    reference = build_sam2_video_predictor(
        TEST_SEGMENTER_CONFIG, str(segmenter), device="cpu", hydra_overrides_extra=list(TEST_SEGMENTER_OVERRIDES)
    )
    state = reference.init_state(str(video))
    for obj, box in enumerate(BOXES):
        reference.add_new_points_or_box(state, 0, obj, box=box)
    reference.add_new_points_or_box(state, 0, len(BOXES), points=CLICK[0], labels=CLICK[1])
    expected = {t: logits[:, 0] for t, _, logits in reference.propagate_in_video(state)}

    # Ours: the image path's module and features (what a runner returns), the frames as the server pre-processes them.
    sam = load_segmenter_module(TEST_SEGMENTER_CONFIG, segmenter, TEST_SEGMENTER_OVERRIDES)
    tracker = sam_memory.MemoryTracker(sam)
    scale = np.array([tracker.image_size / W, tracker.image_size / H], np.float32)
    prompts = [(box.reshape(2, 2) * scale, np.array([2, 3], np.int32)) for box in BOXES] + [
        (CLICK[0] * scale, CLICK[1])
    ]
    memories = [sam_memory.ObjectMemory() for _ in prompts]
    worst, fractions = 1.0, []
    images = _frames(video, tracker.image_size)
    for t in range(FRAMES):
        with torch.inference_mode():
            embed, hr0, hr1 = sam_ops.image_features(sam, images[t])
        frame = tracker.frame_features(ImageFeatures(embed.numpy(), (hr0.numpy(), hr1.numpy())))
        if t == 0:
            steps = [tracker.start(frame, t, *prompt, memory) for prompt, memory in zip(prompts, memories, strict=True)]
        else:  # the objects started together: one batched pass, as the server runs them
            steps = tracker.track_many(frame, t, memories)
        for i, step in enumerate(steps):
            ours = F.interpolate(step.low_res_mask, size=(H, W), mode="bilinear", align_corners=False)[0, 0]
            ref = expected[t][i]
            # Equal to float rounding, but for a sign flip at a pixel within rounding of 0 that changes whether a
            # small hole is filled (0.1) in a batched pass: at most a few such pixels per mask.
            close = torch.isclose(ours, ref, atol=1e-3 * float(ref.abs().max()), rtol=0)
            assert float(close.float().mean()) >= 0.995, (t, i)
            mine, theirs = (ours > 0).numpy(), (ref > 0).numpy()
            worst = min(worst, (mine & theirs).sum() / max((mine | theirs).sum(), 1))
            fractions.append(theirs.mean())
    assert worst >= 0.99
    assert min(fractions) > 0.0 and max(fractions) < 1.0  # masks with a boundary, so IoU means something


def test_a_correction_on_a_tracked_frame_equals_sam2s_video_predictor(
    video: Path, segmenter: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A negative click on frame 5 of a box-started object, as sam2's predictor corrects a frame its propagation
    reached (its tracked mask is SAM's mask input with the click; every corrected frame a conditioning one). Without
    that mask input frame 5 had IoU 0.64 against the predictor, and the frames after it drifted."""
    import sam2.utils.misc
    from sam2.build_sam import build_sam2_video_predictor

    monkeypatch.setattr(sam2.utils.misc, "get_connected_components", _connected_components)
    frames, corrected = 12, 5
    click = (np.array([[120, 180]], np.float32), np.array([0], np.int32))
    reference = build_sam2_video_predictor(
        TEST_SEGMENTER_CONFIG,
        str(segmenter),
        device="cpu",
        hydra_overrides_extra=[*TEST_SEGMENTER_OVERRIDES, "++model.add_all_frames_to_correct_as_cond=true"],
    )
    state = reference.init_state(str(video))
    reference.add_new_points_or_box(state, 0, 0, box=BOXES[0])
    expected = {t: m[0, 0] for t, _, m in reference.propagate_in_video(state, max_frame_num_to_track=corrected)}
    expected[corrected] = reference.add_new_points_or_box(state, corrected, 0, points=click[0], labels=click[1])[2][
        0, 0
    ]
    for t, _, m in reference.propagate_in_video(state, start_frame_idx=corrected, max_frame_num_to_track=frames):
        expected[t] = m[0, 0]

    sam = load_segmenter_module(TEST_SEGMENTER_CONFIG, segmenter, TEST_SEGMENTER_OVERRIDES)
    tracker = sam_memory.MemoryTracker(sam)
    scale = np.array([tracker.image_size / W, tracker.image_size / H], np.float32)
    memory = sam_memory.ObjectMemory()
    images = _frames(video, tracker.image_size)
    for t in range(frames):
        with torch.inference_mode():
            embed, hr0, hr1 = sam_ops.image_features(sam, images[t])
        frame = tracker.frame_features(ImageFeatures(embed.numpy(), (hr0.numpy(), hr1.numpy())))
        if t == 0:
            step = tracker.start(frame, t, BOXES[0].reshape(2, 2) * scale, np.array([2, 3], np.int32), memory)
        elif t == corrected:
            step = tracker.start(frame, t, click[0] * scale, click[1], memory)
        else:
            step = tracker.track(frame, t, memory)
        ours = F.interpolate(step.low_res_mask, size=(H, W), mode="bilinear", align_corners=False)[0, 0]
        ref = expected[t]
        close = torch.isclose(ours, ref, atol=1e-3 * float(ref.abs().max()), rtol=0)
        assert float(close.float().mean()) >= 0.995, t
    assert 0.0 < float((expected[corrected] > 0).float().mean()) < float((expected[corrected - 1] > 0).float().mean())


def test_memory_is_bounded_over_a_long_stream() -> None:
    """After the windows fill, an object holds a fixed number of frames and bytes, whatever the stream's length
    (a seeded small SAM 2 of the demo's widths: the bound is the tracker's, not the model's)."""
    from sam2.build_sam import build_sam2

    from service.models.demo.profile import SHAPES_SAM2_CONFIG, SHAPES_SAM2_OVERRIDES

    torch.manual_seed(0)
    memory_widths = (  # what the demo overrides leave at SAM 2.1-T's 256 on the video path
        "++model.image_encoder.neck.position_encoding.num_pos_feats=64",
        "++model.memory_encoder.in_dim=64",
        "++model.memory_encoder.mask_downsampler.embed_dim=64",
    )
    sam = build_sam2(
        SHAPES_SAM2_CONFIG, None, device="cpu", hydra_overrides_extra=[*SHAPES_SAM2_OVERRIDES, *memory_widths]
    )
    tracker = sam_memory.MemoryTracker(sam, max_cond_frames=2)
    gen = torch.Generator().manual_seed(0)
    with torch.inference_mode():
        embed, hr0, hr1 = sam_ops.image_features(sam, torch.randn(1, 3, 256, 256, generator=gen))
    frame = tracker.frame_features(ImageFeatures(embed.numpy(), (hr0.numpy(), hr1.numpy())))
    memory = sam_memory.ObjectMemory()
    box = np.array([[20, 20], [120, 140]], np.float32), np.array([2, 3], np.int32)
    sizes = []
    for t in range(70):
        if t in (0, 10, 20, 30):  # prompted again: conditioning frames beyond max_cond_frames are dropped
            tracker.start(frame, t, *box, memory)
        else:
            tracker.track(frame, t, memory)
        sizes.append(memory.nbytes())
    cond, recent = memory.frames["cond_frame_outputs"], memory.frames["non_cond_frame_outputs"]
    assert sorted(cond) == [0, 30]  # the first prompt and the latest
    assert sorted(recent) == list(range(70 - tracker.pointer_frames, 70))
    with_features = [t for t, out in recent.items() if out["maskmem_features"] is not None]
    assert sorted(with_features) == list(range(70 - tracker.memory_frames, 70))
    assert len(set(sizes[50:])) == 1 and max(sizes) == sizes[-1]  # flat once the windows are full


def test_fill_holes_fills_small_background_components_only() -> None:
    logits = torch.full((1, 1, 12, 12), 5.0)
    logits[0, 0, 2:4, 2:4] = -1.0  # a 4-pixel hole: filled
    logits[0, 0, 6:9, 6:9] = -1.0  # a 9-pixel hole: kept (> 8)
    filled = sam_memory.fill_holes(logits)
    assert torch.all(filled[0, 0, 2:4, 2:4] == 0.1)
    assert torch.all(filled[0, 0, 6:9, 6:9] == -1.0)
    outside = torch.full((1, 1, 6, 6), -3.0)
    assert torch.equal(sam_memory.fill_holes(outside), outside)  # the background itself is no hole


def test_remember_rewrites_a_tracked_frames_memory_from_another_mask(segmenter: Path) -> None:
    """A frame the object was just tracked on is remembered as the given mask shows it (sam2's own memory encoder
    on that mask), keeping the frame's object pointer; the next frame reads it; a prompted frame stays as it was."""
    sam = load_segmenter_module(TEST_SEGMENTER_CONFIG, segmenter, TEST_SEGMENTER_OVERRIDES)
    tracker = sam_memory.MemoryTracker(sam)
    gen, size = torch.Generator().manual_seed(0), tracker.image_size
    frames = []
    for _ in range(3):
        with torch.inference_mode():
            embed, hr0, hr1 = sam_ops.image_features(sam, torch.randn(1, 3, size, size, generator=gen))
        frames.append(tracker.frame_features(ImageFeatures(embed.numpy(), (hr0.numpy(), hr1.numpy()))))
    box = np.array([[0.2, 0.2], [0.6, 0.7]], np.float32) * size, np.array([2, 3], np.int32)
    side = size // 4
    other = np.full((side, side), -8.0, np.float32)
    other[side // 10 : side // 3, side * 3 // 5 : side * 9 // 10] = 8.0  # somewhere else than the box

    def run(remembered: bool) -> tuple[sam_memory.ObjectMemory, sam_memory.ObjectStep]:
        memory = sam_memory.ObjectMemory()
        tracker.start(frames[0], 0, *box, memory)
        tracker.track(frames[1], 1, memory)
        if remembered:
            before = memory.frames["cond_frame_outputs"][0]
            tracker.remember(frames[0], 0, memory, other)  # the prompted frame: nothing changes
            assert memory.frames["cond_frame_outputs"][0] is before
            tracker.remember(frames[1], 1, memory, other)
        return memory, tracker.track(frames[2], 2, memory)

    plain, plain_next = run(False)
    kept, kept_next = run(True)
    entry, was = kept.frames["non_cond_frame_outputs"][1], plain.frames["non_cond_frame_outputs"][1]
    with torch.inference_mode():
        high_res = F.interpolate(torch.from_numpy(other)[None, None], size=(size, size), mode="bilinear")
        features, _ = sam._encode_new_memory(
            current_vision_feats=list(frames[1].vision_feats),
            feat_sizes=list(frames[1].sizes),
            pred_masks_high_res=high_res,
            object_score_logits=was["object_score_logits"],
            is_mask_from_pts=True,
        )
    assert torch.equal(entry["maskmem_features"], features.to(torch.bfloat16))
    assert torch.equal(entry["pred_masks"][0, 0], torch.from_numpy(other))
    assert torch.equal(entry["obj_ptr"], was["obj_ptr"])
    assert not torch.equal(entry["maskmem_features"], was["maskmem_features"])
    assert not torch.equal(kept_next.low_res_mask, plain_next.low_res_mask)  # frame 2 reads what frame 1 remembers
