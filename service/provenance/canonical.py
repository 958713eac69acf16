"""Canonical JSON and the digests of provenance: what a signature covers and how artifacts are named by hash."""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any


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


def strict_json(text: str) -> Any:
    """``json.loads`` refusing what makes one text two readings: a key given twice (readers may keep either value)
    and the NaN / Infinity constants (not JSON). Raises ValueError naming which."""
    return json.loads(text, object_pairs_hook=_no_duplicate_keys, parse_constant=_no_constant)


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"duplicate key {key!r} (ambiguous: readers may keep either value)")
        out[key] = value
    return out


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not allowed")
