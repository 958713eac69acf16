"""Runs the pipeline's models on a Triton Inference Server over gRPC (tritonclient aio).

The repository is the one ``detseg export`` writes (``service.models.triton_repo``): roles ``detector``,
``sam2_image_encoder`` and ``sam2_mask_decoder`` (+ ``text_encoder`` and ``visual_prompt_encoder`` for an
open-vocabulary detector, whose class embeddings are then a detector input: a new vocabulary needs no re-export
and no reload); their ``detseg_*`` config parameters give this front end the class names and input sizes, so it
needs no weights of its own (only the tokenizer of the sentence encoder, for texts).

- Deadlines: what is left of the caller's deadline becomes the gRPC deadline of each Triton call. When it
  passes, the call is cancelled: Triton counts it (``nv_inference_request_failure{reason="CANCELED"}``)
  and our python-backend model skips requests that were cancelled while they queued.
- Messages: SAM 2 features are ~17 MB fp32 at 1024² (image_embed 4 MiB, high_res 8 + 4 MiB), far over
  gRPC's 4 MiB default: the channel's limits are ``settings.triton_max_message_bytes`` both ways (Triton's
  own gRPC server has no lower limit). Features come back as numpy views of the response bytes (no copy)
  and go to the decoder unchanged: one serialisation per hop, no conversions.
- Errors: Triton unreachable → ModelUnavailable (UNAVAILABLE, immediately: no wait-for-ready), queue full →
  Overloaded (RESOURCE_EXHAUSTED), deadline / queue timeout → DeadlineExceeded. Anything else is an
  internal error (logged server-side, not shown to callers).
- Reconnects: the channel retries connecting every ≤ 2 s, so a restarted Triton is picked up without
  restarting detseg; ``ready()`` (server + the three models) drives detseg's gRPC health.
"""

from __future__ import annotations

import asyncio
import collections
import logging
from collections.abc import Sequence
from typing import Any

import numpy as np
from opentelemetry import trace

from service.config import Settings
from service.errors import DeadlineExceeded, ModelUnavailable, Overloaded, Unsupported
from service.models.graphs import IO, decoder_outputs, detector_io, read_parameters
from service.models.roles import MODEL_ROLES, ModelDescriptor, Role, graph_roles
from service.models.tensors import (
    ClassPrompts,
    ConceptOutput,
    ConceptSpec,
    DecoderOutput,
    DetectorOutput,
    DetectorSpec,
    ImageFeatures,
    MemoryCorrection,
    PromptBatch,
    SegmenterSpec,
    TextEncoderSpec,
    TrackOutput,
    TrackStep,
)
from service.models.text import SentenceEncoder, load_sentence_encoder
from service.runners.base import time_left
from service.runners.exported import decoder_feeds, detector_feeds, specs, text_feeds, tokenizer_for

_tracer = trace.get_tracer("detseg.runners")


log = logging.getLogger(__name__)


class TritonRunner:
    """A ``Runner`` whose models live on Triton (see module docstring)."""

    backend = "triton"

    def __init__(self, settings: Settings) -> None:
        """Loads the sentence encoder here (it runs in this front end: 7 ms a text on CPU); Triton on ``start``."""
        self._settings = settings
        self._text = load_sentence_encoder(settings.text_encoder)
        self.text_encoder = TextEncoderSpec(dim=self._text.info.dim) if self._text is not None else None
        self.calls: collections.Counter[str] = collections.Counter()
        self._client: Any = None
        self._detector: DetectorSpec | None = None
        self._segmenter: SegmenterSpec | None = None
        self._roles: tuple[Role, ...] = MODEL_ROLES  # + the prompt encoders once an open detector is seen
        self._tokenizer: SentenceEncoder | None = None
        self.models: tuple[ModelDescriptor, ...] = ()
        self.profile = ""
        self._params: dict[Role, dict[str, str]] = {}  # each role's detseg_* parameters, as read by ``start``
        self._replaced = False  # Triton serves other models than ``start`` read (logged once per change)

    @property
    def detector(self) -> DetectorSpec:
        if self._detector is None:
            raise ModelUnavailable("the inference server has not been reached yet")
        return self._detector

    @property
    def segmenter(self) -> SegmenterSpec:
        if self._segmenter is None:
            raise ModelUnavailable("the inference server has not been reached yet")
        return self._segmenter

    def _make_client(self) -> Any:
        import tritonclient.grpc.aio as grpcclient

        limit = self._settings.triton_max_message_bytes
        return grpcclient.InferenceServerClient(
            self._settings.triton_url,
            channel_args=[
                ("grpc.max_send_message_length", limit),
                ("grpc.max_receive_message_length", limit),
                ("grpc.initial_reconnect_backoff_ms", 250),
                ("grpc.min_reconnect_backoff_ms", 250),
                ("grpc.max_reconnect_backoff_ms", 2000),
                ("grpc.keepalive_time_ms", 10_000),
                ("grpc.keepalive_timeout_ms", 5_000),
            ],
        )

    async def start(self) -> None:
        """Waits until Triton and the models are ready (logging while it waits), then reads their metadata: the
        three pipeline graphs, and the two prompt encoders when the detector is open-vocabulary."""
        self._client = self._make_client()
        await self._wait_ready()
        params = {role: await self._parameters(role) for role in MODEL_ROLES}
        detector = params[Role.DETECTOR]
        if int(detector.get("detseg_class_dim", "0")):
            self._roles = graph_roles(True, detector.get("detseg_visual_prompts") == "1")
            await self._wait_ready()
            params.update({role: await self._parameters(role) for role in self._roles if role not in params})
        graphs = read_parameters(params)
        self._tokenizer = tokenizer_for(graphs, self._text)
        self._detector, self._segmenter = specs(graphs)
        self.models = graphs.models + ((self._text.descriptor,) if self._text is not None else ())
        self.profile = graphs.profile
        encoder, decoder = params[Role.SAM2_IMAGE_ENCODER], params[Role.SAM2_MASK_DECODER]
        if encoder.get("detseg_sha256") != decoder.get("detseg_sha256"):
            raise ModelUnavailable("Triton's SAM encoder and decoder come from different checkpoints")
        self._params = params

    async def _wait_ready(self) -> None:
        waited = 0.0
        while not await self.ready():
            if waited % 10 == 0:
                log.warning("waiting for Triton at %s and models %s", self._settings.triton_url, ", ".join(self._roles))
            await asyncio.sleep(0.5)
            waited += 0.5

    async def _parameters(self, role: str) -> dict[str, str]:
        config = (await self._client.get_model_config(role, as_json=True, client_timeout=10))["config"]
        params = {k: v.get("string_value", "") for k, v in config.get("parameters", {}).items()}
        if "detseg_input_size" not in params:
            raise ModelUnavailable(f"Triton model {role!r} was not written by `detseg export` (no detseg_* parameters)")
        return params

    async def ready(self) -> bool:
        """Triton and every model ready, and (once ``start`` has read them) the same models: a Triton restarted with
        other models (their detseg_* parameters differ) is not ready for this server, whose names, provenance and
        cache keys are the first ones' (an ERROR says so, once; serving them needs a restart)."""
        if self._client is None:
            return False
        try:
            if not await self._client.is_server_ready(client_timeout=1.0):
                return False
            for role in self._roles:
                if not await self._client.is_model_ready(role, client_timeout=1.0):
                    return False
            if self._params:
                now = {role: await self._parameters(role) for role in self._params}
                if now != self._params:
                    if not self._replaced:
                        changed = ", ".join(role for role in self._params if now[role] != self._params[role])
                        log.error(
                            "Triton now serves other models (%s) than this server loaded; not serving them: restart "
                            "detseg to serve what Triton has",
                            changed,
                        )
                    self._replaced = True
                    return False
                self._replaced = False
            return True
        except Exception:
            return False

    async def _infer(self, role: str, inputs: dict[str, np.ndarray], outputs: Sequence[str]) -> dict[str, np.ndarray]:
        import tritonclient.grpc as grpcclient
        from tritonclient.utils import InferenceServerException, np_to_triton_dtype

        if self._replaced:  # health said NOT_SERVING; a caller that does not watch it must not get other models
            raise ModelUnavailable("the inference server now serves other models than this server loaded")
        left = time_left()
        if left is not None and left <= 0:
            raise DeadlineExceeded("the request's deadline passed before the models ran")
        self.calls[role] += 1
        infer_inputs = []
        for name, array in inputs.items():
            tensor = grpcclient.InferInput(name, list(array.shape), np_to_triton_dtype(array.dtype))
            tensor.set_data_from_numpy(array)
            infer_inputs.append(tensor)
        rows = int(next(iter(inputs.values())).shape[0]) if inputs else 0
        with _tracer.start_as_current_span(
            f"detseg.triton.{role}", attributes={"triton.model": str(role), "rows": rows}
        ):
            try:
                result = await self._client.infer(
                    role,
                    infer_inputs,
                    outputs=[grpcclient.InferRequestedOutput(n) for n in outputs],
                    client_timeout=left,
                )
            except InferenceServerException as e:
                raise _domain_error(role, e) from None
        return {name: result.as_numpy(name) for name in outputs}

    async def detect(self, images: np.ndarray, classes: ClassPrompts | None = None) -> DetectorOutput:
        """Every call carries its own class embeddings (open vocabulary), so Triton's dynamic batcher may put
        requests with different vocabularies in one batch: each row is scored against its own classes."""
        if (classes is not None) != self.detector.open_vocabulary:
            raise ValueError("class prompts are for open-vocabulary detectors, and they need them")
        outputs = detector_io(classes is not None).outputs
        (raw,) = (await self._infer(Role.DETECTOR, detector_feeds(images, classes), outputs)).values()
        return DetectorOutput(raw=raw)

    async def encode(self, images: np.ndarray) -> ImageFeatures:
        io = IO[Role.SAM2_IMAGE_ENCODER]
        embed, hr0, hr1 = (await self._infer(Role.SAM2_IMAGE_ENCODER, {io.inputs[0]: images}, io.outputs)).values()
        return ImageFeatures(image_embed=embed, high_res_feats=(hr0, hr1))

    async def decode(self, features: ImageFeatures, prompts: PromptBatch) -> DecoderOutput:
        names = decoder_outputs(prompts.multimask)
        feeds = decoder_feeds(features, prompts, self.segmenter.image_size)
        masks, iou = (await self._infer(Role.SAM2_MASK_DECODER, feeds, names)).values()
        return DecoderOutput(low_res_masks=masks, iou_predictions=iou)

    async def embed_classes(self, names: Sequence[str]) -> np.ndarray:
        feeds = text_feeds(self._tokenizer, list(names))
        (embeddings,) = (await self._infer(Role.TEXT_ENCODER, feeds, IO[Role.TEXT_ENCODER].outputs)).values()
        return embeddings

    async def embed_exemplars(self, image: np.ndarray, visuals: np.ndarray) -> np.ndarray:
        if not self.detector.visual_prompts:
            raise Unsupported("exemplars need a detector that takes visual prompts (YOLOE)")
        io = IO[Role.VISUAL_PROMPT_ENCODER]
        feeds = dict(zip(io.inputs, (image, visuals), strict=True))
        (embeddings,) = (await self._infer(Role.VISUAL_PROMPT_ENCODER, feeds, io.outputs)).values()
        return embeddings[0]

    concepts: ConceptSpec | None = None  # SAM 3 runs in-process only (backend torch)

    async def segment_concepts(
        self, images: np.ndarray, texts: Sequence[str], exemplars: Sequence[np.ndarray] = ()
    ) -> ConceptOutput:
        raise Unsupported("the concept segmenter (SAM 3) runs with the torch backend only")

    def track_memory(self) -> object:
        raise Unsupported(
            "video tracking runs SAM 2's memory modules in the server's process and the triton backend has none; "
            "serve with backend torch or openvino"
        )

    async def track(self, features: ImageFeatures, steps: Sequence[TrackStep]) -> TrackOutput:
        self.track_memory()
        raise AssertionError("unreachable")

    async def remember(self, features: ImageFeatures, corrections: Sequence[MemoryCorrection]) -> None:
        self.track_memory()
        raise AssertionError("unreachable")

    async def embed_text(self, texts: Sequence[str]) -> np.ndarray:
        text = self._text
        if text is None:
            raise Unsupported("texts: this server has no text encoder (serve with text_encoder=minilm)")
        self.calls["embed_text"] += 1
        return await asyncio.to_thread(text.encode, texts)

    async def close(self) -> None:
        if self._client is not None:
            await self._client.close()
            self._client = None


def _domain_error(role: str, error: Any) -> Exception:
    """Triton / gRPC failure → the domain error detseg reports (see module docstring)."""
    status = str(error.status() or "")
    message = str(error.message() or "")
    if "Exceeds maximum queue size" in message:
        return Overloaded(f"the inference server's queue for {role} is full; retry with backoff")
    if status.endswith("DEADLINE_EXCEEDED") or "timeout expired" in message.lower():
        return DeadlineExceeded(f"the deadline passed while {role} ran on the inference server")
    if status.endswith(("UNAVAILABLE", "CANCELLED")) or "not ready" in message or "unknown model" in message:
        return ModelUnavailable("the inference server is unavailable; retry shortly")
    if "Stub process" in message and "not healthy" in message:  # a python-backend model's process died: restarting
        return ModelUnavailable(f"the inference server is restarting {role}; retry shortly")
    log.error("Triton %s failed: %s %s", role, status, message)
    return RuntimeError(f"Triton {role} failed: {status}")
