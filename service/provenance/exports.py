"""Files: writing an export's signed manifest over its files, and verifying a manifest file, its artifacts and
weights files against it."""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from service.provenance.canonical import file_sha256, strict_json
from service.provenance.manifests import KIND_EXPORT, MANIFEST_NAME, _checked_manifest, _path_problem, _schema_problems
from service.provenance.signatures import VerificationFailed, envelope, verify_envelope


@dataclasses.dataclass(frozen=True)
class VerifyReport:
    """A manifest file whose envelope, artifacts and given weights verified.

    ``artifacts_checked``: files whose size and sha256 matched (0 for a ``response`` manifest);
    ``inputs_checked``: input images placed in the export (``PLACED_INPUTS``) whose sha256 matched their input's;
    ``weights_checked``: weights files whose sha256 matched a model of the manifest; ``unlisted``: of a manifest
    written before ``PLACED_INPUTS`` existed, the files it does not cover (its placed images among them: reported,
    not a failure, as they were then).
    """

    signed: bool
    key_id: str | None
    artifacts_checked: int
    weights_checked: int
    manifest: dict[str, Any]
    inputs_checked: int = 0
    unlisted: tuple[str, ...] = ()


# An export manifest's parameter: the folders (relative POSIX paths) that hold every input under its own name, as
# links to the source images or copies of them (``detseg label``'s YOLO and CVAT images). The manifest lists their
# sha256 as inputs, not as artifacts (a link leads out of the folder); verify checks them against those.
PLACED_INPUTS = "placed_inputs"


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
    sha256, that every input placed in it (``PLACED_INPUTS``) is there with its input's sha256, and that the folder
    holds no other file (an image and label added to a YOLO dataset are trained on); and that each of ``weights``
    has the ``weights_sha256`` of some model in the manifest.

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
    checked: tuple[int, int, tuple[str, ...]] = (0, 0, ())
    if content["kind"] == KIND_EXPORT:
        checked = _verify_files(manifest_path.parent, content)
    weights_checked = verify_weights(weights, content["models"])
    return VerifyReport(
        signed=result.signed,
        key_id=result.key_id,
        artifacts_checked=checked[0],
        weights_checked=weights_checked,
        manifest=content,
        inputs_checked=checked[1],
        unlisted=checked[2],
    )


def _read_envelope(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise VerificationFailed(f"{path}: no such manifest file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise VerificationFailed(f"{path}: cannot be read ({type(e).__name__})") from None
    try:
        data = strict_json(text)
    except ValueError as e:
        raise VerificationFailed(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise VerificationFailed(f"{path}: not a manifest envelope (a JSON object is expected)")
    return data


def _verify_files(folder: Path, content: dict[str, Any]) -> tuple[int, int, tuple[str, ...]]:
    """An export's artifacts and placed inputs checked, and nothing else under ``folder``: (artifacts, inputs, files
    not covered). A manifest written before ``PLACED_INPUTS`` existed left its placed images out: the files it does
    not cover are reported, as then (an export that verified then verifies now)."""
    root = folder.resolve()
    problems = []
    for artifact in content["artifacts"]:
        name = artifact["name"]
        problem = _path_problem(name) or _file_problem(root, name, artifact["sha256"], artifact["bytes"])
        if problem:
            problems.append(problem)
    placed = _placed_inputs(content)
    for name, sha256 in placed.items():
        problem = _path_problem(name) or _input_problem(root, name, sha256)
        if problem:
            problems.append(problem)
    covered = {a["name"] for a in content["artifacts"]} | set(placed) | {MANIFEST_NAME}
    added = sorted(set(_files_under(root)) - covered)
    earlier = PLACED_INPUTS not in content["parameters"]
    if added and not earlier:
        problems.append(
            f"{len(added)} file(s) the manifest does not cover (added): {', '.join(added[:3])}"
            f"{' ...' if len(added) > 3 else ''}"
        )
    if problems:
        message = problems[0] if len(problems) == 1 else f"{len(problems)} problems: " + "; ".join(problems)
        raise VerificationFailed(message, problems)
    return len(content["artifacts"]), len(placed), tuple(added) if earlier else ()


def _placed_inputs(content: dict[str, Any]) -> dict[str, str]:
    """Relative path → sha256 of every input placed in the export (``PLACED_INPUTS``)."""
    folders = content["parameters"].get(PLACED_INPUTS, [])
    if not isinstance(folders, list) or not all(isinstance(f, str) and f for f in folders):
        raise VerificationFailed(f"the manifest's parameters.{PLACED_INPUTS} must be a list of folder names")
    return {f"{folder}/{i['name']}": i["sha256"] for folder in folders for i in content["inputs"]}


def _input_problem(root: Path, name: str, sha256: str) -> str | None:
    """A placed input (a link to its source image, which lies outside the folder, or a copy of it), by content."""
    full = root / name
    if not full.exists():
        return f"{name}: missing (deleted or moved, or its source image is)"
    if not full.is_file():
        return f"{name}: not a regular file"
    actual = file_sha256(full)
    if actual != sha256:
        return f"{name}: not the image that was labeled (sha256 {actual}, the manifest's input {sha256})"
    return None


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
    """Every file under ``folder`` at any depth, sorted, relative to ``folder`` (as ``write_signed_export`` takes
    them, wherever the working directory is): what an export wrote there (links to files included; links to folders
    are listed by ``os.walk`` as folders and not followed). Export manifests cover these: as artifacts, or as placed
    inputs (``PLACED_INPUTS``)."""
    return sorted(
        (Path(dirpath) / name).relative_to(folder) for dirpath, _dirs, names in os.walk(folder) for name in names
    )


def _files_under(root: Path) -> list[str]:
    return [p.as_posix() for p in files_under(root)]


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
