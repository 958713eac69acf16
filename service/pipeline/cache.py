"""Embedding reuse: decoded images and their SAM features, by content hash, in a byte-bounded LRU with a TTL.

A handle is ``"sha256:" + hex sha256 of the image bytes received`` (raw pixels: of their width, height and that
digest, since the same bytes at another size are another image), so the same image always gives the same handle,
and a Segment request carrying bytes that were seen before hits the cache without one.
Entries hold the decoded image, the SAM image features and, once computed, the detector's raw outputs by
vocabulary key: one for a closed detector (key None; classes only filter that output, so a new class prompt on
a cached image skips the detector too), one per distinct vocabulary for an open-vocabulary detector.

Keys here are handles alone, without the models' identity: one EmbeddingCache belongs to one Pipeline, which serves
one loaded model set for the life of the process, so every entry was computed by the models that read it. The
shared tier crosses processes and models, so its keys name them (``service.pipeline.shared_cache.ModelIdentity``).
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import threading
import time
from collections.abc import Callable, Hashable
from typing import Protocol

import numpy as np

from service.models.tensors import DetectorOutput, ImageFeatures
from service.pipeline.image import DecodedImage

PREFIX = "sha256:"


def handle_for(sha256_hex: str, raw_size: tuple[int, int] | None = None) -> str:
    """The handle of an image whose bytes hash to ``sha256_hex``: encoded bytes name their image alone; raw pixel
    bytes (``raw_size`` their width and height) only with their size, so it is hashed in."""
    if raw_size is None:
        return PREFIX + sha256_hex
    width, height = raw_size
    return PREFIX + hashlib.sha256(f"raw {width}x{height} {sha256_hex}".encode()).hexdigest()


@dataclasses.dataclass
class CacheEntry:
    image: DecodedImage
    features: ImageFeatures
    detector: dict[Hashable, DetectorOutput] = dataclasses.field(default_factory=dict)
    # Kept low-res masks (options.keep_masks): mask handle -> (S/4, S/4) float32 logits, oldest first.
    masks: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)
    last_used: float = 0.0

    @property
    def nbytes(self) -> int:
        # copies of the values (one C call each under the GIL): the shared tier reads this in a worker thread while
        # the event loop may add an output or a mask
        det = sum(o.raw.nbytes for o in list(self.detector.values()))
        kept = sum(m.nbytes for m in list(self.masks.values()))
        return int(self.image.rgb.nbytes + self.features.nbytes + det + kept)


# A replica that keeps answering an image from its own tier restarts the shared values' TTL at most once per this
# fraction of the TTL; the shared tier keeps values this much longer than the TTL, so a use on one replica keeps
# them alive for every other for the whole TTL.
SHARED_TOUCH_FRACTION = 0.25


class SharedTier(Protocol):
    """A second cache tier behind the in-process one, shared by replicas (``service.pipeline.shared_cache.RedisTier``).
    Blocking calls (the pipeline runs them in worker threads); failures are the tier's own business: a get that
    cannot reach it is a miss, a put that cannot is skipped (``put`` and ``add_masks`` say whether they stored)."""

    def get(self, handle: str) -> CacheEntry | None: ...

    def put(self, handle: str, entry: CacheEntry) -> bool: ...

    def add_detector_output(self, handle: str, output: DetectorOutput, key: Hashable = None) -> None: ...

    def add_masks(self, handle: str, masks: dict[str, np.ndarray]) -> bool: ...

    def mask(self, handle: str, mask_handle: str) -> np.ndarray | None: ...

    def touch(self, handle: str, entry: CacheEntry) -> None: ...


class EmbeddingCache:
    """Thread-safe LRU of CacheEntry, bounded by ``max_bytes`` in total and ``ttl`` seconds since last use.

    ``max_bytes`` 0 disables caching (every lookup misses, nothing is kept).
    """

    def __init__(self, max_bytes: int, ttl: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.max_bytes = max_bytes
        self.ttl = ttl
        self._clock = clock
        self._entries: collections.OrderedDict[str, CacheEntry] = collections.OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0
        self.evictions = 0

    def get(self, handle: str) -> CacheEntry | None:
        """The live entry for ``handle`` (refreshing its place and TTL), or None (counted as a miss)."""
        with self._lock:
            self._expire()
            entry = self._entries.get(handle)
            if entry is None:
                self.misses += 1
                return None
            self.hits += 1
            entry.last_used = self._clock()
            self._entries.move_to_end(handle)
            return entry

    def put(self, handle: str, entry: CacheEntry) -> bool:
        """Stores ``entry`` (replacing one with the same handle: its detector outputs and kept masks that ``entry``
        lacks carry over, so a request that computed the same image meanwhile loses nothing another kept, e.g. the
        mask handle it answered), then evicts least recently used to fit. False when it does not fit at all."""
        with self._lock:
            if self.max_bytes <= 0 or entry.nbytes > self.max_bytes:
                return False
            old = self._entries.pop(handle, None)
            if old is not None:
                self._bytes -= old.nbytes
                entry.detector = {**old.detector, **entry.detector}
                entry.masks = {**old.masks, **entry.masks}
            entry.last_used = self._clock()
            self._entries[handle] = entry
            self._bytes += entry.nbytes
            self._fit()
            return True

    def _fit(self) -> None:
        """Evicts least recently used entries until the total fits ``max_bytes`` (the lock held)."""
        while self._bytes > self.max_bytes and self._entries:
            _, evicted = self._entries.popitem(last=False)
            self._bytes -= evicted.nbytes
            self.evictions += 1

    def add_detector_output(self, handle: str, output: DetectorOutput, key: Hashable = None) -> None:
        """Remembers the detector's raw output for vocabulary ``key`` of a cached image (if it is still cached), never
        so many that the entry outgrows the cache (the oldest vocabularies' dropped first, this one too where the image
        and its kept masks leave no room for it); then least recently used images make room. (An open-vocabulary
        detector's output per distinct vocabulary was added uncounted against ``max_bytes``: one image asked with ever
        new classes grew without bound; and an entry that the one new output made outgrow the cache evicted itself,
        its handle and kept masks NOT_FOUND at their next use.)"""
        with self._lock:
            entry = self._entries.get(handle)
            if entry is None or key in entry.detector:
                return
            entry.detector[key] = output
            self._bytes += output.raw.nbytes
            while entry.detector and entry.nbytes > self.max_bytes:
                self._bytes -= entry.detector.pop(next(iter(entry.detector))).raw.nbytes
            entry.last_used = self._clock()  # a use: the entry moves to the young end, so its TTL restarts
            self._entries.move_to_end(handle)
            self._fit()

    def add_masks(self, handle: str, masks: dict[str, np.ndarray], limit: int) -> set[str]:
        """Keeps low-res masks with a cached image (if it is still cached): at most ``limit``, and never so many that
        the entry outgrows the cache: earlier calls' masks are dropped first (oldest first), then the last of
        ``masks`` (a response's first instances keep theirs, as with ``limit``); then least recently used images
        make room. Returns the keys of ``masks`` kept."""
        with self._lock:
            entry = self._entries.get(handle)
            if entry is None:
                return set()
            for key, logits in masks.items():
                old = entry.masks.pop(key, None)
                self._bytes += logits.nbytes - (old.nbytes if old is not None else 0)
                entry.masks[key] = logits
            newest = [key for key in masks if key in entry.masks]
            while entry.masks and (len(entry.masks) > limit or entry.nbytes > self.max_bytes):
                older = next((key for key in entry.masks if key not in masks), None)
                self._bytes -= entry.masks.pop(older if older is not None else newest.pop()).nbytes
            entry.last_used = self._clock()  # as add_detector_output
            self._entries.move_to_end(handle)
            self._fit()
            return set(masks) & set(entry.masks) if self._entries.get(handle) is entry else set()

    def mask(self, handle: str, mask_handle: str) -> np.ndarray | None:
        """A kept low-res mask of a cached image (a live one), or None."""
        with self._lock:
            self._expire()
            entry = self._entries.get(handle)
            return entry.masks.get(mask_handle) if entry is not None else None

    def _expire(self) -> None:
        now = self._clock()
        while self._entries:
            handle, oldest = next(iter(self._entries.items()))
            if now - oldest.last_used <= self.ttl:
                break
            del self._entries[handle]
            self._bytes -= oldest.nbytes

    def clear(self) -> None:
        """Drops every entry and resets the counters."""
        with self._lock:
            self._entries.clear()
            self._bytes = 0
            self.hits = self.misses = self.evictions = 0

    @property
    def nbytes(self) -> int:
        return self._bytes

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, handle: object) -> bool:
        """Whether a live entry is kept for ``handle`` (counted neither as a hit nor as a miss)."""
        with self._lock:
            self._expire()
            return handle in self._entries
