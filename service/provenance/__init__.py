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
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import datetime as dt
import hashlib
import json
import math
import os
import re
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

SCHEMA = "detseg.manifest/v1"
MANIFEST_NAME = "detseg-manifest.json"
ALGORITHM = "Ed25519"
KIND_EXPORT = "export"
KIND_RESPONSE = "response"
KINDS = (KIND_EXPORT, KIND_RESPONSE)

_HEX64 = re.compile(r"[0-9a-f]{64}")
_RFC3339_UTC = re.compile(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d{1,6})?Z")
_MANIFEST_KEYS = frozenset(
    {"schema", "kind", "created", "detseg_version", "models", "inputs", "prompts", "parameters", "artifacts"}
)
_MODEL_KEYS = ("role", "name", "version", "weights_sha256")
_INPUT_KEYS = ("name", "sha256")
_ARTIFACT_KEYS = ("name", "sha256", "bytes")
_SIGNATURE_KEYS = frozenset({"algorithm", "key_id", "public_key", "value"})


class VerificationFailed(Exception):
    """A manifest, its signature, an artifact or a weights file did not verify.

    The message names what failed (e.g. ``"instances.json: sha256 mismatch (tampered or replaced)"``);
    ``problems`` holds one line per failure when several artifacts failed at once.
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


@dataclasses.dataclass(frozen=True)
class VerifyReport:
    """A manifest file whose envelope, artifacts and given weights verified.

    ``artifacts_checked``: files whose size and sha256 matched (0 for a ``response`` manifest);
    ``weights_checked``: weights files whose sha256 matched a model of the manifest; ``unlisted``: files under an
    export folder that the manifest does not cover (relative POSIX paths, sorted; reported, not a failure).
    """

    signed: bool
    key_id: str | None
    artifacts_checked: int
    weights_checked: int
    manifest: dict[str, Any]
    unlisted: tuple[str, ...] = ()


# --- canonical form and digests ----------------------------------------------------------------------------------


def canonical_json(obj: Any) -> bytes:
    """The canonical UTF-8 JSON bytes of ``obj``: keys sorted, no whitespace, non-ASCII written as is.

    Accepts dicts with str keys, lists/tuples, str, int, finite float, bool and None (float subclasses such as
    ``numpy.float64`` are written as floats; other numpy scalars are refused: convert them first).

    Gives the same bytes as RFC 8785 (JSON Canonicalization Scheme) for what detseg writes: dicts, lists,
    strings (same escaping: only ``"``, ``\\`` and U+0000..U+001F, as ``\\n`` etc. or lowercase ``\\u00xx``),
    bools, null, ints with ``|i| <= 2**53``, and finite floats that are not integral and have ``1e-4 <= |x| < 1e16``.
    Outside that it differs:

    * floats are written as Python's shortest round-trip ``repr``, so an integral float is ``1.0`` and ``-0.0``
      stays ``-0.0`` (JCS: ``1``, ``0``), and exponents follow Python (``1e-05``, ``1e+16``; JCS: ``0.00001``,
      ``10000000000000000``); any float still round-trips exactly through ``json.loads``;
    * ints are written exactly at any size (JCS goes through IEEE doubles: exact only up to 2**53);
    * keys sort by Unicode code point (JCS: by UTF-16 code unit); the two orders differ only when keys mix
      characters above U+FFFF with characters in U+E000..U+FFFF.

    Same object → same bytes, across runs and processes, and ``json.loads`` of the bytes gives an equal object.

    Raises:
        ValueError: a NaN or infinite float, or a string that is not valid Unicode (lone surrogate).
        TypeError: a non-str dict key or a value of another type.
    """
    _check_json_value(obj, "$")
    text = json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    return text.encode("utf-8")


def _check_json_value(obj: Any, where: str) -> None:
    if isinstance(obj, float):
        if not math.isfinite(obj):
            raise ValueError(f"{where}: {obj!r} is not allowed in canonical JSON (NaN and Infinity are refused)")
    elif isinstance(obj, Mapping):
        for key, value in obj.items():
            if not isinstance(key, str):
                raise TypeError(f"{where}: dict key {key!r} is a {type(key).__name__}, canonical JSON needs str keys")
            _check_json_value(value, f"{where}.{key}")
    elif isinstance(obj, list | tuple):
        for i, value in enumerate(obj):
            _check_json_value(value, f"{where}[{i}]")


def file_sha256(path: Path) -> str:
    """The sha256 hex digest of the file at ``path``, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def sha256_hex(data: bytes) -> str:
    """Lowercase hex sha256 of ``data`` (64 chars)."""
    return hashlib.sha256(data).hexdigest()


def instances_digest(instances: Sequence[Mapping[str, Any]]) -> str:
    """sha256_hex of ``canonical_json(list(instances))``: the content digest of a response's instances.

    The caller passes one dict per instance, in response order, e.g. ``{"label": str, "class_id": int,
    "score": float, "box": [x1, y1, x2, y2], "mask": {"counts": str, "size": [H, W]}, "mask_score": float,
    "source": str, "review": {...}}``; any change to a mask's counts, a label, a score or a box changes the
    digest, while the order of keys inside a dict does not.

    Client and server agree only if both build these dicts from exactly what is sent: the protobuf field values
    as read back from the message (float fields are float32 on the wire, so read ``msg.score`` rather than the
    float64 the model produced; RLE counts bytes decoded as ASCII str; boxes as lists of those floats).
    """
    return sha256_hex(canonical_json(list(instances)))


def content_artifact(name: str, content: Any) -> dict[str, Any]:
    """The artifact entry ``{"name", "sha256", "bytes"}`` for JSON content (e.g. ``"instances"`` of a response):
    ``sha256`` and ``bytes`` are those of ``canonical_json(content)``."""
    data = canonical_json(content)
    return {"name": name, "sha256": sha256_hex(data), "bytes": len(data)}


# --- manifests -----------------------------------------------------------------------------------------------------


def manifest(
    *,
    kind: str,
    models: Sequence[Mapping[str, Any]],
    inputs: Sequence[Mapping[str, Any]],
    prompts: Mapping[str, Any],
    parameters: Mapping[str, Any],
    artifacts: Sequence[Mapping[str, Any]],
    created: str | None = None,
    detseg_version: str,
) -> dict[str, Any]:
    """A validated ``detseg.manifest/v1`` object (layout in the module docstring), as plain JSON types.

    ``kind``: ``"export"`` (artifact names are relative POSIX paths of files) or ``"response"`` (logical names);
    ``models``: ``{role, name, version, weights_sha256}`` (weights_sha256 "" for a model built in memory, with
    no file); ``inputs``: ``{name, sha256}``; ``artifacts``: ``{name, sha256, bytes}`` (exactly these keys; sha256
    as 64 lowercase hex; bytes an int >= 0);
    ``created``: RFC 3339 UTC ending in 'Z' (now, to the millisecond, if None). Lists keep the caller's order.

    Raises:
        ValueError: a field is missing, has the wrong type or format, or is not canonical-JSON serialisable.
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {', '.join(KINDS)}, got {kind!r}")
    if not isinstance(detseg_version, str) or not detseg_version:
        raise ValueError("detseg_version must be a non-empty str")
    if created is None:
        created = dt.datetime.now(dt.UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
    _check_created(created)
    for field, value in (("prompts", prompts), ("parameters", parameters)):
        if not isinstance(value, Mapping):
            raise ValueError(f"{field} must be a dict, got {type(value).__name__}")
    out = {
        "schema": SCHEMA,
        "kind": kind,
        "created": created,
        "detseg_version": detseg_version,
        "models": _entries("models", models, _MODEL_KEYS),
        "inputs": _entries("inputs", inputs, _INPUT_KEYS),
        "prompts": dict(prompts),
        "parameters": dict(parameters),
        "artifacts": _entries("artifacts", artifacts, _ARTIFACT_KEYS),
    }
    try:
        data = canonical_json(out)
    except (TypeError, ValueError) as e:
        raise ValueError(f"manifest is not canonical-JSON serialisable: {e}") from None
    problems = _schema_problems(out)
    if problems:
        raise ValueError("; ".join(problems))
    result: dict[str, Any] = json.loads(data)  # a deep copy in plain JSON types, equal to what a verifier reads
    return result


def _check_created(created: str) -> None:
    if not isinstance(created, str) or not _RFC3339_UTC.fullmatch(created):
        raise ValueError(f"created must be RFC 3339 UTC ending in 'Z' (e.g. 2026-01-31T12:00:00.000Z), got {created!r}")
    try:
        dt.datetime.fromisoformat(created)
    except ValueError:
        raise ValueError(f"created is not a valid date-time: {created!r}") from None


def _entries(field: str, entries: Sequence[Mapping[str, Any]], keys: tuple[str, ...]) -> list[dict[str, Any]]:
    if isinstance(entries, str | bytes | Mapping) or not isinstance(entries, Sequence):
        raise ValueError(f"{field} must be a list of dicts")
    out = []
    for i, entry in enumerate(entries):
        if not isinstance(entry, Mapping):
            raise ValueError(f"{field}[{i}] must be a dict with keys {', '.join(keys)}")
        if set(entry) != set(keys):
            raise ValueError(f"{field}[{i}] must have exactly the keys {', '.join(keys)}, got {', '.join(entry)}")
        out.append(dict(entry))
    return out


def _schema_problems(m: Mapping[str, Any]) -> list[str]:
    """What is wrong with the shape of manifest ``m`` (empty when it is a valid v1 manifest)."""
    if m.get("schema") != SCHEMA:
        return [f"manifest schema is {m.get('schema')!r}, expected {SCHEMA!r}"]
    problems = []
    if set(m) != _MANIFEST_KEYS:
        missing, extra = sorted(_MANIFEST_KEYS - set(m)), sorted(set(m) - _MANIFEST_KEYS)
        problems.append(f"manifest fields: missing {missing}, unexpected {extra}")
        return problems
    if m["kind"] not in KINDS:
        problems.append(f"manifest kind {m['kind']!r} is not one of {', '.join(KINDS)}")
    for field in ("created", "detseg_version"):
        if not isinstance(m[field], str):
            problems.append(f"manifest {field} must be a str")
    for field in ("prompts", "parameters"):
        if not isinstance(m[field], Mapping):
            problems.append(f"manifest {field} must be a dict")
    specs = (("models", _MODEL_KEYS), ("inputs", _INPUT_KEYS), ("artifacts", _ARTIFACT_KEYS))
    for field, keys in specs:
        entries = m[field]
        if not isinstance(entries, list):
            problems.append(f"manifest {field} must be a list")
            continue
        for i, entry in enumerate(entries):
            where = f"{field}[{i}]"
            if not isinstance(entry, Mapping) or set(entry) != set(keys):
                problems.append(f"{where} must have exactly the keys {', '.join(keys)}")
                continue
            for key in keys:
                value = entry[key]
                if key == "weights_sha256" and value == "":
                    pass  # a model built in memory (seeded test models): no weights file, nothing to hash
                elif key.endswith("sha256"):
                    if not isinstance(value, str) or not _HEX64.fullmatch(value):
                        problems.append(f"{where}.{key} must be 64 lowercase hex chars")
                elif key == "bytes":
                    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                        problems.append(f"{where}.bytes must be an int >= 0")
                elif not isinstance(value, str) or not value:
                    problems.append(f"{where}.{key} must be a non-empty str")
    if problems:
        return problems
    names = [a["name"] for a in m["artifacts"]]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        problems.append(f"artifact names appear more than once: {', '.join(duplicates)}")
    if m["kind"] == KIND_EXPORT:
        problems.extend(p for p in (_path_problem(n) for n in names) if p)
    return problems


def _path_problem(name: str) -> str | None:
    """Why ``name`` is not a safe relative POSIX path inside an export folder (None when it is)."""
    if name.startswith("/") or re.match(r"[A-Za-z]:", name):
        return f"{name}: absolute path refused (artifact paths are relative to the manifest's folder)"
    if "\\" in name or "\x00" in name:
        return f"{name}: backslash or NUL in path refused (artifact paths use POSIX '/' separators)"
    parts = name.split("/")
    if ".." in parts:
        return f"{name}: '..' in path refused (it would escape the manifest's folder)"
    if any(part in ("", ".") for part in parts):
        return f"{name}: empty or '.' path segment refused (write the path in normal form)"
    if name == MANIFEST_NAME:
        return f"{name}: the manifest cannot list itself"
    return None


# --- keys and signatures -----------------------------------------------------------------------------------------


def generate_key(path: Path) -> Path:
    """Writes a new Ed25519 private key to ``path`` (PKCS8 PEM, unencrypted, mode 0600) and its public key to
    ``<path>.pub`` (SubjectPublicKeyInfo PEM, mode 0644); returns ``path``.

    Raises:
        FileExistsError: ``path`` or ``<path>.pub`` exists (a key is never overwritten).
    """
    path = Path(path)
    pub_path = _pub_path(path)
    if pub_path.exists():
        raise FileExistsError(f"{pub_path} exists; refusing to overwrite a key")
    key = Ed25519PrivateKey.generate()
    private_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    public_pem = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    _write_new(path, private_pem, 0o600)
    try:
        _write_new(pub_path, public_pem, 0o644)
    except BaseException:
        path.unlink(missing_ok=True)
        raise
    return path


def _pub_path(path: Path) -> Path:
    return path.with_name(path.name + ".pub")


def _write_new(path: Path, data: bytes, mode: int) -> None:
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    except FileExistsError:
        raise FileExistsError(f"{path} exists; refusing to overwrite a key") from None
    try:
        os.fchmod(fd, mode)  # the umask may have removed bits from ``mode``
        with os.fdopen(fd, "wb") as f:
            f.write(data)
    except BaseException:
        path.unlink(missing_ok=True)
        raise


def load_private_key(path: Path) -> Ed25519PrivateKey:
    """The Ed25519 private key in PEM file ``path`` (PKCS8, unencrypted, as :func:`generate_key` writes).

    Raises:
        ValueError: the file holds no PEM private key, or one of another algorithm.
    """
    key = serialization.load_pem_private_key(Path(path).read_bytes(), password=None)
    if not isinstance(key, Ed25519PrivateKey):
        raise ValueError(f"{path} holds a {type(key).__name__}, not an Ed25519 private key")
    return key


def load_public_key(source: Path | str | bytes) -> Ed25519PublicKey:
    """The Ed25519 public key from a PEM file path, or from PEM bytes (SubjectPublicKeyInfo).

    Raises:
        ValueError: not a PEM public key, or one of another algorithm.
    """
    pem = source if isinstance(source, bytes) else Path(source).read_bytes()
    key = serialization.load_pem_public_key(pem)
    if not isinstance(key, Ed25519PublicKey):
        raise ValueError(f"{type(key).__name__} given where an Ed25519 public key is needed")
    return key


def _raw(public_key: Ed25519PublicKey) -> bytes:
    return public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def key_id(public_key: Ed25519PublicKey) -> str:
    """First 16 hex chars of sha256 of the raw 32-byte public key."""
    return sha256_hex(_raw(public_key))[:16]


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


def _checked_manifest(manifest: Mapping[str, Any]) -> dict[str, Any]:
    if not isinstance(manifest, Mapping) or manifest.get("schema") != SCHEMA:
        raise ValueError(f"not a {SCHEMA} manifest (build it with provenance.manifest)")
    content: dict[str, Any] = json.loads(canonical_json(manifest))
    return content


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


# --- files ---------------------------------------------------------------------------------------------------------


def write_envelope(path: Path, envelope: Mapping[str, Any]) -> Path:
    """Writes ``envelope`` to ``path`` atomically as pretty-printed UTF-8 JSON (sorted keys, 2-space indent);
    returns ``path``."""
    path = Path(path)
    text = json.dumps(envelope, indent=2, sort_keys=True, ensure_ascii=False, allow_nan=False) + "\n"
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp_name, path)
    finally:
        Path(tmp_name).unlink(missing_ok=True)
    return path


def write_signed_export(
    folder: Path,
    files: Sequence[Path],
    base_manifest: Mapping[str, Any],
    *,
    key: Ed25519PrivateKey | None = None,
) -> Path:
    """Writes ``<folder>/detseg-manifest.json`` covering ``files`` and returns its path.

    ``files``: the export's files, absolute or relative to ``folder``, all inside it; ``base_manifest``: an
    ``export`` manifest from :func:`manifest` with no artifacts. Each file becomes an artifact ``{name: relative
    POSIX path, sha256, bytes}`` (sorted by name); the envelope is signed when ``key`` is given.

    Raises:
        ValueError: a file lies outside ``folder``, is listed twice, or is the manifest itself; or
            ``base_manifest`` is not an export manifest without artifacts.
        FileNotFoundError: a file does not exist.
    """
    folder = Path(folder)
    base = _checked_manifest(base_manifest)
    if base.get("kind") != KIND_EXPORT:
        raise ValueError(f"base_manifest kind is {base.get('kind')!r}, expected {KIND_EXPORT!r}")
    if base.get("artifacts"):
        raise ValueError("base_manifest must have no artifacts: write_signed_export lists the files itself")
    root, base_dir = folder.resolve(), Path(os.path.abspath(folder))
    artifacts: list[dict[str, Any]] = []
    for file in files:
        full = Path(os.path.normpath(base_dir / file))  # absolute ``file`` replaces base_dir; links kept
        if not full.is_relative_to(base_dir) or not full.resolve().is_relative_to(root):
            raise ValueError(f"{file} is not inside the export folder {folder}")
        if not full.is_file():
            raise FileNotFoundError(f"{file}: no such file in the export")
        name = full.relative_to(base_dir).as_posix()
        artifacts.append({"name": name, "sha256": file_sha256(full), "bytes": full.stat().st_size})
    artifacts.sort(key=lambda a: str(a["name"]))
    content = {**base, "artifacts": artifacts}
    problems = _schema_problems(content)
    if problems:
        raise ValueError("; ".join(problems))
    return write_envelope(folder / MANIFEST_NAME, envelope(content, key))


def verify_path(
    path: Path,
    *,
    trusted_keys: Sequence[Ed25519PublicKey] = (),
    weights: Sequence[Path] = (),
    require_signature: bool = True,
) -> VerifyReport:
    """Verifies a manifest file, or the ``detseg-manifest.json`` in folder ``path``.

    Checks the envelope (:func:`verify_envelope`); for an ``export`` manifest, that every artifact exists under the
    manifest's folder (never outside it: absolute paths, '..' and symlinks out are refused) with its size and
    sha256; and that each of ``weights`` has the ``weights_sha256`` of some model in the manifest.

    Raises:
        VerificationFailed: the message names the file and what failed; when several artifacts fail, all are
            listed (``problems`` has one line each).
    """
    path = Path(path)
    manifest_path = path / MANIFEST_NAME if path.is_dir() else path
    result = verify_envelope(
        _read_envelope(manifest_path), trusted_keys=trusted_keys, require_signature=require_signature
    )
    content = result.manifest
    checked: tuple[int, tuple[str, ...]] = (0, ())
    if content["kind"] == KIND_EXPORT:
        checked = _verify_artifacts(manifest_path.parent, content["artifacts"])
    weights_checked = verify_weights(weights, content["models"])
    return VerifyReport(
        signed=result.signed,
        key_id=result.key_id,
        artifacts_checked=checked[0],
        weights_checked=weights_checked,
        manifest=content,
        unlisted=checked[1],
    )


def _read_envelope(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise VerificationFailed(f"{path}: no such manifest file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise VerificationFailed(f"{path}: cannot be read ({type(e).__name__})") from None
    try:
        data = json.loads(text, object_pairs_hook=_no_duplicate_keys, parse_constant=_no_constant)
    except ValueError as e:
        raise VerificationFailed(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise VerificationFailed(f"{path}: not a manifest envelope (a JSON object is expected)")
    return data


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"duplicate key {key!r} (ambiguous: readers may keep either value)")
        out[key] = value
    return out


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not allowed")


def _verify_artifacts(folder: Path, artifacts: list[dict[str, Any]]) -> tuple[int, tuple[str, ...]]:
    root = folder.resolve()
    problems = []
    for artifact in artifacts:
        name = artifact["name"]
        problem = _path_problem(name) or _file_problem(root, name, artifact["sha256"], artifact["bytes"])
        if problem:
            problems.append(problem)
    if problems:
        message = problems[0] if len(problems) == 1 else f"{len(problems)} artifacts failed: " + "; ".join(problems)
        raise VerificationFailed(message, problems)
    listed = {a["name"] for a in artifacts} | {MANIFEST_NAME}
    return len(artifacts), tuple(sorted(set(_files_under(root)) - listed))


def _file_problem(root: Path, name: str, sha256: str, size: int) -> str | None:
    full = root / name
    if not full.resolve().is_relative_to(root):
        return f"{name}: resolves outside the manifest's folder (symlink), refused"
    if not full.exists():
        return f"{name}: missing (deleted or moved)"
    if not full.is_file():
        return f"{name}: not a regular file"
    actual_size = full.stat().st_size
    if actual_size != size:
        return f"{name}: size {actual_size} bytes, expected {size} (tampered or replaced)"
    actual = file_sha256(full)
    if actual != sha256:
        return f"{name}: sha256 mismatch (tampered or replaced): expected {sha256}, found {actual}"
    return None


def files_under(folder: Path) -> list[Path]:
    """Every file under ``folder`` at any depth, sorted: what an export wrote there (links to files included; links
    to folders are listed by ``os.walk`` as folders and not followed). Export manifests cover these, less the placed
    source images; ``verify_path`` reports those it does not cover."""
    return sorted(Path(dirpath) / name for dirpath, _dirs, names in os.walk(folder) for name in names)


def _files_under(root: Path) -> list[str]:
    return [p.relative_to(root).as_posix() for p in files_under(root)]


def verify_weights(weights: Sequence[Path], models: list[dict[str, Any]]) -> int:
    """Checks each file of ``weights`` against the sha256 of the manifest's ``models``; returns how many were
    checked. Raises VerificationFailed naming a file that cannot be read or matches none."""
    expected = {m["weights_sha256"] for m in models}
    for file in weights:
        try:
            actual = file_sha256(Path(file))
        except OSError as e:
            raise VerificationFailed(f"{file}: weights file cannot be read ({type(e).__name__})") from None
        if actual not in expected:
            listing = "; ".join(f"{m['role']} {m['name']} {m['version']} {m['weights_sha256']}" for m in models)
            raise VerificationFailed(
                f"{file}: weights sha256 {actual} matches no model of the manifest; expected one of "
                f"(role name version sha256): {listing or 'none'}"
            )
    return len(weights)
