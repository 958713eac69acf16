"""The second cache tier, shared by every replica: decoded images, SAM features and detector outputs in Redis,
by content hash and by what computed them, so a handle made on one replica is answered by another replica of the
same models without re-encoding, and never by a replica of other models.

The in-process LRU (``service.pipeline.cache.EmbeddingCache``) stays the first tier; the pipeline asks this
tier on a first-tier miss and writes what it computes to both. Layout, per image ``<sha>`` (the handle's hex; the
handle clients see is the same on every replica, only these keys carry the models):
- ``detseg:img:<segmenter identity>:<sha>``: the image and its SAM features, one ``.npz`` (numpy's format, loaded
  with ``allow_pickle=False``: nothing from Redis is ever unpickled);
- ``detseg:msk:<segmenter identity>:<sha>``: a hash of the image's kept low-res masks (options.keep_masks), field =
  mask handle, value = its float32 logits; at most ``max_masks`` of them, the longest kept dropped first (as the
  replica's own tier keeps them);
- ``detseg:det:<detector identity>:<sha>``: a hash, field = the detector-output key as JSON (``null`` for a closed
  detector, the vocabulary and its embeddings' sha256 for an open one), value = the raw output as ``.npz``; at most
  ``max_entry_bytes`` of them, the longest kept dropped first (one image asked with ever new vocabularies grew
  without bound, and every read of it loaded them all);
- beside each hash, ``<its key>:order``: its fields by when each was stored (a sorted set), for those bounds.
The identities (``ModelIdentity``) are digests of the weights sha256, name, version, input size, precision, backend
and (torch) device kind of the model that computed the value, and ``PREPROCESSING_VERSION``: replicas of other
weights (a rolling upgrade) or another numerical variant miss each other's entries; replicas that differ only in
their detector share images and features, not detections.
All expire ``ttl`` (plus ``SHARED_TOUCH_FRACTION`` of it: a replica answering from its own copy restarts them at most
that often) after their last good read or write; a replica that finds them gone when it restarts them (evicted, or
Redis restarted) shares its copy again. Entries over ``max_entry_bytes`` are not shared; Redis's own ``maxmemory`` +
``allkeys-lru`` bounds the whole (the chart configures it). A write Redis refuses (over its ``maxmemory``) leaves
that value unshared and the tier up.

A value that does not parse (garbage, a truncated ``.npz``, arrays of the wrong dtype or shape for these models) is
a miss: it is deleted (its TTL is not refreshed), counted in ``corrupt`` (metric ``detseg.cache.shared.corrupt``)
and logged once per process at WARNING; the request recomputes and shares a good value.

Redis down or slow (``timeout`` per call) never fails a request: the tier reports a miss, skips writes, and
does not try again for ``retry_after`` seconds; ``up`` and the counters say so (metrics, one WARNING per
outage).
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import logging
import math
import threading
import time
from collections.abc import Callable, Hashable
from typing import Any

import numpy as np

from service.models.roles import ModelDescriptor, ModelRole
from service.models.tensors import DetectorOutput, ImageFeatures
from service.pipeline.cache import PREFIX, SHARED_TOUCH_FRACTION, CacheEntry
from service.pipeline.image import DecodedImage
from service.pipeline.phrases import PhraseReader
from service.runners.base import Runner

log = logging.getLogger(__name__)

# Bump when image decoding or the models' pre-processing change what an image's cached values are, or when this
# module's value layout changes: every key then names a new namespace and older entries are never read.
PREPROCESSING_VERSION = 2  # 2: the ``:order`` sets beside the hashes

# Stores field/value pairs in a hash and keeps only its newest ARGV[1] fields (by the sorted set beside it; fields the
# set lost, evicted alone, are dropped), both expiring ARGV[2] milliseconds from now.
_KEEP_NEWEST = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
for i = 3, #ARGV, 2 do
  redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1])
  redis.call('ZADD', KEYS[2], now + (i - 3) / 2, ARGV[i])
end
if redis.call('HLEN', KEYS[1]) > redis.call('ZCARD', KEYS[2]) then  -- the order set was lost (evicted): unbounded
  for _, field in ipairs(redis.call('HKEYS', KEYS[1])) do
    if not redis.call('ZSCORE', KEYS[2], field) then redis.call('HDEL', KEYS[1], field) end
  end
end
local over = redis.call('ZCARD', KEYS[2]) - tonumber(ARGV[1])
if over > 0 then
  redis.call('HDEL', KEYS[1], unpack(redis.call('ZRANGE', KEYS[2], 0, over - 1)))
  redis.call('ZREMRANGEBYRANK', KEYS[2], 0, over - 1)
end
redis.call('PEXPIRE', KEYS[1], ARGV[2])
redis.call('PEXPIRE', KEYS[2], ARGV[2])
return 1
"""


@dataclasses.dataclass(frozen=True)
class ModelIdentity:
    """What computed the shared values; part of every key.

    ``segmenter``: hex digest naming the decoded images and SAM features (segmenter weights sha256, name, version,
    input size, precision, backend, device kind, PREPROCESSING_VERSION); ``detector``: the same for the detector's
    raw outputs (its vocabulary too). ``image_size``: the segmenter's square input side S, pixels (features are checked
    against it); ``num_classes``: a closed detector's vocabulary size (0 for an open vocabulary, whose outputs are
    checked against their key's names).
    """

    segmenter: str
    detector: str
    image_size: int
    num_classes: int

    @classmethod
    def of(
        cls, runner: Runner, reader: PhraseReader | None = None, jpeg_device: str = "cpu", device: str = "cpu"
    ) -> ModelIdentity:
        """The identity of a loaded runner's detector and segmenter (computed once, where the tier is built); the
        detector's names the phrase ``reader`` too (it changes what a text's detections are), and both name nvJPEG
        when JPEGs are decoded on a GPU (``jpeg_device``: its pixels are its own; the host's are Pillow's) and the
        kind of device the torch backend computes on (``device``: a GPU's fp32 is not the CPU's, e.g. TF32)."""
        by_role = {m.role: m for m in runner.models}
        detector, segmenter = by_role[ModelRole.DETECTOR], by_role[ModelRole.SEGMENTER]
        jpeg = "" if jpeg_device == "cpu" else "nvjpeg"
        kind = device.split(":")[0] if runner.backend == "torch" else "cpu"
        backend = runner.backend if kind == "cpu" else f"{runner.backend}@{kind}"
        return cls(
            segmenter=_digest(segmenter, backend, jpeg=jpeg),
            detector=_digest(detector, backend, reader.name if reader is not None else "", jpeg),
            image_size=runner.segmenter.image_size,
            num_classes=0 if runner.detector.open_vocabulary else len(runner.detector.names),
        )


def _digest(model: ModelDescriptor, backend: str, reader: str = "", jpeg: str = "") -> str:
    """128-bit hex digest of what makes a model's outputs what they are (not its gate measurements or notes);
    ``reader``: the phrase reader in front of an open-vocabulary detector ("" none: the digest of before readers);
    ``jpeg``: the JPEG decoder when not the host's ("" the host's: the digest of before)."""
    parts = (
        (
            str(model.role),
            model.name,
            model.architecture,
            model.version,
            model.weights_sha256,
            model.input_size,
            list(model.vocabulary),
            model.open_vocabulary,
            model.precision,
            backend,
            PREPROCESSING_VERSION,
        )
        + ((reader,) if reader else ())
        + ((f"jpeg:{jpeg}",) if jpeg else ())
    )
    return hashlib.sha256(json.dumps(parts).encode()).hexdigest()[:32]


@dataclasses.dataclass(frozen=True)
class _SharedOutput:
    """A detector output read back from the tier, with its key (``ClassPrompts.key``; None: closed detector)."""

    key: Hashable
    output: DetectorOutput


class _Corrupt(ValueError):
    """A shared value that does not parse as this identity's entry (internal to this module: a miss)."""


class RedisTier:
    """Thread-safe (redis-py's pooled client); every method swallows Redis failures (see module doc)."""

    def __init__(
        self,
        url: str,
        identity: ModelIdentity,
        ttl: float,
        max_entry_bytes: int,
        timeout: float,
        retry_after: float,
        max_masks: int,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        import redis

        self._client = redis.Redis.from_url(url, socket_timeout=timeout, socket_connect_timeout=timeout)
        self._errors_type: tuple[type[BaseException], ...] = (redis.RedisError, OSError)
        self._oom_types: tuple[type[BaseException], ...] = (redis.exceptions.OutOfMemoryError,)
        self._abort_type: type[BaseException] = redis.exceptions.ExecAbortError
        self._keep_newest = self._client.register_script(_KEEP_NEWEST)
        self.identity = identity
        self.ttl = ttl
        self._expire_ms = max(1, math.ceil(ttl * (1 + SHARED_TOUCH_FRACTION) * 1000))
        self.max_entry_bytes = max_entry_bytes
        self.max_masks = max_masks
        self.retry_after = retry_after
        self._clock = clock
        self._down_until = 0.0
        self._lock = threading.Lock()
        # Shapes of the features and the detector's anchor count, from the first entry this replica computed and
        # shared: what a value read back must have (before that, only what the identity fixes is checked).
        self._feature_shapes: tuple[tuple[int, ...], ...] | None = None
        self._anchors: int | None = None
        self.up = True
        self.hits = 0
        self.misses = 0
        self.errors = 0
        self.writes = 0
        self.corrupt = 0
        self.refused = 0  # calls Redis refused for want of memory (over its maxmemory): unshared values, misses

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

    def _refused(self, error: BaseException) -> bool:
        """Whether ``error`` is Redis refusing for want of memory (over its maxmemory: OOM, or a transaction aborted
        for it): counted (``refused``), the tier left up, that value unshared or read as a miss. Any other error (a
        read-only replica, a misconfiguration) is an outage (``_failed``: a WARNING, ``up`` 0)."""
        if not isinstance(error, self._oom_types) and not (
            isinstance(error, self._abort_type) and "maxmemory" in str(error)
        ):
            return False
        with self._lock:
            self.refused += 1
        log.debug("shared cache (Redis) refused for want of memory: %s", error)
        return True

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

    def _corrupted(self, what: str, error: Exception) -> None:
        with self._lock:
            self.corrupt += 1
            first = self.corrupt == 1
        if first:
            log.warning(
                "shared cache (Redis): a stored %s could not be read; deleted and recomputed (further ones are "
                "only counted: detseg.cache.shared.corrupt)",
                what,
            )
        log.debug("unreadable shared %s: %r", what, error)

    # -- entries ---------------------------------------------------------------------------------------------

    def get(self, handle: str) -> CacheEntry | None:
        """The shared entry of ``handle`` with every detector output stored for it, or None.

        A value that does not parse is a miss (or, for one detector output, left out): deleted, counted, logged
        once; only good values have their TTL refreshed."""
        if not self._available():
            return None
        sha = handle.removeprefix(PREFIX)
        image_key, detector_key = self._image_key(sha), self._detector_key(sha)
        try:  # no MULTI (not needed for reads): Redis over its maxmemory refuses every command queued in one
            with self._client.pipeline(transaction=False) as p:
                p.get(image_key)
                p.hgetall(detector_key)
                blob, outputs = p.execute()
        except self._errors_type as e:
            if not self._refused(e):
                self._failed(e)
            return None
        self._succeeded()
        entry: CacheEntry | None = None
        bad_fields: list[bytes] = []
        if blob is not None:
            try:
                entry = self._entry_from_bytes(blob, handle)
            except Exception as e:  # anything a foreign value raises while parsing: _Corrupt, zip, npz, json errors
                self._corrupted("image entry", e)
            else:
                for field, raw in outputs.items():
                    try:
                        shared = self._output_from_bytes(field, raw)
                    except Exception as e:  # as above
                        self._corrupted("detector output", e)
                        bad_fields.append(field)
                    else:
                        entry.detector[shared.key] = shared.output
        if entry is None:
            self.misses += 1
        else:
            self.hits += 1
        if blob is not None:
            try:
                with self._client.pipeline(transaction=False) as p:
                    if entry is None:
                        p.delete(image_key)
                    else:
                        self._restart_ttl(p, sha)
                    if bad_fields:
                        p.hdel(detector_key, *bad_fields)
                    p.execute()
            except self._errors_type as e:
                if not self._refused(e):
                    self._failed(e)
        return entry

    def put(self, handle: str, entry: CacheEntry) -> bool:
        """Shares an entry (its detector outputs and kept masks too), unless it is larger than ``max_entry_bytes``;
        whether it did."""
        if not self._available() or entry.nbytes > self.max_entry_bytes:
            return False
        sha = handle.removeprefix(PREFIX)
        feats = entry.features.on_host()  # device-resident features spill to the host only here
        if self._feature_shapes is None:
            self._feature_shapes = _shapes(feats)
        # copies (one C call under the GIL): the event loop may add an output or a mask to this entry meanwhile, and
        # iterating the dict itself raised "dictionary changed size during iteration", failing the request
        outputs, masks = list(entry.detector.items()), list(entry.masks.items())
        blob = _entry_to_bytes(handle, entry.image, feats)

        def store(p: Any) -> None:
            p.set(self._image_key(sha), blob, px=self._expire_ms)
            if outputs:
                self._keep_outputs(p, sha, [(_key_text(k), self._output_to_bytes(o)) for k, o in outputs])
            if masks:
                self._keep_masks(p, sha, masks)

        if not self._pipelined(store):
            return False
        self.writes += 1
        return True

    def touch(self, handle: str, entry: CacheEntry) -> None:
        """Restarts the TTL of an image's shared values (entry, detector outputs, kept masks) as a read of them
        would: a replica that keeps using its own copy (``entry``) keeps the shared one alive for the others, and
        shares it again when the shared one is gone (evicted, or Redis restarted: the handle worked only on the
        replica that kept its own copy)."""
        if not self._available():
            return
        sha = handle.removeprefix(PREFIX)
        restarted: list[Any] = []
        if self._pipelined(lambda p: self._restart_ttl(p, sha), restarted, transaction=False) and not restarted[0]:
            self.put(handle, entry)

    def _restart_ttl(self, p: Any, sha: str) -> None:
        """Queues on pipeline ``p`` the TTL restart of every shared value of image ``sha`` (the image's first)."""
        p.pexpire(self._image_key(sha), self._expire_ms)
        for key in (self._detector_key(sha), self._masks_key(sha)):  # each hash and its order set
            p.pexpire(key, self._expire_ms)
            p.pexpire(f"{key}:order", self._expire_ms)

    def add_detector_output(self, handle: str, output: DetectorOutput, key: Hashable = None) -> None:
        """Shares one more detector output of an image already shared."""
        if not self._available() or output.raw.nbytes > self.max_entry_bytes:
            return
        field, value, sha = _key_text(key), self._output_to_bytes(output), handle.removeprefix(PREFIX)
        self._pipelined(lambda p: self._keep_outputs(p, sha, [(field, value)]))

    def add_masks(self, handle: str, masks: dict[str, np.ndarray]) -> bool:
        """Shares kept low-res masks of an image (float32 bytes under ``detseg:msk:<segmenter identity>:<sha>``);
        whether it did."""
        if not self._available():
            return False
        sha = handle.removeprefix(PREFIX)
        return self._pipelined(lambda p: self._keep_masks(p, sha, list(masks.items())))

    def _keep_outputs(self, p: Any, sha: str, fields: list[tuple[str, bytes]]) -> None:
        """Queues detector outputs (field, value) of image ``sha``, the newest kept within ``max_entry_bytes``."""
        key = self._detector_key(sha)
        most = max(1, self.max_entry_bytes // max(len(v) for _, v in fields))
        self._keep_newest(keys=[key, f"{key}:order"], args=[most, self._expire_ms, *_flat(fields)], client=p)

    def _keep_masks(self, p: Any, sha: str, masks: list[tuple[str, np.ndarray]]) -> None:
        """Queues kept masks of image ``sha``, the newest ``max_masks`` kept."""
        key = self._masks_key(sha)
        fields = [(k, np.ascontiguousarray(m, np.float32).tobytes()) for k, m in masks]
        self._keep_newest(keys=[key, f"{key}:order"], args=[self.max_masks, self._expire_ms, *_flat(fields)], client=p)

    def _pipelined(
        self, commands: Callable[[Any], None], replies: list[Any] | None = None, *, transaction: bool = True
    ) -> bool:
        """Runs ``commands`` on one Redis pipeline (their replies appended to ``replies``); whether they ran. A write
        Redis refuses (over its maxmemory) is counted and leaves the tier up; any other failure is the tier's own
        business (``_failed``)."""
        try:
            with self._client.pipeline(transaction=transaction) as p:
                commands(p)
                answered = p.execute()
        except self._errors_type as e:
            if not self._refused(e):
                self._failed(e)
            return False
        self._succeeded()
        if replies is not None:
            replies.extend(answered)
        return True

    def mask(self, handle: str, mask_handle: str) -> np.ndarray | None:
        """A kept low-res mask, (S/4, S/4) float32, or None; one of the wrong size is corrupt: deleted, a miss."""
        if not self._available():
            return None
        key = self._masks_key(handle.removeprefix(PREFIX))
        side = self.identity.image_size // 4
        try:
            raw = self._client.hget(key, mask_handle)
            if raw is not None and (not isinstance(raw, bytes) or len(raw) != side * side * 4):
                self._client.hdel(key, mask_handle)
                self._corrupted("kept mask", ValueError(f"{len(raw)} bytes"))
                raw = None
        except self._errors_type as e:
            self._failed(e)
            return None
        self._succeeded()
        return None if not isinstance(raw, bytes) else np.frombuffer(raw, np.float32).reshape(side, side).copy()

    def close(self) -> None:
        self._client.close()

    # -- keys and values ---------------------------------------------------------------------------------------

    def _image_key(self, sha: str) -> str:
        return f"detseg:img:{self.identity.segmenter}:{sha}"

    def _masks_key(self, sha: str) -> str:
        return f"detseg:msk:{self.identity.segmenter}:{sha}"

    def _detector_key(self, sha: str) -> str:
        return f"detseg:det:{self.identity.detector}:{sha}"

    def _output_to_bytes(self, output: DetectorOutput) -> bytes:
        if self._anchors is None and output.raw.ndim == 3:
            self._anchors = int(output.raw.shape[2])
        return _to_bytes(raw=output.raw)

    def _entry_from_bytes(self, blob: bytes, handle: str) -> CacheEntry:
        """The image entry of ``handle`` as shared by a replica of this identity. Raises: _Corrupt (or a parser's
        error)."""
        with _arrays(blob) as data:
            meta = json.loads(bytes(data["meta"]).decode())
            count = sum(k.startswith("high_res_") for k in data.files)
            high_res = tuple(data[f"high_res_{i}"] for i in range(count))
            rgb, image_embed = np.ascontiguousarray(data["rgb"]), data["image_embed"]
        if (
            not isinstance(meta, dict)
            or meta.get("handle") != handle
            or not isinstance(meta.get("sha256"), str)
            or not isinstance(meta.get("format"), str)
        ):
            raise _Corrupt("meta: not this image's")
        if rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[2] != 3 or 0 in rgb.shape:
            raise _Corrupt(f"rgb: {rgb.dtype} {rgb.shape}, expected uint8 (H, W, 3)")
        features = ImageFeatures(image_embed=image_embed, high_res_feats=high_res)
        s = self.identity.image_size
        sides = ((s // 16, s // 16), (s // 4, s // 4), (s // 8, s // 8))  # image_embed, then high_res_feats
        shapes = _shapes(features)
        arrays = (image_embed, *high_res)
        if (
            len(arrays) != len(sides)
            or any(a.dtype != np.float32 or a.ndim != 4 or a.shape[0] != 1 for a in arrays)
            or any(a.shape[2:] != side for a, side in zip(arrays, sides, strict=True))
            or (self._feature_shapes is not None and shapes != self._feature_shapes)
        ):
            raise _Corrupt(f"features: {shapes}, expected {self._feature_shapes or sides}")
        return CacheEntry(DecodedImage(rgb=rgb, format=meta["format"], sha256=meta["sha256"]), features)

    def _output_from_bytes(self, field: bytes, blob: bytes) -> _SharedOutput:
        """A detector output as shared by a replica of this identity. Raises: _Corrupt (or a parser's error)."""
        key = _key_from_text(field.decode())
        with _arrays(blob) as data:
            raw = data["raw"]
        classes = self.identity.num_classes if key is None else len(key[0])
        if (
            raw.dtype != np.float32
            or raw.ndim != 3
            or raw.shape[:2] != (1, 4 + classes)
            or (self._anchors is not None and raw.shape[2] != self._anchors)
        ):
            raise _Corrupt(f"raw: {raw.dtype} {raw.shape}, expected float32 (1, {4 + classes}, anchors)")
        return _SharedOutput(key, DetectorOutput(raw=raw))


def _flat(fields: list[tuple[str, bytes]]) -> list[str | bytes]:
    return [x for pair in fields for x in pair]


def _shapes(features: ImageFeatures) -> tuple[tuple[int, ...], ...]:
    return (tuple(features.image_embed.shape), *(tuple(f.shape) for f in features.high_res_feats))


def _key_text(key: Hashable) -> str:
    """A detector-output key as JSON: None (closed detector) or (vocabulary names, embeddings sha256)."""
    return json.dumps(key)


def _key_from_text(text: str) -> tuple[tuple[str, ...], str] | None:
    value = json.loads(text)
    if value is None:
        return None
    names, digest = value
    if not isinstance(digest, str) or not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise _Corrupt("detector-output key: expected null or [names, sha256]")
    return tuple(names), digest


def _to_bytes(**arrays: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    return buffer.getvalue()


def _arrays(blob: bytes) -> Any:
    data = np.load(io.BytesIO(blob), allow_pickle=False)
    if not isinstance(data, np.lib.npyio.NpzFile):  # a bare .npy parses too: not an entry
        raise _Corrupt("not an .npz")
    return data


def _entry_to_bytes(handle: str, image: DecodedImage, feats: ImageFeatures) -> bytes:
    """``feats``: on the host (numpy). The handle is kept with the image's own sha256 (ImageInfo.sha256): they differ
    for raw pixels, whose handle hashes their size too."""
    meta = json.dumps({"handle": handle, "format": image.format, "sha256": image.sha256}).encode()
    high_res = {f"high_res_{i}": f for i, f in enumerate(feats.high_res_feats)}
    return _to_bytes(rgb=image.rgb, meta=np.frombuffer(meta, np.uint8), image_embed=feats.image_embed, **high_res)
