"""Parity with the reference implementations on the same weights and pixels.

Detector: our gRPC answers vs ``ultralytics.YOLO(...).predict(rect=False)`` (boxes within 1 px, same
classes in the same order). Masks: vs ``SAM2ImagePredictor.predict`` given the same boxes/points (IoU >= 0.99),
unrefined; refined masks vs the predictor's masks clipped to box + margin and cleaned by sam2's own
``remove_small_regions``. The image goes over gRPC as lossless PNG of the very array the references get.
"""

from __future__ import annotations

import numpy as np
import pytest

from service.models import testing
from service.proto.detseg.v1 import detseg_pb2 as pb
from tests.conftest import DEVICE, ultralytics_asset
from tests.helpers import RAW_MASKS, encode, load_rgb, mask_iou, mask_overflow, rle_mask, segment_request

PHOTOS = ("bus.jpg", "zidane.jpg")
CONF, IOU, MAX_DET = 0.05, 0.7, 100


@pytest.fixture(scope="module")
def test_weights(settings):
    return testing.make_test_models(settings.cache_dir / "test-models")


@pytest.fixture(scope="module")
def sam_predictor(test_weights):
    from sam2.build_sam import build_sam2
    from sam2.sam2_image_predictor import SAM2ImagePredictor

    model = build_sam2(
        testing.TEST_SEGMENTER_CONFIG,
        str(test_weights[1]),
        device=DEVICE,
        hydra_overrides_extra=list(testing.TEST_SEGMENTER_OVERRIDES),
    )
    predictor = SAM2ImagePredictor(model)
    s = testing.TEST_SEGMENTER_IMAGE_SIZE
    predictor._bb_feat_sizes = [(s // 4, s // 4), (s // 8, s // 8), (s // 16, s // 16)]  # it assumes 1024²
    return predictor


@pytest.mark.parametrize("name", PHOTOS)
def test_detector_boxes_match_ultralytics_predict(stub, test_weights, figures, name):
    from ultralytics import YOLO

    rgb = load_rgb(ultralytics_asset(name))
    reference = YOLO(str(test_weights[0])).predict(
        np.ascontiguousarray(rgb[..., ::-1]),  # ultralytics takes BGR arrays
        imgsz=640,
        conf=CONF,
        iou=IOU,
        max_det=MAX_DET,
        rect=False,
        device=DEVICE,
        verbose=False,
    )[0]
    response = stub.Segment(
        segment_request(encode(rgb), score_threshold=CONF, iou_threshold=IOU, max_instances=MAX_DET), timeout=300
    )
    ref_boxes = reference.boxes.xyxy.cpu().numpy()
    ours = np.array([[i.box.x_min, i.box.y_min, i.box.x_max, i.box.y_max] for i in response.instances])
    assert len(ref_boxes) >= 5, "the reference must find boxes for the comparison to mean anything"
    assert len(ours) == len(ref_boxes)
    assert [i.class_id for i in response.instances] == reference.boxes.cls.int().tolist()
    assert [reference.names[c] for c in reference.boxes.cls.int().tolist()] == [i.label for i in response.instances]
    np.testing.assert_allclose([i.score for i in response.instances], reference.boxes.conf.cpu().numpy(), atol=1e-4)
    deviation = float(np.abs(ours - ref_boxes).max())
    figures[f"detector parity {name}: boxes, max |Δ| px"] = f"{len(ours)}, {deviation:.2e}"
    assert deviation <= 1.0


@pytest.mark.parametrize("name", PHOTOS)
def test_masks_match_sam2_image_predictor(stub, sam_predictor, figures, name):
    rgb = load_rgb(ultralytics_asset(name))
    request = segment_request(encode(rgb), score_threshold=CONF, max_instances=20, refinement=RAW_MASKS)
    response = stub.Segment(request, timeout=300)
    assert len(response.instances) >= 3
    boxes = np.array([[i.box.x_min, i.box.y_min, i.box.x_max, i.box.y_max] for i in response.instances], np.float32)
    sam_predictor.set_image(rgb)
    masks, scores, _ = sam_predictor.predict(box=boxes, multimask_output=False)
    masks = masks.reshape(len(boxes), *rgb.shape[:2]).astype(bool)
    ious = [mask_iou(rle_mask(i.mask), m) for i, m in zip(response.instances, masks, strict=True)]
    nonempty = sum(bool(m.any()) for m in masks)
    figures[f"mask parity {name}: instances, non-empty, min IoU"] = f"{len(ious)}, {nonempty}, {min(ious):.6f}"
    assert nonempty >= len(masks) // 2, "random SAM weights must still give non-trivial masks here"
    assert min(ious) >= 0.99
    np.testing.assert_allclose([i.mask_score for i in response.instances], scores.reshape(-1), atol=1e-4)


def test_point_and_box_prompts_match_sam2_image_predictor(stub, sam_predictor, figures):
    rgb = load_rgb(ultralytics_asset("bus.jpg"))
    box = np.array([50, 230, 250, 900], np.float32)
    points = np.array([[150, 500], [400, 400]], np.float32)
    labels = np.array([1, 0], np.int32)
    request = pb.SegmentRequest(
        image=pb.Image(encoded=encode(rgb)),
        regions=[
            pb.RegionPrompt(
                box=pb.BoundingBox(x_min=50, y_min=230, x_max=250, y_max=900),
                points=[pb.Point(x=150, y=500, label=1), pb.Point(x=400, y=400, label=0)],
            ),
            pb.RegionPrompt(points=[pb.Point(x=150, y=500, label=1), pb.Point(x=400, y=400, label=0)]),
        ],
        options=pb.SegmentOptions(refinement=RAW_MASKS),
    )
    response = stub.Segment(request, timeout=300)
    sam_predictor.set_image(rgb)
    with_box, _, _ = sam_predictor.predict(point_coords=points, point_labels=labels, box=box, multimask_output=False)
    points_only, _, _ = sam_predictor.predict(point_coords=points, point_labels=labels, multimask_output=False)
    ious = [
        mask_iou(rle_mask(response.instances[0].mask), with_box[0].astype(bool)),
        mask_iou(rle_mask(response.instances[1].mask), points_only[0].astype(bool)),
    ]
    figures["mask parity points(+box) prompts: min IoU"] = f"{min(ious):.6f}"
    assert min(ious) >= 0.99


def test_refined_masks_stay_in_their_box_and_match_sams_own_region_cleanup(stub, sam_predictor, settings, figures):
    from sam2.utils.amg import remove_small_regions

    from service.pipeline.refine import Refinement, refine_mask

    rgb = load_rgb(ultralytics_asset("bus.jpg"))
    request = segment_request(encode(rgb), score_threshold=CONF, max_instances=20)
    refined = stub.Segment(request, timeout=300)
    request.options.refinement.CopyFrom(RAW_MASKS)
    raw = stub.Segment(request, timeout=300)
    assert len(refined.instances) == len(raw.instances) >= 3
    margin, area = settings.mask_box_margin, settings.mask_min_region_area
    raw_spill = max(mask_overflow(rle_mask(i.mask), i.box) for i in raw.instances)
    assert raw_spill > 100, "random SAM weights spill far outside their boxes: the case refinement is for"
    boxes = np.array([[i.box.x_min, i.box.y_min, i.box.x_max, i.box.y_max] for i in raw.instances], np.float32)
    sam_predictor.set_image(rgb)
    masks, _, _ = sam_predictor.predict(box=boxes, multimask_output=False)
    ious, spill = [], 0.0
    for inst, box, sam_mask in zip(refined.instances, boxes, masks.reshape(len(boxes), *rgb.shape[:2]), strict=True):
        got = rle_mask(inst.mask)
        w, h = box[2] - box[0], box[3] - box[1]
        spill = max(spill, mask_overflow(got, inst.box) / max(w, h))
        assert mask_overflow(got, inst.box) <= margin * max(w, h) + 1
        expected = sam_mask.astype(bool)
        refine_mask(expected, box, Refinement(box_margin=margin))  # clipping only
        expected, _ = remove_small_regions(expected, area, mode="holes")
        expected, _ = remove_small_regions(expected, area, mode="islands")
        ious.append(mask_iou(got, expected))
    figures["mask refinement bus.jpg (test weights): raw spill px, refined spill / box side, IoU vs sam2 cleanup"] = (
        f"{raw_spill:.0f}, {spill:.3f}, min {min(ious):.4f}"
    )
    assert min(ious) >= 0.99


def test_multimask_answer_is_the_predictors_best_scored_candidate(stub, sam_predictor, figures):
    rgb = load_rgb(ultralytics_asset("zidane.jpg"))
    clicks = [(560.0, 420.0, 1), (900.0, 300.0, 1)]
    request = pb.SegmentRequest(
        image=pb.Image(encoded=encode(rgb)),
        regions=[pb.RegionPrompt(points=[pb.Point(x=x, y=y, label=lab)]) for x, y, lab in clicks],
        options=pb.SegmentOptions(multimask=True, refinement=RAW_MASKS),
    )
    response = stub.Segment(request, timeout=300)
    sam_predictor.set_image(rgb)
    ious = []
    for (x, y, lab), got in zip(clicks, response.instances, strict=True):
        masks, scores, _ = sam_predictor.predict(
            point_coords=np.array([[x, y]], np.float32), point_labels=np.array([lab]), multimask_output=True
        )
        best = int(scores.argmax())
        ious.append(mask_iou(rle_mask(got.mask), masks[best].astype(bool)))
        assert abs(got.mask_score - float(scores[best])) <= 1e-4
    figures["mask parity multimask clicks: min IoU"] = f"{min(ious):.6f}"
    assert min(ious) >= 0.99


def test_a_click_with_the_previous_mask_matches_sam2_image_predictor_with_mask_input(stub, sam_predictor, figures):
    """SAM's interactive loop: options.keep_masks keeps each instance's low-res mask; a region naming it as
    previous_mask sends it to SAM as the mask input with the region's box and clicks, as the predictor's
    ``mask_input`` does with the logits its last call returned."""
    import grpc

    rgb = load_rgb(ultralytics_asset("bus.jpg"))
    image = encode(rgb)
    box = np.array([50, 230, 250, 900], np.float32)
    region = pb.RegionPrompt(box=pb.BoundingBox(x_min=50, y_min=230, x_max=250, y_max=900))
    first = stub.Segment(
        pb.SegmentRequest(
            image=pb.Image(encoded=image),
            regions=[region],
            options=pb.SegmentOptions(refinement=RAW_MASKS, keep_masks=True),
        ),
        timeout=300,
    )
    handle = first.instances[0].mask_handle
    assert handle.startswith("mask:") and len(handle) == 37
    clicks = [pb.Point(x=150, y=500, label=1), pb.Point(x=120, y=300, label=0)]
    follow_up = pb.RegionPrompt(box=region.box, points=clicks, previous_mask=handle)
    second = stub.Segment(
        pb.SegmentRequest(
            image=pb.Image(encoded=image),
            regions=[follow_up],
            options=pb.SegmentOptions(refinement=RAW_MASKS, keep_masks=True),
        ),
        timeout=300,
    )
    assert second.instances[0].mask_handle not in ("", handle)  # a new mask, kept under its own handle

    sam_predictor.set_image(rgb)
    _, _, logits = sam_predictor.predict(box=box, multimask_output=False)
    points = np.array([[150, 500], [120, 300]], np.float32)
    labels = np.array([1, 0], np.int32)
    with_mask, _, _ = sam_predictor.predict(
        point_coords=points, point_labels=labels, box=box, mask_input=logits, multimask_output=False
    )
    without, _, _ = sam_predictor.predict(point_coords=points, point_labels=labels, box=box, multimask_output=False)
    ours = rle_mask(second.instances[0].mask)
    iou = mask_iou(ours, with_mask[0].astype(bool))
    figures["interactive loop (previous mask as SAM's mask input): IoU vs SAM2ImagePredictor"] = f"{iou:.6f}"
    assert iou >= 0.99
    # The mask input matters for these prompts: the answer is not the one without it.
    assert mask_iou(with_mask[0].astype(bool), without[0].astype(bool)) < 0.99

    for bad, code in (("mask:" + "0" * 32, grpc.StatusCode.NOT_FOUND), ("mask:xyz", grpc.StatusCode.INVALID_ARGUMENT)):
        with pytest.raises(grpc.RpcError) as refused:
            stub.Segment(
                pb.SegmentRequest(
                    image=pb.Image(encoded=image),
                    regions=[pb.RegionPrompt(box=region.box, previous_mask=bad)],
                ),
                timeout=60,
            )
        assert refused.value.code() == code and "regions[0].previous_mask" in refused.value.details()
