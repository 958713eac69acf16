"""Fetching official weights into the cache: resumable-safe, checksummed, atomic.

A file is only ever visible in the cache under its final name once its sha256 matched; partial
downloads live under a temporary name and are removed on any failure.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
import urllib.error
import urllib.request
from pathlib import Path

from tqdm import tqdm

from service.errors import ChecksumMismatch, WeightsNotFound
from service.models.catalog import CatalogEntry
from service.provenance import file_sha256

log = logging.getLogger(__name__)
_CHUNK = 1 << 20


def _where_to_put(entry: CatalogEntry, cache_dir: Path) -> str:
    return (
        f"download {entry.url} (sha256 {entry.sha256}) and place it at {cache_dir / entry.filename}, "
        "or pass an explicit checkpoint path"
    )


def ensure_weights(
    entry: CatalogEntry,
    cache_dir: Path,
    *,
    offline: bool = False,
    progress: bool = True,
    timeout: float = 60.0,
) -> Path:
    """Returns the verified path of ``entry`` in ``cache_dir``, downloading it first if needed.

    Raises:
        WeightsNotFound: absent and offline, or the download failed (message says where to put the file).
        ChecksumMismatch: the cached or downloaded bytes do not match ``entry.sha256``.
    """
    target = cache_dir / entry.filename
    if target.exists():
        actual = file_sha256(target)
        if actual != entry.sha256:
            raise ChecksumMismatch(
                f"{target} has sha256 {actual}, expected {entry.sha256}; delete it and retry, or "
                + _where_to_put(entry, cache_dir)
            )
        return target
    if offline:
        raise WeightsNotFound(
            f"{entry.filename} is not in the cache and downloads are off: " + _where_to_put(entry, cache_dir),
            files=[entry.filename],
            reasons=["downloads are off"],
        )
    cache_dir.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{entry.filename}.", suffix=".part", dir=cache_dir)
    tmp = Path(tmp_name)
    try:
        digest = hashlib.sha256()
        log.info("downloading %s from %s", entry.filename, entry.url)
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(entry.url, timeout=timeout) as response:
            total = int(response.headers.get("Content-Length") or entry.size_bytes or 0) or None
            with tqdm(total=total, unit="B", unit_scale=True, desc=entry.filename, disable=not progress) as bar:
                for block in iter(lambda: response.read(_CHUNK), b""):
                    out.write(block)
                    digest.update(block)
                    bar.update(len(block))
        actual = digest.hexdigest()
        if actual != entry.sha256:
            raise ChecksumMismatch(
                f"downloaded {entry.filename} has sha256 {actual}, expected {entry.sha256}; refused and removed"
            )
        os.replace(tmp, target)
        return target
    except (urllib.error.URLError, OSError, TimeoutError) as e:
        raise WeightsNotFound(
            f"{entry.filename} is not in the cache and could not be downloaded ({_reason(e)}): "
            + _where_to_put(entry, cache_dir),
            files=[entry.filename],
            reasons=[f"download failed: {_reason(e)}"],
        ) from None
    finally:
        tmp.unlink(missing_ok=True)


def _reason(e: BaseException) -> str:
    if isinstance(e, urllib.error.HTTPError):
        return f"HTTP {e.code}"
    if isinstance(e, urllib.error.URLError):
        return str(e.reason)
    return type(e).__name__
