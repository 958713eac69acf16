"""Provenance manifests of responses and exports, signed with Ed25519: real server, real keys, tampering."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from service import provenance
from service.client import Client
from service.provenance.response import verify_response
from tests.conftest import ServerThread, wait_serving

SAMPLE = Path(__file__).resolve().parents[2] / "service" / "models" / "demo" / "sample.jpg"
DETSEG = [sys.executable, "-m", "service.cli"]


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    folder = tmp_path_factory.mktemp("keys")
    private = provenance.generate_key(folder / "server.pem")
    other = provenance.generate_key(folder / "other.pem")
    return private, Path(f"{private}.pub"), Path(f"{other}.pub")


@pytest.fixture(scope="module")
def signing_server(settings, keys):
    import grpc

    srv = ServerThread(settings.replace(models="demo", signing_key=str(keys[0])))
    with grpc.insecure_channel(srv.target) as channel:
        wait_serving(channel)
    yield srv
    srv.stop()


def test_a_signed_response_verifies_and_names_models_image_and_prompts(signing_server, keys):
    trusted = provenance.load_public_key(keys[1])
    with Client(signing_server.target) as detseg:
        result = detseg.segment(SAMPLE, classes=["circle", "star"], score_threshold=0.3)
    checked = result.verify([trusted])
    m = checked.manifest
    assert checked.signed and checked.key_id == provenance.key_id(trusted)
    assert m["kind"] == "response" and m["inputs"] == [{"name": "image", "sha256": result.sha256}]
    assert m["prompts"]["classes"] == ["circle", "star"] and m["parameters"]["options"]["scoreThreshold"] == 0.3
    weights = {x["name"]: x["weights_sha256"] for x in m["models"]}
    assert weights == {x.name: x.weights_sha256 for x in result.models}
    assert m["created"].endswith("Z") and len(result) > 0


def test_a_tampered_label_mask_or_key_fails(signing_server, keys):
    trusted, other = provenance.load_public_key(keys[1]), provenance.load_public_key(keys[2])
    with Client(signing_server.target) as detseg:
        response = detseg.segment(SAMPLE, classes=["circle", "star"]).response
    for tamper in (
        lambda r: setattr(r.instances[0], "label", "hexagon"),
        lambda r: setattr(r.instances[0].mask.coco_rle, "counts", r.instances[0].mask.coco_rle.counts[:-2] + b"00"),
        lambda r: setattr(r.instances[0], "score", 0.123),
        lambda r: setattr(r.image, "sha256", "0" * 64),
        lambda r: setattr(r.provenance, "manifest", r.provenance.manifest.replace('"circle"', '"square"')),
    ):
        bad = type(response)()
        bad.CopyFrom(response)
        tamper(bad)
        with pytest.raises(provenance.VerificationFailed):
            verify_response(bad, trusted_keys=[trusted])
    verify_response(response, trusted_keys=[trusted])  # the untouched one still verifies
    with pytest.raises(provenance.VerificationFailed, match="untrusted key"):
        verify_response(response, trusted_keys=[other])


def _set_model(r):
    r.provenance.models[0].name = "evil"


@pytest.mark.parametrize(
    "tamper",
    [
        _set_model,
        lambda r: setattr(r.provenance.models[0], "weights_sha256", "f" * 64),
        lambda r: setattr(r.provenance, "request_id", "someone-else"),
        lambda r: setattr(r.provenance, "profile", "official"),
        lambda r: setattr(r.provenance, "backend", "triton"),
        lambda r: setattr(r.image, "width", 999),
        lambda r: setattr(r.image, "format", "png"),
        lambda r: setattr(r.instances[0].text_match, "read_as", "red star"),
    ],
)
def test_a_tampered_model_request_or_image_field_fails(signing_server, keys, tamper):
    """Only the instances' digest and the image's sha256 were compared: a response naming other models, another
    request id, profile, backend or image size verified with the trusted key."""
    trusted = provenance.load_public_key(keys[1])
    with Client(signing_server.target) as detseg:
        response = detseg.segment(SAMPLE, classes=["circle", "star"]).response
    bad = type(response)()
    bad.CopyFrom(response)
    tamper(bad)
    with pytest.raises(provenance.VerificationFailed, match="differs from the signed manifest"):
        verify_response(bad, trusted_keys=[trusted])


def test_a_manifest_with_a_duplicate_key_or_unreadable_content_fails_as_verification(signing_server, keys):
    """A manifest naming "models" twice verified (json.loads keeps the last; another reader the first); a manifest
    that is not JSON or RLE counts that are not ASCII raised JSONDecodeError / UnicodeDecodeError."""
    trusted = provenance.load_public_key(keys[1])
    with Client(signing_server.target) as detseg:
        response = detseg.segment(SAMPLE, classes=["circle", "star"]).response
    envelope = json.loads(response.provenance.manifest)
    text = json.dumps(envelope, sort_keys=True)
    inner = '"manifest": {'
    assert inner in text
    for tamper, message in (
        (lambda r: setattr(r.provenance, "manifest", text.replace(inner, inner + '"models": ["EVIL"], ', 1)), "dup"),
        (lambda r: setattr(r.provenance, "manifest", text[:-1]), "JSON"),
        (lambda r: setattr(r.instances[0].mask.coco_rle, "counts", b"\xff"), "Unicode"),
    ):  # fmt: skip
        bad = type(response)()
        bad.CopyFrom(response)
        tamper(bad)
        with pytest.raises(provenance.VerificationFailed, match=message):
            verify_response(bad, trusted_keys=[trusted])


def test_exemplar_reference_images_and_raw_sizes_are_in_the_manifest():
    """Two requests whose exemplars' reference images differed (and so their answers) had equal manifests: the
    exemplar entry said only "image": true."""
    from service.proto.detseg.v1 import detseg_pb2 as pb
    from service.provenance.response import response_manifest

    def manifest_of(exemplar_image: pb.Image, raw_size=(4, 2)) -> dict:
        request = pb.SegmentRequest(
            exemplars=[pb.Exemplar(box=pb.BoundingBox(x_max=1, y_max=1), label="sku", image=exemplar_image)]
        )
        response = pb.SegmentResponse(
            image=pb.ImageInfo(width=raw_size[0], height=raw_size[1], sha256="0" * 64, format="raw")
        )
        m = response_manifest(request, response)
        return {k: m[k] for k in ("inputs", "prompts", "parameters")}

    a, b = manifest_of(pb.Image(encoded=b"one")), manifest_of(pb.Image(encoded=b"two"))
    assert a != b and a["inputs"][1]["name"] == "exemplars[0].image"
    raw = pb.Image(raw=pb.RawImage(data=bytes(24), width=4, height=2))
    flipped = pb.Image(raw=pb.RawImage(data=bytes(24), width=2, height=4))
    assert manifest_of(raw) != manifest_of(flipped)
    assert manifest_of(raw, (4, 2))["parameters"]["image"] != manifest_of(raw, (2, 4))["parameters"]["image"]


def _nudge(coordinates):
    coordinates[0] += 1


@pytest.mark.parametrize(
    ("encoding", "tamper"),
    [
        ("POLYGON", lambda m: _nudge(m.polygons.polygons[0].coordinates)),
        ("POLYGON", lambda m: m.polygons.polygons.add().coordinates.extend([0, 0, 5, 0, 5, 5])),
        ("PNG", lambda m: setattr(m, "png", m.png[:-1] + bytes([m.png[-1] ^ 1]))),
        ("PNG", lambda m: setattr(m, "height", m.height + 1)),
    ],
)  # fmt: skip
def test_a_tampered_polygon_or_png_mask_fails(signing_server, keys, encoding, tamper):
    """The signed content holds the mask in the encoding sent; it held only the COCO RLE, empty in a polygon or PNG
    answer, so any change to such a mask verified."""
    import grpc

    from service.client_requests import segment_request
    from service.proto.detseg.v1 import detseg_pb2 as pb
    from service.proto.detseg.v1 import detseg_pb2_grpc as pb_grpc

    trusted = provenance.load_public_key(keys[1])
    request = segment_request(SAMPLE, classes=["circle", "star"])
    request.options.mask_encoding = getattr(pb, f"MASK_ENCODING_{encoding}")
    with grpc.insecure_channel(signing_server.target) as channel:
        response = pb_grpc.SegmentationServiceStub(channel).Segment(request, timeout=60)
    assert response.instances and response.instances[0].mask.WhichOneof("data") == encoding.lower().replace(
        "polygon", "polygons"
    )
    verify_response(response, trusted_keys=[trusted])
    bad = type(response)()
    bad.CopyFrom(response)
    tamper(bad.instances[0].mask)
    with pytest.raises(provenance.VerificationFailed):
        verify_response(bad, trusted_keys=[trusted])


def test_without_a_key_the_manifest_is_there_but_unsigned(demo_server):
    with Client(demo_server.target) as detseg:
        result = detseg.segment(SAMPLE, classes=["circle"])
    assert not result.verify(require_signature=False).signed
    with pytest.raises(provenance.VerificationFailed, match="not signed"):
        result.verify()


def test_an_unreadable_signing_key_stops_the_server_at_start(settings, tmp_path):
    from service.errors import ConfigurationError

    bad = tmp_path / "not-a-key.pem"
    bad.write_text("hello")
    with pytest.raises(ConfigurationError, match="signing_key"):
        ServerThread(settings.replace(signing_key=str(bad)))


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*DETSEG, *args], capture_output=True, text=True, timeout=300)


def test_detseg_verify_checks_a_saved_response_and_the_weights(signing_server, keys, tmp_path):
    saved = _cli("segment", str(SAMPLE), "--classes", "circle,star", "--target", signing_server.target, "--json")
    assert saved.returncode == 0, saved.stderr
    path = tmp_path / "response.json"
    path.write_text(saved.stdout)
    demo = Path(__file__).resolve().parents[2] / "service" / "models" / "demo"
    ok = _cli("verify", str(path), "--public-key", str(keys[1]), "--weights", str(demo / "shapes-yolo11n.pt"))
    assert ok.returncode == 0 and ok.stdout.startswith("OK: signed by key"), ok.stderr
    wrong = _cli("verify", str(path), "--public-key", str(keys[1]), "--weights", str(demo / "shapes-yoloe.pt"))
    assert wrong.returncode == 1 and "shapes-yoloe.pt: sha256 matches none" in wrong.stderr
    data = json.loads(saved.stdout)
    data["instances"][0]["rle"]["counts"] = data["instances"][0]["rle"]["counts"][:-1] + "0"
    path.write_text(json.dumps(data))
    tampered = _cli("verify", str(path), "--public-key", str(keys[1]))
    assert tampered.returncode == 1 and "tampered" in tampered.stderr
    # A private key or a file that is no key where a public key is wanted: one line naming it (it was a traceback).
    for not_public in (keys[0], SAMPLE):
        refused = _cli("verify", str(path), "--public-key", str(not_public))
        assert refused.returncode == 2 and "Traceback" not in refused.stderr
        assert refused.stderr.startswith(f"detseg verify: --public-key {not_public}: not an Ed25519 public key in PEM")


def test_detseg_verify_without_a_public_key_says_that_any_signer_passes(signing_server, tmp_path):
    saved = _cli("segment", str(SAMPLE), "--classes", "circle", "--target", signing_server.target, "--json")
    path = tmp_path / "response.json"
    path.write_text(saved.stdout)
    ok = _cli("verify", str(path))
    assert ok.returncode == 0 and ok.stdout.splitlines()[1] == (
        "  no --public-key given: any key's signature passes; give the signer's public key to check who signed"
    )
