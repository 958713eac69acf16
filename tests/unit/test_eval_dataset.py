"""`detseg eval`'s dataset reader: a malformed COCO file is refused naming the entry and the field (before, each of
these was a KeyError or AssertionError from inside pycocotools, or figures computed without a word: an annotation
of an unknown image, a duplicated image id), and what COCO derives from a mask is filled in where it is left out,
equal to what pycocotools computes."""

from __future__ import annotations

import copy
import json

import pytest
from pycocotools import mask as mask_utils

from service.evaluation.dataset import load_dataset
from service.shapes.dataset import write_coco_dataset


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    path = write_coco_dataset(tmp_path_factory.mktemp("eval-dataset"), "test", 3)
    return path, json.loads(path.read_text())


def _load(written, tmp_path, change):
    path, coco = written
    coco = copy.deepcopy(coco)
    change(coco)
    out = path.parent / f"{tmp_path.name}.json"  # beside the images, so file_names resolve
    out.write_text(json.dumps(coco))
    return load_dataset(out)


def _set(where, key, value):
    def change(coco):
        entry = coco[where[0]][where[1]]
        if value is KeyError:
            del entry[key]
        else:
            entry[key] = value

    return change


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda c: c.update(images=[], annotations=[]), "has no images"),
        (lambda c: c.pop("categories"), "not a COCO instances file (no 'categories' list)"),
        (_set(("images", 0), "width", KeyError), "images[0]: 'width' must be a whole number of pixels >= 1"),
        (_set(("images", 1), "height", 0), "images[1]: 'height' must be a whole number of pixels >= 1"),
        (_set(("images", 0), "id", "7"), "images[0]: 'id' must be an integer"),
        (_set(("images", 0), "file_name", KeyError), "images[0]: 'file_name' must be a non-empty string"),
        (lambda c: c["images"][1].update(id=c["images"][0]["id"]), "images[1]: id"),
        (_set(("categories", 1), "name", " Circle "), "categories[1]: name ' Circle ' is another category's name"),
        (_set(("categories", 1), "id", 1), "categories[1]: id 1 is another category's id too"),
        (_set(("annotations", 0), "image_id", 999), "annotations[0]: image_id 999 is not an image's id"),
        (_set(("annotations", 0), "category_id", 99), "annotations[0]: category_id 99 is not a category's id"),
        (_set(("annotations", 1), "id", 1), "annotations[1]: id 1 is another annotation's id too"),
        (_set(("annotations", 0), "segmentation", KeyError), "annotations[0]: 'segmentation' must be polygons"),
        (_set(("annotations", 0), "segmentation", [[1, 2, 3, 4]]), "3 points or more"),
        (_set(("annotations", 0), "bbox", [1, 2, -3, 4]), "annotations[0]: 'bbox' must be [x, y, width, height]"),
        (lambda c: c["images"][0].update(width=c["images"][0]["height"], height=c["images"][0]["width"]),
         "the RLE's size"),
    ],
)  # fmt: skip
def test_a_malformed_dataset_is_refused_naming_the_entry_and_field(written, tmp_path, change, message):
    with pytest.raises(ValueError) as e:
        _load(written, tmp_path, change)
    assert message in str(e.value)


def test_area_bbox_and_iscrowd_left_out_are_what_pycocotools_computes_from_the_mask(written, tmp_path):
    def strip(coco):
        for a in coco["annotations"]:
            del a["area"], a["bbox"], a["iscrowd"]
        image = coco["images"][0]
        # one instance as polygons, one as uncompressed RLE: every segmentation form gets its fields
        first, second = [a for a in coco["annotations"] if a["image_id"] == image["id"]][:2]
        first["segmentation"] = [[10, 10, 40, 10, 40, 30, 10, 30]]
        rle = mask_utils.frPyObjects([[5, 5, 20, 5, 20, 25]], image["height"], image["width"])[0]
        second["segmentation"] = {"size": rle["size"], "counts": _uncompressed(mask_utils.decode(rle))}

    original = {a["id"]: a for a in written[1]["annotations"]}
    dataset = _load(written, tmp_path, strip)
    for a in dataset.coco["annotations"]:
        image = dataset.image(a["image_id"])
        seg = a["segmentation"]
        if isinstance(seg, list):
            rle = mask_utils.merge(mask_utils.frPyObjects(seg, image.height, image.width))
        elif isinstance(seg["counts"], list):
            rle = mask_utils.frPyObjects(seg, image.height, image.width)
        else:
            rle = {"size": seg["size"], "counts": seg["counts"].encode()}
        assert a["iscrowd"] == 0
        assert a["area"] == float(mask_utils.area(rle))
        assert a["bbox"] == [float(v) for v in mask_utils.toBbox(rle)]
        if isinstance(seg, dict) and isinstance(seg["counts"], str):  # unchanged masks: the writer's own figures
            assert (a["area"], a["bbox"]) == (original[a["id"]]["area"], original[a["id"]]["bbox"])


def _uncompressed(mask):
    """COCO's uncompressed RLE counts (column-major runs, starting with zeros)."""
    flat = mask.flatten(order="F")
    counts, value, run = [], 0, 0
    for v in flat:
        if v != value:
            counts.append(run)
            value, run = v, 0
        run += 1
    counts.append(run)
    return [int(c) for c in counts]


def test_a_slices_file_that_is_not_an_object_of_objects_is_refused(written, tmp_path):
    path = tmp_path / "slices.json"
    path.write_text(json.dumps(["rain"]))
    with pytest.raises(ValueError, match="not a slices file"):
        load_dataset(written[0], slices=path)


def test_a_slices_key_naming_no_image_is_refused_and_a_null_value_is_no_value(written, tmp_path):
    """A key that is not a file_name as written in the JSON (e.g. without its folder) dropped that image's slices
    without a word; an attribute set to null became its own slice "None"."""
    path, coco = written
    first, second = coco["images"][0], coco["images"][1]
    slices = tmp_path / "slices.json"
    slices.write_text(json.dumps({first["file_name"].rsplit("/", 1)[-1] + ".x": {"weather": "rain"}}))
    with pytest.raises(ValueError, match=r"1 key\(s\) name no image .*'[^']+\.x'"):
        load_dataset(path, slices=slices)
    slices.write_text(json.dumps({first["file_name"]: {"weather": "rain"}, str(second["id"]): {"weather": None}}))
    loaded = load_dataset(path, slices=slices)
    assert [i.slices.get("weather", "-") for i in loaded.images[:2]] == ["rain", "-"]


def test_category_names_match_labels_as_the_server_matches_class_names(written, tmp_path):
    """A category "Traffic_Light" is the class the server answers as "traffic light" ("_", "-", case and runs of spaces
    aside, as ``normalise_class_name`` says); it was compared by case and outer spaces only, so such a class was never
    asked of a closed detector and its answers counted as no category's."""
    from service.evaluation.predict import classes_to_ask
    from service.proto.detseg.v1 import detseg_pb2 as pb

    def rename(coco):
        coco["categories"][0]["name"] = "Traffic_Light"
        coco["categories"][1]["name"] = "fire-hydrant "

    dataset = _load(written, tmp_path, rename)
    first, second = (c["id"] for c in written[1]["categories"][:2])
    assert dataset.category_id("traffic light") == first and dataset.category_id("Fire  Hydrant") == second
    detector = pb.ModelInfo(vocabulary=["person", "traffic light", "fire hydrant"], open_vocabulary=False)
    assert classes_to_ask(dataset, detector) == ["Traffic_Light", "fire-hydrant "]


def test_two_category_names_the_server_takes_as_one_class_are_refused(written, tmp_path):
    def clash(coco):
        coco["categories"][0]["name"] = "star_"
        coco["categories"][1]["name"] = "Star"

    with pytest.raises(ValueError, match=r"categories\[1\]: name 'Star' is another category's name too"):
        _load(written, tmp_path, clash)
