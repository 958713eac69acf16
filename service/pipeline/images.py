"""A request's images: the two cache tiers (this process's LRU, then the optional shared tier), decoding and
validation, handles, and the exemplars' reference images.

A handle is the content hash of the image's bytes (``service.pipeline.cache``; raw pixels' with their size), so
bytes and their handle are the same image; a handle that is in neither tier is NOT_FOUND.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import re
import threading
import time
from collections.abc import Hashable, Iterator

import numpy as np

from service.errors import InvalidInput, NotFound
from service.models.tensors import DetectorOutput
from service.pipeline.cache import (
    PREFIX,
    SHARED_TOUCH_FRACTION,
    CacheEntry,
    EmbeddingCache,
    SharedTier,
    handle_for,
)
from service.pipeline.image import DecodedImage, ImageLimits, decode_image, image_from_raw
from service.pipeline.lru import LRU
from service.pipeline.prompts import Exemplar, ImageInput, check_box_inside
from service.pipeline.stages import stage

_HANDLE = re.compile(re.escape(PREFIX) + "[0-9a-f]{64}")  # EncodeImage's handle: lower-case hex

TOUCHED_KEPT = 4096  # images whose last shared-TTL restart is remembered (the least recently used forgotten)


@dataclasses.dataclass(frozen=True)
class Lookup:
    """An image by its cache handle: the cached entry, or None when neither tier has it. ``sha256``: the hex sha256
    of the bytes received (ImageInfo.sha256), None for an image given by its handle."""

    handle: str
    entry: CacheEntry | None
    sha256: str | None = None


@dataclasses.dataclass(frozen=True)
class FoundImage:
    """A request's image by its cache handle: the cached entry (None: not cached) and the decoded image."""

    handle: str
    entry: CacheEntry | None
    image: DecodedImage


class ImageStore:
    """Finds, decodes and keeps a request's images. ``cache``: this replica's tier (None: nothing kept);
    ``shared``: the tier shared by replicas (None: none), asked after a miss here (blocking: in a worker thread);
    ``max_kept_masks``: low-res masks kept per cached image (options.keep_masks); ``jpeg_device``: the torch device
    JPEGs are decoded on (``decode_image``)."""

    def __init__(
        self,
        limits: ImageLimits,
        cache: EmbeddingCache | None = None,
        shared: SharedTier | None = None,
        max_kept_masks: int = 0,
        jpeg_device: str = "cpu",
    ) -> None:
        self.limits = limits
        self.jpeg_device = jpeg_device
        self.cache = cache if cache is not None else EmbeddingCache(0, 0.0)
        self.shared = shared
        self.max_kept_masks = max_kept_masks
        # handle -> when its shared values' TTL was last restarted here (lookups run in worker threads)
        self._touched: LRU[str, float] = LRU(TOUCHED_KEPT)
        self._touch_lock = threading.Lock()

    async def find(self, image_input: ImageInput, timings: dict[str, float]) -> FoundImage:
        """The request's image: from the cache (bytes or handle), else decoded (timed as "decode_image")."""
        if self.shared is None:
            found = self.lookup(image_input)
        else:  # the shared tier is a network call
            found = await asyncio.to_thread(self.lookup, image_input)
        if found.entry is not None:
            return FoundImage(found.handle, found.entry, found.entry.image)
        with stage(timings, "decode_image", bytes=len(image_input.data)) as span:
            image = await asyncio.to_thread(self.decode, image_input, found.sha256)
            span.set_attributes({"image.width": image.width, "image.height": image.height})
        return FoundImage(found.handle, None, image)

    def lookup(self, image: ImageInput, field: str = "image") -> Lookup:
        """The handle and cached entry (or None) of an image given by bytes or handle. A handle that is not cached
        is NOT_FOUND. Looks in the shared tier (blocking) after a miss in this replica's cache."""
        handle = image.handle
        if handle is not None:
            if _HANDLE.fullmatch(handle) is None:
                raise InvalidInput(
                    f"{field}.handle: not a handle from EncodeImage (expected 'sha256:' + 64 hex digits)"
                )
            entry = self.cached(handle)
            if entry is None:
                raise NotFound(
                    f"{field}.handle: {handle[:19]}... is unknown or expired (cached images live "
                    f"{self.cache.ttl:.0f} s after last use, fewer under memory pressure); send the image again"
                )
            return Lookup(handle, entry)
        digest = hashlib.sha256(image.data).hexdigest()
        handle = handle_for(digest, image.raw_size)
        return Lookup(handle, self.cached(handle), digest)

    def cached(self, handle: str) -> CacheEntry | None:
        """This replica's entry, else the shared tier's (then kept here too), else None. A hit here restarts the
        shared entry's TTL too (at most every SHARED_TOUCH_FRACTION of the TTL per image), sharing the entry again
        where the shared tier lost it (evicted, or Redis restarted): a handle used on one worker only expired from the
        shared tier meanwhile, and the next call that reached another worker was NOT_FOUND."""
        entry = self.cache.get(handle)
        if self.shared is None:
            return entry
        now = time.monotonic()
        if entry is None:
            entry = self.shared.get(handle)  # a good read restarts its TTL
            if entry is not None:
                self.cache.put(handle, entry)
                with self._touch_lock:
                    self._touched.put(handle, now)
            return entry
        with self._touch_lock:
            last = self._touched.get(handle)
            due = last is None or now - last >= self.cache.ttl * SHARED_TOUCH_FRACTION
            if due:
                self._touched.put(handle, now)
        if due:
            self.shared.touch(handle, entry)
        return entry

    def decode(self, image: ImageInput, sha256: str | None, field: str = "image") -> DecodedImage:
        """Decodes an image's bytes; ``sha256``: their hex digest when known (hashed once, for the cache lookup)."""
        if image.raw is not None:
            return image_from_raw(image.raw, image.width, image.height, self.limits, sha256, f"{field}.raw")
        return decode_image(
            image.encoded or b"", self.limits, f"{field}.encoded", sha256=sha256, jpeg_device=self.jpeg_device
        )

    def reference_images(self, exemplars: tuple[Exemplar, ...]) -> list[DecodedImage | None]:
        """Each exemplar's own image (None: the request's), found or decoded as the request's image is, each
        distinct image once, with every box checked against its image."""
        decoded: dict[str, DecodedImage] = {}
        out: list[DecodedImage | None] = []
        for i, e in enumerate(exemplars):
            if e.image is None:
                out.append(None)
                continue
            field = f"exemplars[{i}].image"
            found = self.lookup(e.image, field)
            if found.handle not in decoded:
                entry = found.entry
                decoded[found.handle] = entry.image if entry is not None else self.decode(e.image, found.sha256, field)
            ref = decoded[found.handle]
            check_box_inside(e.box, ref.width, ref.height, f"exemplars[{i}].box")
            out.append(ref)
        return out

    async def put(self, handle: str, entry: CacheEntry) -> bool:
        """Keeps a new entry in both tiers (the shared one before returning: a handle must work on every replica
        at once). False when neither tier kept it (too large for both, or the shared one unreachable)."""
        kept = self.cache.put(handle, entry)
        if self.shared is not None:
            kept = await asyncio.to_thread(self.shared.put, handle, entry) or kept
        return kept

    async def add_detector_output(self, handle: str, output: DetectorOutput, key: Hashable) -> None:
        """Adds a detector output to a cached image's entry, in both tiers."""
        self.cache.add_detector_output(handle, output, key)
        if self.shared is not None:
            await asyncio.to_thread(self.shared.add_detector_output, handle, output, key)

    async def add_masks(self, handle: str, masks: dict[str, np.ndarray]) -> set[str]:
        """Keeps low-res masks with a cached image (options.keep_masks), in both tiers: the first
        ``max_kept_masks`` of ``masks`` (in order). Returns the keys kept (none when the image is not cached)."""
        first = dict(list(masks.items())[: self.max_kept_masks])
        kept = self.cache.add_masks(handle, first, self.max_kept_masks)
        if self.shared is not None and await asyncio.to_thread(self.shared.add_masks, handle, first):
            kept = set(first)
        return kept

    async def kept_mask(self, handle: str, mask_handle: str, field: str) -> np.ndarray:
        """A kept low-res mask of the image ``handle`` names (this replica's, else the shared tier's), or NotFound
        naming ``field``."""
        logits = self.cache.mask(handle, mask_handle)
        if logits is None and self.shared is not None:
            logits = await asyncio.to_thread(self.shared.mask, handle, mask_handle)
        if logits is None:
            raise NotFound(
                f"{field}: {mask_handle} is unknown for this image or expired (kept masks live with the image's cache "
                "entry); send the region without it, or ask again with options.keep_masks"
            )
        return logits

    @contextlib.contextmanager
    def local_only(self) -> Iterator[None]:
        """Without the shared tier for the body (nothing read from it or left in it), e.g. a replica's warm-up."""
        shared, self.shared = self.shared, None
        try:
            yield
        finally:
            self.shared = shared
