"""In-process execution of the exported graphs (``detseg export``) with the fastest CPU runtime per role.

The graphs are the ONNX backend's (exported once per weights into ``<cache_dir>/onnx/<weights>/``). Per role, the
runtime measured fastest on a 2-core Xeon, 2 threads, seeded YOLO11n at 640² and SAM 2.1-T at 1024² (min of 6
interleaved runs, one process; torch fp32 in brackets):

- detector: OpenVINO f32, 35 ms (ONNX Runtime 40 ms with its arena, 56 ms without; torch 57 ms);
- sam2_image_encoder: OpenVINO, f32 1.37 s or int8 0.80 s (``Settings.precision``; ONNX Runtime 2.18 s;
  torch 1.65 s). Its IR is built once per graph and cached (``service.models.openvino_ir``); the int8 one serves
  only where its quality gate passes (``measure_gate``, ``Settings.int8_gate_min_iou``);
- sam2_mask_decoder (figures from a 2-core AMD EPYC with AVX512_BF16): torch's ``sam_ops.PromptDecoder`` (the
  image side shared by a call's prompts, re-associated attention) for every call, with bfloat16 image tokens where
  the CPU has bf16 dot products, ``Settings.precision`` is not fp32 and the model passes their quality gate
  (``gated_decoder``): 11-12 ms per box at 10-50 boxes, 22 ms for one box (float32: 22 and 35 ms; sam2's own decoder
  54-59 ms per box; before, torch's shared path 36-47 ms per box and the exported graph on ONNX Runtime 42 ms for
  one box; OpenVINO running the rewritten graph: f32 17-20 ms per box, bf16 11-12 ms but min mask IoU 0.9899 vs
  fp32, below the gate; benchmarks/DECODER.md);
- text / visual-prompt encoders (open-vocabulary detectors): ONNX Runtime, as the onnx backend.

Every OpenVINO model runs with ``INFERENCE_PRECISION_HINT=f32`` (its bf16 default wrecked the detector's boxes) and
``settings.threads`` threads. OpenVINO's compile aborts in a process with jemalloc or tcmalloc LD_PRELOADed.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from service.config import Settings
from service.errors import ModelUnavailable
from service.models import sam_memory, sam_ops
from service.models.cpu import cpu_has_int8_dot_products, cpu_has_native_bf16
from service.models.demo.profile import SHAPES_SAM2
from service.models.graphs import IO
from service.models.loading import load_segmenter_module
from service.models.openvino_ir import (
    F32,
    EncoderIR,
    cpu_supports_int8,
    encoder_ir,
    int8_gate,
    int8_identity,
    measured_gate,
)
from service.models.profiles import ModelSet
from service.models.roles import ModelRole, PrecisionGate, Role
from service.models.sam_memory import MemoryTracker
from service.models.tensors import DecoderOutput, ImageFeatures, PromptBatch, SegmenterSpec
from service.models.text import load_sentence_encoder
from service.processing.segmentation import SamPrompt, SegmenterProcessing
from service.runners.batching import BatchPolicy
from service.runners.exported import load_export, ort_session, specs, tokenizer_for
from service.runners.local import Arrays, Call, descriptor, memory_tracker
from service.runners.onnx import OnnxRunner
from service.runners.torch import decode_batch

log = logging.getLogger(__name__)

# The int8 encoder's calibration images (never the quality gate's photos, ultralytics' bus.jpg and zidane.jpg):
# scikit-learn's two sample photos (china.jpg, flower.jpg; scikit-learn comes with nncf), each whole, mirrored and as
# two crops, and four shapes-world scenes (read from INT8_IMAGES). Renaming it rebuilds cached int8 encoders.
CALIBRATION = "sklearn-photos-x8+shapes-train-4"
CALIBRATION_SCENES = 4  # CALIBRATION's "shapes-train-4": the first scenes of the plain world's train split
# The int8 encoder's quality gate (Settings.int8_gate_min_iou): held-out images (never CALIBRATION's) of the
# segmenter's domain, by name. "photos": ultralytics' bus.jpg and zidane.jpg with GRID box prompts each (27), for
# every SAM trained on photos (the official weights, the seeded test models). "shapes": for the demo's SAM, trained on
# the shapes worlds (on photos its masks are noise either way: measured int8 vs fp32 on the photos, min IoU 0.00,
# median 0.97), validation scenes of both worlds (the plain one and the attribute one) with a box prompt per
# ground-truth shape. Changing a set's name or content measures the gates anew.
GATE_SETS = {
    "photos": "ultralytics-bus-zidane-grid-27",
    "shapes": "shapes-val-16-gt+attributes-val-16-gt",
}
GATE_PHOTOS = ("bus.jpg", "zidane.jpg")
GATE_SCENES = 16  # of each shapes world's val split
# The shapes-world images of CALIBRATION and of GATE_SETS["shapes"], shipped as lossless PNGs with a manifest.json
# (file names, the gate's boxes, the set names they were rendered for): the serving path never renders the
# synthetic worlds. `python -m service.training.int8_images` writes them; tests/unit/test_int8_images.py checks
# they are what the worlds render.
INT8_IMAGES = Path(__file__).resolve().parents[1] / "models" / "int8_images"
# GRID: 27 boxes per photo, 3 sizes (20, 35, 60 % of each side) on a 3 × 3 grid of positions.
GRID_FRACTIONS = (0.2, 0.35, 0.6)
GRID_POSITIONS = (0.0, 0.5, 1.0)


@dataclasses.dataclass(frozen=True)
class Execution:
    """How one role's graph runs: runtime "openvino" | "onnxruntime"; precision "fp32" | "int8"."""

    runtime: str
    precision: str

    def __str__(self) -> str:
        return f"{self.runtime}-{self.precision}"


class OpenVinoModel:
    """A compiled OpenVINO model with ONNX Runtime's calling convention, ``run(output_names, feeds) -> [arrays]``;
    safe to call from several threads (one infer request per thread)."""

    def __init__(self, compiled: Any) -> None:
        self._compiled = compiled
        self._local = threading.local()

    def run(self, outputs: Sequence[str], feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        request = getattr(self._local, "request", None)
        if request is None:
            request = self._local.request = self._compiled.create_infer_request()
        results = request.infer(feeds)  # copies of the outputs (share_outputs=False)
        return [results[name] for name in outputs]


class OpenVinoRunner(OnnxRunner):
    """The ONNX backend's graphs, each on its fastest runtime here; the image encoder optionally in int8.

    ``execution``: how each role runs (``str(runner.execution[Role.SAM2_IMAGE_ENCODER])`` is e.g. "openvino-int8").
    """

    backend = "openvino"
    torch_calls = OnnxRunner.torch_calls | {Call.DECODE}  # SAM's decoder on torch

    def __init__(
        self,
        *args: Any,
        execution: dict[Role, Execution],
        decoder: sam_ops.PromptDecoder,
        tracker: MemoryTracker | None = None,
        **kwargs: Any,
    ) -> None:
        """``decoder``: SAM 2's mask decoder on torch, which serves every decoder call; ``tracker``: video tracking
        on torch (None: on the decoder's SAM module when its memory path can run)."""
        super().__init__(*args, **kwargs)
        self.execution = execution
        self._decoder = decoder
        self.tracker = tracker or (MemoryTracker(decoder.sam) if sam_memory.tracks(decoder.sam) else None)

    def _decode_sync(self, features: ImageFeatures, prompts: PromptBatch) -> DecoderOutput:
        """Every call on torch's ``sam_ops.PromptDecoder`` (module docstring: the fastest here at every size)."""
        import torch

        with torch.inference_mode():
            masks, iou = decode_batch(self._decoder, features, prompts, torch.from_numpy)
        return DecoderOutput(low_res_masks=masks.numpy(), iou_predictions=iou.numpy())

    @classmethod
    def load(cls, models: ModelSet, settings: Settings) -> OpenVinoRunner:
        """The int8 encoder is built (once per weights) where ``resolve_encoder_precision`` asks for it (precision
        auto: on CPUs with int8 dot products only; elsewhere one INFO line says why fp32), and its quality gate
        measured with it (``measure_gate``; figures cached beside it, per CPU class: with or without int8 dot
        products). precision auto serves it only when the gate passes, else fp32 with one WARNING; precision int8
        serves it, with that WARNING when it fails. The segmenter's ModelDescriptor carries the figures either way.
        SAM's decoder runs on torch, with bf16 image tokens unless precision is fp32 where the CPU has bf16 dot
        products and the served encoder with that decoder passes the same gate (``gated_decoder``; figures stored
        under the export's sam2_mask_decoder/torch/); the descriptor's precision names each reduced part
        ("int8-encoder", "bf16-decoder", joined by "+")."""
        import openvino as ov
        import torch

        core = ov.Core()
        int8_dots = cpu_has_int8_dot_products()
        requested = resolve_encoder_precision(settings, core, int8_dots)
        if settings.precision == "auto" and not int8_dots:
            log.info(
                "precision auto: SAM's image encoder runs in fp32, as this CPU has no int8 dot products (VNNI, AMX), "
                "where int8 measured no faster than fp32 and below its quality gate"
            )
        export = load_export(models, settings)
        config: dict[str, Any] = {**F32, "PERFORMANCE_HINT": "LATENCY"}
        if settings.threads > 0:
            config["INFERENCE_NUM_THREADS"] = settings.threads
            torch.set_num_threads(settings.threads)
        seg = models.segmenter
        sam = load_segmenter_module(seg.architecture, seg.path, seg.overrides, "cpu")
        image_size = export.graphs.image_size
        compiled: dict[str, OpenVinoModel] = {}

        def encoder(precision: str) -> tuple[EncoderIR, OpenVinoModel]:
            """The encoder IR in ``precision`` (built if missing), compiled once per load."""
            ir = encoder_ir(
                core,
                export.graph(Role.SAM2_IMAGE_ENCODER),
                image_size,
                precision,
                lambda: calibration_images(image_size),
                CALIBRATION,
                weights_name=models.segmenter.name,
            )
            if precision not in compiled:
                compiled[precision] = OpenVinoModel(core.compile_model(str(ir.xml), "CPU", config))
            return ir, compiled[precision]

        precision, gate = "fp32", None
        segmenter_sha256 = next(m.weights_sha256 for m in export.graphs.models if m.role == ModelRole.SEGMENTER)
        held_out = GATE_SETS[gate_domain(seg.path)]
        exact = sam_ops.PromptDecoder(sam, sam_ops.decoder_policy("cpu"))
        if requested == "int8":
            int8_ir, _ = encoder(requested)
            figures = int8_gate(
                int8_ir,
                {
                    "held_out_set": held_out,
                    "reference": "openvino-fp32",
                    "decoder": sam_ops.DECODER_VERSION,  # measured through the torch decoder, as the bf16 gate is
                    "torch": torch.__version__,
                    "decoder_weights_sha256": segmenter_sha256,
                    "cpu_int8_dot_products": int8_dots,  # its int8 kernels, whose rounding the figures measure
                },
                lambda: measure_gate((encoder("fp32")[1], exact), (encoder("int8")[1], exact), image_size, held_out),
            )
            gate = PrecisionGate(
                precision="int8",
                held_out_set=held_out,
                images=figures["images"],
                prompts=figures["prompts"],
                min_mask_iou=figures["min_mask_iou"],
                median_mask_iou=figures["median_mask_iou"],
                required_min_mask_iou=settings.int8_gate_min_iou,
            )
            precision = "int8" if gate.passed or settings.precision == "int8" else "fp32"
            shown = (gate.min_mask_iou, gate.required_min_mask_iou, gate.median_mask_iou, gate.prompts, gate.images)
            if not gate.passed:
                log.warning(
                    "the int8 image encoder of %s failed its quality gate (min mask IoU %.4f vs fp32 < %.4f required "
                    "[int8_gate_min_iou]; median %.4f; %d box prompts on %d held-out images%s): %s",
                    seg.name,
                    *shown,
                    "" if int8_dots else "; this CPU has no int8 dot products (VNNI, AMX)",
                    "serving it as asked (precision int8)" if precision == "int8" else "serving fp32",
                )
            else:
                log.info(
                    "the int8 image encoder of %s passed its quality gate: min mask IoU %.4f >= %.4f, median %.4f, "
                    "%d box prompts on %d held-out images",
                    seg.name,
                    *shown,
                )
        sessions: dict[Role, Any] = {
            Role.DETECTOR: OpenVinoModel(core.compile_model(str(export.graph(Role.DETECTOR)), "CPU", config)),
            Role.SAM2_IMAGE_ENCODER: encoder(precision)[1],
        }
        # SAM's decoder runs on torch (no graph session): bf16 image tokens where the CPU has bf16 dot products and
        # the served encoder + bf16 decoder pass the gate against fp32 + fp32 (``gated_decoder``), else exact.
        decoder, decoder_execution = exact, Execution("torch", "fp32")
        if settings.precision != "fp32" and cpu_has_native_bf16():
            served = encoder(precision)[0]
            key = {
                "decoder": sam_ops.DECODER_VERSION,
                "torch": torch.__version__,
                "held_out_set": held_out,
                "reference": "openvino-fp32 + torch-fp32",
                # an int8 encoder's rounding is its CPU class's (as in its own gate's key)
                "encoder": {**int8_identity(served), "cpu_int8_dot_products": int8_dots}
                if precision == "int8"
                else "openvino-fp32",
                "decoder_weights_sha256": segmenter_sha256,
            }
            decoder, decoder_execution = gated_decoder(
                sam,
                exact,
                export.repo / Role.SAM2_MASK_DECODER / "torch" / "bf16-gate.json",
                key,
                lambda bf16: measure_gate(
                    (encoder("fp32")[1], exact), (encoder(precision)[1], bf16), image_size, held_out
                ),
                settings.int8_gate_min_iou,
                seg.name,
            )
        bf16 = decoder_execution.precision == "bf16"
        execution = {
            Role.DETECTOR: Execution("openvino", "fp32"),
            Role.SAM2_IMAGE_ENCODER: Execution("openvino", precision),
            Role.SAM2_MASK_DECODER: decoder_execution,
        }
        for role in export.graphs.roles:
            if role not in execution:  # the open-vocabulary detector's prompt encoders
                sessions[role] = ort_session(export.graph(role), settings, arena=False)
                execution[role] = Execution("onnxruntime", "fp32")
        log.info("openvino backend: %s", ", ".join(f"{role} {execution[role]}" for role in export.graphs.roles))
        detector, segmenter = specs(export.graphs)
        text = load_sentence_encoder(settings.text_encoder)
        reduced = [name for name, on in (("int8-encoder", precision == "int8"), ("bf16-decoder", bf16)) if on]
        described = tuple(
            dataclasses.replace(m, precision="+".join(reduced) or m.precision, precision_gate=gate)
            if m.role == ModelRole.SEGMENTER
            else m
            for m in export.graphs.models
        )
        if models.tracker is not None:
            described += (descriptor(models.tracker, segmenter.image_size, ()),)
        return cls(
            sessions,
            tokenizer_for(export.graphs, text),
            detector,
            segmenter,
            described,
            models.profile,
            batching=BatchPolicy.from_settings(settings),
            text=text,
            execution=execution,
            decoder=decoder,
            tracker=memory_tracker(sam, models.tracker, "cpu"),
        )

    def _encode_sync(self, images: np.ndarray) -> Arrays:
        """The encoder IR takes one image (a static shape: compiles in ~1 s and runs fastest); N images, N calls."""
        io = IO[Role.SAM2_IMAGE_ENCODER]
        encoder = self._sessions[Role.SAM2_IMAGE_ENCODER]
        per_image = [encoder.run(list(io.outputs), {io.inputs[0]: images[i : i + 1]}) for i in range(len(images))]
        return tuple(np.concatenate(outputs) for outputs in zip(*per_image, strict=True))


def gated_decoder(
    sam: Any,
    exact: sam_ops.PromptDecoder,
    figures_path: Path,
    key: dict[str, Any],
    measure: Callable[[sam_ops.PromptDecoder], tuple[int, list[float]]],
    min_iou: float,
    name: str,
) -> tuple[sam_ops.PromptDecoder, Execution]:
    """SAM's decoder with bfloat16 image tokens (the CPU policy) when its quality gate passes, else ``exact``.

    The gate: ``measure`` (given the bf16 decoder) → one final-mask IoU per held-out box prompt vs fp32; passed when the
    smallest reaches ``min_iou`` (``Settings.int8_gate_min_iou``, the one threshold of precision auto). Its figures are
    stored at ``figures_path`` for ``key`` (what computed them) and read back on later loads. One INFO line names them
    either way (not a WARNING when it fails: the exact decoder then serves, as precision fp32 would have it): a small
    model trained at 256² (the demo's SAM: min 0.54 on 139 shapes-world boxes) fails where SAM 2.1-T at 1024² passes
    (min 0.996 on 104 photo boxes, benchmarks/DECODER.md)."""
    bf16 = sam_ops.PromptDecoder(sam, sam_ops.decoder_policy("cpu", bf16=True))
    figures = measured_gate(figures_path, key, lambda: measure(bf16))
    passed = figures["min_mask_iou"] >= min_iou
    log.info(
        "the bf16 decoder of %s %s its quality gate (min mask IoU %.4f vs fp32, %.4f required [int8_gate_min_iou]; "
        "median %.4f; %d box prompts on %d held-out images): serving its %s decoder",
        name,
        "passed" if passed else "failed",
        figures["min_mask_iou"],
        min_iou,
        figures["median_mask_iou"],
        figures["prompts"],
        figures["images"],
        "bf16" if passed else "fp32",
    )
    return (bf16, Execution("torch", "bf16")) if passed else (exact, Execution("torch", "fp32"))


def resolve_encoder_precision(settings: Settings, core: Any, int8_dot_products: bool) -> str:
    """fp32 | int8 for ``settings.precision``: auto is int8 where OpenVINO's CPU plugin has int8 kernels and the CPU
    int8 dot products (``int8_dot_products``: ``cpu_has_int8_dot_products``; without them int8 measured no faster
    than fp32 and below its gate, ``service.models.cpu``)."""
    if settings.precision == "auto":
        return "int8" if int8_dot_products and cpu_supports_int8(core) else "fp32"
    return settings.precision


@dataclasses.dataclass(frozen=True)
class GateImage:
    """One held-out image of the int8 gate. rgb: (H, W, 3) uint8; boxes: (B, 4) float32 box prompts, original-image
    pixels XYXY."""

    rgb: np.ndarray
    boxes: np.ndarray


def gate_domain(segmenter: Path) -> str:
    """The GATE_SETS key for the segmenter weights at ``segmenter``: "shapes" for the demo's SAM, else "photos"."""
    return "shapes" if segmenter.resolve() == SHAPES_SAM2.resolve() else "photos"


def gate_images(held_out_set: str) -> list[GateImage]:
    """The images and box prompts of ``held_out_set`` (a GATE_SETS value): GATE_PHOTOS with grid boxes, or
    GATE_SCENES val scenes of each shapes world with their ground-truth boxes."""
    if held_out_set == GATE_SETS["photos"]:
        import importlib.util

        spec = importlib.util.find_spec("ultralytics")  # its bundled assets; importing it would change process state
        if spec is None or spec.origin is None:
            raise ModelUnavailable("the int8 gate's photos come with the ultralytics package, which is missing")
        items = []
        for name in GATE_PHOTOS:
            with Image.open(Path(spec.origin).parent / "assets" / name) as photo:
                rgb = np.array(photo.convert("RGB"))  # writable: torchvision warns on read-only arrays
            items.append(GateImage(rgb, grid_boxes(rgb.shape[1], rgb.shape[0])))
        return items
    if held_out_set != GATE_SETS["shapes"]:
        raise ValueError(f"no int8 gate set {held_out_set!r}")
    return load_int8_images().gate_scenes


def grid_boxes(width: int, height: int) -> np.ndarray:
    """(27, 4) float32 boxes, pixels XYXY: GRID_FRACTIONS of each side at GRID_POSITIONS (left/top to right/bottom)."""
    boxes = []
    for fraction in GRID_FRACTIONS:
        w, h = fraction * width, fraction * height
        for fx in GRID_POSITIONS:
            for fy in GRID_POSITIONS:
                x0, y0 = fx * (width - w), fy * (height - h)
                boxes.append((x0, y0, x0 + w, y0 + h))
    return np.array(boxes, dtype=np.float32)


def measure_gate(
    reference: tuple[OpenVinoModel, sam_ops.PromptDecoder],
    candidate: tuple[OpenVinoModel, sam_ops.PromptDecoder],
    image_size: int,
    held_out_set: str,
) -> tuple[int, list[float]]:
    """A precision gate's measurement: for every box prompt of ``gate_images(held_out_set)``, the IoU of SAM's final
    mask (upsampled to the image, thresholded, unrefined) from the ``candidate`` image encoder and decoder vs from the
    ``reference`` ones (single mask per box, as detections are decoded). Returns (images, IoUs in prompt order)."""
    import torch

    io = IO[Role.SAM2_IMAGE_ENCODER]
    processing = SegmenterProcessing(SegmenterSpec(image_size=image_size))
    no_points, no_labels = np.zeros((0, 2), np.float32), np.zeros(0, np.int32)
    items = gate_images(held_out_set)
    ious: list[float] = []
    for item in items:
        hw = (item.rgb.shape[0], item.rgb.shape[1])
        image = processing.preprocess(np.ascontiguousarray(item.rgb))
        prompts = [SamPrompt(box=box, points=no_points, point_labels=no_labels) for box in item.boxes]
        features: dict[int, ImageFeatures] = {}
        masks = []
        for encoder, decoder in (reference, candidate):
            if id(encoder) not in features:
                embed, hr0, hr1 = encoder.run(list(io.outputs), {io.inputs[0]: image})
                features[id(encoder)] = ImageFeatures(image_embed=embed, high_res_feats=(hr0, hr1))
            parts = []
            for _, batch in processing.prompt_batches(prompts, hw, multimask=False):
                with torch.inference_mode():
                    low_res, _ = decode_batch(decoder, features[id(encoder)], batch, torch.from_numpy)
                parts.append(processing.postprocess(low_res.numpy()[:, 0], hw).masks)
            masks.append(np.concatenate(parts))
        for a, b in zip(*masks, strict=True):
            union = int(np.logical_or(a, b).sum())
            ious.append(int(np.logical_and(a, b).sum()) / union if union else 1.0)
    return len(items), ious


def calibration_images(image_size: int) -> list[np.ndarray]:
    """The CALIBRATION set as the encoder takes it: 12 × (1, 3, S, S) float32, SAM-normalised."""
    from sklearn.datasets import load_sample_image

    rgbs = []
    for name in ("china.jpg", "flower.jpg"):
        photo = load_sample_image(name)  # (427, 640, 3) uint8
        h, w = photo.shape[:2]
        rgbs += [photo, photo[:, ::-1], photo[h // 6 : h - h // 6, w // 6 : w - w // 6], photo[: 2 * h // 3, w // 3 :]]
    rgbs += load_int8_images().calibration
    processing = SegmenterProcessing(SegmenterSpec(image_size=image_size))
    # np.array: a contiguous, writable copy (the sample photos are read-only; torchvision warns on those).
    return [processing.preprocess(np.array(rgb)) for rgb in rgbs]


@dataclasses.dataclass(frozen=True)
class Int8Images:
    """The shapes-world images of the int8 encoder (INT8_IMAGES). calibration: CALIBRATION_SCENES (H, W, 3) uint8
    train scenes of the plain world; gate_scenes: GATE_SCENES val scenes of the plain world, then as many of the
    attribute world, each with its ground-truth boxes."""

    calibration: list[np.ndarray]
    gate_scenes: list[GateImage]


def load_int8_images(folder: Path = INT8_IMAGES) -> Int8Images:
    """Reads ``folder`` (INT8_IMAGES): manifest.json and the PNGs it names. Its set names must be CALIBRATION's and
    GATE_SETS["shapes"]: images rendered for other sets would be cached under these sets' names."""
    manifest = json.loads((folder / "manifest.json").read_text())
    sets = (manifest["calibration_set"], manifest["gate_set"])
    if sets != (CALIBRATION, GATE_SETS["shapes"]):
        raise ModelUnavailable(
            f"{folder} holds the images of {sets}, not of {(CALIBRATION, GATE_SETS['shapes'])}: "
            "regenerate it with python -m service.training.int8_images"
        )

    def rgb(name: str) -> np.ndarray:
        with Image.open(folder / name) as png:
            return np.array(png.convert("RGB"))

    return Int8Images(
        calibration=[rgb(name) for name in manifest["calibration"]],
        gate_scenes=[
            GateImage(rgb(item["image"]), np.array(item["boxes"], dtype=np.float32).reshape(-1, 4))
            for item in manifest["gate_scenes"]
        ],
    )
