"""Manifests: building a ``detseg.manifest/v1`` object and checking the shape of one (layout:
``service.provenance``)."""

from __future__ import annotations

import datetime as dt
import json
import re
from collections.abc import Mapping, Sequence
from typing import Any

from service.provenance.canonical import canonical_json

SCHEMA = "detseg.manifest/v1"
MANIFEST_NAME = "detseg-manifest.json"
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
    """A validated ``detseg.manifest/v1`` object (layout: ``service.provenance``), as plain JSON types.

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


def _checked_manifest(manifest: Mapping[str, Any]) -> dict[str, Any]:
    if not isinstance(manifest, Mapping) or manifest.get("schema") != SCHEMA:
        raise ValueError(f"not a {SCHEMA} manifest (build it with provenance.manifest)")
    content: dict[str, Any] = json.loads(canonical_json(manifest))
    return content
