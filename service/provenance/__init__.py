"""Provenance of what detseg produces: manifests, Ed25519 signatures, and their verification.

Every response and every export carries a *manifest*: a plain JSON object naming the models (with their
weights' sha256), the inputs' sha256, the prompts, the parameters, the time, and a digest of every artifact.
A manifest travels in an *envelope*, optionally signed with the server's Ed25519 key::

    {
      "manifest": {
        "schema": "detseg.manifest/v1",
        "kind": "export",                        # "export" (artifacts are files) or "response" (content digests)
        "created": "2026-05-09T07:35:25.123Z",   # RFC 3339, UTC, 'Z'
        "detseg_version": "0.1.0",
        "models": [{"role": "detector", "name": "yolo11n", "version": "8.4.0", "weights_sha256": "<64 hex>"}],
        "inputs": [{"name": "images/a.jpg", "sha256": "<64 hex>"}],
        "prompts": {"classes": ["person"]},
        "parameters": {"score_threshold": 0.25, "format": "coco"},
        "artifacts": [{"name": "annotations/instances.json", "sha256": "<64 hex>", "bytes": 1234}]
      },
      "signature": {                             # absent when unsigned
        "algorithm": "Ed25519",
        "key_id": "<16 hex>",                    # first 16 hex chars of sha256(raw 32-byte public key)
        "public_key": "<base64 of the raw 32-byte public key>",
        "value": "<base64 of the 64-byte signature over canonical_json(manifest)>"
      }
    }

The signature covers ``canonical_json(manifest)``, never the bytes of a file, so an envelope may be stored
pretty-printed. For an ``export`` manifest every artifact name is a relative POSIX path under the folder that holds
``detseg-manifest.json``; for a ``response`` manifest artifact names are logical (e.g. ``"instances"``, see
:func:`instances_digest`) and name no file.

Nothing here reads the environment or touches the file system at import time; keys are passed in by the caller.

The package: ``canonical`` (canonical JSON, digests, ``file_sha256``), ``manifests`` (building and checking
manifests), ``keys`` (Ed25519 key files, ``key_id``), ``signatures`` (``sign``, ``envelope``,
``verify_envelope``), ``exports`` (an export's manifest file, ``verify_path``, ``verify_weights``) and
``response`` (the manifest of a Segment response, from ``service.results``). The names below are its public
API: ``from service import provenance; provenance.verify_path(...)``.
"""

from __future__ import annotations

from service.provenance.canonical import canonical_json, content_artifact, file_sha256, instances_digest, sha256_hex
from service.provenance.exports import (
    PLACED_INPUTS,
    VerifyReport,
    files_under,
    verify_path,
    verify_weights,
    write_envelope,
    write_signed_export,
)
from service.provenance.keys import generate_key, key_id, load_private_key, load_public_key
from service.provenance.manifests import KIND_EXPORT, KIND_RESPONSE, KINDS, MANIFEST_NAME, SCHEMA, manifest
from service.provenance.signatures import ALGORITHM, VerificationFailed, VerifyResult, envelope, sign, verify_envelope

__all__ = [
    "ALGORITHM",
    "KINDS",
    "KIND_EXPORT",
    "KIND_RESPONSE",
    "MANIFEST_NAME",
    "PLACED_INPUTS",
    "SCHEMA",
    "VerificationFailed",
    "VerifyReport",
    "VerifyResult",
    "canonical_json",
    "content_artifact",
    "envelope",
    "file_sha256",
    "files_under",
    "generate_key",
    "instances_digest",
    "key_id",
    "load_private_key",
    "load_public_key",
    "manifest",
    "sha256_hex",
    "sign",
    "verify_envelope",
    "verify_path",
    "verify_weights",
    "write_envelope",
    "write_signed_export",
]
