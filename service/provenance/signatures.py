"""Envelopes: signing a manifest with Ed25519, and verifying an envelope's manifest and signature."""

from __future__ import annotations

import base64
import binascii
import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from service.provenance.canonical import canonical_json
from service.provenance.keys import _raw, key_id
from service.provenance.manifests import _checked_manifest, _schema_problems

ALGORITHM = "Ed25519"
_SIGNATURE_KEYS = frozenset({"algorithm", "key_id", "public_key", "value"})


class VerificationFailed(Exception):
    """A manifest, its signature, an artifact or a weights file did not verify.

    The message names what failed (e.g. ``"instances.json: sha256 mismatch (tampered or replaced)"``);
    ``problems`` holds one line per failure when several files failed at once.
    """

    def __init__(self, message: str, problems: Sequence[str] = ()) -> None:
        super().__init__(message)
        self.problems = tuple(problems) or (message,)


@dataclasses.dataclass(frozen=True)
class VerifyResult:
    """An envelope that verified. ``key_id``: None when unsigned (only with ``require_signature=False``)."""

    signed: bool
    key_id: str | None
    manifest: dict[str, Any]


def sign(manifest: Mapping[str, Any], key: Ed25519PrivateKey) -> dict[str, Any]:
    """The signed envelope ``{"manifest", "signature": {algorithm, key_id, public_key, value}}`` of ``manifest``;
    ``value`` is base64 of the Ed25519 signature over ``canonical_json(manifest)``.

    Raises:
        ValueError: ``manifest`` is not a ``detseg.manifest/v1`` object or not canonical-JSON serialisable.
    """
    content = _checked_manifest(manifest)
    public = key.public_key()
    signature = {
        "algorithm": ALGORITHM,
        "key_id": key_id(public),
        "public_key": base64.b64encode(_raw(public)).decode("ascii"),
        "value": base64.b64encode(key.sign(canonical_json(content))).decode("ascii"),
    }
    return {"manifest": content, "signature": signature}


def envelope(manifest: Mapping[str, Any], key: Ed25519PrivateKey | None = None) -> dict[str, Any]:
    """``sign(manifest, key)`` when a key is given, else the unsigned envelope ``{"manifest": manifest}``."""
    if key is not None:
        return sign(manifest, key)
    return {"manifest": _checked_manifest(manifest)}


def verify_envelope(
    envelope: Mapping[str, Any],
    *,
    trusted_keys: Sequence[Ed25519PublicKey] = (),
    require_signature: bool = True,
) -> VerifyResult:
    """Checks an envelope: its manifest's shape, then the Ed25519 signature over ``canonical_json(manifest)`` with
    the embedded public key. With ``trusted_keys``, a signed envelope must also be signed by one of them.

    An unsigned envelope passes only with ``require_signature=False`` (``trusted_keys`` restrict signed
    envelopes only); a signed one is always checked.

    Raises:
        VerificationFailed: the message names what failed ("not signed", "signed by an untrusted key <key_id>",
            "signature does not match the manifest ...", a malformed field).
    """
    if not isinstance(envelope, Mapping) or not isinstance(envelope.get("manifest"), Mapping):
        raise VerificationFailed("envelope has no 'manifest' object")
    extra = sorted(set(envelope) - {"manifest", "signature"})
    if extra:
        raise VerificationFailed(f"envelope has unexpected fields {extra} (only 'manifest' and 'signature')")
    content = dict(envelope["manifest"])
    problems = _schema_problems(content)
    if problems:
        raise VerificationFailed("invalid manifest: " + "; ".join(problems), problems)
    try:
        data = canonical_json(content)
    except (TypeError, ValueError) as e:
        raise VerificationFailed(f"invalid manifest: {e}") from None
    if "signature" not in envelope:
        if require_signature:
            raise VerificationFailed("not signed: the envelope has no signature and a signature is required")
        return VerifyResult(signed=False, key_id=None, manifest=content)
    public, kid, value = _parse_signature(envelope["signature"])
    try:
        public.verify(value, data)
    except InvalidSignature:
        raise VerificationFailed(
            f"signature by key {kid} does not match the manifest (manifest or signature altered)"
        ) from None
    if trusted_keys and _raw(public) not in {_raw(k) for k in trusted_keys}:
        trusted = ", ".join(key_id(k) for k in trusted_keys)
        raise VerificationFailed(f"signed by an untrusted key {kid} (trusted: {trusted})")
    return VerifyResult(signed=True, key_id=kid, manifest=content)


def _parse_signature(sig: Any) -> tuple[Ed25519PublicKey, str, bytes]:
    if not isinstance(sig, Mapping) or set(sig) != _SIGNATURE_KEYS:
        raise VerificationFailed(f"signature must have exactly the fields {', '.join(sorted(_SIGNATURE_KEYS))}")
    if sig["algorithm"] != ALGORITHM:
        raise VerificationFailed(f"signature algorithm {sig['algorithm']!r} is not supported (only {ALGORITHM})")
    raw = _b64("signature.public_key", sig["public_key"], 32)
    value = _b64("signature.value", sig["value"], 64)
    try:
        public = Ed25519PublicKey.from_public_bytes(raw)
    except ValueError:
        raise VerificationFailed("signature.public_key is not a valid Ed25519 public key") from None
    kid = key_id(public)
    if sig["key_id"] != kid:
        raise VerificationFailed(f"signature.key_id {sig['key_id']!r} is not that of its public key ({kid})")
    return public, kid, value


def _b64(field: str, text: Any, size: int) -> bytes:
    try:
        data = base64.b64decode(text, validate=True) if isinstance(text, str) else b""
    except (binascii.Error, ValueError):
        data = b""
    if len(data) != size:
        raise VerificationFailed(f"{field} must be base64 of {size} bytes")
    return data
