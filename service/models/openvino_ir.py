"""The SAM 2 image encoder as OpenVINO IR: its exported ONNX graph made quick to compile, optionally quantised to
int8 with NNCF, and cached beside the export.

Hiera adds a position embedding bicubic-interpolated from a small parameter to the patch grid. In the exported
graph that is a ``Resize`` of an initializer to a size computed from the input's shape; OpenVINO folds it at
compile time with a slow reference kernel (measured: 120-135 s per compile of SAM 2.1-T at 1024², vs 0.6 s once
folded). ``fold_constant_resizes`` evaluates such resizes once with ONNX Runtime and stores the result as a
constant (the same numbers: the graph computed them). The input is then fixed to (1, 3, S, S).

``int8``: NNCF's static post-training quantisation with the caller's calibration images; which layers stay in f32
is the recipe below (``RECIPE_VERSION``). Each variant is built once per encoder graph (its sha256) and recipe into
``<export>/sam2_image_encoder/openvino/<variant>/`` (written to a temporary folder, then renamed: a crash leaves no
half-written model); later loads read it. The int8 build's quality-gate figures (``int8_gate``: measured by the
runner against fp32 on held-out images) are stored beside it, keyed by what computed them, and read back likewise.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import logging
import os
import shutil
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from service.models.graphs import IO
from service.models.roles import Role
from service.provenance import file_sha256
from service.startup import block_telemetry

log = logging.getLogger(__name__)
block_telemetry()  # before nncf or openvino's tools are imported (see service.startup)

# Bump when folding or quantisation changes: cached IRs of older recipes are then rebuilt, not reused.
RECIPE_VERSION = 1
PRECISIONS = ("fp32", "int8")
# The int8 recipe: NNCF's transformer preset (SmoothQuant on the MatMuls; residual adds, norms, multiplies and
# divides stay float) with the Convolutions (patch embedding, FPN neck, high-res projections) and Hiera's first block
# (the stride-4 stage behind the finest features) in f32. Measured on seeded SAM 2.1-T at 1024², final masks of 48
# box prompts on two held-out photos vs fp32 (min / mean IoU, encoder s/image on 2 cores with int8 dot products,
# VNNI; fp32 1.32 s): NNCF's default preset with the Convolutions in f32 0.9835 / 0.9924, 0.51 s; transformer preset
# without SmoothQuant 0.9894 / 0.9952; transformer preset 0.9938 / 0.9970, 0.72 s; this recipe 0.9951 / 0.9977,
# 0.73 s. Without int8 dot products (2 AVX2-only EPYC cores; the gate's 54 boxes, min / median): this recipe 0.9686 /
# 0.9826, 2.80 s vs fp32 2.78 s; with NNCF's overflow fix (7-bit weights) 0.9915 / 0.9956, 3.45 s. So precision
# auto quantises on CPUs with them only (service.models.cpu).
FLOAT_TYPES = ("Convolution",)
FLOAT_PATTERNS = (r".*/trunk/blocks\.0/.*",)
# OpenVINO's CPU plugin picks bf16 by default where the CPU has it: wrong boxes on YOLO11n, 0.990 mask IoU on SAM.
# Float graphs always run in f32 here.
F32 = {"INFERENCE_PRECISION_HINT": "f32"}
# What the log announces before an int8 build: measured 44-76 s on 2 cores (SAM 2.1-T at 1024², the test profile).
INT8_BUILD_SECONDS = 60
_XML = "model.xml"
_META = "detseg-ir.json"
_GATE = "detseg-gate.json"  # the int8 build's quality-gate figures (``int8_gate``), beside its model.xml


@dataclasses.dataclass(frozen=True)
class EncoderIR:
    """A cached encoder IR. xml: its model.xml (model.bin beside it); precision: fp32 | int8; meta: what the
    build recorded (source graph sha256, recipe, calibration, seconds); built: this call wrote it."""

    xml: Path
    precision: str
    meta: dict[str, Any]
    built: bool


def cpu_supports_int8(core: Any) -> bool:
    """Whether OpenVINO's CPU plugin has int8 kernels on this machine (its OPTIMIZATION_CAPABILITIES)."""
    return "INT8" in core.get_property("CPU", "OPTIMIZATION_CAPABILITIES")


def fold_constant_resizes(onnx_path: Path, image_size: int) -> Any:
    """The ONNX model at ``onnx_path`` with every Resize of an initializer replaced by its value for
    (1, 3, S, S) inputs, S = ``image_size`` (the image encoder's input; only its batch axis is dynamic).

    Returns an ``onnx.ModelProto``. Nodes that only computed the resized tensors' sizes are left in place (dead);
    OpenVINO drops them. Raises ValueError when the graph has no such Resize (nothing to fold: not Hiera?)."""
    import onnx
    import onnxruntime as ort
    from onnx import numpy_helper

    model = onnx.load(str(onnx_path))
    graph = model.graph
    initializers = {i.name for i in graph.initializer}
    resizes = [n for n in graph.node if n.op_type == "Resize" and n.input[0] in initializers]
    if not resizes:
        raise ValueError(f"{onnx_path}: no Resize of a constant to fold")
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    del probe.graph.output[:]
    probe.graph.output.extend(onnx.helper.make_empty_tensor_value_info(n.output[0]) for n in resizes)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # evaluate, not rewrite
    session = ort.InferenceSession(probe.SerializeToString(), options, providers=["CPUExecutionProvider"])
    (images,) = IO[Role.SAM2_IMAGE_ENCODER].inputs
    values = session.run(None, {images: np.zeros((1, 3, image_size, image_size), np.float32)})
    kept = [n for n in graph.node if all(n is not r for r in resizes)]
    del graph.node[:]
    graph.node.extend(kept)
    graph.initializer.extend(numpy_helper.from_array(v, n.output[0]) for n, v in zip(resizes, values, strict=True))
    return model


def read_encoder(core: Any, onnx_path: Path, image_size: int) -> Any:
    """The image encoder as an ``openvino.Model`` with its position embedding folded, input (1, 3, S, S)."""
    import onnx

    folded = fold_constant_resizes(onnx_path, image_size)
    # From a file, not a stream: read from bytes, the two branches of the graph's If nodes came back sharing nodes,
    # and NNCF's graph builder failed on them ("Could not find a node Result_… in NNCFGraph").
    with tempfile.TemporaryDirectory(prefix="detseg-encoder-") as tmp:
        path = Path(tmp) / "model.onnx"
        onnx.save(folded, str(path))
        model = core.read_model(str(path))
    (images,) = IO[Role.SAM2_IMAGE_ENCODER].inputs
    model.reshape({images: [1, 3, image_size, image_size]})
    return model


def encoder_ir(
    core: Any,
    onnx_path: Path,
    image_size: int,
    precision: str,
    calibration: Callable[[], Sequence[np.ndarray]],
    calibration_name: str,
    weights_name: str = "",
) -> EncoderIR:
    """The cached IR of the image encoder graph at ``onnx_path`` in ``precision`` (fp32 | int8), built if missing.

    calibration: called only when an int8 IR is built; returns (1, 3, S, S) float32 SAM-normalised images.
    calibration_name: names that set in the cache key and metadata (another set → another IR).
    weights_name: the segmenter's weights, as the log names them ("" = the graph's path).
    A build logs one INFO line before and one after; third-party chatter stays out of the log (``_quiet_build``)."""
    if precision not in PRECISIONS:
        raise ValueError(f"encoder precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    source = file_sha256(onnx_path)
    key = {
        "source_sha256": source,
        "recipe": RECIPE_VERSION,
        "precision": precision,
        "image_size": image_size,
        "calibration": calibration_name if precision == "int8" else "",
        "float_types": list(FLOAT_TYPES) if precision == "int8" else [],
        "float_patterns": list(FLOAT_PATTERNS) if precision == "int8" else [],
        "libraries": _library_versions(precision),  # what converts and quantises it (their rounding is the IR's)
    }
    folder = onnx_path.parent.parent / "openvino" / f"{precision}-{source[:16]}-r{RECIPE_VERSION}"
    cached = _cached(folder, key)
    if cached is not None:
        return EncoderIR(folder / _XML, precision, cached, built=False)
    started = time.perf_counter()
    expected = f", ~{INT8_BUILD_SECONDS} s (NNCF int8 quantisation)" if precision == "int8" else ""
    log.info("building the %s OpenVINO image encoder for %s once%s", precision, weights_name or onnx_path, expected)
    meta = dict(key)
    with _quiet_build():
        model = read_encoder(core, onnx_path, image_size)
        if precision == "int8":
            images = list(calibration())
            model = quantize(model, images)
            meta["calibration_images"] = len(images)
    meta["build_seconds"] = round(time.perf_counter() - started, 1)
    _save_atomically(model, meta, folder, key)
    log.info("built the %s OpenVINO image encoder in %.0f s: %s", precision, meta["build_seconds"], folder)
    return EncoderIR(folder / _XML, precision, meta, built=True)


def int8_gate(ir: EncoderIR, key: dict[str, Any], measure: Callable[[], tuple[int, Sequence[float]]]) -> dict[str, Any]:
    """The quality-gate figures of the int8 build ``ir``: read from its folder when they were stored for ``key``
    (what computed them: the held-out set, the reference, the decoder, the method), else ``measure``d and stored.

    measure: returns (held-out images, one mask IoU int8 vs fp32 per box prompt, each in [0, 1]).
    Returns {"key", "images", "prompts", "min_mask_iou", "median_mask_iou", "seconds"}. Whether they pass is the
    threshold's (Settings, applied at each start), so it is not stored: a new threshold reuses the figures."""
    key = {"int8": int8_identity(ir), **key}
    return measured_gate(ir.xml.parent / _GATE, key, measure)


def int8_identity(ir: EncoderIR) -> dict[str, Any]:
    """What identifies the int8 build ``ir`` in a gate's key: its source graph, recipe, calibration, input size and
    the library versions that built it."""
    return {k: ir.meta.get(k) for k in ("source_sha256", "recipe", "calibration", "image_size", "libraries")}


def _library_versions(precision: str) -> dict[str, str]:
    """OpenVINO's version (it converts every IR and runs it) and, for int8, NNCF's (it quantises)."""
    from importlib.metadata import version

    names = ("openvino", "nncf") if precision == "int8" else ("openvino",)
    return {name: version(name) for name in names}


def measured_gate(
    path: Path, key: dict[str, Any], measure: Callable[[], tuple[int, Sequence[float]]]
) -> dict[str, Any]:
    """Quality-gate figures stored at ``path``: read back when they were stored for ``key`` (what computed them),
    else ``measure``d and stored (``int8_gate``'s figures; the runners' bf16 decoder's too)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    stored = _stored_gate(path, key)
    if stored is not None:
        return stored
    started = time.perf_counter()
    images, measured = measure()
    ious = np.asarray(measured, dtype=np.float64)
    figures = {
        "key": key,
        "images": images,
        "prompts": int(ious.size),
        "min_mask_iou": float(ious.min()),
        "median_mask_iou": float(np.median(ious)),
        "seconds": round(time.perf_counter() - started, 1),
    }
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}-", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(figures, f, indent=1)
        os.replace(tmp, path)  # atomic: a reader sees no file, the old one or the whole new one
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
    return figures


def _stored_gate(path: Path, key: dict[str, Any]) -> dict[str, Any] | None:
    """The figures in ``path`` if they parse and were measured for ``key``, else None (a miss, measured anew)."""
    try:
        stored = json.loads(path.read_text())
        figures = {
            "key": stored["key"],
            "images": int(stored["images"]),
            "prompts": int(stored["prompts"]),
            "min_mask_iou": float(stored["min_mask_iou"]),
            "median_mask_iou": float(stored["median_mask_iou"]),
            "seconds": float(stored["seconds"]),
        }
    except (OSError, ValueError, TypeError, KeyError):
        return None
    return figures if figures["key"] == key and figures["prompts"] > 0 else None


def quantize(model: Any, images: Sequence[np.ndarray]) -> Any:
    """NNCF static int8 post-training quantisation of an ``openvino.Model`` of the encoder with the recipe above.
    images: calibration inputs, (1, 3, S, S) float32 each; all are used."""
    import nncf

    nncf_logger = logging.getLogger("nncf")  # only once imported: nncf gives that logger its own class
    nncf_level = nncf_logger.level
    nncf_logger.setLevel(logging.WARNING)  # its own stdout handler logs INFO per layer (~100 lines per build)
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # its rich progress bars (its handler kept the real stdout)
            return nncf.quantize(
                model,
                nncf.Dataset(list(images)),
                subset_size=len(images),
                model_type=nncf.ModelType.TRANSFORMER,
                ignored_scope=nncf.IgnoredScope(types=list(FLOAT_TYPES), patterns=list(FLOAT_PATTERNS)),
            )
    finally:
        nncf_logger.setLevel(nncf_level)


@contextlib.contextmanager
def _quiet_build() -> Iterator[None]:
    """Keeps third-party chatter out of the service's log while an IR is built (the log says when it starts and
    ends): Python warnings (torch's deprecations, the calibration's tensor conversions) are ignored, and torch's
    loggers, which write to stderr through torch's own handler, go to ERROR (importing nncf imports
    torch.utils.cpp_extension, which warns on machines without CUDA). ``quantize`` quiets NNCF itself."""
    torch_logger = logging.getLogger("torch")
    torch_level = torch_logger.level
    torch_logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        torch_logger.setLevel(torch_level)


def _cached(folder: Path, key: dict[str, Any]) -> dict[str, Any] | None:
    """The metadata of the build in ``folder`` if it is complete and was built for ``key``, else None: a build whose
    metadata does not parse, or that lacks its weights, is a miss (built again, replacing it), never an error."""
    meta_path = folder / _META
    if not (meta_path.exists() and (folder / _XML).exists() and (folder / _XML).with_suffix(".bin").exists()):
        return None
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    if not isinstance(meta, dict):
        return None
    return meta if {k: meta.get(k) for k in key} == key else None


def _save_atomically(model: Any, meta: dict[str, Any], folder: Path, key: dict[str, Any]) -> None:
    """Writes model.xml + model.bin + the metadata into a temporary sibling of ``folder``, then renames it into
    place, replacing a stale build; a build for ``key`` that another process put there meanwhile is kept."""
    import openvino as ov

    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}-", dir=folder.parent))
    try:
        ov.save_model(model, str(tmp / _XML), compress_to_fp16=False)  # its default halves f32 weights
        (tmp / _META).write_text(json.dumps(meta, indent=1))
        if _cached(folder, key) is None:
            shutil.rmtree(folder, ignore_errors=True)
            with contextlib.suppress(OSError):  # ENOTEMPTY: another process's build landed in between
                os.replace(tmp, folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
