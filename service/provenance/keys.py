"""Ed25519 keys: generating a key pair on disk, loading keys, and a public key's id."""

from __future__ import annotations

import errno
import logging
import os
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from service.provenance.canonical import sha256_hex

log = logging.getLogger(__name__)


def generate_key(path: Path) -> Path:
    """Writes a new Ed25519 private key to ``path`` (PKCS8 PEM, unencrypted, mode 0600) and its public key to
    ``<path>.pub`` (SubjectPublicKeyInfo PEM, mode 0644); returns ``path``.

    Raises:
        FileExistsError: ``path`` or ``<path>.pub`` exists (a key is never overwritten).
    """
    path = Path(path)
    pub_path = _pub_path(path)
    if pub_path.exists():
        raise _exists(pub_path)
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


def _exists(path: Path) -> FileExistsError:
    """With ``filename`` set, as the OS's own errors have it (the CLI prints ``path: reason``, one line)."""
    return FileExistsError(errno.EEXIST, "exists; refusing to overwrite a key", str(path))


def _pub_path(path: Path) -> Path:
    return path.with_name(path.name + ".pub")


def _write_new(path: Path, data: bytes, mode: int) -> None:
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    except FileExistsError:
        raise _exists(path) from None
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
        OSError: the file cannot be read.
        ValueError: the file holds no unencrypted PEM private key, or one of another algorithm (the message names
            the file).
    """
    try:
        key = serialization.load_pem_private_key(Path(path).read_bytes(), password=None)
    except (ValueError, TypeError) as e:  # TypeError: an encrypted key (no password given)
        raise ValueError(f"{path}: not an unencrypted Ed25519 private key in PEM ({e})") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise ValueError(f"{path} holds a {type(key).__name__}, not an Ed25519 private key")
    mode = os.stat(path).st_mode
    if mode & 0o007:  # other users (a group, as a Kubernetes secret mounted 0440 with fsGroup, is the owner's choice)
        log.warning("signing key %s is readable by every user (mode %04o): chmod 600 it", path, mode & 0o777)
    return key


def load_public_key(source: Path | str | bytes) -> Ed25519PublicKey:
    """The Ed25519 public key from a PEM file path, or from PEM bytes (SubjectPublicKeyInfo).

    Raises:
        OSError: the file cannot be read.
        ValueError: not a PEM public key, or one of another algorithm (the message names the file, if one).
    """
    named = "" if isinstance(source, bytes) else f"{source}: "
    pem = source if isinstance(source, bytes) else Path(source).read_bytes()
    try:
        key = serialization.load_pem_public_key(pem)
    except ValueError as e:
        raise ValueError(f"{named}not an Ed25519 public key in PEM ({e})") from None
    if not isinstance(key, Ed25519PublicKey):
        raise ValueError(f"{named}{type(key).__name__} given where an Ed25519 public key is needed")
    return key


def _raw(public_key: Ed25519PublicKey) -> bytes:
    return public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def key_id(public_key: Ed25519PublicKey) -> str:
    """First 16 hex chars of sha256 of the raw 32-byte public key."""
    return sha256_hex(_raw(public_key))[:16]
