"""detseg label: a folder through the demo server, resumable, per-image errors kept, exports loaded back by
their own tools, and a signed manifest over them."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from service import provenance
from service.client import Client
from service.labeling.run import ERRORS, RECORDS, Prompts, label_folder
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
    result = subprocess.run(
        [sys.executable, "-m", "service.cli", "label", str(folder), "--out", str(tmp_path / "o"), "--models", "demo",
         "--offline", "--classes", ",".join(CLASSES), "--formats", "coco,yolo", "--no-progress"],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert result.returncode == 1, result.stderr[-2000:]  # one image failed: a non-zero exit says so
    assert "7 images: 6 labeled now, 0 already done, 1 failed" in result.stdout
    assert (tmp_path / "o" / "exports" / "yolo" / "data.yaml").exists()
