"""``detseg verify`` (a provenance manifest, or a saved response against its own) and ``detseg keygen``."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

from service import provenance
from service.provenance.canonical import strict_json
from service.provenance.response import verify_content


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    ver = sub.add_parser("verify", help="check a provenance manifest: signature, files, and weights' sha256")
    ver.add_argument("manifest", type=Path, help="detseg-manifest.json, or the folder holding it")
    ver.add_argument("--weights", type=Path, action="append", default=[], help="a weights file to check (repeatable)")
    ver.add_argument("--public-key", type=Path, action="append", default=[], help="trusted key (PEM; repeatable)")
    ver.add_argument("--allow-unsigned", action="store_true", help="accept a manifest without a signature")
    ver.set_defaults(func=verify)

    kg = sub.add_parser("keygen", help="write an Ed25519 signing key (PEM, 0600) and its public key (.pub)")
    kg.add_argument("path", type=Path)
    kg.set_defaults(func=keygen)


def verify(args: argparse.Namespace) -> int:
    """An export folder's manifest, or a saved response (`detseg segment --json`) against its own manifest."""
    try:
        keys = [provenance.load_public_key(k) for k in args.public_key]
    except ValueError as e:  # names the file; OSError (a missing file) is reported by main
        print(f"detseg verify: --public-key {e}", file=sys.stderr)
        return 2
    try:
        saved = _saved_response(args.manifest)
        if saved is not None:
            if saved.get("manifest") is None:
                raise provenance.VerificationFailed("the saved response carries no manifest")
            image, instances = saved["image"], saved["instances"]
            if (
                not isinstance(image, dict)
                or not isinstance(instances, list)
                or not isinstance(saved["manifest"], dict)
            ):
                raise provenance.VerificationFailed(
                    f"{args.manifest}: not a saved response (its image and manifest are objects, its instances a list)"
                )
            fields = ("request_id", "profile", "backend")
            result = verify_content(
                saved["manifest"],
                instances,
                {k: v for k, v in image.items() if k not in fields},
                provenance={k: image[k] for k in fields if k in image},
                trusted_keys=keys,
                require_signature=not args.allow_unsigned,
            )
            _check_weights(result.manifest, args.weights)
            signed = f"signed by key {result.key_id}" if result.signed else "not signed"
            print(f"OK: {signed}; {len(saved['instances'])} instance(s) and the image match the manifest")
            if result.signed and not keys:
                print(f"  {_ANY_SIGNER}")
            return 0
        report = provenance.verify_path(
            args.manifest, trusted_keys=keys, weights=args.weights, require_signature=not args.allow_unsigned
        )
    except provenance.VerificationFailed as e:
        print(f"detseg verify: FAILED: {e}", file=sys.stderr)
        return 1
    signed = f"signed by key {report.key_id}" if report.signed else "not signed"
    placed = f", {report.inputs_checked} placed input image(s)" if report.inputs_checked else ""
    weights = f"{report.weights_checked} weights file(s)"
    print(f"OK: {signed}; {report.artifacts_checked} file(s){placed} and {weights} match")
    if report.signed and not keys:
        print(f"  {_ANY_SIGNER}")
    if report.unlisted:  # a manifest from before placed inputs were checked
        print(
            f"  {len(report.unlisted)} file(s) not covered (a manifest written before placed images were checked): "
            f"{', '.join(report.unlisted[:3])}{' ...' if len(report.unlisted) > 3 else ''}"
        )
    return 0


# Said when a signed manifest was checked without --public-key: the signature then shows it is intact, not whose.
_ANY_SIGNER = "no --public-key given: any key's signature passes; give the signer's public key to check who signed"


def _saved_response(path: Path) -> dict[str, Any] | None:
    """A `detseg segment --json` file's content, None for anything else (a manifest or an export folder)."""
    if path.is_dir():
        return None
    try:
        data = strict_json(path.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise provenance.VerificationFailed(f"{path} is not a manifest or a saved response: not JSON ({e})") from None
    return data if isinstance(data, dict) and "instances" in data and "image" in data else None


def _check_weights(manifest: dict[str, Any], weights: list[Path]) -> None:
    """``provenance.verify_weights``, one file at a time: a readable file that matches none of the manifest's models
    is reported in the words `detseg verify` has always used for a saved response; an unreadable one in
    provenance's."""
    models = manifest["models"]
    for w in weights:
        try:
            provenance.verify_weights([w], models)
        except provenance.VerificationFailed:
            if not (w.is_file() and os.access(w, os.R_OK)):
                raise
            names = ", ".join({m["weights_sha256"]: m["name"] for m in models}.values())
            raise provenance.VerificationFailed(
                f"{w.name}: sha256 matches none of the manifest's models ({names})"
            ) from None


def keygen(args: argparse.Namespace) -> int:
    path = provenance.generate_key(args.path)
    key = provenance.load_private_key(path)
    print(f"wrote {path} (private, 0600) and {path}.pub; key id {provenance.key_id(key.public_key())}")
    return 0
