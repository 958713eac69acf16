"""detseg label: a folder through the demo server, resumable, per-image errors kept, exports loaded back by
their own tools, and a signed manifest over them."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from PIL import Image

from service import provenance
from service.client import Client
from service.labeling.run import ERRORS, RECORDS, RUN, Prompts, label_folder
from service.shapes.dataset import scenes

CLASSES = ("circle", "square", "triangle", "star", "hexagon")


@pytest.fixture
def folder(tmp_path):
    root = tmp_path / "images"
    (root / "sub").mkdir(parents=True)
    for n, scene in enumerate(scenes("test", 6)):
        Image.fromarray(scene.image).save(root / ("sub" if n % 2 else ".") / f"{scene.seed}.png")
    (root / "broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    return root


def test_labels_a_folder_records_errors_and_resumes(demo_server, folder, tmp_path):
    out = tmp_path / "out"
    with Client(demo_server.target) as client:
        first = label_folder(client, folder, out, Prompts(classes=CLASSES), progress=False)
        assert (first.images, first.labeled_now, first.failed, first.skipped) == (7, 6, 1, 0)
        (error,) = [json.loads(line) for line in (out / ERRORS).read_text().splitlines()]
        assert error["file_name"] == "broken.jpg" and error["code"] == "INVALID_ARGUMENT"
        again = label_folder(client, folder, out, Prompts(classes=CLASSES), progress=False)
        assert (again.labeled_now, again.skipped, again.failed) == (0, 6, 1)  # the broken one is retried
        # a run killed mid-write leaves a torn last line: only that image is labeled again
        lines = (out / RECORDS).read_text().splitlines()
        (out / RECORDS).write_text("\n".join(lines[:-1]) + "\n" + lines[-1][: len(lines[-1]) // 2])
        torn = label_folder(client, folder, out, Prompts(classes=CLASSES), progress=False)
        assert (torn.labeled_now, torn.skipped) == (1, 5)
        # a changed image is labeled again (its sha256 differs)
        changed = sorted(folder.rglob("*.png"))[0]
        Image.fromarray(next(iter(scenes("test", 1, start=50))).image).save(changed)
        assert label_folder(client, folder, out, Prompts(classes=CLASSES), progress=False).labeled_now == 1
    assert torn.instances == first.instances > 0


def test_exports_load_back_and_the_signed_manifest_catches_tampering(demo_server, folder, tmp_path):
    from pycocotools.coco import COCO

    key = provenance.generate_key(tmp_path / "key.pem")
    out = tmp_path / "out"
    with Client(demo_server.target) as client:
        summary = label_folder(client, folder, out, Prompts(classes=CLASSES), signing_key=key, progress=False)
    exports = summary.exports
    coco = COCO(str(exports["coco"]))
    assert len(coco.getAnnIds()) == summary.instances and len(coco.getImgIds()) == 6
    assert {c["name"] for c in coco.loadCats(coco.getCatIds())} <= set(CLASSES)
    flagged = sum(a["attributes"]["needs_review"] for a in coco.loadAnns(coco.getAnnIds()))
    assert flagged == summary.flagged
    tasks = json.loads(exports["label-studio"].read_text())
    assert len(tasks) == 6 and all(t["predictions"][0]["result"] for t in tasks if t["predictions"])
    public = provenance.load_public_key(Path(f"{key}.pub"))
    report = provenance.verify_path(exports["manifest"], trusted_keys=[public])
    assert report.signed and report.artifacts_checked >= 4
    assert {i["name"] for i in report.manifest["inputs"]} == {
        p.relative_to(folder).as_posix() for p in folder.rglob("*.png")
    }
    data = bytearray(exports["coco"].read_bytes())
    data[len(data) // 2] ^= 1
    exports["coco"].write_bytes(bytes(data))
    with pytest.raises(provenance.VerificationFailed, match="instances.json"):
        provenance.verify_path(exports["manifest"], trusted_keys=[public])


def test_the_cli_labels_with_an_in_process_server(folder, tmp_path):
    """Paths relative to the working directory, as the README gives them (before: the manifest looked for the
    export's files relative to the export folder, a FileNotFoundError traceback after every image was labeled)."""
    result = subprocess.run(
        [sys.executable, "-m", "service.cli", "label", os.path.relpath(folder, tmp_path), "--out", "o", "--models",
         "demo", "--offline", "--classes", ",".join(CLASSES), "--formats", "coco,yolo", "--no-progress"],
        capture_output=True, text=True, timeout=600, cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 1, result.stderr[-2000:]  # one image failed: a non-zero exit says so
    assert "7 images: 6 labeled now, 0 already done, 1 failed" in result.stdout
    assert (tmp_path / "o" / "exports" / "yolo" / "data.yaml").exists()
    report = provenance.verify_path(tmp_path / "o" / "exports" / provenance.MANIFEST_NAME, require_signature=False)
    assert report.artifacts_checked >= 2


@pytest.fixture
def nested_folder(tmp_path):
    """Images under an ``images/`` folder of their own (so the YOLO labels land in ``yolo/images/labels/``) and
    beside it."""
    root = tmp_path / "dataset"
    for n, scene in enumerate(scenes("test", 4)):
        path = root / ("images" if n % 2 else "other") / f"{scene.seed}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(scene.image).save(path)
    return root


def test_a_byte_flip_in_any_exported_file_fails_verify_and_the_linked_images_are_checked_as_inputs(
    demo_server, nested_folder, tmp_path
):
    """Every file the export wrote is an artifact, but the linked source images, which are checked against the
    manifest's inputs: an image swapped, replaced or deleted, or a file added (an image and its label that YOLO
    trains on) passed verify before."""
    from service.cli import main
    from service.labeling.run import read_records

    key = provenance.generate_key(tmp_path / "key.pem")
    with Client(demo_server.target) as client:
        summary = label_folder(client, nested_folder, tmp_path / "out", Prompts(classes=CLASSES), signing_key=key,
                               progress=False)  # fmt: skip
    exports = summary.exports["manifest"].parent
    images = list(read_records(tmp_path / "out").values())
    linked = {f"{fmt}/images/{i.file_name}" for fmt in ("yolo", "cvat") for i in images}
    everything = {p.relative_to(exports).as_posix() for p in exports.rglob("*") if p.is_file()}
    assert all((exports / name).is_symlink() for name in linked) and linked < everything
    public = f"{key}.pub"
    verify = ["verify", str(exports), "--public-key", public]
    report = provenance.verify_path(exports, trusted_keys=[provenance.load_public_key(Path(public))])
    covered = {a["name"] for a in report.manifest["artifacts"]}
    assert covered == everything - linked - {provenance.MANIFEST_NAME}
    assert report.inputs_checked == len(linked) == 2 * len(images)
    yolo_labels = {name for name in covered if name.startswith("yolo/images/labels/")}
    assert len(yolo_labels) == 2, covered  # the files the old "images" path filter left out
    main_files = ("yolo/data.yaml", "cvat/annotations.xml", "coco/instances.json", "label-studio/tasks.json")
    assert {*main_files, "label-studio/labeling_config.xml"} < covered
    assert main(verify) == 0
    for name in sorted(covered):
        path = exports / name
        original = path.read_bytes()
        flipped = bytearray(original or b"\0")  # an empty label file (a background image) gains a byte
        flipped[len(flipped) // 2] ^= 1
        path.write_bytes(bytes(flipped))
        with pytest.raises(provenance.VerificationFailed, match=name):
            provenance.verify_path(exports, trusted_keys=[provenance.load_public_key(Path(public))])
        assert main(verify) == 1, name
        path.write_bytes(original)
    assert main(verify) == 0
    first, second = sorted(nested_folder.rglob("*.png"))[:2]
    a, b = first.read_bytes(), second.read_bytes()
    first.write_bytes(b), second.write_bytes(a)  # two source images swapped: each label file now on another image
    with pytest.raises(provenance.VerificationFailed, match="not the image that was labeled"):
        provenance.verify_path(exports)
    first.write_bytes(a), second.write_bytes(b)
    linked_one = exports / sorted(linked)[0]
    target = linked_one.readlink()
    linked_one.unlink()
    with pytest.raises(provenance.VerificationFailed, match=f"{sorted(linked)[0]}: missing"):
        provenance.verify_path(exports)
    linked_one.symlink_to(target)
    (exports / "yolo" / "images" / "extra.png").write_bytes(b"an image added")
    with pytest.raises(provenance.VerificationFailed, match=r"1 file\(s\) the manifest does not cover .*extra.png"):
        provenance.verify_path(exports)
    (exports / "yolo" / "images" / "extra.png").unlink()
    assert main(verify) == 0


def test_a_failed_export_leaves_the_previous_one_whole_and_a_first_one_absent(demo_server, folder, tmp_path):
    from service.labeling.run import FORMATS, read_records, write_exports

    with Client(demo_server.target) as client:
        summary = label_folder(client, folder, tmp_path / "out", Prompts(classes=CLASSES), progress=False)
        exports = summary.exports["manifest"].parent
        before = _snapshot(exports)
        images = sorted(read_records(tmp_path / "out").values(), key=lambda i: i.file_name)
        removed = (folder / images[-1].file_name).read_bytes()
        (folder / images[-1].file_name).unlink()  # COCO needs no image, YOLO does: it fails after COCO is written
        other = Prompts(classes=CLASSES[::-1])  # another category order: a COCO file that differs
        for out in (exports, tmp_path / "first"):
            with pytest.raises(FileNotFoundError, match=images[-1].file_name):
                write_exports(client, images, folder, out, other, FORMATS, "/x/", None)
    assert _snapshot(exports) == before
    (folder / images[-1].file_name).write_bytes(removed)  # the export links to it
    provenance.verify_path(exports, require_signature=False)
    assert not (tmp_path / "first").exists()
    assert sorted(p.name for p in exports.parent.iterdir()) == sorted(["exports", RECORDS, ERRORS, RUN])  # no leftovers


def _snapshot(folder):
    """Every file under ``folder``: its bytes, or for a link its target (a removed source leaves it dangling)."""
    return {p: str(p.readlink()) if p.is_symlink() else p.read_bytes() for p in folder.rglob("*") if not p.is_dir()}


def test_unprintable_prompts_stop_the_label_command_before_anything_runs(demo_server, folder, tmp_path):
    """The issue's `detseg label --text $'red \\x01star'`: a one-line error naming the field, exit 2, nothing
    written; the library and the client get the same refusal."""
    from service.client import RequestFailed
    from service.errors import InvalidInput

    result = subprocess.run(
        [sys.executable, "-m", "service.cli", "label", str(folder), "--out", str(tmp_path / "o"), "--models", "demo",
         "--offline", "--text", "red \x01star", "--no-progress"],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert result.returncode == 2, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    assert "texts[0]: contains a control character (U+0001); labels must be printable text" in result.stderr
    assert not (tmp_path / "o").exists()
    with Client(demo_server.target) as client:
        with pytest.raises(InvalidInput, match=r"classes\[1\]: contains a control character \(U\+001B\)"):
            label_folder(client, folder, tmp_path / "o", Prompts(classes=("circle", "star\x1b[2J")), progress=False)
        assert not (tmp_path / "o").exists()
        image = sorted(folder.rglob("*.png"))[0].read_bytes()
        with pytest.raises(RequestFailed, match=r"INVALID_ARGUMENT: texts\[0\]: contains a format character"):
            client.segment(image, texts=["red\u200bstar"])


def test_a_folder_that_is_none_or_holds_no_image_is_refused_before_anything_starts(tmp_path, capsys):
    """(It labeled 0 images, wrote four empty exports and exited 0: a mistyped folder looked like success.)"""
    from service.cli import main as cli_main

    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("no image here")
    for folder, says in (("missing", "no such folder"), ("empty", "no images under it (.jpg, .jpeg, .png, .webp)")):
        out = tmp_path / f"out-{folder}"
        argv = ["label", str(tmp_path / folder), "--out", str(out), "--classes", "circle", "--target", "127.0.0.1:1"]
        assert cli_main(argv) == 2
        assert capsys.readouterr().err == f"detseg label: {tmp_path / folder}: {says}\n"
        assert not out.exists()


def test_a_signing_key_that_is_none_is_refused_before_any_image_is_labeled(demo_server, folder, tmp_path, capsys):
    """(It was read when the manifest was written: after every image had been labeled.)"""
    from service.cli import main as cli_main

    public = provenance.generate_key(tmp_path / "key").with_name("key.pub")  # the public half given by mistake
    out = tmp_path / "out"
    argv = ["label", str(folder), "--out", str(out), "--signing-key", str(public), "--target", demo_server.target]
    assert cli_main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"detseg label: {public}: not an unencrypted Ed25519 private key in PEM (")
    assert not out.exists()
    with Client(demo_server.target) as client, pytest.raises(ValueError, match="key.pub: not an unencrypted"):
        label_folder(client, folder, out, Prompts(classes=CLASSES), signing_key=public, progress=False)
    assert not out.exists()


def test_names_the_server_takes_as_one_class_are_one_category_spelled_as_its_answers(demo_server, folder, tmp_path):
    """ "Circle", "star_" and a text "circle" asked of the closed demo detector: the answers are labeled "circle" and
    "star", and so are the categories (they were "Circle", "star_", "circle", "star": two empty categories, YOLO's
    class indices shifted, and a COCO export `detseg eval` refused as naming one class twice)."""
    from service.evaluation.dataset import load_dataset

    out = tmp_path / "out"
    prompts = Prompts(classes=("Circle", "star_", " SQUARE"), texts=("circle",))
    with Client(demo_server.target) as client:
        summary = label_folder(client, folder, out, prompts, formats=("coco", "yolo"), progress=False)
    coco = json.loads(summary.exports["coco"].read_text())
    assert [c["name"] for c in coco["categories"]] == ["circle", "star", "square"]
    records = [json.loads(line) for line in (out / RECORDS).read_text().splitlines()]
    labels = {i["label"] for r in records for i in r["instances"]}
    assert "circle" in labels and labels <= {"circle", "star", "square"}, labels
    dataset = load_dataset(summary.exports["coco"], folder)
    assert sorted(dataset.categories.values()) == ["circle", "square", "star"]
    names = yaml.safe_load(summary.exports["yolo"].read_text())["names"]
    assert names == {0: "circle", 1: "star", 2: "square"}


def test_an_object_a_class_and_a_text_both_find_is_one_annotation(demo_server, folder, tmp_path):
    """The server answers once per prompt ("circle" as a class and as a text: two instances, one box, one mask); a
    dataset holds one annotation per object and label (each circle was two identical annotations)."""
    with Client(demo_server.target) as client:
        once = label_folder(
            client, folder, tmp_path / "a", Prompts(classes=("circle",)), formats=("coco",), progress=False
        )
        both = Prompts(classes=("circle",), texts=("circle",))
        twice = label_folder(client, folder, tmp_path / "b", both, formats=("coco",), progress=False)
        answered = sum(
            len(client.segment(p, classes=["circle"], texts=["circle"])) for p in sorted(folder.rglob("*.png"))
        )
    assert once.instances > 0 and answered == 2 * once.instances
    assert twice.instances == once.instances
    assert len(json.loads(twice.exports["coco"].read_text())["annotations"]) == once.instances


def test_a_changed_image_that_then_fails_keeps_no_labels_of_the_image_it_replaced(demo_server, folder, tmp_path):
    """Its old record stayed and was exported (and signed, with the old sha256) on the new file."""
    from service.labeling.run import read_records

    out = tmp_path / "out"
    changed = sorted(folder.rglob("*.png"))[0]
    name = changed.relative_to(folder).as_posix()
    with Client(demo_server.target) as client:
        label_folder(client, folder, out, Prompts(classes=CLASSES), formats=("coco",), progress=False)
        changed.write_bytes(changed.read_bytes()[:200])  # truncated: the server refuses it
        again = label_folder(client, folder, out, Prompts(classes=CLASSES), formats=("coco",), progress=False)
    assert (again.labeled_now, again.failed) == (0, 2)  # it and broken.jpg
    coco = json.loads(again.exports["coco"].read_text())
    assert name not in {i["file_name"] for i in coco["images"]}
    manifest = provenance.verify_path(again.exports["manifest"], require_signature=False).manifest
    assert name not in {i["name"] for i in manifest["inputs"]}
    assert name in read_records(out)  # the log keeps what was answered; only the exports leave it out


def test_a_rerun_with_other_prompts_is_refused_and_the_runs_own_folder_is_not_labeled(demo_server, folder, tmp_path):
    """A re-run into the same --out with another threshold kept the first run's records and signed them all as made
    at the new one (and with other models, by those); an --out inside the folder labeled the export's own copies
    of the images as new images on every re-run."""
    out = folder / "labels"  # inside the folder labeled
    with Client(demo_server.target) as client:
        first = label_folder(client, folder, out, Prompts(classes=CLASSES), formats=("yolo",), progress=False)
        again = label_folder(client, folder, out, Prompts(classes=CLASSES), formats=("yolo",), progress=False)
        before = (out / RECORDS).read_bytes()
        default = client.list_models().defaults.score_threshold
        other = Prompts(classes=CLASSES, score_threshold=0.9)
        with pytest.raises(ValueError, match=r"holds the records of another run \(its score_threshold differed"):
            label_folder(client, folder, out, other, formats=("yolo",), progress=False)
    assert first.images == again.images == 7 and (again.labeled_now, again.skipped) == (0, 6)
    assert (out / RECORDS).read_bytes() == before
    assert json.loads((out / RUN).read_text())["score_threshold"] == pytest.approx(default)


def test_file_names_and_prompts_every_image_would_fail_on_are_refused_before_any_is_labeled(demo_server, tmp_path):
    """Names the exports refuse (a YOLO label file two images would share) were found after every image was labeled,
    and no export was written; a class the closed detector does not know was sent with every image (each refused)
    and an empty export signed. A Persian name spelled with a zero-width non-joiner is a name like any other."""
    from service.client import RequestFailed

    root = tmp_path / "images"
    root.mkdir()
    scene = next(iter(scenes("test", 1)))
    Image.fromarray(scene.image).save(root / "نامه\u200cها.png")
    with Client(demo_server.target) as client:
        labeled = label_folder(client, root, tmp_path / "ok", Prompts(classes=CLASSES), progress=False)
        assert labeled.labeled_now == 1 and "yolo" in labeled.exports
        Image.fromarray(scene.image).save(root / "photo.png")
        Image.fromarray(scene.image).save(root / "photo.jpg")
        with pytest.raises(ValueError, match="'photo.jpg' and 'photo.png' would share one YOLO label file"):
            label_folder(client, root, tmp_path / "stems", Prompts(classes=CLASSES), progress=False)
        assert not (tmp_path / "stems").exists()
        with pytest.raises(RequestFailed, match=r"INVALID_ARGUMENT: classes\[1\]: unknown class 'cirlce'"):
            label_folder(client, root, tmp_path / "typo", Prompts(classes=("circle", "cirlce")), formats=("coco",),
                         progress=False)  # fmt: skip
        assert not (tmp_path / "typo").exists()


def test_only_the_runs_own_exports_are_left_out_of_the_images_to_label(tmp_path):
    """The export's placed copies inside the labeled folder were labeled again as new images on every re-run; the
    first fix left out everything under --out, and so every image where --out was the folder or above it."""
    from service.labeling.run import image_files

    folder = tmp_path / "data" / "imgs"
    (folder / "labels" / "exports" / "yolo" / "images").mkdir(parents=True)
    (folder / "labels" / ".exports.0a1b.partial").mkdir()
    for path in (folder / "a.png", folder / "labels" / "exports" / "yolo" / "images" / "a.png",
                 folder / "labels" / ".exports.0a1b.partial" / "a.png"):  # fmt: skip
        Image.new("RGB", (4, 4)).save(path)
    for out in (folder / "labels", folder, tmp_path / "data", None):
        assert [p.relative_to(folder).as_posix() for p in image_files(folder, out)] == (
            ["a.png"] if out == folder / "labels" else
            ["a.png", "labels/.exports.0a1b.partial/a.png", "labels/exports/yolo/images/a.png"]
        ), out  # fmt: skip


def test_records_that_do_not_say_what_made_them_are_not_taken_for_this_runs(tmp_path):
    """A --out written before run.json existed was resumed by any models and prompts, and its records signed as
    theirs."""
    from service.labeling.run import check_same_run

    check_same_run(tmp_path, {"models": []})  # a new folder
    (tmp_path / RECORDS).write_text("")
    with pytest.raises(ValueError, match="holds records of a run that did not say what made them"):
        check_same_run(tmp_path, {"models": []})
