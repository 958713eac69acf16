"""Provenance manifests of Segment responses, signed with the server's Ed25519 key when it has one.

The manifest (``service.provenance``, kind "response") names the models (name, version, weights sha256), the
input (the image's sha256 as ImageInfo reports it), the prompts, the options as sent, the server's time, and
one artifact: "instances", the sha256 of the canonical JSON of ``instance_content`` of every instance in
order. It travels as ``Provenance.manifest`` (the JSON envelope). ``verify_response`` recomputes the digest
from the instances received, so a changed mask, label, score, box or review fails as a changed manifest does.
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
from service.provenance.canonical import content_artifact
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
    input; exemplar reference images likewise)."""
    prompts = {
        "classes": list(request.classes),
        "texts": list(request.texts),
        "regions": [MessageToDict(r) for r in request.regions],
        "exemplars": [
            {"box": MessageToDict(e.box), "label": e.label, "image": e.HasField("image")} for e in request.exemplars
        ],
    }
    return manifest(
        kind=KIND_RESPONSE,
        models=manifest_models(response.provenance.models),
        inputs=[{"name": "image", "sha256": response.image.sha256}],
        prompts=prompts,
        parameters={
            "options": MessageToDict(request.options),
            "request_id": response.provenance.request_id,
            "profile": response.provenance.profile,
            "backend": response.provenance.backend,
        },
        artifacts=[content_artifact(INSTANCES, [instance_content(i) for i in response.instances])],
        detseg_version=__version__,
    )


def attach_manifest(request: pb.SegmentRequest, response: pb.SegmentResponse, key: Any | None) -> None:
    """Sets ``response.provenance.manifest``: the envelope, signed when ``key`` (Ed25519PrivateKey) is given."""
    envelope = make_envelope(response_manifest(request, response), key)
    response.provenance.manifest = json.dumps(envelope, sort_keys=True)


def verify_content(
    envelope: dict[str, Any],
    instances: Sequence[dict[str, Any]],
    image_sha256: str,
    *,
    trusted_keys: Sequence[Any] = (),
    require_signature: bool = True,
) -> VerifyResult:
    """The envelope's signature, and that ``instances`` (``instance_content`` dicts) and the image hash are
    what it covers. Raises provenance.VerificationFailed."""
    result = verify_envelope(envelope, trusted_keys=trusted_keys, require_signature=require_signature)
    m = result.manifest
    if m["kind"] != KIND_RESPONSE:
        raise VerificationFailed(f"manifest kind {m['kind']!r}, expected {KIND_RESPONSE!r}")
    expected = next((a for a in m["artifacts"] if a["name"] == INSTANCES), None)
    actual = content_artifact(INSTANCES, list(instances))
    if expected is None or expected["sha256"] != actual["sha256"]:
        raise VerificationFailed("instances: content differs from the signed manifest (tampered)")
    if [i["sha256"] for i in m["inputs"]] != [image_sha256]:
        raise VerificationFailed("image: sha256 differs from the signed manifest")
    return result


def verify_response(
    response: pb.SegmentResponse, *, trusted_keys: Sequence[Any] = (), require_signature: bool = True
) -> VerifyResult:
    """``verify_content`` for a received response (its ``provenance.manifest``)."""
    if not response.provenance.manifest:
        raise VerificationFailed("the response carries no manifest")
    return verify_content(
        json.loads(response.provenance.manifest),
        [instance_content(i) for i in response.instances],
        response.image.sha256,
        trusted_keys=trusted_keys,
        require_signature=require_signature,
    )
