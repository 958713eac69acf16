"""``detseg eval``: predictions through the service, figures, annotator effort, report."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from service.client import Client
from service.evaluation.dataset import EvalDataset
from service.evaluation.metrics import coco_results, dataset_rle, evaluate
from service.evaluation.noc import InstanceEffort, annotate, summarize
from service.evaluation.predict import Prompt, classes_to_ask, predict, readable_names
from service.evaluation.report import write_report
from service.proto.detseg.v1 import detseg_pb2 as pb


def effort(client: Client, dataset: EvalDataset, count: int) -> list[InstanceEffort]:
    """The simulated annotator on the first ``count`` non-crowd ground-truth instances (dataset order), one
    EncodeImage per image."""
    from pycocotools import mask as mask_utils

    out: list[InstanceEffort] = []
    for image in dataset.images:
        anns = [a for a in dataset.annotations(image.id) if not a.get("iscrowd")][: count - len(out)]
        if not anns:
            continue
        handle = client.encode_image(image.path)
        for a in anns:
            gt = mask_utils.decode(dataset_rle(a, dataset)).astype(bool)
            out.append(annotate(client, handle, gt, int(a["id"])))
        if len(out) >= count:
            break
    return out


def run_eval(
    client: Client,
    dataset: EvalDataset,
    out: Path,
    *,
    prompt: Prompt = Prompt.CLASSES,
    score_threshold: float = 0.05,
    operating_threshold: float | None = None,
    noc_instances: int = 100,
    title: str = "detseg evaluation",
) -> dict[str, Any]:
    """Runs everything and writes the report into ``out``; returns the figures. ``score_threshold``: what the
    requests ask for (low, for AP); ``operating_threshold``: where instances are kept (default: the server's
    default score threshold, from ListModels). With ``classes``, a closed detector is asked only for the categories it
    knows, an open-vocabulary one only for those its server accepts; with ``texts``, only the names the server
    accepts as texts (``readable_names``); the others are listed in the figures' ``classes_not_asked`` and count as
    missed (``boxes`` asks every category). An image whose request failed (or whose answer is not at
    the dataset's size) counts as empty, is listed in the figures' ``failed_images`` with why, and is not clicked
    on by the simulated annotator."""
    t = time.perf_counter()
    served = client.list_models()
    if operating_threshold is None:
        operating_threshold = float(served.defaults.score_threshold)
    detector = next((m for m in served.models if m.role == pb.MODEL_ROLE_DETECTOR), None)
    if prompt is Prompt.BOXES:  # every category labels its boxes
        asked = list(dataset.categories.values())
    elif prompt is Prompt.TEXTS:
        asked = readable_names(client, dataset, list(dataset.categories.values()), "texts")
    else:
        asked = classes_to_ask(dataset, detector)
        if detector is not None and detector.open_vocabulary:
            asked = readable_names(client, dataset, asked, "classes")
    predictions = predict(client, dataset, prompt, score_threshold, asked)
    figures = evaluate(dataset, predictions, operating_threshold)
    figures["prompt"] = prompt.value
    figures["classes_not_asked"] = [n for n in dataset.categories.values() if n not in asked]
    figures["models"] = [
        {"role": pb.ModelRole.Name(m.role), "name": m.name, "version": m.version, "weights_sha256": m.weights_sha256}
        for m in served.models
    ]
    failed = {f["image_id"] for f in figures["failed_images"]}
    answered = dataset.subset({i.id for i in dataset.images if i.id not in failed})
    efforts = effort(client, answered, noc_instances) if noc_instances else []
    figures["noc"] = summarize(efforts)
    figures["seconds"] = time.perf_counter() - t
    out.mkdir(parents=True, exist_ok=True)
    (out / "predictions.json").write_text(json.dumps(coco_results(dataset, predictions)))
    write_report(figures, out, title)
    return figures
