"""Official-weights download against a real loopback HTTP server: checksum, atomicity, offline message."""

from __future__ import annotations

import functools
import hashlib
import http.server
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from service.errors import ChecksumMismatch, WeightsNotFound
from service.models.catalog import CatalogEntry
from service.models.download import ensure_weights

PAYLOAD = b"weights!" * 50_000  # 400 kB, several chunks


@pytest.fixture
def http_root(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    root = tmp_path / "www"
    root.mkdir()
    (root / "model.pt").write_bytes(PAYLOAD)
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(root))
    handler.log_message = lambda *a, **k: None  # type: ignore[assignment]
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", root
    server.shutdown()
    server.server_close()


def _entry(base: str, sha256: str, path: str = "model.pt") -> CatalogEntry:
    return CatalogEntry("m", "detector", f"{base}/{path}", sha256, len(PAYLOAD), "yolo11n.yaml", "v1")


def test_good_checksum_downloads_once_into_the_cache(http_root, tmp_path):
    base, root = http_root
    cache = tmp_path / "cache"
    path = ensure_weights(_entry(base, hashlib.sha256(PAYLOAD).hexdigest()), cache, progress=False)
    assert path == cache / "model.pt" and path.read_bytes() == PAYLOAD
    (root / "model.pt").unlink()  # a second call must not need the network
    assert ensure_weights(_entry(base, hashlib.sha256(PAYLOAD).hexdigest()), cache, progress=False) == path


def test_bad_checksum_is_refused_and_leaves_nothing_behind(http_root, tmp_path):
    base, _ = http_root
    cache = tmp_path / "cache"
    with pytest.raises(ChecksumMismatch, match="refused and removed"):
        ensure_weights(_entry(base, "0" * 64), cache, progress=False)
    assert list(cache.iterdir()) == []


def test_http_error_names_the_file_and_where_to_put_it(http_root, tmp_path):
    base, _ = http_root
    cache = tmp_path / "cache"
    with pytest.raises(WeightsNotFound, match=r"HTTP 404.*place it at .*cache/missing.pt"):
        ensure_weights(_entry(base, "0" * 64, "missing.pt"), cache, progress=False)
    assert list(cache.iterdir()) == []


def test_offline_without_the_file_says_where_to_put_it(tmp_path):
    entry = _entry("http://127.0.0.1:9", "0" * 64)
    with pytest.raises(WeightsNotFound, match=r"model.pt is not in the cache and downloads are off.*model.pt"):
        ensure_weights(entry, tmp_path, offline=True)


def test_corrupted_cached_file_is_reported(tmp_path):
    (tmp_path / "model.pt").write_bytes(b"tampered")
    with pytest.raises(ChecksumMismatch, match="delete it and retry"):
        ensure_weights(_entry("http://127.0.0.1:9", hashlib.sha256(PAYLOAD).hexdigest()), tmp_path)


def test_offline_official_profile_names_every_missing_file(tmp_path):
    from service.config import Settings
    from service.models.profiles import resolve_models

    with pytest.raises(WeightsNotFound) as err:
        resolve_models(Settings(models="official", cache_dir=tmp_path, offline=True))
    message = str(err.value)
    assert "yolo11n.pt" in message and "sam2.1_hiera_tiny.pt" in message and str(tmp_path) in message


def test_auto_profile_without_official_weights_serves_the_open_demo_with_one_warning(tmp_path, caplog):
    import logging

    from service.config import Settings
    from service.models.profiles import resolve_models

    caplog.set_level(logging.WARNING)
    models = resolve_models(Settings(models="auto", cache_dir=tmp_path, offline=True))
    assert models.profile == "demo-open" and models.detector.name == "shapes-yoloe"
    (warning,) = [r for r in caplog.records if r.levelno >= logging.WARNING]
    message = warning.getMessage()
    assert "\n" not in message and "DEMO" in message and "yolo11n.pt, sam2.1_hiera_tiny.pt" in message
    assert "--models official" in message


def test_auto_profile_warning_says_the_download_failed_and_why(http_root, tmp_path, caplog, monkeypatch):
    """Online but the files cannot be fetched (here a real HTTP 404): the one WARNING says so, not just "absent"."""
    import dataclasses
    import logging

    from service.config import Settings
    from service.models import catalog
    from service.models.profiles import resolve_models

    base, _ = http_root
    for name in catalog.PROFILES["official"]:
        entry = catalog.CATALOG[name]
        monkeypatch.setitem(catalog.CATALOG, name, dataclasses.replace(entry, url=f"{base}/{entry.filename}"))
    caplog.set_level(logging.INFO)
    models = resolve_models(Settings(models="auto", cache_dir=tmp_path / "cache"), progress=False)
    assert models.profile == "demo-open"
    assert any("downloading yolo11n.pt" in r.getMessage() for r in caplog.records)
    (warning,) = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert "could not be fetched (download failed: HTTP 404)" in warning.getMessage()
