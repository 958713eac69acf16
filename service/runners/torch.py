"""In-process torch execution of the ultralytics detector and the SAM 2 encoder / prompt decoder.

Model calls run on a small thread pool so the gRPC event loop never blocks and the detector and the
SAM image encoder of one request run concurrently. Detector and encoder calls of concurrent requests
are micro-batched (``service.runners.batching``): one forward pass serves several callers. Modules are
used read-only (eval, no grad), and no per-request state lives on them, so concurrent requests are safe
(STYLE 11).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import threading
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import numpy as np
import torch

from service.config import Settings
from service.models import open_vocabulary, sam_memory, sam_ops
from service.models.loading import head_output, load_detector_module, load_segmenter_module
from service.models.profiles import ModelSet
from service.models.roles import ModelDescriptor
from service.models.sam_memory import MemoryTracker
from service.models.tensors import (
    ClassPrompts,
    ConceptOutput,
    ConceptSpec,
    DecoderOutput,
    DetectorSpec,
    ImageFeatures,
    PromptBatch,
    SegmenterSpec,
)
from service.models.text import ClassTexts, class_text_encoder, load_sentence_encoder
from service.runners.batching import BatchPolicy
from service.runners.local import CALLS, Arrays, Call, LocalRunner, descriptor, memory_tracker

log = logging.getLogger(__name__)


class TorchRunner(LocalRunner):
    """Runs a detector and a SAM 2 model in this process with torch."""

    backend = "torch"

    def __init__(
        self,
        detector_module: torch.nn.Module,
        segmenter_module: Any,
        *args: Any,
        device: str,
        class_text: ClassTexts | None,
        concepts: Any = None,
        device_resident: bool | None = None,
        sam_autocast: torch.dtype | None = None,
        tracker: MemoryTracker | None = None,
        **kwargs: Any,
    ) -> None:
        """``device``: where the modules live (``cpu``, ``cuda``, ``cuda:1``); arrays cross to it and back.
        ``class_text``: an open-vocabulary detector's text encoder (None for a closed detector). ``concepts``: a
        ``service.models.sam3.Sam3Concepts`` answering texts (None: texts go to the detector). ``device_resident``:
        keep SAM features and low-res masks on the device (None: on every device but the CPU). ``sam_autocast``: the
        dtype SAM's encoder and decoder autocast to (None: none, fp32)."""
        super().__init__(*args, **kwargs)
        self._class_text = class_text
        self._concepts = concepts
        # One SAM 3 pass at a time: each holds ~4.5 GB of activations at 1008² on top of the model's 3.4 GB.
        self._concept_lock = threading.Lock()
        if concepts is not None:
            concepts.model.to(device)
            self.concepts = ConceptSpec(image_size=concepts.image_size, mask_threshold=concepts.mask_threshold)
        self._device = torch.device(device)
        self._det: Any = detector_module.to(self._device)
        self._sam = segmenter_module.to(self._device)
        # SAM's decoder as this device runs it best (sam_ops.DECODER_POLICIES), float32 image tokens: the torch
        # backend is the exact reference on the CPU (bf16 where autocast asks for it, on GPUs).
        self._decoder = sam_ops.PromptDecoder(self._sam, sam_ops.decoder_policy(device))
        # Video tracking: on the tracker module the profile names, else on SAM itself when its memory path can run.
        self.tracker = tracker or (MemoryTracker(self._sam) if sam_memory.tracks(self._sam) else None)
        # Device-resident SAM (every device but the CPU unless told): features and low-res masks stay on the device
        # between encoder, cache, decoder and mask upsampling; only final masks come back (ImageFeatures).
        self.device_resident = self._device.type != "cpu" if device_resident is None else device_resident
        if self.device_resident:  # SAM's input is pre-processed there too: the image crosses as uint8
            self.segmenter = dataclasses.replace(self.segmenter, input_device=str(self._device))
        self.sam_autocast = sam_autocast
        # On the CPU every call is torch on the host (one thread: ``torch_thread``); on a GPU only the text encoder is.
        self.torch_calls = CALLS if self._device.type == "cpu" else frozenset({Call.EMBED_TEXT})

    def _tensor(self, array: Any) -> torch.Tensor:
        """A numpy array → a tensor on the device; a tensor (device-resident features) passes as it is."""
        if isinstance(array, torch.Tensor):
            return array.to(self._device, non_blocking=True)
        return torch.from_numpy(array).to(self._device, non_blocking=True)

    def _sam_precision(self) -> Any:
        """SAM's encoder and decoder run under sam2's own recipe on GPUs (bfloat16 autocast), else as they are."""
        if self.sam_autocast is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self._device.type, dtype=self.sam_autocast)

    @classmethod
    def load(cls, models: ModelSet, settings: Settings, device_resident: bool | None = None) -> TorchRunner:
        """Loads both models from verified files and sets torch's thread count from Settings. ``device_resident``:
        as the constructor's (tests run the device-resident path on the CPU with True)."""
        if settings.threads > 0:
            torch.set_num_threads(settings.threads)
        loaded = load_detector_module(models.detector.path)
        det: Any = loaded.module
        sam = load_segmenter_module(
            models.segmenter.architecture, models.segmenter.path, models.segmenter.overrides, settings.device
        )
        names = tuple(str(det.names[i]) for i in range(len(det.names)))
        imgsz = loaded.input_size(settings.detector_imgsz)
        text = load_sentence_encoder(settings.text_encoder)
        class_text = None
        if loaded.text_model is not None:  # open vocabulary: class prompts are text features, per request
            from service.models.profiles import text_encoder_weights

            class_text = class_text_encoder(loaded.text_model, text, lambda m: text_encoder_weights(m, settings))
        detector = DetectorSpec(
            names=names,
            imgsz=imgsz,
            stride=int(det.stride.max()),
            class_dim=class_text.dim if class_text else 0,
            visual_prompts=loaded.visual_prompts,
        )
        segmenter = SegmenterSpec(image_size=int(sam.image_size))
        autocast = sam_autocast(settings)
        descriptors: tuple[ModelDescriptor, ...] = (
            descriptor(models.detector, detector.imgsz, names, detector.open_vocabulary),
            dataclasses.replace(
                descriptor(models.segmenter, segmenter.image_size, ()), precision=_precision_name(autocast)
            ),
        )
        if models.tracker is not None:
            descriptors += (descriptor(models.tracker, segmenter.image_size, ()),)
        concepts = None
        if settings.concept_model:
            concepts, concept_descriptor = _load_concepts(settings)
            descriptors += (concept_descriptor,)
        return cls(
            det,
            sam,
            detector,
            segmenter,
            descriptors,
            models.profile,
            batching=BatchPolicy.from_settings(settings),
            text=text,
            device=settings.device,
            class_text=class_text,
            concepts=concepts,
            device_resident=device_resident,
            sam_autocast=autocast,
            tracker=memory_tracker(sam, models.tracker, settings.device),
        )

    def _detect_sync(self, images: np.ndarray, classes: ClassPrompts | None) -> Arrays:
        """A closed detector's forward pass, or an open-vocabulary one's with this call's class embeddings given
        as an input, never set on the shared module (``service.models.open_vocabulary``)."""
        with torch.inference_mode():
            if classes is None:
                raw = head_output(self._det(self._tensor(images)))
            else:
                raw = open_vocabulary.detect(self._det, self._tensor(images), self._tensor(classes.embeddings)[None])
        return (raw.float().cpu().numpy(),)

    def _embed_exemplars_sync(self, image: np.ndarray, visuals: np.ndarray) -> np.ndarray:
        if not self.detector.visual_prompts:
            return super()._embed_exemplars_sync(image, visuals)
        with torch.inference_mode():
            vpe = open_vocabulary.visual_prompt_embeddings(self._det, self._tensor(image), self._tensor(visuals))
        return vpe[0].float().cpu().numpy()

    def _embed_classes_sync(self, names: Sequence[str]) -> np.ndarray:
        """The class-text encoder's features through the detector's text head (YOLOE's ``get_tpe``)."""
        if self._class_text is None:
            return super()._embed_classes_sync(names)
        features = self._tensor(self._class_text.encode(names))
        with torch.inference_mode():
            embeddings = open_vocabulary.class_embeddings_from_text(self._det, features[None])[0]
        return embeddings.float().cpu().numpy()

    def _segment_concepts_sync(
        self, images: np.ndarray, texts: Sequence[str], exemplars: Sequence[np.ndarray]
    ) -> ConceptOutput:
        if self._concepts is None:
            return super()._segment_concepts_sync(images, texts, exemplars)
        with self._concept_lock:
            out = self._concepts.ground(self._tensor(images), texts, [self._tensor(b) for b in exemplars])
        return ConceptOutput(
            boxes=out["pred_boxes"].float().cpu().numpy(),
            logits=out["pred_logits"][..., 0].float().cpu().numpy(),
            presence=out["presence_logit_dec"][:, 0].float().cpu().numpy(),
            mask_logits=out["pred_masks"].float().cpu().numpy(),
        )

    def _encode_sync(self, images: np.ndarray) -> Any:
        """→ (embed, high_res_0, high_res_1): tensors on the device when device-resident, else float32 numpy."""
        with torch.inference_mode(), self._sam_precision():
            features = sam_ops.image_features(self._sam, self._tensor(images))
        if self.device_resident:
            return tuple(f.contiguous() for f in features)
        return tuple(f.contiguous().float().cpu().numpy() for f in features)

    def _decode_sync(self, features: ImageFeatures, prompts: PromptBatch) -> DecoderOutput:
        with torch.inference_mode(), self._sam_precision():
            masks, iou = decode_batch(self._decoder, features, prompts, self._tensor)
        low_res = masks.float() if self.device_resident else masks.float().cpu().numpy()
        return DecoderOutput(low_res_masks=low_res, iou_predictions=iou.float().cpu().numpy())


def decode_batch(
    decoder: sam_ops.PromptDecoder | Any,
    features: ImageFeatures,
    prompts: PromptBatch,
    tensor: Callable[[Any], torch.Tensor],
) -> tuple[torch.Tensor, torch.Tensor]:
    """One image's prompt batch through SAM's decoder → (masks (B, M, S/4, S/4) float32, iou (B, M)) tensors of the
    batch's choice (M = 3 if multimask else 1). ``decoder``: a ``sam_ops.PromptDecoder``, or a SAM 2 module (its exact
    float32 decoder, built for this call: scripts and gates). ``tensor``: how arrays reach the module's device. Call
    under inference mode."""
    if not isinstance(decoder, sam_ops.PromptDecoder):
        decoder = sam_ops.PromptDecoder(decoder)
    hr0, hr1 = (tensor(f) for f in features.high_res_feats)
    mask_input = None if prompts.mask_input is None else tensor(prompts.mask_input)
    coords, labels = tensor(prompts.point_coords), tensor(prompts.point_labels)
    return decoder(tensor(features.image_embed), hr0, hr1, coords, labels, prompts.multimask, mask_input)


def sam_autocast(settings: Settings) -> torch.dtype | None:
    """The dtype SAM autocasts to: bfloat16 on a CUDA device (sam2's own inference recipe; Ampere or newer), unless
    ``precision`` is fp32; None (fp32) on the CPU, where bfloat16 was measured slower without AMX."""
    if settings.precision == "fp32" or not settings.device.startswith("cuda"):
        return None
    return torch.bfloat16


def _precision_name(autocast: torch.dtype | None) -> str:
    """ModelDescriptor.precision of SAM under ``autocast``."""
    return "fp32" if autocast is None else {torch.bfloat16: "bf16-autocast"}.get(autocast, f"{autocast}-autocast")


class LoadedConcepts(NamedTuple):
    model: Any  # sam3.Sam3Concepts
    descriptor: ModelDescriptor


def _load_concepts(settings: Settings) -> LoadedConcepts:
    """SAM 3 for ``settings.concept_model``: "test" = seeded random weights built here; else verified weights."""
    from service.models import sam3
    from service.models.profiles import resolve_concept_weights
    from service.models.roles import ModelRole

    size = settings.concept_imgsz
    if settings.concept_model == "test":
        model = sam3.build(size, seed=0)
        about = ModelDescriptor(ModelRole.CONCEPT_SEGMENTER, "test-sam3", sam3.ARCHITECTURE, "seed-0", "", size)
    else:
        ref = resolve_concept_weights(settings)
        model = sam3.build(size, sam3.load_checkpoint(ref.path))
        about = descriptor(dataclasses.replace(ref, architecture=sam3.ARCHITECTURE), size, ())
    return LoadedConcepts(sam3.Sam3Concepts(model, size), about)
