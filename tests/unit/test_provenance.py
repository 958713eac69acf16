"""Provenance manifests, Ed25519 signatures and their verification, with real keys and real files (no mocks)."""

from __future__ import annotations

import base64
import copy
import hashlib
import json
import math
import os
import re
import stat
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from service import provenance as pv
from service.provenance import VerificationFailed

DETECTOR_WEIGHTS = b"detector weights \x00\x01\x02" * 100
SEGMENTER_WEIGHTS = b"segmenter weights \xff\xfe" * 100
CREATED = "2026-01-31T12:00:00.000Z"


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _base_manifest(
    kind: str = "export", artifacts: list[dict[str, Any]] | None = None, placed: list[str] | None = None
) -> dict[str, Any]:
    """``placed``: the export's PLACED_INPUTS (None: a manifest written before it existed)."""
    parameters: dict[str, Any] = {"score_threshold": 0.25, "iou_threshold": 0.7, "format": "coco"}
    if placed is not None:
        parameters[pv.PLACED_INPUTS] = placed
    return pv.manifest(
        kind=kind,
        models=[
            {"role": "detector", "name": "yolo11n", "version": "8.4.0", "weights_sha256": _sha(DETECTOR_WEIGHTS)},
            {"role": "segmenter", "name": "sam2.1_t", "version": "2.1", "weights_sha256": _sha(SEGMENTER_WEIGHTS)},
        ],
        inputs=[{"name": "images/a.jpg", "sha256": _sha(b"image a")}],
        prompts={"classes": ["person", "chat noir"], "boxes": [[1.5, 2.0, 30.25, 40.0]]},
        parameters=parameters,
        artifacts=artifacts or [],
        created=CREATED,
        detseg_version="0.1.0",
    )


@pytest.fixture(scope="module")
def key() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.generate()


@pytest.fixture(scope="module")
def other_key() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.generate()


# --- canonical JSON --------------------------------------------------------------------------------------------


def test_canonical_json_sorts_keys_at_every_level_without_whitespace() -> None:
    obj = {"b": 1, "a": [3, {"z": None, "y": True}], "c": {"é": -2, "B": "x", "a": 0.5}}
    assert pv.canonical_json(obj) == b'{"a":[3,{"y":true,"z":null}],"b":1,"c":{"B":"x","a":0.5,"\xc3\xa9":-2}}'


def test_canonical_json_writes_unicode_as_utf8_and_escapes_only_what_json_requires() -> None:
    out = pv.canonical_json({"label": "chat noir 猫 é 🐱", "quote": 'a"b\\c\n\x01'})
    assert out == '{"label":"chat noir 猫 é 🐱","quote":"a\\"b\\\\c\\n\\u0001"}'.encode()


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_canonical_json_rejects_nan_and_infinity_even_nested(bad: float) -> None:
    with pytest.raises(ValueError, match=r"\$\.a\[1\]"):
        pv.canonical_json({"a": [1.0, bad]})


def test_canonical_json_rejects_non_str_keys() -> None:
    with pytest.raises(TypeError, match="str keys"):
        pv.canonical_json({1: "one", "1": "also one"})


def test_equal_objects_give_the_same_bytes_whatever_the_insertion_order() -> None:
    a = {"x": [1, 2], "y": {"p": 0.1, "q": "s"}}
    b = {"y": {"q": "s", "p": 0.1}, "x": (1, 2)}
    assert pv.canonical_json(a) == pv.canonical_json(b) == pv.canonical_json(copy.deepcopy(a))


@pytest.mark.parametrize("value", [0.1, 1 / 3, 0.8999999761581421, 1e-7, 123456.789, -2.5e300, 1.0])
def test_floats_are_written_as_shortest_repr_and_round_trip(value: float) -> None:
    out = pv.canonical_json([value])
    assert out == f"[{value!r}]".encode()
    assert json.loads(out)[0] == value


def test_sha256_hex_matches_a_known_vector() -> None:
    assert pv.sha256_hex(b"abc") == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"


# --- manifests -------------------------------------------------------------------------------------------------


def test_manifest_fills_schema_and_created_and_keeps_the_callers_fields() -> None:
    m = pv.manifest(
        kind="response",
        models=[{"role": "detector", "name": "d", "version": "1", "weights_sha256": "a" * 64}],
        inputs=[{"name": "image", "sha256": "b" * 64}],
        prompts={"text": "cat"},
        parameters={"max_instances": 5},
        artifacts=[pv.content_artifact("instances", [])],
        detseg_version="0.1.0",
    )
    assert m["schema"] == "detseg.manifest/v1"
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", m["created"])
    assert m["artifacts"] == [{"name": "instances", "sha256": pv.sha256_hex(b"[]"), "bytes": 2}]
    assert set(m) == {
        "schema", "kind", "created", "detseg_version", "models", "inputs", "prompts", "parameters", "artifacts",
    }  # fmt: skip
    assert _base_manifest()["created"] == CREATED


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda f: f["models"][0].pop("weights_sha256"), r"models\[0\] must have exactly the keys"),
        (lambda f: f["models"][0].update(weights_sha256="A" * 64), r"models\[0\]\.weights_sha256 must be 64"),
        (lambda f: f["models"][0].update(version=""), r"models\[0\]\.version must be a non-empty str"),
        (lambda f: f["inputs"][0].update(extra=1), r"inputs\[0\] must have exactly the keys"),
        (lambda f: f["artifacts"][0].update(bytes=-1), r"artifacts\[0\]\.bytes must be an int >= 0"),
        (lambda f: f["artifacts"][0].update(name="../x.json"), r"'\.\.' in path refused"),
        (lambda f: f["artifacts"][0].update(name="/etc/passwd"), "absolute path refused"),
        (lambda f: f["artifacts"].append(dict(f["artifacts"][0])), "more than once"),
        (lambda f: f.update(kind="export-ish"), "kind must be one of"),
        (lambda f: f.update(created="2026-01-31 12:00:00+00:00"), "RFC 3339 UTC"),
        (lambda f: f["parameters"].update(threshold=math.nan), "not canonical-JSON serialisable"),
    ],
)
def test_manifest_rejects_malformed_fields(change: Callable[[dict[str, Any]], Any], message: str) -> None:
    fields: dict[str, Any] = {
        "kind": "export",
        "models": [{"role": "detector", "name": "d", "version": "1", "weights_sha256": "a" * 64}],
        "inputs": [{"name": "a.jpg", "sha256": "b" * 64}],
        "prompts": {},
        "parameters": {},
        "artifacts": [{"name": "x.json", "sha256": "c" * 64, "bytes": 3}],
        "created": CREATED,
        "detseg_version": "0.1.0",
    }
    pv.manifest(**copy.deepcopy(fields))  # the unchanged fields are valid
    change(fields)
    with pytest.raises(ValueError, match=message):
        pv.manifest(**fields)


# --- signatures ------------------------------------------------------------------------------------------------


def test_signed_envelope_verifies_after_a_pretty_printed_json_round_trip(key: Ed25519PrivateKey) -> None:
    m = _base_manifest()
    env = pv.sign(m, key)
    assert env["signature"]["algorithm"] == "Ed25519"
    assert len(base64.b64decode(env["signature"]["public_key"])) == 32
    reread = json.loads(json.dumps(env, indent=4, ensure_ascii=True))  # other whitespace and escaping
    result = pv.verify_envelope(reread)
    assert result == pv.VerifyResult(signed=True, key_id=pv.key_id(key.public_key()), manifest=m)


def _flip_b64(text: str) -> str:
    raw = bytearray(base64.b64decode(text))
    raw[0] ^= 1
    return base64.b64encode(bytes(raw)).decode()


def _swap_in_public_key(env: dict[str, Any], other: Ed25519PrivateKey, with_key_id: bool) -> None:
    public = other.public_key()
    raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    env["signature"]["public_key"] = base64.b64encode(raw).decode()
    if with_key_id:
        env["signature"]["key_id"] = pv.key_id(public)


TAMPERINGS: dict[str, Callable[[dict[str, Any], Ed25519PrivateKey], Any]] = {
    "model weights_sha256": lambda e, o: e["manifest"]["models"][1].update(weights_sha256="0" * 64),
    "prompt": lambda e, o: e["manifest"]["prompts"]["classes"].append("dog"),
    "parameter": lambda e, o: e["manifest"]["parameters"].update(score_threshold=0.2500001),
    "artifact digest": lambda e, o: e["manifest"]["artifacts"][0].update(sha256="1" * 64),
    "created": lambda e, o: e["manifest"].update(created="2026-01-31T12:00:01.000Z"),
    "signature value": lambda e, o: e["signature"].update(value=_flip_b64(e["signature"]["value"])),
    "public key and key_id": lambda e, o: _swap_in_public_key(e, o, with_key_id=True),
    "public key only": lambda e, o: _swap_in_public_key(e, o, with_key_id=False),
    "algorithm": lambda e, o: e["signature"].update(algorithm="RS256"),
    "extra envelope field": lambda e, o: e.update(note="trust me"),
}


@pytest.mark.parametrize("tampering", sorted(TAMPERINGS))
def test_any_tampering_of_a_signed_envelope_fails(
    tampering: str, key: Ed25519PrivateKey, other_key: Ed25519PrivateKey
) -> None:
    env = pv.sign(_base_manifest(artifacts=[{"name": "a.json", "sha256": "f" * 64, "bytes": 1}]), key)
    pv.verify_envelope(env)
    TAMPERINGS[tampering](env, other_key)
    with pytest.raises(VerificationFailed):
        pv.verify_envelope(env)


def test_the_signature_check_names_the_failure(key: Ed25519PrivateKey, other_key: Ed25519PrivateKey) -> None:
    env = pv.sign(_base_manifest(), key)
    env["manifest"]["prompts"]["classes"] = ["dog"]
    with pytest.raises(VerificationFailed, match="does not match the manifest"):
        pv.verify_envelope(env)
    env = pv.sign(_base_manifest(), key)
    _swap_in_public_key(env, other_key, with_key_id=False)
    with pytest.raises(VerificationFailed, match="key_id .* is not that of its public key"):
        pv.verify_envelope(env)


def test_a_key_outside_trusted_keys_is_refused_and_a_trusted_one_accepted(
    key: Ed25519PrivateKey, other_key: Ed25519PrivateKey
) -> None:
    env = pv.sign(_base_manifest(), other_key)
    with pytest.raises(VerificationFailed, match=f"signed by an untrusted key {pv.key_id(other_key.public_key())}"):
        pv.verify_envelope(env, trusted_keys=[key.public_key()])
    assert pv.verify_envelope(env, trusted_keys=[key.public_key(), other_key.public_key()]).signed


def test_an_unsigned_envelope_verifies_only_when_no_signature_is_required() -> None:
    env = pv.envelope(_base_manifest())
    assert set(env) == {"manifest"}
    with pytest.raises(VerificationFailed, match="not signed"):
        pv.verify_envelope(env)
    result = pv.verify_envelope(env, require_signature=False)
    assert (result.signed, result.key_id) == (False, None)


def test_a_signed_envelope_with_a_bad_signature_fails_even_when_signatures_are_optional(
    key: Ed25519PrivateKey,
) -> None:
    env = pv.envelope(_base_manifest(), key)
    env["manifest"]["parameters"]["format"] = "yolo"
    with pytest.raises(VerificationFailed):
        pv.verify_envelope(env, require_signature=False)


# --- keys ------------------------------------------------------------------------------------------------------


def test_generate_key_writes_a_private_0600_pem_and_a_public_pem_that_load_back(tmp_path: Path) -> None:
    path = pv.generate_key(tmp_path / "keys" / "server.key")
    pub = tmp_path / "keys" / "server.key.pub"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert path.read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")
    assert pub.read_bytes().startswith(b"-----BEGIN PUBLIC KEY-----")
    private, public = pv.load_private_key(path), pv.load_public_key(pub)
    assert pv.key_id(private.public_key()) == pv.key_id(public) == pv.key_id(pv.load_public_key(pub.read_bytes()))
    assert re.fullmatch(r"[0-9a-f]{16}", pv.key_id(public))
    env = pv.sign(_base_manifest(), private)
    assert pv.verify_envelope(env, trusted_keys=[public]).key_id == pv.key_id(public)


def test_generate_key_never_overwrites_a_key(tmp_path: Path) -> None:
    path = pv.generate_key(tmp_path / "server.key")
    before = path.read_bytes()
    with pytest.raises(FileExistsError):
        pv.generate_key(path)
    assert path.read_bytes() == before


def test_key_id_is_the_sha256_prefix_of_the_raw_public_key(key: Ed25519PrivateKey) -> None:
    raw = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    assert pv.key_id(key.public_key()) == hashlib.sha256(raw).hexdigest()[:16]


def test_a_non_ed25519_key_is_refused(tmp_path: Path) -> None:
    ec_key = ec.generate_private_key(ec.SECP256R1())
    path = tmp_path / "ec.key"
    path.write_bytes(
        ec_key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    with pytest.raises(ValueError, match="not an Ed25519 private key"):
        pv.load_private_key(path)
    pem = ec_key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    with pytest.raises(ValueError, match="Ed25519 public key"):
        pv.load_public_key(pem)


# --- exports ---------------------------------------------------------------------------------------------------


@pytest.fixture
def export(tmp_path: Path, key: Ed25519PrivateKey) -> Path:
    """A small COCO-style export signed with ``key``; returns its folder."""
    folder = tmp_path / "export"
    (folder / "annotations").mkdir(parents=True)
    coco = {
        "images": [{"id": 1, "file_name": "a.jpg", "width": 64, "height": 48}],
        "annotations": [
            {"id": 1, "image_id": 1, "category_id": 1, "bbox": [1.5, 2.0, 20.0, 10.0], "area": 200.0, "iscrowd": 1,
             "segmentation": {"size": [48, 64], "counts": "PPYo0"}, "score": 0.9},
        ],
        "categories": [{"id": 1, "name": "chat noir"}],
    }  # fmt: skip
    (folder / "annotations" / "instances.json").write_text(json.dumps(coco, ensure_ascii=False), encoding="utf-8")
    (folder / "classes.txt").write_text("chat noir\n", encoding="utf-8")
    (folder / "images").mkdir()
    (folder / "images" / "a.jpg").write_bytes(b"\xff\xd8\xff not really a jpeg \xff\xd9")
    files = [folder / "annotations" / "instances.json", Path("classes.txt"), Path("images/a.jpg")]
    pv.write_signed_export(folder, files, _base_manifest(), key=key)
    return folder


@pytest.fixture
def weights(tmp_path: Path) -> dict[str, Path]:
    out = {}
    for name, data in (("yolo11n.pt", DETECTOR_WEIGHTS), ("sam2.1_t.pt", SEGMENTER_WEIGHTS), ("other.pt", b"other")):
        out[name] = tmp_path / name
        out[name].write_bytes(data)
    return out


def test_a_signed_export_verifies_from_its_folder_or_its_manifest_file(export: Path, key: Ed25519PrivateKey) -> None:
    envelope = json.loads((export / "detseg-manifest.json").read_text(encoding="utf-8"))
    artifacts = envelope["manifest"]["artifacts"]
    assert [a["name"] for a in artifacts] == ["annotations/instances.json", "classes.txt", "images/a.jpg"]
    data = (export / "classes.txt").read_bytes()
    assert artifacts[1] == {"name": "classes.txt", "sha256": _sha(data), "bytes": len(data)}
    for target in (export, export / "detseg-manifest.json"):
        report = pv.verify_path(target, trusted_keys=[key.public_key()])
        assert (report.signed, report.key_id) == (True, pv.key_id(key.public_key()))
        assert (report.artifacts_checked, report.weights_checked, report.inputs_checked) == (3, 0, 0)
        assert report.manifest["prompts"]["classes"] == ["person", "chat noir"]


def test_flipping_one_byte_of_an_exported_file_fails_naming_that_file(export: Path) -> None:
    path = export / "annotations" / "instances.json"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(VerificationFailed, match=r"^annotations/instances\.json: sha256 mismatch \(tampered"):
        pv.verify_path(export)


def test_a_changed_size_or_a_deleted_file_fails_and_every_failing_file_is_listed(export: Path) -> None:
    with (export / "classes.txt").open("ab") as f:
        f.write(b"dog\n")
    (export / "images" / "a.jpg").unlink()
    with pytest.raises(VerificationFailed) as info:
        pv.verify_path(export)
    assert info.value.problems == (
        "classes.txt: size 14 bytes, expected 10 (tampered or replaced)",
        "images/a.jpg: missing (deleted or moved)",
    )
    assert str(info.value).startswith("2 problems: ")


def test_an_edited_manifest_file_fails_its_signature(export: Path) -> None:
    path = export / "detseg-manifest.json"
    path.write_text(path.read_text(encoding="utf-8").replace('"coco"', '"yolo"'), encoding="utf-8")
    with pytest.raises(VerificationFailed, match="does not match the manifest"):
        pv.verify_path(export)


def test_a_manifest_file_with_duplicate_keys_is_refused(export: Path) -> None:
    path = export / "detseg-manifest.json"
    text = path.read_text(encoding="utf-8")
    path.write_text(text.replace('"kind": "export",', '"kind": "export", "kind": "response",'), encoding="utf-8")
    with pytest.raises(VerificationFailed, match="duplicate key 'kind'"):
        pv.verify_path(export)


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("../outside.txt", r"'\.\.' in path refused"),
        ("images/../../outside.txt", r"'\.\.' in path refused"),
        ("/tmp/outside.txt", "absolute path refused"),
        ("images\\a.jpg", "backslash"),
        ("./classes.txt", "'.' path segment refused"),
    ],
)
def test_an_artifact_path_that_could_leave_the_folder_is_refused_even_when_signed(
    export: Path, key: Ed25519PrivateKey, name: str, message: str
) -> None:
    outside = export.parent / "outside.txt"
    outside.write_bytes(b"secret")
    path = export / "detseg-manifest.json"
    env = json.loads(path.read_text(encoding="utf-8"))
    env["manifest"]["artifacts"].append({"name": name, "sha256": _sha(b"secret"), "bytes": 6})
    pv.write_envelope(path, pv.sign(env["manifest"], key))  # the attacker holds the key: still refused
    with pytest.raises(VerificationFailed, match=message):
        pv.verify_path(export)


def test_an_artifact_symlinked_outside_the_folder_is_refused(export: Path, key: Ed25519PrivateKey) -> None:
    outside = export.parent / "outside.txt"
    outside.write_bytes(b"secret")
    (export / "link.txt").symlink_to(outside)
    with pytest.raises(ValueError, match="not inside the export folder"):
        pv.write_signed_export(export, [Path("link.txt")], _base_manifest(), key=key)
    path = export / "detseg-manifest.json"
    env = json.loads(path.read_text(encoding="utf-8"))
    env["manifest"]["artifacts"].append({"name": "link.txt", "sha256": _sha(b"secret"), "bytes": 6})
    pv.write_envelope(path, pv.sign(env["manifest"], key))
    with pytest.raises(VerificationFailed, match="link.txt: resolves outside"):
        pv.verify_path(export)


def test_weights_must_match_a_model_of_the_manifest(export: Path, weights: dict[str, Path]) -> None:
    report = pv.verify_path(export, weights=[weights["yolo11n.pt"], weights["sam2.1_t.pt"]])
    assert report.weights_checked == 2
    with pytest.raises(VerificationFailed) as info:
        pv.verify_path(export, weights=[weights["yolo11n.pt"], weights["other.pt"]])
    message = str(info.value)
    assert message.startswith(f"{weights['other.pt']}: weights sha256 {_sha(b'other')} matches no model")
    assert f"detector yolo11n 8.4.0 {_sha(DETECTOR_WEIGHTS)}" in message
    assert f"segmenter sam2.1_t 2.1 {_sha(SEGMENTER_WEIGHTS)}" in message


def test_a_file_the_manifest_does_not_cover_fails(export: Path, key: Ed25519PrivateKey) -> None:
    """An export's folder is what was signed: a file added there (an image and its label, which YOLO trains on) was
    only reported. A manifest written before PLACED_INPUTS existed (its placed images not covered) still verifies as
    it did then: what it does not cover is reported."""
    (export / "images" / "b.jpg").write_bytes(b"extra")
    assert pv.verify_path(export).unlisted == ("images/b.jpg",)  # the fixture's manifest: written as before
    files = [Path("annotations/instances.json"), Path("classes.txt"), Path("images/a.jpg")]
    pv.write_signed_export(export, files, _base_manifest(placed=[]), key=key)
    with pytest.raises(VerificationFailed, match=r"1 file\(s\) the manifest does not cover \(added\): images/b.jpg"):
        pv.verify_path(export)


def test_an_unsigned_export_verifies_only_when_no_signature_is_required(export: Path, tmp_path: Path) -> None:
    files = [Path("annotations/instances.json"), Path("classes.txt"), Path("images/a.jpg")]
    pv.write_signed_export(export, files, _base_manifest())
    with pytest.raises(VerificationFailed, match="not signed"):
        pv.verify_path(export)
    report = pv.verify_path(export, require_signature=False)
    assert (report.signed, report.key_id, report.artifacts_checked) == (False, None, 3)
    with pytest.raises(VerificationFailed, match="no such manifest file"):
        pv.verify_path(tmp_path)


def test_write_signed_export_refuses_a_manifest_with_artifacts_or_of_another_kind(export: Path) -> None:
    with pytest.raises(ValueError, match="must have no artifacts"):
        pv.write_signed_export(export, [], _base_manifest(artifacts=[{"name": "x", "sha256": "a" * 64, "bytes": 1}]))
    with pytest.raises(ValueError, match="expected 'export'"):
        pv.write_signed_export(export, [], _base_manifest(kind="response"))


def test_a_response_manifest_names_no_files(tmp_path: Path, key: Ed25519PrivateKey) -> None:
    instances = [{"label": "cat", "score": 0.5}]
    m = _base_manifest(kind="response", artifacts=[pv.content_artifact("instances", instances)])
    path = pv.write_envelope(tmp_path / "response.manifest.json", pv.sign(m, key))
    report = pv.verify_path(path)
    assert (report.artifacts_checked, report.manifest["artifacts"][0]["sha256"]) == (
        0,
        pv.instances_digest(instances),
    )
    assert not os.path.exists(tmp_path / "instances")


# --- response digests -----------------------------------------------------------------------------------------


def _instances() -> list[dict[str, Any]]:
    return [
        {"label": "cat", "class_id": 0, "score": 0.8999999761581421, "box": [1.5, 2.0, 30.25, 40.0],
         "mask": {"counts": "PPYo0a1N", "size": [48, 64]}, "mask_score": 0.95, "source": "detector",
         "review": {"needs_review": False, "reasons": []}},
        {"label": "dog", "class_id": 1, "score": 0.5, "box": [3.0, 4.0, 10.0, 12.0],
         "mask": {"counts": "0Pd02N", "size": [48, 64]}, "mask_score": 0.75, "source": "text",
         "review": {"needs_review": True, "reasons": ["low_mask_score"]}},
    ]  # fmt: skip


CHANGES: dict[str, Callable[[list[dict[str, Any]]], Any]] = {
    "mask counts": lambda i: i[0]["mask"].update(counts="PPYo0a1O"),
    "mask size": lambda i: i[0]["mask"].update(size=[64, 48]),
    "label": lambda i: i[1].update(label="cat"),
    "score": lambda i: i[0].update(score=0.9),
    "box": lambda i: i[1]["box"].__setitem__(2, 10.5),
    "review": lambda i: i[1]["review"].update(needs_review=False),
    "instance order": lambda i: i.reverse(),
}


@pytest.mark.parametrize("change", sorted(CHANGES))
def test_instances_digest_changes_with_any_sent_value(change: str) -> None:
    instances = _instances()
    CHANGES[change](instances)
    assert pv.instances_digest(instances) != pv.instances_digest(_instances())


def test_instances_digest_ignores_the_order_of_keys() -> None:
    reordered = [{k: dict(reversed(v.items())) if isinstance(v, dict) else v for k, v in reversed(i.items())}
                 for i in _instances()]  # fmt: skip
    assert list(reordered[0]) != list(_instances()[0])
    assert pv.instances_digest(reordered) == pv.instances_digest(_instances())
    assert pv.instances_digest(_instances()) == _sha(pv.canonical_json(_instances()))


def test_files_under_a_relative_folder_sign_from_any_working_directory(
    export: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``files_under`` gives paths as ``write_signed_export`` reads them (relative to the folder): `detseg label
    --out labels` and `detseg adapt --out adapted/v1` sign a folder named relative to the working directory
    (before: FileNotFoundError, the file looked for under the folder twice)."""
    monkeypatch.chdir(tmp_path)
    folder = Path(export.name)
    files = [p for p in pv.files_under(folder) if p.name != pv.MANIFEST_NAME]
    assert [p.as_posix() for p in files] == ["annotations/instances.json", "classes.txt", "images/a.jpg"]
    pv.write_signed_export(folder, files, _base_manifest())
    assert pv.verify_path(folder, require_signature=False).artifacts_checked == 3


def test_a_signing_key_every_user_can_read_is_loaded_with_a_warning(tmp_path: Path, caplog) -> None:
    path = pv.generate_key(tmp_path / "server.key")
    with caplog.at_level("WARNING", logger="service.provenance.keys"):
        pv.load_private_key(path)  # 0600
        os.chmod(path, 0o640)  # a group (a Kubernetes secret with fsGroup): the owner's choice
        pv.load_private_key(path)
        assert not caplog.records
        os.chmod(path, 0o644)
        pv.load_private_key(path)
    assert [r.getMessage() for r in caplog.records] == [
        f"signing key {path} is readable by every user (mode 0644): chmod 600 it"
    ]
