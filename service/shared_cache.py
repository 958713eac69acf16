"""The second cache tier, shared by every replica: decoded images, SAM features and detector outputs in Redis,
by content hash, so a handle made on one replica is answered by another without re-encoding.

The in-process LRU (``service.pipeline.cache.EmbeddingCache``) stays the first tier; the pipeline asks this
tier on a first-tier miss and writes what it computes to both. Layout, per image ``<sha>`` (the handle's hex):
- ``detseg:img:<sha>``: the image and its SAM features, one ``.npz`` (numpy's format, loaded with
  ``allow_pickle=False``: nothing from Redis is ever unpickled);
- ``detseg:det:<sha>``: a hash, field = the detector-output key as JSON (``null`` for a closed detector, the
  vocabulary and its embeddings' sha256 for an open one), value = the raw output as ``.npz``.
Both expire ``ttl`` seconds after their last use (refreshed on every hit). Entries over ``max_entry_bytes`` are
not shared; Redis's own ``maxmemory`` + ``allkeys-lru`` bounds the whole (the chart configures it).

Redis down or slow (``timeout`` per call) never fails a request: the tier reports a miss, skips writes, and
does not try again for ``retry_after`` seconds; ``up`` and the counters say so (metrics, one WARNING per
outage).
"""

from __future__ import annotations

import io
import json
import logging
import threading
import time
from collections.abc import Callable, Hashable
from typing import Any

import numpy as np

from service.pipeline.cache import PREFIX, CacheEntry
from service.pipeline.image import DecodedImage
from service.runners.base import DetectorOutput, ImageFeatures

log = logging.getLogger(__name__)


class RedisTier:
    """Thread-safe (redis-py's pooled client); every method swallows Redis failures (see module doc)."""

    def __init__(
        self,
        url: str,
        ttl: float,
        max_entry_bytes: int,
        timeout: float,
        retry_after: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        import redis

        self._client = redis.Redis.from_url(url, socket_timeout=timeout, socket_connect_timeout=timeout)
        self._errors_type: tuple[type[BaseException], ...] = (redis.RedisError, OSError)
        self.ttl = ttl
        self.max_entry_bytes = max_entry_bytes
        self.retry_after = retry_after
        self._clock = clock
        self._down_until = 0.0
        self._lock = threading.Lock()
        self.up = True
        self.hits = 0
        self.misses = 0
        self.errors = 0
        self.writes = 0

    # -- availability ---------------------------------------------------------------------------------------

    def _available(self) -> bool:
        return self._clock() >= self._down_until

    def _failed(self, error: BaseException) -> None:
        with self._lock:
            self.errors += 1
            self._down_until = self._clock() + self.retry_after
            if self.up:
                log.warning("shared cache (Redis) unavailable: %s; serving from this replica's cache only", error)
            self.up = False

    def _succeeded(self) -> None:
        if not self.up:
            with self._lock:
                if not self.up:
                    log.info("shared cache (Redis) reachable again")
                self.up = True

    def ping(self) -> bool:
        """Checks Redis now (also after an outage, regardless of ``retry_after``); returns ``up``."""
        try:
            self._client.ping()
        except self._errors_type as e:
            self._failed(e)
        else:
            self._down_until = 0.0
            self._succeeded()
        return self.up

    # -- entries ---------------------------------------------------------------------------------------------

    def get(self, handle: str) -> CacheEntry | None:
        """The shared entry of ``handle`` with every detector output stored for it, or None."""
        if not self._available():
            return None
        sha = handle.removeprefix(PREFIX)
        try:
            with self._client.pipeline() as p:
                p.get(_image_key(sha))
                p.hgetall(_detector_key(sha))
                p.expire(_image_key(sha), _seconds(self.ttl))
                p.expire(_detector_key(sha), _seconds(self.ttl))
                blob, outputs, _, _ = p.execute()
        except self._errors_type as e:
            self._failed(e)
            return None
        self._succeeded()
        if blob is None:
            self.misses += 1
            return None
        self.hits += 1
        entry = _entry_from_bytes(blob)
        for field, raw in outputs.items():
            entry.detector[_key_from_text(field.decode())] = DetectorOutput(raw=_arrays(raw)["raw"])
        return entry

    def put(self, handle: str, entry: CacheEntry) -> None:
        """Shares an entry (its detector outputs too), unless it is larger than ``max_entry_bytes``."""
        if not self._available() or entry.nbytes > self.max_entry_bytes:
            return
        sha = handle.removeprefix(PREFIX)
        try:
            with self._client.pipeline() as p:
                p.set(_image_key(sha), _entry_to_bytes(entry), ex=_seconds(self.ttl))
                for key, output in entry.detector.items():
                    p.hset(_detector_key(sha), _key_text(key), _to_bytes(raw=output.raw))
                if entry.detector:
                    p.expire(_detector_key(sha), _seconds(self.ttl))
                p.execute()
        except self._errors_type as e:
            self._failed(e)
            return
        self.writes += 1
        self._succeeded()

    def add_detector_output(self, handle: str, output: DetectorOutput, key: Hashable = None) -> None:
        """Shares one more detector output of an image already shared."""
        if not self._available() or output.raw.nbytes > self.max_entry_bytes:
            return
        sha = handle.removeprefix(PREFIX)
        try:
            with self._client.pipeline() as p:
                p.hset(_detector_key(sha), _key_text(key), _to_bytes(raw=output.raw))
                p.expire(_detector_key(sha), _seconds(self.ttl))
                p.execute()
        except self._errors_type as e:
            self._failed(e)
            return
        self._succeeded()

    def close(self) -> None:
        self._client.close()


def _seconds(ttl: float) -> int:
    return max(1, int(round(ttl)))


def _image_key(sha: str) -> str:
    return f"detseg:img:{sha}"


def _detector_key(sha: str) -> str:
    return f"detseg:det:{sha}"


def _key_text(key: Hashable) -> str:
    """A detector-output key as JSON: None (closed detector) or (vocabulary names, embeddings sha256)."""
    return json.dumps(key)


def _key_from_text(text: str) -> Hashable:
    value = json.loads(text)
    if value is None:
        return None
    names, digest = value
    return tuple(names), digest


def _to_bytes(**arrays: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    return buffer.getvalue()


def _arrays(blob: bytes) -> Any:
    return np.load(io.BytesIO(blob), allow_pickle=False)


def _entry_to_bytes(entry: CacheEntry) -> bytes:
    meta = json.dumps({"format": entry.image.format, "sha256": entry.image.sha256}).encode()
    feats = entry.features.on_host()  # device-resident features spill to the host only here
    return _to_bytes(
        rgb=entry.image.rgb, meta=np.frombuffer(meta, np.uint8), image_embed=feats.image_embed,
        **{f"high_res_{i}": f for i, f in enumerate(feats.high_res_feats)},
    )  # fmt: skip


def _entry_from_bytes(blob: bytes) -> CacheEntry:
    with _arrays(blob) as data:
        meta = json.loads(bytes(data["meta"]).decode())
        high_res = tuple(data[f"high_res_{i}"] for i in range(sum(k.startswith("high_res_") for k in data.files)))
        image = DecodedImage(rgb=np.ascontiguousarray(data["rgb"]), format=meta["format"], sha256=meta["sha256"])
        features = ImageFeatures(image_embed=data["image_embed"], high_res_feats=high_res)
    return CacheEntry(image, features)
