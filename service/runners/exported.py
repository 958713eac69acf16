"""What the runners of exported graphs (ONNX Runtime in-process, Triton) share: specs from the repository's
parameters, and the graphs' feeds from the interface's types."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np

from service.config import Settings
from service.errors import ModelUnavailable, Unsupported
from service.models import graphs
from service.models.roles import Role
from service.models.tensors import ClassPrompts, DetectorSpec, ImageFeatures, PromptBatch, SegmenterSpec
from service.models.text import SentenceEncoder

if TYPE_CHECKING:  # profiles imports torch (seeded test models); the Triton front end runs without it
    from service.models.profiles import ModelSet

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Export:
    """The exported graphs of a model set in the cache: ``graph(role)`` is each role's model.onnx."""

    repo: Path
    graphs: graphs.ServedGraphs

    def graph(self, role: Role) -> Path:
        return self.repo / role / "1" / "model.onnx"


def load_export(models: ModelSet, settings: Settings) -> Export:
    """Exports ``models`` (and checks them against torch) into ``<cache_dir>/onnx/<weights>/`` unless that folder
    already holds this export, then reads the graphs' ``detseg_*`` parameters back."""
    from service.models.triton_repo import cache_settings, ensure_repository, export_cache, parse_config

    repo = export_cache(models, settings)
    if ensure_repository(models, cache_settings(settings), repo):
        log.info("exported %s + %s to ONNX (once per weights)", models.detector.name, models.segmenter.name)
    served = graphs.read_parameters(
        {
            role: {k: v.string_value for k, v in parse_config(repo / role / "config.pbtxt").parameters.items()}
            for role in Role
            if (repo / role / "config.pbtxt").exists()
        }
    )
    return Export(repo, served)


def ort_session(path: Path, settings: Settings, arena: bool) -> Any:
    """An ONNX Runtime CPU session of the graph at ``path`` with ``settings.threads`` intra-op threads (0: ORT's
    default, all cores). ``arena``: ORT's CPU memory arena, which keeps the peak activation memory of the largest
    call for good and saves re-faulting it on every call (measured, SAM 2 encoder at 1024² on 2 cores: 2.5 s with,
    3.6 s without it at batch 8; a batch of 4 leaves 5.9 GB with it, 0.34 GB without)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    if settings.threads > 0:
        options.intra_op_num_threads = settings.threads
    options.enable_cpu_mem_arena = arena
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


class Specs(NamedTuple):
    """What the exported detector and segmenter are, as the runners report them."""

    detector: DetectorSpec
    segmenter: SegmenterSpec


def specs(served: graphs.ServedGraphs) -> Specs:
    return Specs(
        DetectorSpec(
            names=served.names,
            imgsz=served.imgsz,
            stride=served.stride,
            class_dim=served.class_dim,
            visual_prompts=served.visual_prompts,
        ),
        SegmenterSpec(image_size=served.image_size),
    )


def tokenizer_for(served: graphs.ServedGraphs, text: SentenceEncoder | None) -> SentenceEncoder | None:
    """The sentence encoder whose tokenizer feeds the text-encoder graph (None for a closed detector).

    Raises ModelUnavailable when the graph was exported with another tokenizer than this front end's."""
    if not served.class_dim:
        return None
    if text is None:
        raise ModelUnavailable("the open-vocabulary detector's text encoder needs this front end's text_encoder=minilm")
    if text.info.sha256 != served.tokenizer_sha256:
        raise ModelUnavailable(
            f"the text-encoder graph was exported with tokenizer weights {served.tokenizer_sha256[:12]}…, this "
            f"front end has {text.info.sha256[:12]}…: export again with this text encoder"
        )
    return text


def detector_feeds(images: np.ndarray, classes: ClassPrompts | None) -> dict[str, np.ndarray]:
    """images (N, 3, S, S) float32, and for an open-vocabulary detector the call's class embeddings, one copy per
    image: (N, C, D) float32 (every image of a call shares its vocabulary)."""
    io = graphs.detector_io(classes is not None)
    feeds = {io.inputs[0]: images}
    if classes is not None:
        shape = (len(images), *classes.embeddings.shape)
        feeds[io.inputs[1]] = np.ascontiguousarray(np.broadcast_to(classes.embeddings, shape), np.float32)
    return feeds


def text_feeds(tokenizer: SentenceEncoder | None, texts: list[str]) -> dict[str, np.ndarray]:
    """The text-encoder graph's inputs for ``texts``. Unsupported for a closed detector (``tokenizer`` None)."""
    if tokenizer is None:
        raise Unsupported("this detector has a fixed vocabulary; it takes class names, not class embeddings")
    tokens = tokenizer.tokenize(texts)
    names = graphs.IO[graphs.Role.TEXT_ENCODER].inputs
    return dict(zip(names, (tokens.input_ids, tokens.attention_mask), strict=True))


def decoder_feeds(features: ImageFeatures, prompts: PromptBatch, image_size: int) -> dict[str, np.ndarray]:
    """The decoder graph's inputs for the prompts of one image (``features`` has batch size 1)."""
    return graphs.decoder_feeds(
        features.image_embed,
        features.high_res_feats,
        prompts.point_coords,
        prompts.point_labels,
        image_size,
        prompts.mask_input,
    )
