"""Provenance manifests of Segment responses, signed with the server's Ed25519 key when it has one.

The manifest (``service.provenance``, kind "response") names the models (name, version, weights sha256), the
input (the image's sha256 as ImageInfo reports it), the prompts, the options as sent, the server's time, and
one artifact: "instances", the sha256 of the canonical JSON of ``instance_content`` of every instance in
order. It travels as ``Provenance.manifest`` (the JSON envelope). ``verify_response`` recomputes the digest
from the instances received, so a changed mask, label, score, box or review fails as a changed manifest does.
Both sides build the content from the protobuf values as sent (float32 scores widened to Python floats).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from google.protobuf.json_format import MessageToDict

from service import __version__, provenance
from service.proto.detseg.v1 import detseg_pb2 as pb

INSTANCES = "instances"


def instance_content(inst: pb.Instance) -> dict[str, Any]:
    """What a response says about one instance, as plain JSON (also ``detseg segment --json``'s instances)."""
    return {
        "label": inst.label,
        "class_id": inst.class_id,
        "score": inst.score,
        "box": [inst.box.x_min, inst.box.y_min, inst.box.x_max, inst.box.y_max],
        "mask_score": inst.mask_score,
        "source": pb.InstanceSource.Name(inst.source).removeprefix("INSTANCE_SOURCE_").lower(),
        "region_index": inst.region_index,
        "text": inst.text_match.text,
        "similarity": inst.text_match.similarity,
        "rle": {"size": list(inst.mask.coco_rle.size), "counts": inst.mask.coco_rle.counts.decode("ascii")},
        "review": {
            "needed": inst.review.needed,
            "reasons": [pb.ReviewReason.Name(r).removeprefix("REVIEW_REASON_").lower() for r in inst.review.reasons],
            "stability": inst.review.stability_score,
        },
    }


def manifest_models(models: Sequence[pb.ModelInfo]) -> list[dict[str, str]]:
    """The manifest's model entries (role, name, version, weights sha256) of the models a server reports."""
    return [
        {"role": pb.ModelRole.Name(m.role).removeprefix("MODEL_ROLE_").lower(), "name": m.name,
         "version": m.version or "file", "weights_sha256": m.weights_sha256}
        for m in models
    ]  # fmt: skip


def response_manifest(request: pb.SegmentRequest, response: pb.SegmentResponse) -> dict[str, Any]:
    """The kind "response" manifest of ``response`` to ``request`` (its image bytes excluded: their sha256 is the
    input; exemplar reference images likewise)."""
    prompts = {
        "classes": list(request.classes),
        "texts": list(request.texts),
        "regions": [MessageToDict(r) for r in request.regions],
        "exemplars": [
            {"box": MessageToDict(e.box), "label": e.label, "image": e.HasField("image")} for e in request.exemplars
        ],  # fmt: skip
    }
    return provenance.manifest(
        kind=provenance.KIND_RESPONSE,
        models=manifest_models(response.provenance.models),
        inputs=[{"name": "image", "sha256": response.image.sha256}],
        prompts=prompts,
        parameters={
            "options": MessageToDict(request.options),
            "request_id": response.provenance.request_id,
            "profile": response.provenance.profile,
            "backend": response.provenance.backend,
        },  # fmt: skip
        artifacts=[provenance.content_artifact(INSTANCES, [instance_content(i) for i in response.instances])],
        detseg_version=__version__,
    )


def attach_manifest(request: pb.SegmentRequest, response: pb.SegmentResponse, key: Any | None) -> None:
    """Sets ``response.provenance.manifest``: the envelope, signed when ``key`` (Ed25519PrivateKey) is given."""
    envelope = provenance.envelope(response_manifest(request, response), key)
    response.provenance.manifest = json.dumps(envelope, sort_keys=True)


def verify_content(
    envelope: dict[str, Any], instances: Sequence[dict[str, Any]], image_sha256: str, *,
    trusted_keys: Sequence[Any] = (), require_signature: bool = True,
) -> provenance.VerifyResult:  # fmt: skip
    """The envelope's signature, and that ``instances`` (``instance_content`` dicts) and the image hash are
    what it covers. Raises provenance.VerificationFailed."""
    result = provenance.verify_envelope(envelope, trusted_keys=trusted_keys, require_signature=require_signature)
    m = result.manifest
    if m["kind"] != provenance.KIND_RESPONSE:
        raise provenance.VerificationFailed(f"manifest kind {m['kind']!r}, expected {provenance.KIND_RESPONSE!r}")
    expected = next((a for a in m["artifacts"] if a["name"] == INSTANCES), None)
    actual = provenance.content_artifact(INSTANCES, list(instances))
    if expected is None or expected["sha256"] != actual["sha256"]:
        raise provenance.VerificationFailed("instances: content differs from the signed manifest (tampered)")
    if [i["sha256"] for i in m["inputs"]] != [image_sha256]:
        raise provenance.VerificationFailed("image: sha256 differs from the signed manifest")
    return result


def verify_response(
    response: pb.SegmentResponse, *, trusted_keys: Sequence[Any] = (), require_signature: bool = True
) -> provenance.VerifyResult:
    """``verify_content`` for a received response (its ``provenance.manifest``)."""
    if not response.provenance.manifest:
        raise provenance.VerificationFailed("the response carries no manifest")
    return verify_content(
        json.loads(response.provenance.manifest), [instance_content(i) for i in response.instances],
        response.image.sha256, trusted_keys=trusted_keys, require_signature=require_signature,
    )  # fmt: skip
