"""Provenance manifests of Segment responses, signed with the server's Ed25519 key when it has one.

The manifest (``service.provenance``, kind "response") names the models (name, version, weights sha256), the
inputs (the image's sha256 as ImageInfo reports it; each exemplar's reference image: the sha256 of its encoded or
raw bytes, or the one its handle names), the prompts, the options as sent, the image's size and format, the
request id, profile and backend, the server's time, and one artifact: "instances", the sha256 of the canonical
JSON of ``instance_content`` of every instance in order. It travels as ``Provenance.manifest`` (the JSON
envelope). ``verify_response`` recomputes the digest from the instances received and compares the response's
image, models, request id, profile and backend with the manifest's, so a changed mask, label, score, box, review,
image size or model fails as a changed manifest does. Unsigned: ``Instance.mask_handle`` (a cache handle that
expires) and ``Provenance.manifest`` itself.
Both sides build the content with ``service.results`` from the protobuf values as sent (float32 scores widened
to Python floats).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from google.protobuf.json_format import MessageToDict

from service import __version__
from service.proto.detseg.v1 import detseg_pb2 as pb
from service.provenance.canonical import content_artifact, sha256_hex, strict_json
from service.provenance.manifests import KIND_RESPONSE, manifest
from service.provenance.signatures import VerificationFailed, VerifyResult, verify_envelope
from service.provenance.signatures import envelope as make_envelope
from service.results import ModelRef, instance_content

__all__ = [
    "INSTANCES",
    "attach_manifest",
    "instance_content",
    "manifest_models",
    "response_manifest",
    "verify_content",
    "verify_response",
]

INSTANCES = "instances"


def manifest_models(models: Sequence[pb.ModelInfo]) -> list[dict[str, str]]:
    """The manifest's model entries (role, name, version, weights sha256) of the models a server reports."""
    refs = [ModelRef.from_proto(m) for m in models]
    return [
        {"role": r.role, "name": r.name, "version": r.version or "file", "weights_sha256": r.weights_sha256}
        for r in refs
    ]


def response_manifest(request: pb.SegmentRequest, response: pb.SegmentResponse) -> dict[str, Any]:
    """The kind "response" manifest of ``response`` to ``request`` (its image bytes excluded: their sha256 is the
    input; exemplar reference images likewise, each an input named ``exemplars[i].image``)."""
    prompts = {
        "classes": list(request.classes),
        "texts": list(request.texts),
        "regions": [MessageToDict(r) for r in request.regions],
        "exemplars": [
            {"box": MessageToDict(e.box), "label": e.label, "image": _reference_image(e)} for e in request.exemplars
        ],
    }
    exemplar_images = [
        {"name": f"exemplars[{i}].image", "sha256": _image_sha256(e.image)}
        for i, e in enumerate(request.exemplars)
        if e.HasField("image")
    ]
    return manifest(
        kind=KIND_RESPONSE,
        models=manifest_models(response.provenance.models),
        inputs=[{"name": "image", "sha256": response.image.sha256}, *exemplar_images],
        prompts=prompts,
        parameters={
            "options": MessageToDict(request.options),
            "image": image_fields(response.image),
            **provenance_fields(response.provenance),
        },
        artifacts=[content_artifact(INSTANCES, [instance_content(i) for i in response.instances])],
        detseg_version=__version__,
    )


def image_fields(info: pb.ImageInfo) -> dict[str, Any]:
    """What the manifest says of the image besides its sha256: its size after EXIF orientation and its format."""
    return {"width": info.width, "height": info.height, "format": info.format}


def provenance_fields(p: pb.Provenance) -> dict[str, str]:
    """The request id, profile and backend a response reports, as its manifest's parameters name them."""
    return {"request_id": p.request_id, "profile": p.profile, "backend": p.backend}


def _reference_image(e: pb.Exemplar) -> bool | dict[str, int]:
    """An exemplar's reference image in the prompts: False without one; raw pixels' size (the same bytes at another
    size are another image); else True (its sha256 is an input)."""
    if not e.HasField("image"):
        return False
    if e.image.WhichOneof("source") == "raw":
        return {"width": e.image.raw.width, "height": e.image.raw.height}
    return True


def _image_sha256(image: pb.Image) -> str:
    """The sha256 an image is known by: of its encoded or raw bytes, or the one its handle names."""
    which = image.WhichOneof("source")
    if which == "encoded":
        return sha256_hex(image.encoded)
    if which == "raw":
        return sha256_hex(image.raw.data)
    # A handle's own digest: an encoded image's is its bytes' sha256; a raw image's is sha256("raw WxH <hex>"), not
    # its pixels' (known to the server's cache only, not here: the manifest differs from raw bytes sent; open)
    digest = image.handle.removeprefix("sha256:")
    return digest if len(digest) == 64 else sha256_hex(image.handle.encode())


def attach_manifest(request: pb.SegmentRequest, response: pb.SegmentResponse, key: Any | None) -> None:
    """Sets ``response.provenance.manifest``: the envelope, signed when ``key`` (Ed25519PrivateKey) is given."""
    envelope = make_envelope(response_manifest(request, response), key)
    response.provenance.manifest = json.dumps(envelope, sort_keys=True)


def verify_content(
    envelope: dict[str, Any],
    instances: Sequence[dict[str, Any]],
    image: dict[str, Any],
    *,
    provenance: dict[str, Any] | None = None,
    trusted_keys: Sequence[Any] = (),
    require_signature: bool = True,
) -> VerifyResult:
    """The envelope's signature, and that ``instances`` (``instance_content`` dicts), the image (``sha256``, and
    ``width``, ``height``, ``format`` where the manifest has them) and ``provenance`` (any of ``models`` as
    ``manifest_models`` lists them, ``request_id``, ``profile``, ``backend``) are what it covers. Raises
    provenance.VerificationFailed."""
    result = verify_envelope(envelope, trusted_keys=trusted_keys, require_signature=require_signature)
    m = result.manifest
    if m["kind"] != KIND_RESPONSE:
        raise VerificationFailed(f"manifest kind {m['kind']!r}, expected {KIND_RESPONSE!r}")
    expected = next((a for a in m["artifacts"] if a["name"] == INSTANCES), None)
    try:
        actual = content_artifact(INSTANCES, list(instances))
    except (TypeError, ValueError) as e:
        raise VerificationFailed(f"instances: not JSON content ({e})") from None
    if expected is None or expected["sha256"] != actual["sha256"]:
        raise VerificationFailed("instances: content differs from the signed manifest (tampered)")
    if [i["sha256"] for i in m["inputs"] if i["name"] == "image"] != [image.get("sha256")]:
        raise VerificationFailed("image: sha256 differs from the signed manifest")
    parameters = m["parameters"]
    signed_image = parameters.get("image")  # older manifests name no size
    if isinstance(signed_image, dict):
        for key, value in signed_image.items():
            if image.get(key) != value:
                raise VerificationFailed(f"image: {key} differs from the signed manifest")
    for key, value in (provenance or {}).items():
        signed = m["models"] if key == "models" else parameters.get(key, value)
        if value != signed:
            raise VerificationFailed(f"provenance: {key} differs from the signed manifest")
    return result


def verify_response(
    response: pb.SegmentResponse, *, trusted_keys: Sequence[Any] = (), require_signature: bool = True
) -> VerifyResult:
    """``verify_content`` for a received response (its ``provenance.manifest``): its instances, image, models,
    request id, profile and backend."""
    if not response.provenance.manifest:
        raise VerificationFailed("the response carries no manifest")
    try:
        envelope = strict_json(response.provenance.manifest)
        instances = [instance_content(i) for i in response.instances]
    except (ValueError, UnicodeDecodeError) as e:  # a manifest not JSON, RLE counts not ASCII, an unknown enum
        raise VerificationFailed(f"the response cannot be read as signed ({type(e).__name__}: {e})") from None
    if not isinstance(envelope, dict):
        raise VerificationFailed("the response's manifest is not a JSON object")
    return verify_content(
        envelope,
        instances,
        {"sha256": response.image.sha256, **image_fields(response.image)},
        provenance={"models": manifest_models(response.provenance.models), **provenance_fields(response.provenance)},
        trusted_keys=trusted_keys,
        require_signature=require_signature,
    )
