"""The embedding cache on its own: LRU by bytes, TTL since last use, counters (a fake clock, real arrays)."""

from __future__ import annotations

import numpy as np

from service.models.tensors import DetectorOutput, ImageFeatures
from service.pipeline.cache import CacheEntry, EmbeddingCache, handle_for
from service.pipeline.image import DecodedImage


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def entry(kib: int) -> CacheEntry:
    """An entry of exactly ``kib`` KiB + a 12-byte image."""
    features = ImageFeatures(np.zeros((kib * 256,), np.float32), ())
    return CacheEntry(DecodedImage(np.zeros((2, 2, 3), np.uint8), "raw", "0" * 64), features)


def test_hits_misses_and_lru_eviction_by_bytes():
    cache = EmbeddingCache(max_bytes=3 * 1024 + 100, ttl=60, clock=Clock())
    for name in "abc":
        cache.put(handle_for(name), entry(1))
    assert len(cache) == 3 and cache.nbytes == 3 * (1024 + 12)
    assert cache.get(handle_for("a")) is not None  # a becomes most recently used
    cache.put(handle_for("d"), entry(1))  # over budget: b, the least recently used, goes
    assert cache.get(handle_for("b")) is None
    assert cache.get(handle_for("c")) is not None and cache.get(handle_for("d")) is not None
    assert (cache.hits, cache.misses, cache.evictions) == (3, 1, 1)
    cache.put(handle_for("huge"), entry(8))  # larger than the whole cache: not kept, nothing evicted
    assert len(cache) == 3 and cache.get(handle_for("huge")) is None


def test_ttl_counts_from_last_use():
    clock = Clock()
    cache = EmbeddingCache(max_bytes=1 << 20, ttl=10, clock=clock)
    cache.put("h1", entry(1))
    cache.put("h2", entry(1))
    clock.now = 8
    assert cache.get("h1") is not None  # used at 8: lives until 18
    clock.now = 12
    assert cache.get("h2") is None  # last used at 0: expired
    assert cache.get("h1") is not None
    clock.now = 30
    assert cache.get("h1") is None and len(cache) == 0 and cache.nbytes == 0


def test_keeping_a_mask_or_an_output_is_a_use_and_an_expired_entry_is_never_read():
    """Adding a kept mask or a detector output moved the entry to the young end without restarting its TTL: the LRU's
    order no longer followed the entries' ages, and (expiry only looks at the oldest end) an entry dead by its own
    last use was served behind a younger one; a kept mask was read from an expired entry."""
    clock = Clock()
    cache = EmbeddingCache(max_bytes=1 << 20, ttl=10, clock=clock)
    cache.put("a", entry(1))
    clock.now = 5
    cache.put("b", entry(1))
    clock.now = 6
    assert cache.add_masks("a", {"m": np.zeros((4, 4), np.float32)}, limit=4) == {"m"}  # a use of a, at 6
    clock.now = 15.5  # b (last used at 5) has expired; a (at 6) has not
    assert cache.get("b") is None and cache.get("a") is not None
    clock.now = 26
    assert cache.mask("a", "m") is None and len(cache) == 0


def test_detector_output_joins_a_cached_entry_and_counts_its_bytes():
    cache = EmbeddingCache(max_bytes=1 << 20, ttl=10, clock=Clock())
    cache.put("h", entry(1))
    before = cache.nbytes
    cache.add_detector_output("h", DetectorOutput(np.zeros((1, 9, 100), np.float32)))
    got = cache.get("h")
    assert got is not None and None in got.detector and cache.nbytes == before + 3600
    cache.add_detector_output("h", DetectorOutput(np.zeros((1, 5, 100), np.float32)), key=("cat", "red car"))
    assert set(cache.get("h").detector) == {None, ("cat", "red car")} and cache.nbytes == before + 3600 + 2000
    cache.add_detector_output("gone", DetectorOutput(np.zeros((1,), np.float32)))  # not cached: ignored
    assert cache.get("gone") is None and len(cache) == 1 and cache.nbytes == before + 3600 + 2000


def test_zero_bytes_disables_the_cache():
    cache = EmbeddingCache(max_bytes=0, ttl=10)
    cache.put("h", entry(1))
    assert cache.get("h") is None and len(cache) == 0


def test_kept_masks_are_bounded_per_image_counted_in_bytes_and_fit_the_budget():
    cache = EmbeddingCache(max_bytes=3 * 1024 + 100, ttl=60, clock=Clock())
    a, b = handle_for("a"), handle_for("b")
    cache.put(a, entry(1))
    cache.put(b, entry(1))
    mask = np.zeros((8, 8), np.float32)  # 256 bytes
    cache.add_masks(a, {f"mask:{k}": mask + k for k in range(3)}, limit=2)  # the last of the three is dropped
    assert cache.mask(a, "mask:2") is None and cache.mask(a, "mask:1")[0, 0] == 1
    assert cache.nbytes == 2 * (1024 + 12) + 2 * 256
    cache.add_masks(handle_for("absent"), {"mask:9": mask}, limit=2)  # an image no longer cached: nothing kept
    assert cache.nbytes == 2 * (1024 + 12) + 2 * 256
    cache.add_masks(a, {f"mask:{k}": np.zeros((16, 16), np.float32) for k in range(3, 5)}, limit=4)
    # a alone would outgrow the cache with all four: its earlier masks go first, then b makes room.
    assert cache.mask(a, "mask:0") is None and cache.mask(a, "mask:1") is None
    assert cache.mask(a, "mask:3") is not None and cache.mask(a, "mask:4") is not None
    assert cache.get(b) is None and cache.evictions == 1 and cache.nbytes == 1024 + 12 + 2 * 1024


def test_detector_outputs_of_ever_new_vocabularies_stay_within_the_budget():
    """An open-vocabulary detector keeps one output per vocabulary asked of an image: they were added uncounted by
    the budget (nothing evicted however many came). Now the oldest vocabularies' go first when the entry would outgrow
    the cache, and other images make room as for any growth."""
    cache = EmbeddingCache(max_bytes=3 * 1024 + 100, ttl=60, clock=Clock())
    a, b = handle_for("a"), handle_for("b")
    cache.put(a, entry(1))
    cache.put(b, entry(1))
    for k in range(6):  # 512 bytes each
        cache.add_detector_output(a, DetectorOutput(np.zeros((1, 128), np.float32)), key=("vocabulary", k))
    kept = cache.get(a)
    assert kept is not None and cache.nbytes <= cache.max_bytes
    assert list(kept.detector) == [("vocabulary", k) for k in range(2, 6)]  # the newest four fit beside a's image
    assert cache.get(b) is None and cache.evictions == 1  # b made room first
    assert cache.nbytes == kept.nbytes == 1024 + 12 + 4 * 512


def test_an_entry_put_again_keeps_what_the_first_one_gathered():
    """Two requests on the same image, both missing (BatchSegment items run at once): the second's put replaced the
    first's entry, dropping the mask the first had kept and answered a handle for (NOT_FOUND on its next click)."""
    cache = EmbeddingCache(max_bytes=1 << 20, ttl=60, clock=Clock())
    h = handle_for("same")
    cache.put(h, entry(1))
    cache.add_masks(h, {"mask:first": np.ones((8, 8), np.float32)}, limit=4)
    cache.add_detector_output(h, DetectorOutput(np.zeros((1, 9, 100), np.float32)))
    cache.put(h, entry(1))  # the second request's entry, computed meanwhile
    kept = cache.get(h)
    assert kept is not None and cache.mask(h, "mask:first") is not None and None in kept.detector
    assert cache.nbytes == kept.nbytes == 1024 + 12 + 256 + 3600


def test_an_output_the_entry_has_no_room_for_is_not_kept_and_the_entry_stays():
    """An image whose kept masks fill the cache, then asked for classes: the detector output made the entry outgrow
    the cache and it evicted itself (and every other image), so its handle and masks were NOT_FOUND at next use."""
    cache = EmbeddingCache(max_bytes=2 * 1024 + 100, ttl=60, clock=Clock())
    a = handle_for("a")
    cache.put(a, entry(1))
    cache.add_masks(a, {"mask:0": np.zeros((16, 16), np.float32)}, limit=8)  # 1 KiB: the entry nearly fills it
    cache.add_detector_output(a, DetectorOutput(np.zeros((1, 128), np.float32)), key=("vocabulary", 0))
    kept = cache.get(a)
    assert kept is not None and cache.mask(a, "mask:0") is not None and cache.evictions == 0
    assert kept.detector == {} and cache.nbytes == kept.nbytes <= cache.max_bytes


def test_a_responses_first_masks_keep_their_handles_when_bytes_run_short():
    """Past the cache's bytes the response's first masks were dropped (oldest inserted first), where the count limit
    keeps the first ones (the proto: the first max_kept_masks, in response order): the best instances lost theirs."""
    cache = EmbeddingCache(max_bytes=1024 + 12 + 3 * 256, ttl=60, clock=Clock())
    a = handle_for("a")
    cache.put(a, entry(1))
    cache.add_masks(a, {"earlier": np.zeros((8, 8), np.float32)}, limit=8)
    kept = cache.add_masks(a, {f"mask:{k}": np.zeros((8, 8), np.float32) for k in range(5)}, limit=8)
    assert kept == {"mask:0", "mask:1", "mask:2"} and cache.mask(a, "earlier") is None
