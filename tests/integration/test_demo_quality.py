"""The demo profile (shapes-trained YOLO11n + mini SAM 2) through the real gRPC server on held-out scenes.

Quality is computed by our code (service.shapes.evaluate) and cross-checked with pycocotools COCOeval.
"""

from __future__ import annotations

import numpy as np
import pytest
from pycocotools import mask as mask_utils

from service.proto.detseg.v1 import detseg_pb2 as pb
from service.shapes.dataset import coco_annotations, scenes
from service.shapes.evaluate import Prediction, ap50, coco_eval, end_to_end
from service.shapes.world import CLASSES
from tests.helpers import encode

pytestmark = pytest.mark.slow  # 100 held-out scenes through the demo models

E2E_IMAGES, MAP_IMAGES = 60, 100


@pytest.fixture(scope="module")
def held_out():
    return list(scenes("test", MAP_IMAGES))


def _segment(stub, scene, **options):
    request = pb.SegmentRequest(image=pb.Image(encoded=encode(scene.image)), options=pb.SegmentOptions(**options))
    return stub.Segment(request, timeout=120)


@pytest.fixture(scope="module")
def low_threshold_predictions(demo_stub, held_out):
    """Every scene at score >= 0.001 (as mAP needs): Prediction per instance."""
    predictions = []
    for scene in held_out:
        response = _segment(demo_stub, scene, score_threshold=0.001, max_instances=100)
        for i in response.instances:
            rle = {"size": list(i.mask.coco_rle.size), "counts": i.mask.coco_rle.counts}
            box = (i.box.x_min, i.box.y_min, i.box.x_max, i.box.y_max)
            predictions.append(Prediction(scene.seed, i.class_id + 1, i.score, box, rle))
    return predictions


def test_detector_box_map50_meets_target_and_agrees_with_cocoeval(low_threshold_predictions, held_out, figures):
    gt = coco_annotations(held_out)
    ours = ap50(low_threshold_predictions, gt)
    bbox = coco_eval(low_threshold_predictions, gt, "bbox")
    figures["demo box mAP50 via gRPC (100 held-out scenes): ours vs COCOeval"] = f"{ours:.4f} vs {bbox['map50']:.4f}"
    figures["demo box mAP50-95 (COCOeval)"] = f"{bbox['map']:.4f}"
    assert abs(ours - bbox["map50"]) < 0.01
    assert ours >= 0.90


def test_end_to_end_labels_masks_and_recall_on_held_out_scenes(demo_stub, held_out, low_threshold_predictions, figures):
    pairs = []
    for scene in held_out[:E2E_IMAGES]:
        response = _segment(demo_stub, scene)  # server defaults: score 0.25, NMS IoU 0.7
        assert response.provenance.profile == "demo"
        gt = [
            {"label": i.category, "rle": mask_utils.encode(np.asfortranarray(i.mask.astype(np.uint8)))}
            for i in scene.instances
        ]
        items = [
            {
                "label": i.label,
                "score": i.score,
                "rle": {"size": list(i.mask.coco_rle.size), "counts": i.mask.coco_rle.counts},
            }
            for i in response.instances
        ]
        pairs.append((items, gt))
    m = end_to_end(pairs)
    segm = coco_eval(low_threshold_predictions, coco_annotations(held_out), "segm")
    figures["demo e2e via gRPC (60 held-out scenes)"] = (
        f"gt {m.ground_truth}, predicted {m.predictions}, matched {m.matched}; label accuracy "
        f"{m.label_accuracy:.3f}, mean mask IoU {m.mean_mask_iou:.3f}, recall {m.recall:.3f}, "
        f"precision {m.precision:.3f}; COCOeval segm mAP50 {segm['map50']:.4f}, mAP50-95 {segm['map']:.4f}"
    )
    assert m.images >= 50
    assert m.label_accuracy >= 0.90
    assert m.mean_mask_iou >= 0.80
    assert m.recall >= 0.85


@pytest.mark.parametrize("wanted", ["circle", "star"])
def test_class_prompts_return_only_that_class(demo_stub, held_out, wanted):
    with_it = [s for s in held_out[:40] if any(i.category == wanted for i in s.instances)]
    assert with_it
    found = 0
    for scene in with_it:
        request = pb.SegmentRequest(image=pb.Image(encoded=encode(scene.image)), classes=[wanted])
        response = demo_stub.Segment(request, timeout=120)
        assert {i.label for i in response.instances} <= {wanted}
        found += bool(response.instances)
    assert found >= 0.9 * len(with_it)


def test_demo_vocabulary_is_the_shapes_classes(demo_stub):
    response = demo_stub.ListModels(pb.ListModelsRequest(), timeout=30)
    (detector,) = [m for m in response.models if m.role == pb.MODEL_ROLE_DETECTOR]
    assert list(detector.vocabulary) == list(CLASSES) and response.profile == "demo"
    assert detector.input_size == 320


def test_refined_demo_masks_stay_near_their_box_without_losing_quality(demo_stub, held_out, settings, figures):
    """Default refinement vs SAM's raw masks on the same held-out scenes: less spill, IoU with the truth kept."""
    from tests.helpers import RAW_MASKS, mask_iou, mask_overflow, rle_mask

    spill = {"raw": 0.0, "refined": 0.0}
    ious: dict[str, list[float]] = {"raw": [], "refined": []}
    for scene in held_out[:40]:
        truth = [i.mask for i in scene.instances]
        for kind, options in (("raw", {"refinement": RAW_MASKS}), ("refined", {})):
            for inst in _segment(demo_stub, scene, **options).instances:
                mask = rle_mask(inst.mask)
                spill[kind] = max(spill[kind], mask_overflow(mask, inst.box))
                ious[kind].append(max(mask_iou(mask, t) for t in truth))
                if kind == "refined":
                    side = max(inst.box.x_max - inst.box.x_min, inst.box.y_max - inst.box.y_min)
                    assert mask_overflow(mask, inst.box) <= settings.mask_box_margin * side + 1
    raw_iou, refined_iou = float(np.mean(ious["raw"])), float(np.mean(ious["refined"]))
    figures["demo masks beyond their box, 40 held-out scenes: raw vs refined max px; mean best IoU raw vs refined"] = (
        f"{spill['raw']:.0f} vs {spill['refined']:.0f} px; {raw_iou:.4f} vs {refined_iou:.4f}"
    )
    assert refined_iou >= raw_iou - 0.002
