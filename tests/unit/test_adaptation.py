"""detseg adapt's parts: the seeded split, the YOLO files, the detector's start (class rows kept by name), LoRA
(exactly the base at the start, merged equal to unmerged), the card reader's refusals, eval's closed-vocabulary
classes."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from service.adaptation import data as adapt_data
from service.adaptation.detector import start_checkpoint
from service.adaptation.segmenter import LoRALinear, add_lora, merge_lora
from service.errors import ModelUnavailable
from service.evaluation.dataset import load_dataset
from service.evaluation.predict import classes_to_ask
from service.models.adapted import CARD_NAME, CARD_SCHEMA, read_adapted
from service.models.demo.profile import SHAPES_YOLO
from service.models.loading import safe_load_ultralytics
from service.proto.detseg.v1 import detseg_pb2 as pb
from service.shapes.dataset import write_coco_dataset
from service.shapes.shifted import SHIFTED_CLASSES


@pytest.fixture(scope="module")
def shifted(tmp_path_factory):
    return load_dataset(write_coco_dataset(tmp_path_factory.mktemp("shifted"), "train", 12, world="shifted"))


def test_the_split_is_seeded_disjoint_and_whole(shifted):
    a, b = adapt_data.split(shifted, 0.25, 0), adapt_data.split(shifted, 0.25, 0)
    assert [i.id for i in a.holdout.images] == [i.id for i in b.holdout.images]
    train, held = {i.id for i in a.train.images}, {i.id for i in a.holdout.images}
    assert len(held) == 3 and not train & held and train | held == {i.id for i in shifted.images}
    assert all(x["image_id"] in held for x in a.holdout.coco["annotations"])
    assert {i.id for i in adapt_data.split(shifted, 0.25, 1).holdout.images} != held
    with pytest.raises(ValueError, match="at least 2"):
        adapt_data.split(shifted.subset({shifted.images[0].id}), 0.5, 0)


def test_yolo_files_carry_the_coco_boxes_and_class_names(shifted, tmp_path):
    split = adapt_data.split(shifted, 0.25, 0)
    data = yaml.safe_load(adapt_data.write_yolo(split, tmp_path).read_text())
    assert [data["names"][k] for k in range(len(data["names"]))] == list(SHIFTED_CLASSES)
    image = split.train.images[0]
    lines = (tmp_path / "labels" / "train" / f"{image.id}.txt").read_text().split("\n")[:-1]
    anns = split.train.annotations(image.id)
    assert len(lines) == len(anns)
    for line, a in zip(lines, anns, strict=True):
        k, cx, cy, w, h = line.split()
        x, y, bw, bh = a["bbox"]
        assert int(k) == a["category_id"] - 1
        assert float(cx) == pytest.approx((x + bw / 2) / image.width, abs=1e-6)
        assert float(h) == pytest.approx(bh / image.height, abs=1e-6)
    linked = tmp_path / "images" / "train" / f"{image.id}.png"
    assert np.array_equal(np.asarray(Image.open(linked)), np.asarray(Image.open(image.path)))


def test_boxes_reaching_beyond_the_image_are_clipped_so_ultralytics_keeps_the_image(shifted, tmp_path):
    """A COCO box may reach beyond its image (a corrected label, an object cut by the edge): its YOLO line had a
    centre past 1 and ultralytics' own check (verify_image_label) refused the whole image as corrupt. A box wholly
    outside gives no line."""
    from ultralytics.data.utils import verify_image_label

    split = adapt_data.split(shifted, 0.25, 0)
    image = split.train.images[0]
    first, second = split.train.annotations(image.id)[:2]
    first["bbox"] = [image.width - 10.0, 5.0, 60.0, 20.0]  # mostly beyond the right edge
    second["bbox"] = [image.width + 5.0, 5.0, 10.0, 10.0]  # wholly beyond it
    adapt_data.write_yolo(split, tmp_path)
    label = tmp_path / "labels" / "train" / f"{image.id}.txt"
    lines = label.read_text().splitlines()
    assert len(lines) == len(split.train.annotations(image.id)) - 1
    k, cx, cy, w, h = (float(v) for v in lines[0].split())
    assert (cx, w) == (
        pytest.approx((image.width - 5) / image.width, abs=1e-6),
        pytest.approx(10 / image.width, abs=1e-6),
    )
    linked = tmp_path / "images" / "train" / f"{image.id}.png"
    checked = verify_image_label((str(linked), str(label), "", False, len(SHIFTED_CLASSES), 0, 0, False))
    assert checked[0] is not None and len(checked[1]) == len(lines), checked[-1]


def test_replayed_images_train_beside_the_data_with_classes_matched_by_name(shifted, tmp_path):
    """A replay set of the base's own domain (the plain world: its classes a subset of the shifted world's, listed
    in another order with other ids) joins the training part only; its labels take the adapted classes' ids by
    name; a class only the replay set has is appended."""
    path = write_coco_dataset(tmp_path / "plain", "train", 4)
    coco = json.loads(path.read_text())
    renumber = {c["id"]: 100 - c["id"] for c in coco["categories"]}  # other ids, other order
    for c in coco["categories"]:
        c["id"] = renumber[c["id"]]
        # spelled otherwise, the same class to the server ("Circle" was a class of its own, and the data's
        # "circle" unreachable: the server answers a name with the last class of that spelling)
        c["name"] = {"circle": "Circle", "star": "star_"}.get(c["name"], c["name"])
    coco["categories"].append({"id": 7, "name": "blob"})
    for a in coco["annotations"]:
        a["category_id"] = renumber[a["category_id"]]
    (path.parent / "renumbered.json").write_text(json.dumps(coco))
    replay = load_dataset(path.parent / "renumbered.json")
    split = dataclasses.replace(adapt_data.split(shifted, 0.25, 0), replay=replay)
    names = adapt_data.class_names(split)
    assert names == [*SHIFTED_CLASSES, "blob"]
    data = yaml.safe_load(adapt_data.write_yolo(split, tmp_path / "yolo").read_text())
    assert [data["names"][k] for k in range(len(data["names"]))] == names
    for image in replay.images:
        lines = (tmp_path / "yolo" / "labels" / "train" / f"replay-{image.id}.txt").read_text().split("\n")[:-1]
        got = [names[int(line.split()[0])] for line in lines]
        expected = [replay.categories[a["category_id"]] for a in replay.annotations(image.id)]
        assert got == [{"Circle": "circle", "star_": "star"}.get(n, n) for n in expected]
        assert (tmp_path / "yolo" / "images" / "train" / f"replay-{image.id}.png").exists()
    assert not any(p.name.startswith("replay-") for p in (tmp_path / "yolo" / "labels" / "val").iterdir())


def test_the_detector_starts_with_the_base_rows_of_the_classes_it_knows(tmp_path):
    names = ["cross", "star", "circle"]  # a new class first, two old ones in another order
    kept, new = start_checkpoint(SHAPES_YOLO, names, tmp_path / "start.pt")
    assert kept == ("star", "circle") and new == ("cross",)
    base = safe_load_ultralytics(SHAPES_YOLO)
    base_model = (base.get("ema") or base["model"]).float().eval()
    start = safe_load_ultralytics(tmp_path / "start.pt")["model"].float().eval()
    assert start.names == {0: "cross", 1: "star", 2: "circle"}
    x = torch.rand(1, 3, 320, 320, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        old, now = base_model(x)[0], start(x)[0]
    assert torch.equal(now[:, :4], old[:, :4])  # boxes: every non-class tensor is the base's
    old_names = [base_model.names[k] for k in sorted(base_model.names)]
    for k, name in ((1, "star"), (2, "circle")):
        assert torch.allclose(now[:, 4 + k], old[:, 4 + old_names.index(name)], rtol=1e-5, atol=1e-7), name


def test_an_80_class_base_keeps_its_known_classes_whatever_their_spelling(tmp_path):
    """yolo11n's class branch is as wide as its 80 classes (max(64, min(80, 100))): its hidden convs and norms were
    taken for class rows and reordered or re-initialised, so a kept class's score was lost (max |diff| 0.17 against
    a logit std of 0.12); and names the server takes as one ("Class_3", "class 3") were new classes."""
    from ultralytics.nn.tasks import DetectionModel

    torch.manual_seed(1)
    base_model = DetectionModel("yolo11n.yaml", nc=80, verbose=False)
    base_model.names = {k: f"class {k}" for k in range(80)}
    for m in base_model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.normal_()
            m.running_var.uniform_(0.5, 2)
    torch.save({"model": base_model.half()}, tmp_path / "base.pt")  # as ultralytics ships weights, and the start
    names = [f"Class_{k}" if k % 2 else f"class-{k}" for k in range(79)] + ["newthing"]
    kept, new = start_checkpoint(tmp_path / "base.pt", names, tmp_path / "start.pt")
    assert len(kept) == 79 and new == ("newthing",)
    start = safe_load_ultralytics(tmp_path / "start.pt")["model"].float().eval()
    x = torch.rand(1, 3, 320, 320, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        old, now = base_model.float().eval()(x)[0], start(x)[0]
    assert torch.equal(now[:, :4], old[:, :4])
    assert torch.allclose(now[:, 4 : 4 + 79], old[:, 4 : 4 + 79], rtol=1e-5, atol=1e-6)


def test_lora_starts_as_the_base_and_merges_to_the_same_function():
    torch.manual_seed(0)
    module = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
    x = torch.randn(5, 8)
    base = module(x).detach()
    assert add_lora(module, rank=2, alpha=4.0, seed=0) == (2 * 8 + 16 * 2) + (2 * 16 + 4 * 2)  # A and B per layer
    assert isinstance(module[0], LoRALinear) and torch.equal(module(x), base)  # B is zero at the start
    with torch.no_grad():
        module[0].b.normal_()
        module[2].b.normal_()
    adapted = module(x).detach()
    assert not torch.allclose(adapted, base)
    merge_lora(module)
    assert type(module[0]) is torch.nn.Linear and type(module[2]) is torch.nn.Linear
    assert torch.allclose(module(x), adapted, atol=1e-5)


def _card(folder: Path, **changes) -> None:
    card = {
        "schema": CARD_SCHEMA,
        "version": "v1",
        "base": [{"role": "segmenter", "name": "s", "version": "1", "sha256": "ab"}],
        "detector": {"file": "detector.pt", "name": "d", "architecture": "yolo11n.yaml", "sha256": "00"},
        "segmenter": {
            "file": "segmenter.pt",
            "name": "s",
            "architecture": "c",
            "sha256": "00",
            "encoder_changed": False,
        },
    }
    card.update(changes)
    (folder / CARD_NAME).write_text(json.dumps(card))


def test_the_card_reader_refuses_what_is_not_a_whole_adapted_folder(tmp_path):
    with pytest.raises(ModelUnavailable, match="no adapted.json"):
        read_adapted(tmp_path)
    _card(tmp_path)
    with pytest.raises(ModelUnavailable, match="detector file detector.pt .* is missing"):
        read_adapted(tmp_path)
    (tmp_path / "detector.pt").write_bytes(b"x")
    (tmp_path / "segmenter.pt").write_bytes(b"y")
    adapted = read_adapted(tmp_path)
    assert adapted.version == "v1" and adapted.segmenter.path == (tmp_path / "segmenter.pt").resolve()
    _card(tmp_path, detector={"file": "../detector.pt", "name": "d", "architecture": "a", "sha256": "0"})
    with pytest.raises(ModelUnavailable, match="not inside the folder"):
        read_adapted(tmp_path)
    _card(tmp_path, schema="other/v9")
    with pytest.raises(ModelUnavailable, match="schema"):
        read_adapted(tmp_path)
    _card(tmp_path, segmenter={"file": "segmenter.pt"})
    with pytest.raises(ModelUnavailable, match="not a valid adaptation card"):
        read_adapted(tmp_path)


def test_eval_asks_a_closed_detector_only_for_the_classes_it_knows(shifted):
    closed = pb.ModelInfo(vocabulary=["Circle", "square", "triangle", "star", "hexagon"])
    assert classes_to_ask(shifted, closed) == list(SHIFTED_CLASSES[:5])
    assert classes_to_ask(shifted, pb.ModelInfo(open_vocabulary=True)) == list(SHIFTED_CLASSES)
    assert classes_to_ask(shifted, None) == list(SHIFTED_CLASSES)


def test_adapt_says_what_is_wrong_with_the_data_before_writing_or_resolving_anything(tmp_path):
    """A dataset error comes first: no output folder, and no model resolved (official weights, offline and absent
    here, were looked for first: ModelUnavailable instead of the data's error)."""
    from service.adaptation.run import AdaptJob, adapt
    from service.config import Settings

    bad = tmp_path / "bad.json"
    bad.write_text('{"images": []}')
    settings = Settings(models="official", offline=True, cache_dir=tmp_path / "cache")
    with pytest.raises(ValueError, match="not a COCO instances file"):
        adapt(AdaptJob(annotations=bad, out=tmp_path / "out", settings=settings))
    assert not (tmp_path / "out").exists()


def test_adapt_refuses_a_signing_key_that_is_none_before_training(tmp_path):
    """(It was read when the folder was signed, after the whole training and both evaluations.)"""
    from service.adaptation.run import AdaptJob, adapt
    from service.config import Settings
    from service.shapes.dataset import write_coco_dataset

    annotations = write_coco_dataset(tmp_path / "data", "train", 2)
    public = tmp_path / "key.pub"
    public.write_text("-----BEGIN PUBLIC KEY-----\nMCowBQYDK2VwAyEA\n-----END PUBLIC KEY-----\n")
    settings = Settings(models="official", offline=True, cache_dir=tmp_path / "cache")
    job = AdaptJob(annotations=annotations, out=tmp_path / "out", settings=settings, signing_key=public)
    with pytest.raises(ValueError, match=r"key.pub: not an unencrypted Ed25519 private key in PEM"):
        adapt(job)
    assert not (tmp_path / "out").exists()


def test_the_cards_best_epoch_is_the_one_ultralytics_kept(tmp_path):
    """The card re-derived the best epoch as 0.1 mAP50 + 0.9 mAP50-95; this ultralytics keeps best.pt by mAP50-95
    alone (its early stopper's best_epoch), so the card could name another epoch's figures than the weights'."""
    from service.adaptation.detector import _best_metrics

    csv = tmp_path / "results.csv"
    csv.write_text(
        "epoch,metrics/mAP50(B),metrics/mAP50-95(B)\n1,0.90,0.500\n2,0.70,0.510\n3,0.60,0.510\n4,0.95,0.400\n"
    )
    assert _best_metrics(csv)["epoch"] == 3  # the highest mAP50-95; a tie is saved again
    assert _best_metrics(csv, best_epoch=1)["epoch"] == 2  # the stopper's (from 0) when ultralytics gives it


def test_no_image_measured_is_trained_on(tmp_path):
    """A given --holdout that is a subset of the data trained on its own images; the same image listed twice could
    fall on both sides; a --replay holding held-out images trained on them."""
    from PIL import Image

    from service.adaptation.recipes import SegmenterRecipe
    from service.adaptation.run import AdaptJob, _split
    from service.config import Settings
    from service.evaluation.dataset import load_dataset

    images, annotations = [], []
    for k in range(6):
        Image.fromarray(np.full((32, 32, 3), k * 40, np.uint8)).save(tmp_path / f"{k}.png")
        images.append({"id": k + 1, "file_name": f"{k}.png", "width": 32, "height": 32})
        box = {"bbox": [4, 4, 10, 10], "area": 100, "iscrowd": 0, "segmentation": [[4, 4, 14, 4, 14, 14, 4, 14]]}
        annotations.append({"id": k + 1, "image_id": k + 1, "category_id": 1, **box})
    categories = [{"id": 1, "name": "square"}]
    copy = {**images[0], "id": 7}  # 0.png listed again under another id
    files = {
        "all": {"images": images, "annotations": annotations, "categories": categories},
        "hold": {"images": images[:2], "annotations": annotations[:2], "categories": categories},
        "dup": {"images": [*images, copy], "annotations": [*annotations, {**annotations[0], "id": 7, "image_id": 7}]},
    }
    files["dup"]["categories"] = categories
    for name, coco in files.items():
        (tmp_path / f"{name}.json").write_text(json.dumps(coco))

    def trained_and_held(**paths) -> tuple[set[str], set[str]]:
        job = AdaptJob(out=tmp_path / "out", settings=Settings(models="demo"), **paths)
        original = load_dataset(job.original) if job.original else None
        split = _split(job, load_dataset(job.annotations), original)
        trained = {i.file_name for i in split.train.images}
        trained |= {i.file_name for i in split.replay.images} if split.replay else set()
        return trained, {i.file_name for i in split.holdout.images}

    trained, held = trained_and_held(annotations=tmp_path / "all.json", holdout=tmp_path / "hold.json")
    assert held == {"0.png", "1.png"} and trained == {"2.png", "3.png", "4.png", "5.png"}
    for seed in range(10):  # the split's seed is the segmenter recipe's
        recipe = SegmenterRecipe(seed=seed)
        trained, held = trained_and_held(annotations=tmp_path / "dup.json", holdout_fraction=0.3, segmenter=recipe)
        assert not trained & held, seed
    trained, held = trained_and_held(annotations=tmp_path / "all.json", replay=tmp_path / "all.json")
    assert held and not trained & held
    with pytest.raises(ValueError, match="every image is also held out or in --original; nothing to train on"):
        trained_and_held(
            annotations=tmp_path / "all.json", holdout=tmp_path / "hold.json", original=tmp_path / "dup.json"
        )
    # CVAT's COCO export (datumaro) writes every mask as a crowd region: adapt trained on nothing without a word
    crowd = {**files["all"], "annotations": [{**a, "iscrowd": 1} for a in annotations]}
    (tmp_path / "crowd.json").write_text(json.dumps(crowd))
    with pytest.raises(ValueError, match=r"every annotation of the training images is a crowd region \(iscrowd 1\)"):
        trained_and_held(annotations=tmp_path / "crowd.json", holdout=tmp_path / "hold.json")


def test_sam_examples_read_an_exif_rotated_photo_upright_as_its_masks_are(tmp_path):
    """A phone photo stores its pixels sideways with an EXIF orientation; the server, `detseg label` and COCO's
    masks are in the upright frame, and the SAM examples paired the stored pixels with those masks."""
    upright = np.zeros((40, 24, 3), np.uint8)  # (H, W): taller than wide once upright
    upright[:10, :, 0] = 255  # a red band along the top
    stored = Image.fromarray(upright).transpose(Image.Transpose.ROTATE_90)  # sideways: what the camera wrote
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise to display: undoes ROTATE_90 (counter-clockwise)
    stored.save(tmp_path / "photo.jpg", exif=exif, quality=100)
    polygon = [[0, 0, 24, 0, 24, 10, 0, 10]]  # the band, upright
    coco = {
        "images": [{"id": 1, "file_name": "photo.jpg", "width": 24, "height": 40}],
        "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "segmentation": polygon, "iscrowd": 0}],
        "categories": [{"id": 1, "name": "band"}],
    }
    (tmp_path / "c.json").write_text(json.dumps(coco))
    (example,) = adapt_data.sam_examples(load_dataset(tmp_path / "c.json"), 32)
    red = example.image[0] > example.image[2] + 1.0  # normalised: red well above blue
    assert red[example.masks[0] > 0].mean() > 0.9 and red[example.masks[0] == 0].mean() < 0.1
